"""`completion/complete` and `logging/setLevel` of the aggregating `/mcp`, forwarded upstream.

A completion names what it completes: a prompt (by its public, namespaced name) or a resource or
resource template (by its `scailink://` URI). It goes to the upstream that owns that item, with the
upstream's own name or URI, and the upstream's answer comes back unchanged. A desktop item has no
completion frame in the bridge protocol (SPEC section 4): it completes to nothing.

A log level applies to the upstreams the caller uses, that is the remote servers of its catalog:
each is sent the `logging/setLevel` on the caller's own pooled session (an upstream without logging
answers -32601, which is not the caller's failure), and the level is remembered per (server, user) so
a session the pool opens later is set to it too (`Subscriptions.level_for`, applied by the connector).
Log notifications already flow back through the relay.

Must not: decide who may see an item (the caller's scope already did) nor talk to a device.
"""

from __future__ import annotations

import logging

import anyio
import mcp_types as types
from mcp.client.session import ClientSession

from scailink_mcp.auth import Principal
from scailink_mcp.catalog import CatalogView, ServerSnapshot
from scailink_mcp.invocation import Invoker
from scailink_mcp.subscriptions import Subscriptions
from scailink_mcp.targets import RemoteTarget, Target

logger = logging.getLogger(__name__)
NOTHING = types.CompleteResult(completion=types.Completion(values=[]))


def completion_target(
    scope: CatalogView, ref: types.PromptReference | types.ResourceTemplateReference
) -> Target:
    """The item a completion is about; `ToolNotFound` for a name or URI the caller cannot see."""
    if isinstance(ref, types.PromptReference):
        return scope.resolve_prompt(ref.name)
    return scope.resolve_resource(ref.uri)


async def complete(
    invoker: Invoker, principal: Principal, target: Target, params: types.CompleteRequestParams
) -> types.CompleteResult:
    if not isinstance(target, RemoteTarget):
        return NOTHING
    ref: types.PromptReference | types.ResourceTemplateReference = (
        types.PromptReference(name=target.upstream_name)
        if isinstance(params.ref, types.PromptReference)
        else types.ResourceTemplateReference(uri=target.upstream_name)
    )
    request = types.CompleteRequest(params=params.model_copy(update={"ref": ref}))

    async def send(session: ClientSession) -> types.CompleteResult:
        return await session.send_request(request, types.CompleteResult)

    result: types.CompleteResult = await target.use(invoker.backends, principal, send)
    return result


def set_level_request(level: types.LoggingLevel) -> types.SetLevelRequest:
    return types.SetLevelRequest(params=types.SetLevelRequestParams(level=level))


async def set_level(
    invoker: Invoker,
    subscriptions: Subscriptions,
    principal: Principal,
    scope: CatalogView,
    level: types.LoggingLevel,
) -> int:
    """Send the level to every remote server of the caller's catalog at once; how many took it."""
    servers = {
        owner.id: RemoteTarget("tool", "", owner)
        for owner in scope.namespaces.values()
        if isinstance(owner, ServerSnapshot)  # a desktop device has no log level to set
    }
    accepted = 0

    async def one(target: RemoteTarget) -> None:
        nonlocal accepted
        subscriptions.set_level(target.server.id, principal.user_id, level)
        try:
            await target.use(
                invoker.backends,
                principal,
                lambda s: s.send_request(set_level_request(level), types.EmptyResult),
            )
            accepted += 1
        except Exception as exc:  # one upstream's refusal (or absence) is not the caller's error
            logger.debug(
                "setLevel not taken", extra={"server_id": target.server.id, "error": type(exc).__name__}
            )

    async with anyio.create_task_group() as tg:
        for target in servers.values():
            tg.start_soon(one, target)
    return accepted
