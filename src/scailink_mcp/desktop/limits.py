"""How many tools a desktop may register: per session and per (tenant, user) across its sessions.

The registry (`connections.py`) counts the user's other sessions (this replica's and its peers');
`ToolLimits` decides. A catalog over a limit is refused whole with `FrameError` naming the setting,
before anything changes (the bridge closes 4002 on an init, 4003 on a `catalog_update`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scailink_mcp.desktop import protocol

Tools = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ToolLimits:
    """Tools one session may hold, and one (tenant, user) across its sessions (connected or in grace)."""

    per_session: int
    per_user: int

    def check(self, count: int, others: int) -> None:
        """`FrameError` if a session holding `count` tools, beside `others` of the user's, is too many."""
        if count > self.per_session:
            raise protocol.FrameError(
                f"{count} tools in one session (limit ws_max_tools_per_session={self.per_session})"
            )
        if others + count > self.per_user:
            raise protocol.FrameError(
                f"{others + count} tools across this user's sessions "
                f"(limit ws_max_tools_per_user={self.per_user})"
            )

    @staticmethod
    def updated(
        tools: dict[str, dict[str, Any]], update: protocol.CatalogUpdate
    ) -> dict[str, dict[str, Any]]:
        """`tools` after an update's removals, then its additions (a new dict; `tools` is unchanged)."""
        result = dict(tools)
        for name in update.removed:
            result.pop(name, None)
        for tool in update.added:
            result[tool["name"]] = tool
        return result
