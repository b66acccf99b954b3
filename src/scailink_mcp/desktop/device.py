"""This machine as a ScaiLink device: its id, where that id is kept, and its platform.

Owns: the per-user state dir of each OS, the device id (random, made once per install, kept in the
state dir and remade when unusable), and the `platform` of `session_init`.

Must not: read the environment beyond the mapping it is handed, or know about the connection.
"""

from __future__ import annotations

import os
import platform
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

_DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{8,128}$")


def default_state_dir(system: str, environ: Mapping[str, str], home: Path) -> Path:
    """The per-user config dir for `platform.system()`; `environ` is read only for its location."""
    if system == "Windows" and environ.get("APPDATA"):
        return Path(environ["APPDATA"]) / "ScaiLink"
    if system == "Darwin":
        return home / "Library" / "Application Support" / "ScaiLink"
    xdg = environ.get("XDG_CONFIG_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else home / ".config") / "scailink"


def load_device_id(state_dir: Path) -> str:
    """A random id made once per install and kept in `state_dir/device_id` (remade if unusable)."""
    path = state_dir / "device_id"
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        value = ""
    if _DEVICE_ID.match(value):
        return value
    value = "dev_" + secrets.token_urlsafe(18)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("device_id.tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a crash mid-write leaves the old file or the new one, never half of one
    return value


def platform_info() -> dict[str, str]:
    return {
        "os": platform.system().lower() or "unknown",
        "arch": platform.machine() or "unknown",
        "version": platform.release() or "unknown",
    }
