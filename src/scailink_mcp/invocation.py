"""The one call path: MCP `tools/call` (both endpoints, both eras), REST invoke and the dashboard.

    Invoker.call(principal, target, public_name, arguments, timeout=..., caller=...)
      -> permission (`scailink:invoke`) -> consent (tier or device) -> target.call(...)  [targets.py]
      -> size cap -> metrics + one audit event (what the caller got)

Protocol-neutral: whatever the caller's protocol can offer (progress, a relay for upstream
server-to-client requests, MCP elicitation for consent) arrives in a `Caller`. Failures are raised as
`ScaiLinkError`s; each surface renders them its own way (errors.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from scailink_mcp import auth
from scailink_mcp.audit import AuditLog, AuditRecord
from scailink_mcp.auth import Principal
from scailink_mcp.config import Settings
from scailink_mcp.desktop.connections import consent_denied
from scailink_mcp.errors import ConsentDenied, Forbidden, ResultTooLarge, ScaiLinkError, ToolNotFound
from scailink_mcp.metrics import Metrics
from scailink_mcp.remote.wire import WireResult
from scailink_mcp.targets import (
    Backends,
    DesktopTarget,
    Forwarding,
    PromptResult,
    ReadResult,
    Result,
    Target,
    ToolCall,
)


class ConsentGate(Protocol):
    """Asks the user to approve one invocation of a `confirm` tool (the desktop bridge implements it)."""

    async def ask(self, principal: Principal, public_name: str, arguments: dict[str, Any] | None) -> bool: ...


@dataclass(frozen=True)
class Caller:
    """What the calling surface offers for one call."""

    request_id: str | None = None
    forwarding: Forwarding = field(default_factory=Forwarding)
    # MCP elicitation, when the calling client declares it: asks "allow?" and answers True to accept.
    elicit: Callable[[str], Awaitable[bool]] | None = None


def _text_size(item: Any) -> int:
    if not isinstance(item, dict):
        return 0
    return sum(len(v) for f in ("text", "data", "blob") if isinstance(v := item.get(f), str))


def result_size(result: Result) -> int:
    """The result's wire size: exact for an upstream's bytes (`WireResult`); otherwise a cheap
    estimate (text and base64 payloads dominate it)."""
    if isinstance(result, WireResult):
        return len(result.raw)
    size = 0
    content = result.get("content")
    for block in content if isinstance(content, list) else ():
        size += _text_size(block)
        if isinstance(block, dict):
            size += _text_size(block.get("resource"))
    structured = result.get("structuredContent")
    if structured is not None:
        size += len(json.dumps(structured))
    return size


class Invoker:
    def __init__(
        self,
        settings: Settings,
        backends: Backends,
        consent: ConsentGate,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.backends = backends
        self.consent = consent
        self.metrics = metrics
        self.audit = audit

    def timeout(self, requested_ms: object = None) -> float:
        """Default `call_timeout_s`; a caller may ask for another (ms), capped at `call_timeout_max_s`."""
        seconds = self.settings.call_timeout_s
        if isinstance(requested_ms, int | float) and not isinstance(requested_ms, bool) and requested_ms > 0:
            seconds = requested_ms / 1000
        return min(seconds, self.settings.call_timeout_max_s)

    async def call(
        self,
        principal: Principal,
        target: Target,
        public: str,
        arguments: dict[str, Any] | None,
        *,
        timeout: float,
        caller: Caller,
    ) -> Result:
        """Permission, consent, forward, size cap; metrics and one audit event. Raises ScaiLinkError."""
        started = time.perf_counter()
        outcome, code = "error", None
        try:
            principal.require(auth.INVOKE)
            await self._approve(principal, target, public, arguments, caller)
            call = ToolCall(principal, arguments, timeout, caller.forwarding)
            result = await target.call(self.backends, call)
            if result_size(result) > self.settings.max_result_bytes:
                raise ResultTooLarge(f"tool result over {self.settings.max_result_bytes} bytes refused")
            outcome = "tool_error" if result.get("isError") is True else "ok"
            return result
        except ScaiLinkError as err:
            outcome, code = ("denied" if isinstance(err, Forbidden | ConsentDenied) else "error"), err.code
            raise
        finally:
            elapsed = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.call(target.source, outcome, elapsed)
            self.record(
                principal,
                "tool_call",
                "error" if outcome == "tool_error" else outcome,
                code=code,
                elapsed_s=elapsed,
                request_id=caller.request_id,
                target=public,
                arguments=arguments,
                level=target.audit_level,
            )

    def unknown(self, principal: Principal, public: str, request_id: str | None) -> None:
        """A routing failure (unknown name, hidden server, no device) is audited like a call."""
        self.record(
            principal, "tool_call", "error", code=ToolNotFound.code, request_id=request_id, target=public
        )

    async def read(self, principal: Principal, target: Target, forwarding: Forwarding) -> ReadResult:
        return await target.read(self.backends, principal, forwarding)

    async def get_prompt(
        self, principal: Principal, target: Target, arguments: dict[str, str] | None, forwarding: Forwarding
    ) -> PromptResult:
        return await target.get_prompt(self.backends, principal, arguments, forwarding)

    async def _approve(
        self, principal: Principal, target: Target, public: str, args: dict[str, Any] | None, caller: Caller
    ) -> None:
        """`locked` is never callable; `confirm` (or a device tool that asks) needs approval per call:
        through the device that holds the tool, else MCP elicitation, else the user's desktop."""
        tier = target.consent_tier
        if tier == "locked":
            raise ToolNotFound(f"unknown tool {public!r}")
        if tier not in ("confirm", "device"):
            return
        approved = False
        with anyio.move_on_after(self.settings.consent_timeout_s):
            if isinstance(target, DesktopTarget):
                approved = await self.backends.desktop.ask_consent(
                    target.session, target.upstream_name, args, timeout=self.settings.consent_timeout_s
                )
            elif caller.elicit is not None:
                approved = await caller.elicit(f"Allow the call of {public}?")
            else:
                approved = await self.consent.ask(principal, public, args)
        self.record(principal, "consent", "ok" if approved else "denied", target=public)
        if not approved:
            raise consent_denied()

    def record(
        self,
        principal: Principal,
        event: str,
        outcome: str,
        *,
        code: str | None = None,
        elapsed_s: float | None = None,
        request_id: str | None = None,
        target: str | None = None,
        arguments: Any = None,
        level: str | None = None,
    ) -> None:
        """One audit event; never blocks nor fails the caller."""
        if self.audit is None:
            return
        self.audit.record(
            AuditRecord(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                event=event,
                outcome=outcome,
                error_code=code,
                duration_ms=elapsed_s * 1000 if elapsed_s is not None else None,
                request_id=request_id,
                target=target,
                arguments=arguments,
                detail_level=level or self.settings.audit_detail_level,
            )
        )


class DenyingConsentGate:
    """Until a desktop session can be asked, `confirm` tools are denied (unless MCP elicitation is used)."""

    async def ask(self, principal: Principal, public_name: str, arguments: dict[str, Any] | None) -> bool:
        return False
