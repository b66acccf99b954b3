"""Consent on a desktop device: asking the user before a call runs, and remembering "for this session".

Two kinds of call ask: a desktop tool whose `_meta` says `"scailink/consent": "confirm"`
(`needs_consent`), and a call to a remote server of consent tier `confirm` (`DesktopConsentGate` asks
one of the caller's connected devices). The device answers a `consent_request` notification with a
`consent_response`; denied, dropped or timed out is a denial (`consent_denied`).

Must not: decide who may call what (permissions are checked before consent is asked), or wait past
the caller's timeout.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import anyio

from scailink_mcp.desktop import protocol
from scailink_mcp.desktop.sessions import DesktopSession, Pending
from scailink_mcp.errors import ConsentDenied

if TYPE_CHECKING:
    from scailink_mcp.desktop.connections import DesktopRegistry

CONSENT_META_KEY = "scailink/consent"  # a desktop tool whose `_meta` says "confirm" needs consent per call


async def ask_consent(session: DesktopSession, tool: str, arguments: Any, *, timeout: float) -> bool:
    """`consent_request` to the device; True when approved. Denied, dropped or timed out -> False."""
    if tool in session.approved_for_session:
        return True
    consent_id = uuid.uuid4().hex
    waiter = Pending()
    session.consents[consent_id] = waiter
    try:
        with anyio.move_on_after(timeout):
            if session.send is None:
                return False
            await session.send(
                protocol.notification(
                    protocol.CONSENT_REQUEST,
                    {
                        "consent_id": consent_id,
                        "tool": tool,
                        "arguments": arguments,
                        "expires_ms": int(timeout * 1000),
                    },
                )
            )
            await waiter.done.wait()
    finally:
        session.consents.pop(consent_id, None)
    answer = waiter.result or {}
    approved = answer.get("decision") == "approved"
    if approved and answer.get("remember") == "session":
        session.approved_for_session.add(tool)
    return approved


def consent_answered(session: DesktopSession, response: protocol.ConsentResponse) -> None:
    """The device's `consent_response`; one nobody waits for any more is ignored."""
    waiter = session.consents.get(response.consent_id)
    if waiter is not None:
        waiter.settle(result=response.model_dump())


class DesktopConsentGate:
    """The consent interface for `confirm` remote servers: ask one of the user's connected devices."""

    def __init__(self, registry: DesktopRegistry, timeout_s: float) -> None:
        self.registry = registry
        self.timeout_s = timeout_s

    async def ask(self, principal: Any, public_name: str, arguments: dict[str, Any] | None) -> bool:
        for session in self.registry.sessions_for(principal.tenant_id, principal.user_id):
            if session.online:
                return await self.registry.ask_consent(
                    session, public_name, arguments, timeout=self.timeout_s
                )
        return False


def needs_consent(tool: dict[str, Any]) -> bool:
    meta = tool.get("_meta")
    return isinstance(meta, dict) and meta.get(CONSENT_META_KEY) == "confirm"


def consent_denied() -> ConsentDenied:
    return ConsentDenied("the user denied the invocation, or did not answer in time")
