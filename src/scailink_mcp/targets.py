"""What a public name resolves to, and how each kind of target is reached.

A `RemoteTarget` is an item of a registered server, reached through the upstream session pool (one
pooled session per (server, credential version, user)). A `DesktopTarget` is an item of a user's
desktop session, reached through the bridge with a `scailink/tool_invoke` (or `resource_read`,
`prompt_get`) frame. The `Invoker` (invocation.py) does what is common to both (permission, consent,
audit, metrics, size caps); each target only knows how to forward. Nothing here branches on the
kind of target: the call path asks the target.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import mcp_types as types
from mcp.client.session import ClientSession
from mcp.shared.dispatcher import ProgressFnT
from mcp_types.methods import is_input_required
from pydantic import BaseModel, ValidationError

from scailink_mcp.desktop.connections import DesktopRegistry, DesktopSession, needs_consent
from scailink_mcp.desktop.protocol import PROMPT_GET, RESOURCE_READ, TOOL_INVOKE
from scailink_mcp.era_reverse import caller_capabilities
from scailink_mcp.errors import UpstreamError
from scailink_mcp.remote.pool import PoolKey, UpstreamPool

if TYPE_CHECKING:
    from scailink_mcp.auth import Principal
    from scailink_mcp.catalog import ServerSnapshot
    from scailink_mcp.era_bridge import EraBridge
    from scailink_mcp.era_pending import EraCall
    from scailink_mcp.relay import Downstream
    from scailink_mcp.remote.oauth import OAuth

Kind = Literal["tool", "prompt", "resource"]
# A result in its wire form (camelCase keys), passed through from the upstream or device unchanged.
Result = dict[str, Any]
# A prompt, or (2026-07-28) the upstream's request for the caller's input first.
PromptResult = types.GetPromptResult | types.InputRequiredResult
ReadResult = types.ReadResourceResult | types.InputRequiredResult
Answer = TypeVar("Answer", bound=BaseModel)


def _validated(raw: Result, model: type[Any], what: str) -> Any:
    """`raw` as `model`, or as the upstream's request for the caller's input first."""
    try:
        return (types.InputRequiredResult if is_input_required(raw) else model).model_validate(raw)
    except ValidationError:
        raise UpstreamError(f"the upstream answered with an invalid {what}") from None


def _from_device(raw: object, model: type[Answer], what: str) -> Answer:
    """A desktop device's answer as `model`; `UpstreamError` when it is not one."""
    try:
        return model.model_validate(raw)
    except ValidationError:
        raise UpstreamError(f"the desktop device answered with an invalid {what}") from None


def prompt_result(raw: Result) -> PromptResult:
    result: PromptResult = _validated(raw, types.GetPromptResult, "prompt")
    return result


def read_result(raw: Result) -> ReadResult:
    result: ReadResult = _validated(raw, types.ReadResourceResult, "resource")
    return result


@dataclass(frozen=True)
class Backends:
    """What targets forward through; built once per app."""

    pool: UpstreamPool
    desktop: DesktopRegistry
    request_timeout_s: float  # resource reads and prompt gets
    oauth: OAuth | None = None  # OAuth upstreams' tokens (SPEC section 12)
    bridge: EraBridge | None = None  # 2026-07-28 callers' remote calls (era_bridge.py)


@dataclass(frozen=True)
class Forwarding:
    """The caller's side of one call that a target may need: progress and the relay of upstream
    server-to-client requests (sampling, elicitation, roots) back to the downstream session."""

    progress: ProgressFnT | None = None
    relay: Downstream | None = None
    # A 2026-07-28 caller's request (era_bridge.py): remote calls then go through the era bridge.
    era: EraCall | None = None


@dataclass(frozen=True)
class ToolCall:
    """One `tools/call` as a target receives it (after permission and consent)."""

    principal: Principal
    arguments: dict[str, Any] | None
    timeout: float
    forwarding: Forwarding


