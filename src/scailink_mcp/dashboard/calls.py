"""The dashboard's two touch points with the call path, each in one small function:

- `invoke_tool`: what `POST /users/{id}/tools/{name}/invoke` does (resolve in the caller's catalog,
  audit a routing failure, then `Invoker.call`), for the playground.
- `source_of`: where a catalog entry comes from and its consent tier, for the catalog page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scailink_mcp.catalog import NameStyle
from scailink_mcp.errors import ToolNotFound
from scailink_mcp.invocation import Caller
from scailink_mcp.targets import DesktopTarget, Target

if TYPE_CHECKING:
    from scailink_mcp.app import Components
    from scailink_mcp.auth import Principal


@dataclass(frozen=True)
class ToolSource:
    kind: str  # remote | desktop
    owner_id: str  # server id or desktop session id
    owner_label: str  # server name or device name
    consent_tier: str  # auto | confirm | locked | device (the device asks per call)


def source_of(target: Target) -> ToolSource:
    if isinstance(target, DesktopTarget):
        session = target.session
        return ToolSource("desktop", session.session_id, session.device_name, target.consent_tier)
    return ToolSource("remote", target.server.id, target.server.name, target.consent_tier)


async def invoke_tool(
    parts: Components,
    who: Principal,
    name: str,
    style: NameStyle,
    arguments: dict[str, Any],
    *,
    timeout_ms: float | None,
    request_id: str,
) -> dict[str, Any]:
    """Call `name` from the caller's own catalog as the caller. Raises `ScaiLinkError`."""
    view = parts.catalog.view(who, style)
    try:
        target = view.resolve_tool(name)
    except ToolNotFound:  # routing failures are audited too, as on REST and MCP
        parts.invoker.unknown(who, name, request_id)
        raise
    result: dict[str, Any] = await parts.invoker.call(
        who,
        target,
        name,
        arguments,
        timeout=parts.invoker.timeout(timeout_ms),
        caller=Caller(request_id=request_id),
    )
    return result
