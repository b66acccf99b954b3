"""Desktop WebSockets are served without permessage-deflate unless configured (issue 14): its zlib
state per connection was ~50 KiB of the ~88 KiB an idle desktop session cost (bench/README.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scailink_mcp.config import Settings
from tests.conftest import LiveApp, TokenFactory
from tests.test_desktop_bridge import device

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("deflate", [False, True])
async def test_permessage_deflate_only_when_configured(
    settings_factory: Callable[..., Settings], token: TokenFactory, deflate: bool
) -> None:
    overrides = {"ws_per_message_deflate": True} if deflate else {}
    with LiveApp(settings_factory(**overrides)) as live:
        async with device(live, token("u1", "t1", ("tenant_user",))) as (ws, ack):
            assert ack["session_id"]
            assert ws.response is not None
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions") or ""
            # the client (websockets) offers permessage-deflate by default; the server accepts it only if told
            assert ("permessage-deflate" in extensions) is deflate, extensions
