"""The desktop client's errors; each message is written for the person running `scailink desktop`.

    DesktopClientError
    ├── ConfigError     the config, the server URL or every local server is unusable (exit 2)
    └── FatalClose      ScaiLink refused the device in a way reconnecting cannot fix (exit 1)

Separate from the server's `ScaiLinkError` tree: these never become HTTP answers.
"""

from __future__ import annotations

from scailink_mcp.desktop.protocol import Close

FATAL_CLOSES: dict[int, str] = {
    Close.UNAUTHORIZED: "the token was refused",
    Close.BAD_INIT: "the server refused session_init",
    Close.PROTOCOL: "the server saw a protocol violation",
    Close.TOO_MANY: "too many desktop connections for this user",
    Close.REPLACED: "replaced by a newer connection of this device",
}


class DesktopClientError(Exception):
    pass


class ConfigError(DesktopClientError):
    pass


class FatalClose(DesktopClientError):
    """`code` is the close code (or the HTTP status of a refused upgrade); `reason` is the server's."""

    def __init__(self, code: int, reason: str = "", meaning: str | None = None) -> None:
        meaning = meaning or FATAL_CLOSES.get(code, "the server refused the connection")
        super().__init__(
            f"ScaiLink closed the connection ({code}: {meaning})" + (f": {reason}" if reason else "")
        )
        self.code = code
        self.reason = reason
