"""One subprocess smoke test per CLI command: `scailink dev` serves and its printed token registers a
loopback upstream; `token`, `migrate`, `kek generate`, `kek rotate` (resumable re-wrap) and `openapi`."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.upstream import UpstreamServer

SCAILINK = [sys.executable, "-m", "scailink_mcp.cli"]
BASE = "/v1/modules/scailink/remote-servers"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError("condition not met in time")


@contextmanager
def dev_server(data_dir: Path, *args: str, **env: str) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    port = _free_port()
    proc = subprocess.Popen(
        [*SCAILINK, "dev", "--data-dir", str(data_dir), "--port", str(port), *args],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"scailink dev exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                return httpx.get(base + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(healthy, timeout=60)
        token = (data_dir / "dev_admin_token").read_text().strip()
        yield base, token, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dev_serves_and_printed_token_registers_loopback_upstream(tmp_path: Path) -> None:
    with UpstreamServer(required_headers={"authorization": "Bearer up-secret"}) as upstream:
        with dev_server(tmp_path / "data") as (base, token, proc):
            headers = {"Authorization": f"Bearer {token}"}
            assert httpx.get(base + "/readyz", timeout=5).status_code == 200
            body = {
                "name": "local",
                "endpoint_url": upstream.url,
                "auth_type": "bearer",
                "credentials": {"authorization": "up-secret"},
            }
            resp = httpx.post(base + BASE, json=body, headers=headers, timeout=30)
            assert resp.status_code == 201, resp.text
            assert resp.json()["data"]["status"] == "active"
            assert resp.json()["data"]["capabilities"]["tools"]
            server_id = resp.json()["data"]["id"]
        output = proc.stdout.read() if proc.stdout else ""
        # the printed banner: token, URLs and a copy-paste request
        assert token in output and "/healthz" in output and "curl" in output
        assert "up-secret" not in output
        # the data dir holds the SQLite file and dev keys, reused on the next start
        assert (tmp_path / "data" / "scailink.db").exists()
        old_kek = (tmp_path / "data" / "dev_kek").read_text().strip()

        # KEK rotation: re-wrap under a new KEK, then serve with only the new one
        new_kek = subprocess.run(
            [*SCAILINK, "kek", "generate"], env=_env(), capture_output=True, text=True, check=True
        )
        new = new_kek.stdout.strip()
        assert len(base64.b64decode(new)) == 32
        db_url = f"sqlite:///{tmp_path / 'data' / 'scailink.db'}"
        rotate_env = _env(
            SCAILINK_DATABASE_URL=db_url,
            SCAILINK_ENCRYPTION_LOCAL_KEK=new,
            SCAILINK_ENCRYPTION_PREVIOUS_KEKS=old_kek,
        )
        first = subprocess.run(
            [*SCAILINK, "kek", "rotate"], env=rotate_env, capture_output=True, text=True, check=True
        )
        assert json.loads(first.stdout)["rewrapped"] == 1
        again = subprocess.run(
            [*SCAILINK, "kek", "rotate"], env=rotate_env, capture_output=True, text=True, check=True
        )
        assert json.loads(again.stdout)["rewrapped"] == 0
        with dev_server(tmp_path / "data", SCAILINK_ENCRYPTION_LOCAL_KEK=new) as (base, token, _):
            refreshed = httpx.post(
                f"{base}{BASE}/{server_id}/refresh", headers={"Authorization": f"Bearer {token}"}, timeout=30
            )
            # the upstream demands the credential: active means it decrypted under the new KEK
            assert refreshed.json()["data"]["status"] == "active"
            assert refreshed.json()["data"]["last_health_status"] == "ok"


def test_token_migrate_openapi(tmp_path: Path) -> None:
    data = tmp_path / "d"
    token = [*SCAILINK, "token", "--user", "u1", "--tenant", "t1", "--groups", "tenant_user"]
    token += ["--data-dir", str(data)]
    missing = subprocess.run(token, env=_env(), capture_output=True, text=True)
    assert missing.returncode == 2 and "scailink dev" in missing.stderr
    from scailink_mcp.auth import generate_dev_key

    generate_dev_key(data / "dev_signing_key.pem")
    out = subprocess.run(token, env=_env(), capture_output=True, text=True, check=True)
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", out.stdout.strip())
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    subprocess.run(
        [*SCAILINK, "migrate"], env=_env(SCAILINK_DATABASE_URL=db_url), check=True, capture_output=True
    )
    from scailink_mcp.db import Database

    assert Database(db_url).is_migrated()
    spec = subprocess.run([*SCAILINK, "openapi"], env=_env(), capture_output=True, text=True, check=True)
    contract = Path(__file__).resolve().parents[1] / "registry_api" / "openapi.yaml"
    assert spec.stdout == contract.read_text()


@pytest.mark.parametrize("args", [["kek", "rotate"]])
def test_kek_rotate_without_kek_fails_clearly(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run(
        [*SCAILINK, *args], env=_env(SCAILINK_DATA_DIR=str(tmp_path)), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "SCAILINK_ENCRYPTION_LOCAL_KEK" in proc.stderr
