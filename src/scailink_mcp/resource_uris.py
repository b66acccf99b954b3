"""Resource URIs an agent receives through `/mcp`, rewritten so each can be read back there.

An upstream (or device) speaks of its resources by its own URIs; through the aggregating endpoint
every resource is `scailink://{namespace}/{percent-encoded uri}` (SPEC section 5). So a
`resources/read` answer carries the URI that was asked (and any other URI it contains, under the same
namespace), and a tool result's `resource_link` items and embedded resources get public URIs too.
The per-server endpoint keeps upstream URIs and never calls this.

Pure functions over wire-form dicts and SDK models; nothing else in a result is touched.
"""

from __future__ import annotations

from typing import Any

import mcp_types as types

from scailink_mcp.catalog import public_uri
from scailink_mcp.targets import RemoteTarget, Result, Target


def namespace_of(target: Target) -> str:
    return target.server.namespace if isinstance(target, RemoteTarget) else target.session.namespace


def read_result(result: types.ReadResourceResult, target: Target, asked: str) -> types.ReadResourceResult:
    """Each content's URI as the agent can read it back: the asked URI for the resource asked."""
    namespace = namespace_of(target)
    contents = [
        item.model_copy(
            update={
                "uri": asked
                if str(item.uri) == target.upstream_name
                else public_uri(namespace, str(item.uri))
            }
        )
        for item in result.contents
    ]
    return result.model_copy(update={"contents": contents})


def _block(block: Any, namespace: str) -> Any:
    if not isinstance(block, dict):
        return block
    if block.get("type") == "resource_link" and isinstance(block.get("uri"), str):
        return {**block, "uri": public_uri(namespace, block["uri"])}
    resource = block.get("resource")
    if (
        block.get("type") == "resource"
        and isinstance(resource, dict)
        and isinstance(resource.get("uri"), str)
    ):
        return {**block, "resource": {**resource, "uri": public_uri(namespace, resource["uri"])}}
    return block


def tool_result(result: Result, target: Target) -> Result:
    """`resource_link` and embedded `resource` items of a tool result under public URIs."""
    content = result.get("content")
    if not isinstance(content, list) or not any(
        isinstance(b, dict) and b.get("type") in ("resource_link", "resource") for b in content
    ):
        return result  # the common case: nothing to copy
    namespace = namespace_of(target)
    return {**result, "content": [_block(block, namespace) for block in content]}
