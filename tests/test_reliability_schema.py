"""Reliability suite, part 1: schemathesis over the served OpenAPI contract (issue 11).

A real ScaiLink (uvicorn on 127.0.0.1, a SQLite file, a KEK so the registry is enabled) with real
servers registered against a real upstream MCP server; schemathesis loads the contract from
`/v1/modules/scailink/openapi.json` and sends generated requests (its examples, coverage and fuzzing
phases through `@schema.parametrize()`, then its stateful phase, which chains a registration's id
into the other operations through the contract's links), authenticated as a `tenant_admin`.

Every response must pass every schemathesis check: no 5xx, the status documented, the body and
headers conforming to the documented schema, `Allow` on a 405, invalid data rejected, valid data
accepted. The one thing a schema cannot state is what depends on stored state or on the network, so
a positive case may get a 422 only when its `details` say exactly that (`_positive_data_acceptance`).

The network stays on this machine: generated `endpoint_url`s name arbitrary hosts, so the resolver
answers only `localhost` and IP literals, and outbound connections reach only loopback addresses
(`offline_network`); nothing else is patched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import httpcore2
import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from pydantic import SecretStr
from schemathesis import Case, CheckContext, HookContext, Response
from schemathesis.checks import CheckFunction
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance

from scailink_mcp.auth import public_pem_from_private
from scailink_mcp.config import Settings
from scailink_mcp.crypto import generate_kek
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.upstream import UpstreamServer

BASE = "/v1/modules/scailink"
SERVERS = f"{BASE}/remote-servers"
# Fuzzing examples per operation; the coverage phase adds its own deterministic cases on top.
FUZZ_EXAMPLES = 220
STATEFUL_SCENARIOS = 40
STATEFUL_STEPS = 300
STATEFUL_RUNS = 6
MIN_CASES = 2000
# Servers registered only to be deleted by generated `DELETE /remote-servers/{id}` cases.
DOOMED = 10
CASES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def offline_network() -> Iterator[None]:
    """The test's network edge: names other than `localhost` do not resolve (no DNS query leaves the
    machine) and only loopback addresses can be connected to (an IP-literal endpoint that the SSRF
    policy allows, i.e. a global one, is refused here rather than contacted)."""
    real_getaddrinfo = anyio.getaddrinfo

    async def getaddrinfo(host: bytes | str, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.lower() == "localhost":
            name = "127.0.0.1"
        try:
            ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "offline test resolver: unknown name") from None
        return await real_getaddrinfo(name, port, *args, **kwargs)

    real_connect = httpcore2.AnyIOBackend.connect_tcp

    async def connect_tcp(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if not ipaddress.ip_address(host).is_loopback:
            raise httpcore2.ConnectError("offline test network: only loopback addresses")
        return await real_connect(self, host, port, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(anyio, "getaddrinfo", getaddrinfo)
        patch.setattr(httpcore2.AnyIOBackend, "connect_tcp", connect_tcp)
        yield


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    dev_key: Path, tmp_path_factory: pytest.TempPathFactory, offline_network: None, upstream: UpstreamServer
) -> Iterator[LiveApp]:
    """One gateway for the whole module: every operation's cases see what the others left behind."""
    data_dir = tmp_path_factory.mktemp("reliability")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'scailink.db'}",
        jwt_public_key=public_pem_from_private(dev_key),
        encryption_local_kek=SecretStr(generate_kek()),
        allowed_private_networks=["127.0.0.0/8", "::1/128"],
        background_tasks=False,
        discovery_timeout_s=5.0,
        health_timeout_s=3.0,
        # Schemathesis sends far more than one user's budget; the limiter has its own tests.
        rate_limit_per_s=0,
        # Registrations keep creating servers (the cap and its 429 have their own tests).
        max_servers_per_tenant=10_000,
    )
    with LiveApp(settings) as app:
        yield app


def _register(app: LiveApp, tok: str, name: str, **body: Any) -> str:
    resp = httpx.post(
        app.base_url + SERVERS, json={"name": name, **body}, headers=auth_headers(tok), timeout=30
    )
    assert resp.status_code == 201, resp.text
    data = resp.json()["data"]
    assert data["status"] == "active", data  # real discovery against the real upstream
    return str(data["id"])


# The published contract, loaded once at collection (`@schema.parametrize()` needs it then);
# `served` checks that the running app serves exactly this document.
CONTRACT = Path(__file__).resolve().parents[1] / "registry_api" / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(
    CONTRACT,
    config=schemathesis.Config.from_dict(
        {
            # Auth is the test's own header (a tenant_admin token), never a generated one; the
            # `ignored_auth` check still sends each operation without it and with a bad one.
            "generation": {
                "max-examples": FUZZ_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "with-security-parameters": False,
            },
            "checks": {
                # 413 (a generated body over the registry's 64 KiB) is a rejection too.
                "negative_data_rejection": {
                    "expected-statuses": ["400", "401", "403", "404", "405", "409", "413", "422", "429"]
                },
            },
        }
    ),
)


class Served:
    """What the generated requests need at run time: where, as whom, and which servers exist."""

    def __init__(self) -> None:
        self.base_url = ""
        self.headers: dict[str, str] = {}
        self.seeded: list[str] = []  # real servers the cases address (never deleted)
        self.doomed: list[str] = []  # real servers only `DELETE /remote-servers/{id}` addresses


SERVED = Served()


