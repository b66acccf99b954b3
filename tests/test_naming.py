"""Names: slugs, namespaced names and the `compat` profile (pure functions, table-driven + property)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from scailink_mcp.catalog import paginate, public_uri, split_uri
from scailink_mcp.mcp_tools import _may_name_resources
from scailink_mcp.naming import (
    TOOL_MAX,
    compat_candidate,
    compat_names,
    device_slug,
    namespaced_name,
    remote_namespace,
    slugify,
)
from scailink_mcp.remote.wire import WireResult

COMPAT = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("My Tools!", "my-tools"),
        ("GitHub", "github"),
        ("  ", "server"),
        ("a--b__c", "a-b-c"),
        ("ÜBER tools", "ber-tools"),
    ],
)
def test_slug(name: str, prefix: str) -> None:
    slug = slugify(name, tenant_id="t", owner_user_id="u", server_id="s")
    assert re.fullmatch(rf"{re.escape(prefix)}-[0-9a-f]{{6}}", slug), slug
    assert slug == slugify(name, tenant_id="t", owner_user_id="u", server_id="s")
    assert slug != slugify(name, tenant_id="t", owner_user_id="u", server_id="other")


def test_namespaces() -> None:
    assert (
        remote_namespace(slug="gh-abcdef", owner_user_id="u1", is_tenant_shared=False)
        == "remote.u1.gh-abcdef"
    )
    assert (
        remote_namespace(slug="gh-abcdef", owner_user_id="u1", is_tenant_shared=True)
        == "remote.tenant.gh-abcdef"
    )
    assert (
        namespaced_name("remote.tenant.gh-abcdef", "create_issue") == "remote.tenant.gh-abcdef.create_issue"
    )


def test_resource_uris_round_trip() -> None:
    uri = "file:///notes/readme.md?x=1#frag"
    public = public_uri("remote.u1.s-abcdef", uri)
    assert public.startswith("scailink://remote.u1.s-abcdef/") and "/notes/" not in public
    assert split_uri(public) == ("remote.u1.s-abcdef", uri)
    template = public_uri("ns", "file:///notes/{name}", template=True)
    assert template.endswith("%2Fnotes%2F{name}")
    assert split_uri(template.replace("{name}", "todo.md")) == ("ns", "file:///notes/todo.md")
    assert split_uri("file:///x") is None


LINK = {"type": "resource_link", "uri": "file:///a", "name": "a"}
EMBEDDED = {"type": "resource", "resource": {"uri": "file:///b", "text": "b"}}


@pytest.mark.parametrize(
    ("content", "raw_of", "scanned"),
    [
        ([{"type": "text", "text": "hi"}], json.dumps, False),
        ([{"type": "text", "text": "ü"}], json.dumps, True),  # \u-escaped: the bytes cannot tell
        ([LINK], json.dumps, True),
        ([EMBEDDED], lambda d: json.dumps(d, separators=(",", ":")), True),
        ([LINK], lambda d: json.dumps(d).replace('"resource', '"\\u0072esource'), True),
    ],
)
def test_a_tool_result_skips_the_resource_uri_scan_only_when_its_bytes_name_no_resource(
    content: list[dict[str, Any]], raw_of: Callable[[dict[str, Any]], str], scanned: bool
) -> None:
    """`mcp_tools` calls `resource_uris.tool_result` unless the upstream's own bytes of the result
    (`WireResult.raw`) cannot hold a resource item; a result someone rebuilt (a plain dict) is scanned."""
    result: dict[str, Any] = {"content": content}
    raw = raw_of(result)
    assert json.loads(raw) == result
    assert _may_name_resources(WireResult(result, raw.encode())) is scanned
    assert _may_name_resources(dict(result))


def test_device_slugs_are_short() -> None:
    slug = device_slug("Ada's MacBook Pro (work, 2024)", tenant_id="t", user_id="u", device_id="d")
    assert re.fullmatch(r"ada-s-macbook-[0-9a-f]{6}", slug), slug  # cut at a word boundary
    assert device_slug("x" * 40, tenant_id="t", user_id="u", device_id="d") == "x" * 16 + slug[-7:]
    assert slug != device_slug("Ada's MacBook Pro (work, 2024)", tenant_id="t", user_id="u", device_id="e")
    # the prefix of a desktop tool's compat name: `desktop__u1__ada-s-macbook-xxxxxx__` (35 chars)
    assert len(f"desktop__u1__{slug}__") == 35


def test_compat_plain() -> None:
    assert compat_candidate("remote.u1.gh-abcdef", "echo") == "remote__u1__gh-abcdef__echo"
    assert compat_candidate("remote.u1.gh-abcdef", "a.b") == "remote__u1__gh-abcdef__a__b"


@pytest.mark.parametrize(
    ("namespace", "tool", "kept_prefix"),
    [
        ("remote.tenant." + "x" * 70, "tool", "remote__tenant__xxx"),
        (
            "desktop.user-with-a-long-id-0123456789.ada-s-macbook-1a2b3c",
            "read_multiple_files",
            "desktop__user",
        ),
        ("remote.u1.gh-abcdef", "create_pull_request_review_comment_reply_thread", "remote_"),
    ],
)
def test_compat_long_names_shorten_the_namespace(namespace: str, tool: str, kept_prefix: str) -> None:
    out = compat_candidate(namespace, tool)
    assert COMPAT.match(out) and len(out) == 64, out
    assert out.endswith(f"__{tool}"), "the tool's own name stays whole and last"
    assert out.startswith(kept_prefix)
    cut, _, rest = out.rpartition(f"__{tool}")[0].rpartition("_")
    assert len(rest) == 8 and re.fullmatch("[a-z2-7]{8}", rest), "an 8-char hash replaces what is cut"
    assert namespace.replace(".", "__").startswith(cut)


def test_compat_tool_alone_too_long_is_cut() -> None:
    tool = "t" * 70
    out = compat_candidate("remote.u1.gh-abcdef", tool)
    assert COMPAT.match(out) and len(out) == 64
    assert re.fullmatch(rf"[a-z2-7]{{8}}__t{{{TOOL_MAX}}}", out), out
    # a tool name that just fits keeps every char, with the namespace down to its hash
    fits = "f" * TOOL_MAX
    assert compat_candidate("remote.u1.gh-abcdef", fits).endswith(f"__{fits}")


def test_compat_other_characters() -> None:
    out = compat_candidate("remote.u1.s", "tool/with:colons")
    assert COMPAT.match(out) and out.endswith("__tool_with_colons"), out
    # the hash tells apart names that differ only in characters compat cannot carry
    mapping = compat_names([("remote.u1.s", "a/b"), ("remote.u1.s", "a:b"), ("remote.u1.s", "a_b")])
    assert len(set(mapping.values())) == 3
    assert mapping[("remote.u1.s", "a_b")] == "remote__u1__s__a_b"


def test_compat_collisions_are_resolved() -> None:
    mapping = compat_names([("remote.u.s", "a.b"), ("remote.u.s", "a__b")])
    assert len(set(mapping.values())) == 2
    assert all(COMPAT.match(v) and v.endswith("__a__b") for v in mapping.values())


def test_compat_property_10000_names() -> None:
    rng = random.Random(1234)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_-./:"
    names: set[tuple[str, str]] = set()
    while len(names) < 10_000:
        kind = rng.random()
        owner = rng.choice(["tenant", "u1", f"user-{rng.randint(0, 9)}", "a.very.long.user.id" * 3])
        base = f"remote.{owner}.srv-{rng.randint(0, 20):06x}"
        if kind < 0.3:  # long names that share a 60-char prefix
            tool = "a_very_long_common_prefix_for_generated_tools_" + "".join(
                rng.choices(alphabet, k=rng.randint(1, 40))
            )
        elif kind < 0.6:  # dotted vs double-underscore lookalikes
            stem = "".join(rng.choices("abc", k=3))
            tool = rng.choice([f"{stem}.x", f"{stem}__x"])
        else:
            tool = "".join(rng.choices(alphabet, k=rng.randint(1, 30)))
        names.add((base, tool))
    mapping = compat_names(list(names))
    assert len(mapping) == len(names)
    assert len(set(mapping.values())) == len(names), "one-to-one"
    assert all(COMPAT.match(v) for v in mapping.values())
    for (_, tool), out in mapping.items():
        own = re.sub(r"[^a-zA-Z0-9_-]", "_", tool.replace(".", "__"))
        if len(own) <= TOOL_MAX:
            assert out.endswith(f"__{own}"), (tool, out)
        else:
            assert out.endswith(f"__{own[:TOOL_MAX]}"), (tool, out)
    assert compat_names(list(reversed(sorted(names)))) == mapping, "stable regardless of input order"


def test_pages_stay_small() -> None:
    items = [{"name": f"t{i}", "description": "d" * 2000} for i in range(1000)]
    pages = paginate(items)
    assert pages[0][0] == 0 and pages[-1][1] == 1000
    assert all(end > start for start, end in pages)
    assert sum(end - start for start, end in pages) == 1000
    assert len(pages) > 1
    assert paginate([]) == [(0, 0)]
