"""The bytes the `/mcp` front forwards (issue 14): the `result` member cut out of an upstream's answer
(`remote/wire.result_bytes`), the envelope around it, and the 2026-07-28 additions spliced in
(`front_answer.modern_result`). Pure functions: every case is checked against `json.loads`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from scailink_mcp.front_answer import Reply, envelope, error_envelope, modern_result, sse_frame
from scailink_mcp.remote.wire import result_bytes

RESULT = '{"content":[{"type":"text","text":"a \\"quoted\\" }"}],"x-new":{"n":123456789012345678901234}}'
STAMP = {"name": "scailink", "version": "1"}
KEY = "io.modelcontextprotocol/serverInfo"


@pytest.mark.parametrize(
    "answer",
    [
        '{"jsonrpc":"2.0","id":"scailink-7","result":' + RESULT + "}",  # the Python SDK's layout
        '{"result":' + RESULT + ',"jsonrpc":"2.0","id":"scailink-7"}',  # the TypeScript SDK's layout
    ],
)
def test_the_result_is_cut_out_as_the_upstream_wrote_it(answer: str) -> None:
    data = answer.encode()
    assert result_bytes(data, json.loads(data), "scailink-7") == RESULT.encode()


@pytest.mark.parametrize(
    "answer",
    [
        '{"jsonrpc": "2.0", "id": "scailink-7", "result": ' + RESULT + "}",  # whitespace
        '{"id":"scailink-7","jsonrpc":"2.0","result":' + RESULT + "}",  # another order
        '{"jsonrpc":"2.0","id":"scailink-7","result":' + RESULT + ',"extra":1}',  # another member
        '{"jsonrpc":"2.0","id":"scailink-7","result":\n' + RESULT + "}",  # a line break
    ],
)
def test_other_layouts_are_reserialized_with_every_field(answer: str) -> None:
    data = answer.encode()
    raw = result_bytes(data, json.loads(data), "scailink-7")
    assert b"\n" not in raw and json.loads(raw) == json.loads(RESULT)


def test_the_envelope_carries_the_callers_id_and_the_bytes() -> None:
    for request_id in (1, "a-string", 2**40):
        message = json.loads(envelope(request_id, RESULT.encode()))
        assert message == {"jsonrpc": "2.0", "id": request_id, "result": json.loads(RESULT)}
    failed = json.loads(error_envelope("x", -32800, "Request cancelled"))
    assert failed == {"jsonrpc": "2.0", "id": "x", "error": {"code": -32800, "message": "Request cancelled"}}
    assert sse_frame(b"{}") == b"event: message\r\ndata: {}\r\n\r\n"


@pytest.mark.parametrize(
    ("result", "expected_meta"),
    [
        ({"content": []}, {KEY: STAMP}),
        ({}, {KEY: STAMP}),
        ({"content": [], "_meta": {"vendor/x": 1}}, {"vendor/x": 1, KEY: STAMP}),
        ({"content": [], "_meta": {KEY: {"name": "upstream"}}}, {KEY: {"name": "upstream"}}),
        ({"content": [], "resultType": "complete"}, {KEY: STAMP}),
    ],
)
def test_a_2026_result_gets_what_the_sdk_adds(result: dict[str, Any], expected_meta: dict[str, Any]) -> None:
    raw = json.dumps(result, separators=(",", ":")).encode()
    stamped = json.loads(modern_result(Reply(raw, result.keys()), STAMP))
    assert stamped.pop("resultType") == "complete"
    assert stamped.pop("_meta") == expected_meta
    assert stamped == {k: v for k, v in result.items() if k not in ("_meta", "resultType")}
