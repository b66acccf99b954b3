"""Credential rotation through `Registry` (remote/credentials.py): one path for setting and deleting a
field. A refused change leaves the row and the credential version alone and publishes nothing; an
accepted one re-seals (or removes) the field, bumps the version once and publishes once."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from sqlmodel import Session, select

from scailink_mcp import auth
from scailink_mcp.auth import Principal
from scailink_mcp.errors import Forbidden, NotFound, ValidationFailed
from scailink_mcp.events import ServerEvent
from scailink_mcp.models import Credential, RemoteServer
from scailink_mcp.remote.schemas import RegisterServer
from tests.conftest import AppHarness

pytestmark = pytest.mark.anyio

OWNER = Principal(
    user_id="u1",
    tenant_id="t1",
    permissions=frozenset({auth.REMOTE_USE, auth.REMOTE_MANAGE_OWN}),
)


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    with socket.socket() as sock:  # bound, never listening: discovery fails at once
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


async def _register(harness: AppHarness, url: str) -> str:
    body = RegisterServer.model_validate_json(
        json.dumps(
            {
                "name": "keyed",
                "endpoint_url": url,
                "auth_type": "api_key_header",
                "credentials": {"x-api-key": "first"},
            }
        )
    )
    return (await harness.parts.registry.register(OWNER, body)).id


async def _state(harness: AppHarness, server_id: str) -> tuple[int, dict[str, bytes]]:
    def read(session: Session) -> tuple[int, dict[str, bytes]]:
        server = session.get(RemoteServer, server_id)
        assert server is not None
        rows = session.exec(select(Credential).where(Credential.server_id == server_id)).all()
        return server.credential_version, {row.field: row.ciphertext for row in rows}

    return await harness.parts.db.run(read)


async def test_refused_changes_change_nothing(harness: AppHarness, closed_port_url: str) -> None:
    registry = harness.parts.registry
    sid = await _register(harness, closed_port_url)
    events: list[ServerEvent] = []
    harness.parts.events.subscribe(events.append, ServerEvent)
    before = await _state(harness, sid)
    with pytest.raises(ValidationFailed):
        await registry.put_credential(OWNER, sid, "Not A Header", "v")
    with pytest.raises(NotFound, match="credential field not found"):
        await registry.delete_credential(OWNER, sid, "x-other")
    with pytest.raises(NotFound, match="remote server not found"):
        await registry.put_credential(OWNER, "no-such-server", "x-api-key", "v")
    stranger = Principal(user_id="u2", tenant_id="t1", permissions=OWNER.permissions)
    with pytest.raises(NotFound):
        await registry.delete_credential(stranger, sid, "x-api-key")
    reader = Principal(user_id="u1", tenant_id="t1", permissions=frozenset({auth.REMOTE_USE}))
    with pytest.raises(Forbidden):
        await registry.put_credential(reader, sid, "x-api-key", "v")
    assert await _state(harness, sid) == before
    assert events == []


async def test_accepted_changes_bump_the_version_once_and_publish_once(
    harness: AppHarness, closed_port_url: str
) -> None:
    registry = harness.parts.registry
    sid = await _register(harness, closed_port_url)
    events: list[str] = []
    harness.parts.events.subscribe(lambda e: events.append(e.kind.value), ServerEvent)
    version, sealed = await _state(harness, sid)

    detail = await registry.put_credential(OWNER, sid, "x-api-key", "second")  # re-seals the row
    assert detail.credential_fields == ["x-api-key"]
    rotated_version, rotated = await _state(harness, sid)
    assert rotated_version == version + 1 and rotated["x-api-key"] != sealed["x-api-key"]
    target = await harness.parts.db.run(lambda s: registry.target_by_id(s, sid))
    assert target is not None and target.headers["x-api-key"] == "second"

    await registry.put_credential(OWNER, sid, "x-extra", "third")  # a new row
    await registry.delete_credential(OWNER, sid, "x-api-key")
    final_version, final = await _state(harness, sid)
    assert final_version == version + 3 and set(final) == {"x-extra"}
    assert events == ["credentials_changed"] * 3