@dataclass(frozen=True)
class RemoteTarget:
    kind: Kind
    upstream_name: str  # tool/prompt name, or resource URI, as the upstream knows it
    server: ServerSnapshot

    source = "remote"
    audit_level: str | None = None  # the tenant default applies

    def pool_key(self, principal: Principal) -> PoolKey:
        return PoolKey(self.server.id, self.server.credential_version, principal.user_id)

    async def key(self, b: Backends, principal: Principal) -> PoolKey:
        """The pool key; for an OAuth upstream with the caller's current token version (from memory
        on a warm call; `UpstreamAuthRequired` when the caller has not authorized)."""
        key = self.pool_key(principal)
        if self.server.auth_type != "oauth2" or b.oauth is None:
            return key
        return replace(key, token_version=await b.oauth.version(self.server.id, principal.user_id))

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "session_id": None, "server_id": self.server.id}

    @property
    def consent_tier(self) -> str:
        return self.server.consent_tier

    async def call(self, b: Backends, call: ToolCall) -> Result:
        key = await self.key(b, call.principal)
        era = call.forwarding.era
        try:
            if era is not None and b.bridge is not None:
                return await b.bridge.call_tool(
                    key,
                    call.principal,
                    self.upstream_name,
                    call.arguments,
                    era,
                    timeout=call.timeout,
                    progress=call.forwarding.progress,
                )
            relay = call.forwarding.relay
            # The caller's capabilities: asked only by an upstream that speaks only 2026-07-28.
            caps = None if b.bridge is None else lambda: caller_capabilities(relay)
            result = await b.pool.call_tool(
                key,
                self.upstream_name,
                call.arguments,
                timeout=call.timeout,
                progress_callback=call.forwarding.progress,
                relay=relay,
                capabilities=caps,
            )
            if b.bridge is not None and is_input_required(result):
                # An upstream's own input_required, asked of the caller (era_reverse.py); the first
                # round is sent here, so a call that asks for nothing never enters the rounds.
                return await b.bridge.reverse.call_tool(
                    key,
                    self.upstream_name,
                    call.arguments,
                    relay,
                    timeout=call.timeout,
                    progress=call.forwarding.progress,
                    first=result,
                )
            return result
        except UpstreamError:
            if key.token_version:  # the token may have been refused since: then the caller must authorize
                await self.key(b, call.principal)
            raise

    async def use(
        self, b: Backends, principal: Principal, fn: Callable[[ClientSession], Awaitable[Any]]
    ) -> Any:
        return await b.pool.use(await self.key(b, principal), fn, timeout=b.request_timeout_s)

    async def read(self, b: Backends, principal: Principal, forwarding: Forwarding) -> ReadResult:
        if b.bridge is not None:
            key, timeout, era = await self.key(b, principal), b.request_timeout_s, forwarding.era
            if era is not None:
                return read_result(
                    await b.bridge.read_resource(key, principal, self.upstream_name, era, timeout=timeout)
                )
            params = {"uri": self.upstream_name}  # an upstream's own input_required asked of the caller
            return read_result(
                await b.bridge.reverse.request(
                    key, "resources/read", params, forwarding.relay, timeout=timeout
                )
            )
        result: types.ReadResourceResult = await self.use(
            b, principal, lambda s: s.read_resource(self.upstream_name)
        )
        return result

    async def get_prompt(
        self, b: Backends, principal: Principal, arguments: dict[str, str] | None, forwarding: Forwarding
    ) -> PromptResult:
        if b.bridge is not None:
            key, timeout, era = await self.key(b, principal), b.request_timeout_s, forwarding.era
            if era is not None:
                raw = await b.bridge.get_prompt(
                    key, principal, self.upstream_name, arguments, era, timeout=timeout
                )
                return prompt_result(raw)
            params: Result = {"name": self.upstream_name}  # its own input_required asked of the caller
            if arguments is not None:
                params["arguments"] = arguments
            return prompt_result(
                await b.bridge.reverse.request(key, "prompts/get", params, forwarding.relay, timeout=timeout)
            )
        result: types.GetPromptResult = await self.use(
            b, principal, lambda s: s.get_prompt(self.upstream_name, arguments)
        )
        return result


@dataclass(frozen=True)
class DesktopTarget:
    kind: Kind
    upstream_name: str  # the device's own name (or resource URI)
    session: DesktopSession

    source = "desktop"

    @property
    def audit_level(self) -> str:
        return self.session.audit_detail_level

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "session_id": self.session.session_id, "server_id": None}

    @property
    def consent_tier(self) -> str:
        """A desktop tool asks per call when its `_meta["scailink/consent"]` is "confirm"."""
        tool = self.session.tools.get(self.upstream_name, {})
        return "device" if needs_consent(tool) else "auto"

    async def call(self, b: Backends, call: ToolCall) -> Result:
        params = {
            "tool": self.upstream_name,
            "arguments": call.arguments or {},
            "caller": {"user_id": call.principal.user_id},
        }
        raw = await b.desktop.invoke(
            self.session, TOOL_INVOKE, params, timeout=call.timeout, progress=call.forwarding.progress
        )
        result = _from_device(raw, types.CallToolResult, "tool result")
        dumped: Result = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        return dumped

    async def read(self, b: Backends, principal: Principal, forwarding: Forwarding) -> ReadResult:
        params = {"uri": self.upstream_name}
        raw = await b.desktop.invoke(self.session, RESOURCE_READ, params, timeout=b.request_timeout_s)
        return _from_device(raw, types.ReadResourceResult, "resource")

    async def get_prompt(
        self, b: Backends, principal: Principal, arguments: dict[str, str] | None, forwarding: Forwarding
    ) -> PromptResult:
        params = {"name": self.upstream_name, "arguments": arguments}
        raw = await b.desktop.invoke(self.session, PROMPT_GET, params, timeout=b.request_timeout_s)
        return _from_device(raw, types.GetPromptResult, "prompt")


Target = RemoteTarget | DesktopTarget
