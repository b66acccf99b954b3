"""JWT verification: keys from a PEM or a JWKS served over real HTTP on 127.0.0.1 (cache, bounded
refetch on an unknown kid), fixed algorithms, audience, leeway, size cap, groups; the role table."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from scailink_mcp import auth
from scailink_mcp.auth import TokenVerifier, resolve_roles
from scailink_mcp.config import Settings
from scailink_mcp.errors import Unauthorized
from tests.servers import JwksServer

pytestmark = pytest.mark.anyio


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> bytes:
    out: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return out


def public_pem(key: Any) -> str:
    out: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return out.decode()


def jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    data.update({"kid": kid, "alg": "ES256", "use": "sig"})
    return data


def mint(key: Any, kid: str | None = None, alg: str = "ES256", **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": "u1", "tenant_id": "t1", "groups": ["tenant_user"], "aud": "scailink",
                            "iat": now, "exp": now + 600}  # fmt: skip
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_cache_and_bounded_refetch(jwks: JwksServer) -> None:
    first, second = ec_key(), ec_key()
    jwks.keys = [jwk(first, "k1")]
    clock = Clock()
    verifier = TokenVerifier(Settings(_env_file=None, jwt_jwks_url=jwks.url), clock=clock)  # type: ignore[call-arg]
    assert (await verifier.verify(mint(first, "k1"))).user_id == "u1"
    assert (await verifier.verify(mint(first, "k1"))).tenant_id == "t1"
    assert jwks.fetches == 1, "cached"
    # a rotated key: an unknown kid refetches once ...
    clock.now += 31
    jwks.keys = [jwk(first, "k1"), jwk(second, "k2")]
    assert (await verifier.verify(mint(second, "k2"))).user_id == "u1"
    assert jwks.fetches == 2
    # ... but another unknown kid within 30 s does not refetch
    with pytest.raises(Unauthorized, match="unknown signing key"):
        await verifier.verify(mint(ec_key(), "k3"))
    assert jwks.fetches == 2
    clock.now += 31
    with pytest.raises(Unauthorized, match="unknown signing key"):
        await verifier.verify(mint(ec_key(), "k3"))
    assert jwks.fetches == 3
    # the cache expires after 300 s
    clock.now += 301
    await verifier.verify(mint(first, "k1"))
    assert jwks.fetches == 4


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 120}, "token expired"),
        ({"nbf": int(time.time()) + 120}, "not yet valid"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"groups": None}, "no groups claim"),
        ({"groups": "tenant_user"}, "groups claim must be a list"),
        ({"tenant_id": None}, "no tenant_id"),
        ({"pad": "x" * 9000}, "too large"),
    ],
)
async def test_claim_checks(claims: dict[str, Any], message: str) -> None:
    key = ec_key()
    verifier = TokenVerifier(Settings(_env_file=None, jwt_public_key=public_pem(key)))  # type: ignore[call-arg]
    token = mint(key, **claims)
    with pytest.raises(Unauthorized, match=message) as err:
        await verifier.verify(token)
    assert token not in err.value.message


async def test_leeway_and_algorithms(tmp_path: Any) -> None:
    key = ec_key()
    path = tmp_path / "pub.pem"
    path.write_text(public_pem(key))
    verifier = TokenVerifier(Settings(_env_file=None, jwt_public_key=str(path)))  # type: ignore[call-arg]
    # 20 s past exp is inside the 30 s leeway; a PEM given as a path works
    exp = int(time.time()) - 20
    assert (await verifier.verify(mint(key, exp=exp))).expires_at == exp
    # algorithm confusion: HS256 signed with the public key as the HMAC secret is refused
    claims = {"sub": "u1", "tenant_id": "t1", "groups": [], "aud": "scailink", "exp": int(time.time()) + 60}
    forged = jwt.encode(claims, b"k" * 32, algorithm="HS256")
    with pytest.raises(Unauthorized, match="algorithm not allowed"):
        await verifier.verify(forged)
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(b'{"sub":"u1"}').rstrip(b"=").decode()
    with pytest.raises(Unauthorized, match="algorithm not allowed"):
        await verifier.verify(f"{header}.{body}.")
    with pytest.raises(Unauthorized, match="bad signature"):
        await verifier.verify(mint(ec_key()))
    with pytest.raises(Unauthorized, match="malformed"):
        await verifier.verify("abc.def")
    # an allowed-algorithm list from settings, not from the token
    rs_only = Settings(_env_file=None, jwt_public_key=public_pem(key), jwt_algorithms="RS256")  # type: ignore[call-arg]
    only_rs = TokenVerifier(rs_only)
    with pytest.raises(Unauthorized, match="algorithm not allowed"):
        await only_rs.verify(mint(key))


def test_bearer_header_parsing() -> None:
    assert auth.bearer_token("Bearer abc") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer a b"):
        with pytest.raises(Unauthorized):
            auth.bearer_token(bad)


@pytest.mark.parametrize(
    ("groups", "expected_roles", "has", "lacks"),
    [
        (["tenant_admin"], ("tenant_admin",), auth.ALL_PERMISSIONS, set()),
        (["tenant_user"], ("tenant_user",), {auth.VIEW, auth.INVOKE, auth.REMOTE_USE, auth.REMOTE_MANAGE_OWN},
         {auth.MANAGE, auth.AUDIT, auth.REMOTE_MANAGE_TENANT}),
        (["tenant_viewer"], ("tenant_viewer",), {auth.VIEW, auth.REMOTE_USE},
         {auth.INVOKE, auth.REMOTE_MANAGE_OWN}),
        (["eng-admins"], ("tenant_admin",), auth.ALL_PERMISSIONS, set()),
        (["random"], (), set(), auth.ALL_PERMISSIONS),
        (["auditors"], ("auditors",), {auth.AUDIT}, auth.ALL_PERMISSIONS - {auth.AUDIT}),
    ],
)  # fmt: skip
def test_role_table(
    groups: list[str], expected_roles: tuple[str, ...], has: set[str], lacks: set[str]
) -> None:
    roles, perms, sources = resolve_roles(
        groups, {"eng-admins": "tenant_admin"}, {"auditors": frozenset({auth.AUDIT})}
    )
    assert roles == expected_roles
    assert has <= perms and not (lacks & perms)
    for perm in perms:
        assert set(sources[perm]) <= set(roles)


async def test_principal_over_http(jwks: JwksServer) -> None:
    """The verifier as the app uses it, end to end with a JWKS key."""
    key = ec_key()
    jwks.keys = [jwk(key, "app")]
    from scailink_mcp.app import create_app
    from scailink_mcp.crypto import generate_kek

    settings = Settings(  # type: ignore[call-arg]
                        _env_file=None, jwt_jwks_url=jwks.url, encryption_local_kek=SecretStr(generate_kek()),
                        database_url="sqlite://", background_tasks=False)  # fmt: skip
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        ok = await c.get(
            "/v1/modules/scailink/capabilities", headers={"Authorization": f"Bearer {mint(key, 'app')}"}
        )
        assert ok.status_code == 200
        bad = await c.get(
            "/v1/modules/scailink/capabilities", headers={"Authorization": f"Bearer {mint(key, 'x')}"}
        )
        assert bad.status_code == 401 and bad.json()["error"]["message"] == "unknown signing key"


async def test_verified_tokens_are_remembered_until_exp_or_ttl() -> None:
    """The cache skips the signature check on repeats, yet a cached token still expires on time and
    is re-verified after the cache TTL; a wrong signature is never cached into success."""
    key = ec_key()
    now = [time.time()]
    mono = [0.0]
    settings = Settings(_env_file=None, jwt_public_key=public_pem(key), jwt_leeway_s=0)  # type: ignore[call-arg]
    decodes = 0

    def counting(*args: Any) -> dict[str, Any]:
        nonlocal decodes
        decodes += 1
        return auth.decode_claims(*args)

    verifier = TokenVerifier(settings, clock=lambda: mono[0], wall_clock=lambda: now[0], decode=counting)
    token = mint(key, exp=int(now[0]) + 60)
    first = await verifier.verify(token)
    assert decodes == 1, "the first sight of a token checks its signature"
    assert (await verifier.verify(token)).user_id == first.user_id
    assert decodes == 1, "a repeat of a verified token does not re-check the signature"
    mono[0] += settings.jwt_verified_cache_ttl_s
    await verifier.verify(token)
    assert decodes == 2, "past the cache TTL the token is verified again"
    now[0] += 61
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(token)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await verifier.verify(forged)
    assert decodes == 4, "a refused token is checked in full every time, never answered from the cache"


async def test_a_cached_principal_is_reused_until_the_tenants_custom_roles_change() -> None:
    """A repeat of a verified token returns the same `Principal` (and the MCP surface the same access
    token model) while the tenant's custom-role mapping is the same object; a change of that mapping
    (the role store replaces it on every change) applies on the very next request."""
    from scailink_mcp.mcp_auth import McpTokenVerifier, ScaiLinkAccessToken

    key = ec_key()
    settings = Settings(_env_file=None, jwt_public_key=public_pem(key))  # type: ignore[call-arg]
    verifier = TokenVerifier(settings)
    roles: dict[str, Any] = {"t1": {}}
    verifier.custom_roles = lambda tenant: roles.get(tenant, {})
    token = mint(key, groups=["tenant_user", "auditors"])
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first, "same claims, same custom roles: the same principal"
    assert auth.AUDIT not in first.permissions
    mcp = McpTokenVerifier(verifier)
    made = await mcp.verify_token(token)
    assert isinstance(made, ScaiLinkAccessToken) and made.principal is first
    assert await mcp.verify_token(token) is made, "no new access token model for the same principal"

    roles["t1"] = {"auditors": frozenset({auth.AUDIT})}  # a custom role added: a new mapping
    changed = await verifier.verify(token)
    assert changed is not first and auth.AUDIT in changed.permissions
    remade = await mcp.verify_token(token)
    assert isinstance(remade, ScaiLinkAccessToken) and remade.principal is changed
    assert auth.AUDIT in remade.scopes, "the access token follows the new principal"
    other = mint(key, sub="u2")
    assert (await verifier.verify(other)).user_id == "u2", "another token has its own entry"