@SCHEMA.hook
def flatmap_path_parameters(context: HookContext, path_parameters: dict[str, Any]) -> Any:
    """Most cases address a real server; the rest keep their generated id (answered 404)."""
    if not path_parameters or "server_id" not in path_parameters or not SERVED.seeded:
        return st.just(path_parameters)
    operation = context.operation
    doomed = operation is not None and operation.method.lower() == "delete" and "field" not in operation.path
    ids = SERVED.doomed if doomed else SERVED.seeded
    real = st.sampled_from(ids).map(lambda server_id: {**path_parameters, "server_id": server_id})
    return st.one_of(real, real, st.just(path_parameters))


@pytest.fixture(scope="module")
def served(gateway: LiveApp, upstream: UpstreamServer, token: TokenFactory) -> Iterator[Served]:
    contract = httpx.get(gateway.base_url + BASE + "/openapi.json", timeout=10)
    assert contract.json() == yaml.safe_load(CONTRACT.read_text()), "the app serves another contract"
    tok = token("admin", "t1", ("tenant_admin",))
    SERVED.base_url = gateway.base_url
    SERVED.headers = auth_headers(tok)
    SERVED.seeded = [
        _register(
            gateway, tok, "seed-bearer", endpoint_url=upstream.url, auth_type="bearer",
            credentials={"authorization": "seed-token"},
        ),
        _register(
            gateway, tok, "seed-api-key", endpoint_url=upstream.sse_url, transport="sse",
            auth_type="api_key_header", credentials={"x-api-key": "seed-key"}, is_tenant_shared=True,
        ),
    ]  # fmt: skip
    SERVED.doomed = [_register(gateway, tok, f"doomed-{i}", endpoint_url=upstream.url) for i in range(DOOMED)]
    try:
        yield SERVED
    finally:
        SERVED.__init__()  # type: ignore[misc]


def _explained_422(case: Case, response: Response) -> bool:
    """A 422 that no schema could have predicted: the contract documents each of these."""
    body = response.json()
    error = body["error"]
    operation = case.operation.definition.raw.get("operationId")
    if error["code"] == "SCAILINK_ENDPOINT_FORBIDDEN":
        # The endpoint's address is judged at registration (SSRF policy, a host nothing can parse).
        return operation in ("registerServer", "updateServer")
    fields = {d["field"] for d in error["details"] or []}
    if operation == "putCredential":  # which fields fit depends on the stored server's auth_type
        sent = unquote(urlsplit(str(response.request.url)).path.rsplit("/", 1)[-1])
        return fields == {sent}
    if operation == "listServers":  # a cursor is opaque: only one this API issued is valid
        return fields == {"cursor"}
    if operation == "authorizeServer":  # a ticket is opaque and one-time; the server may not use OAuth
        return fields in ({"ticket"}, {"auth_type"}, {"oauth.grant"}, {"oauth.client_id"}, {"endpoint_url"})
    if operation == "oauthCallback":  # so is a state; `error` is the authorization server's refusal
        return bool(fields) and fields <= {"state", "error", "code", "iss"}
    return False


def _positive_data_acceptance(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    if response.status_code == 422 and _explained_422(case, response):
        return None
    return positive_data_acceptance(ctx, response, case)


REPLACED: list[CheckFunction] = [positive_data_acceptance]
ADDED: list[CheckFunction] = [_positive_data_acceptance]


@SCHEMA.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_contract_holds_for_generated_requests(case: Case, served: Served) -> None:
    CASES[case.operation.label] += 1
    case.call_and_validate(
        base_url=served.base_url,
        headers=served.headers,
        excluded_checks=REPLACED,
        additional_checks=ADDED,
        timeout=30,
    )


def test_stateful_sequences_hold_the_contract(served: Served) -> None:
    """Registrations chained into every other operation through the contract's links.

    The server's state moves on between scenarios (a name registered once answers 409 the next
    time), so Hypothesis may find that replaying a choice sequence draws differently and stop a run
    with `FlakyStrategyDefinition`; that is no finding, so runs are repeated until enough steps ran.
    Failures are collected rather than raised, so no replay is ever needed to report one.
    """
    failures: list[str] = []

    class Sequences(SCHEMA.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"base_url": served.base_url, "headers": served.headers, "timeout": 30}

        def validate_response(
            self,
            response: Response,
            case: Case,
            additional_checks: list[CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            CASES["stateful"] += 1
            try:
                case.validate_response(
                    response,
                    excluded_checks=REPLACED,
                    additional_checks=[*(additional_checks or []), *ADDED],
                    headers=served.headers,
                    transport_kwargs=kwargs or None,
                    recorder=self.recorder,
                )
            except FailureGroup as exc:
                failures.append(f"{case.operation.label}: {exc}\n{case.as_curl_command(served.headers)}")

    for _ in range(STATEFUL_RUNS):
        if CASES["stateful"] >= STATEFUL_STEPS:
            break
        with contextlib.suppress(FlakyStrategyDefinition):
            Sequences.run(
                settings=settings(
                    max_examples=STATEFUL_SCENARIOS,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    database=None,
                    stateful_step_count=8,
                    phases=[Phase.generate],
                )
            )
    assert not failures, "\n\n".join(failures[:5])
    assert CASES["stateful"] >= STATEFUL_STEPS, CASES["stateful"]


def test_enough_generated_cases() -> None:
    """Runs after the two above (file order): the suite really sent what it claims."""
    if len(CASES) < 2:
        pytest.skip("run together with the generated-request tests of this module")
    total = sum(CASES.values())
    print(f"schemathesis cases: {total} ({dict(sorted(CASES.items()))})")
    assert total >= MIN_CASES, dict(CASES)
    assert len([label for label in CASES if label != "stateful"]) == 11, dict(CASES)
    assert CASES["stateful"] > 0
