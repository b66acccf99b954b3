"""No container engine runs on this machine: the Dockerfile is checked by parsing it."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            lines.append((keyword.upper(), rest))
            pending = ""
    return lines


def test_dockerfile_shape() -> None:
    steps = instructions()
    keywords = [k for k, _ in steps]
    assert all(
        k in {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "EXPOSE", "HEALTHCHECK", "CMD"}
        for k in keywords
    )
    froms = [rest for k, rest in steps if k == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    users = [rest for k, rest in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    assert keywords.index("USER") < keywords.index("CMD")
    health = next(rest for k, rest in steps if k == "HEALTHCHECK")
    assert "/healthz" in health
    assert steps[-1] == ("CMD", '["scailink", "serve"]')
