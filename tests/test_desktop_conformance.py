"""The desktop protocol scenarios (`python -m conformance.desktop`) pass against ScaiLink."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conformance.desktop.__main__ import SCENARIOS, run
from scailink_mcp.config import Settings
from tests.conftest import LiveApp, TokenFactory

pytestmark = pytest.mark.anyio


async def test_every_scenario_passes(
    settings_factory: Callable[..., Settings], token: TokenFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(SCENARIOS) >= 15
    with LiveApp(settings_factory(ws_heartbeat_interval_ms=500)) as live:
        url = live.base_url.replace("http://", "ws://") + "/v1/scailink/ws"
        status = await run(url, token("conformance-user", "t1", ("tenant_user",)), 1.0, None)
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"{len(SCENARIOS)} passed, 0 failed" in out
