"""The served OpenAPI document equals the published contract in `registry_api/openapi.yaml`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import AppHarness

pytestmark = pytest.mark.anyio

CONTRACT = Path(__file__).resolve().parents[1] / "registry_api" / "openapi.yaml"


async def test_served_openapi_equals_file(harness: AppHarness) -> None:
    resp = await harness.client.get("/v1/modules/scailink/openapi.json")
    assert resp.status_code == 200
    published = yaml.safe_load(CONTRACT.read_text())
    assert resp.json() == published, "regenerate with `scailink openapi --out registry_api/openapi.yaml`"


def test_contract_covers_every_registry_route() -> None:
    from scailink_mcp.api.remote_servers import routes

    paths = yaml.safe_load(CONTRACT.read_text())["paths"]
    for route in routes:
        methods = {m.lower() for m in (route.methods or set())} - {"head"}
        assert route.path in paths, route.path
        assert methods <= set(paths[route.path]), (route.path, methods)
