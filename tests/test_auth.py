"""auth.py: the role table, `Principal`, bearer parsing, JWT checks against a PEM key and a JWKS served
by a real uvicorn server on 127.0.0.1 (cache, bounded refetch on an unknown kid, rotation), and the dev
issuer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from scailink_mcp import auth
from scailink_mcp.auth import Principal, TokenVerifier, bearer_token, mint_token, resolve_roles
from scailink_mcp.config import Settings
from scailink_mcp.errors import Forbidden, Unauthorized
from tests.servers import JwksServer

USER_PERMS = frozenset({auth.VIEW, auth.INVOKE, auth.REMOTE_USE, auth.REMOTE_MANAGE_OWN})
VIEWER_PERMS = frozenset({auth.VIEW, auth.REMOTE_USE})
U1 = ("t1", "u1")  # the identity of every `token()`


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- keys, tokens, settings -------------------------------------------------------------------


def private_pem(key: Any) -> bytes:
    out: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return out


def public_pem(private: bytes) -> str:
    key: Any = serialization.load_pem_private_key(private, password=None)
    out: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return out.decode()


def ed_key() -> bytes:
    return private_pem(ed25519.Ed25519PrivateKey.generate())


def ec_key() -> bytes:
    return private_pem(ec.generate_private_key(ec.SECP256R1()))


def rsa_key() -> bytes:
    return private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def jwk(private: bytes, kid: str, **extra: Any) -> dict[str, Any]:
    public: Any = serialization.load_pem_private_key(private, password=None)
    public = public.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "use": "sig", **extra}


def token(private: bytes, *, kid: str | None = None, algorithm: str = "EdDSA", **claims: Any) -> str:
    """A token for u1 in t1 (tenant_user); `claims` add, override, or (as None) delete claims."""
    minted = mint_token(
        private, user_id="u1", tenant_id="t1", groups=["tenant_user"], kid=kid, algorithm=algorithm
    )
    if not claims:
        return minted
    body = jwt.decode(minted, options={"verify_signature": False})
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    key = serialization.load_pem_private_key(private, password=None)
    return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid} if kid else None)  # type: ignore[arg-type]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes | None) -> str:
    """A JWT built without PyJWT, for attacks PyJWT refuses to produce (HMAC with a PEM, alg none)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def valid_claims() -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "u1", "tenant_id": "t1", "groups": ["tenant_admin"], "aud": "scailink", "exp": now + 600}


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


class Clock:
    """A monotonic clock the test steps by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def refused(verifier: TokenVerifier, tok: str, message: str) -> None:
    with pytest.raises(Unauthorized, match=message) as err:
        await verifier.verify(tok)
    if tok:
        assert tok not in err.value.message and tok not in str(err.value)


@pytest.fixture(scope="module")
def key() -> bytes:
    return ed_key()


@pytest.fixture
def verifier(key: bytes) -> TokenVerifier:
    return TokenVerifier(settings(jwt_public_key=public_pem(key)))


# ---- the role table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "group_map", "custom", "roles", "permissions"),
    [
        (["tenant_admin"], {}, {}, ("tenant_admin",), auth.ALL_PERMISSIONS),
        (["super_admin"], {}, {}, ("super_admin",), auth.ALL_PERMISSIONS),
        (["partner_admin"], {}, {}, ("partner_admin",), auth.ALL_PERMISSIONS),
        (["tenant_user"], {}, {}, ("tenant_user",), USER_PERMS),
        (["tenant_viewer"], {}, {}, ("tenant_viewer",), VIEWER_PERMS),
        ([], {}, {}, (), frozenset()),
        (["tenant_user", "tenant_user"], {}, {}, ("tenant_user",), USER_PERMS),
        # names that look powerful but are not roles grant nothing: no catch-all for tenant_user
        (["tenant_user", "scailink:*", "*", "admin", "TENANT_ADMIN", "tenant_admin ", auth.MANAGE], {}, {},
         ("tenant_user",), USER_PERMS),
        (["eng-admins"], {"eng-admins": "tenant_admin"}, {}, ("tenant_admin",), auth.ALL_PERMISSIONS),
        (["readers"], {"readers": "tenant_viewer"}, {}, ("tenant_viewer",), VIEWER_PERMS),
        (["eng"], {"eng": "no_such_role"}, {}, (), frozenset()),
        (["auditor"], {}, {"auditor": frozenset({auth.AUDIT, auth.VIEW})}, ("auditor",),
         frozenset({auth.AUDIT, auth.VIEW})),
        (["sec-team"], {"sec-team": "auditor"}, {"auditor": frozenset({auth.AUDIT})}, ("auditor",),
         frozenset({auth.AUDIT})),
        (["empty"], {}, {"empty": frozenset()}, ("empty",), frozenset()),
        # a custom role cannot redefine a built-in one
        (["tenant_viewer"], {}, {"tenant_viewer": auth.ALL_PERMISSIONS}, ("tenant_viewer",), VIEWER_PERMS),
        (["tenant_viewer", "auditor"], {}, {"auditor": frozenset({auth.AUDIT})},
         ("tenant_viewer", "auditor"), VIEWER_PERMS | {auth.AUDIT}),
    ],
)  # fmt: skip
def test_role_table(
    groups: list[str],
    group_map: dict[str, str],
    custom: dict[str, frozenset[str]],
    roles: tuple[str, ...],
    permissions: frozenset[str],
) -> None:
    got_roles, got_permissions, sources = resolve_roles(groups, group_map, custom)
    assert got_roles == roles
    assert got_permissions == permissions
    assert set(sources) == permissions
    assert all(set(granted_by) <= set(roles) for granted_by in sources.values())


def test_sources_name_every_granting_role() -> None:
    _, _, sources = resolve_roles(
        ["tenant_user", "tenant_viewer", "auditor"], {}, {"auditor": frozenset({auth.AUDIT, auth.VIEW})}
    )
    assert sources[auth.VIEW] == ["tenant_user", "tenant_viewer", "auditor"]
    assert sources[auth.INVOKE] == ["tenant_user"]
    assert sources[auth.AUDIT] == ["auditor"]
    assert list(sources) == sorted(sources)


def test_principal_has_and_require() -> None:
    who = Principal(user_id="u1", tenant_id="t1", permissions=VIEWER_PERMS)
    assert who.has(auth.VIEW) and not who.has(auth.MANAGE)
    who.require(auth.REMOTE_USE)
    with pytest.raises(Forbidden, match=f"missing permission {auth.MANAGE}"):
        who.require(auth.MANAGE)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        ("   ", "missing bearer token"),
        ("Basic dXNlcjpwdw==", "malformed authorization header"),
        ("Bearer", "malformed authorization header"),
        ("Bearer ", "malformed authorization header"),
        ("Bearer a b", "malformed authorization header"),
        ("Bearer a\tb", "malformed authorization header"),
        ("abc.def.ghi", "malformed authorization header"),
    ],
)
def test_bearer_token(header: str | None, expected: str) -> None:
    if expected.startswith(("missing", "malformed")):
        with pytest.raises(Unauthorized, match=expected):
            bearer_token(header)
    else:
        assert bearer_token(header) == expected


# ---- claims, against a PEM public key ---------------------------------------------------------


@pytest.mark.anyio
async def test_valid_token_gives_principal(key: bytes) -> None:
    tok = mint_token(
        key,
        user_id="alice",
        tenant_id="acme",
        groups=["tenant_user", "auditors", "unrelated"],
        extra_claims={"name": "Alice", "email": "alice@example.com"},
    )
    verifier = TokenVerifier(settings(jwt_public_key=public_pem(key)))
    calls: list[str] = []

    def custom_roles(tenant: str) -> Mapping[str, frozenset[str]]:
        calls.append(tenant)
        return {"auditors": frozenset({auth.AUDIT})} if tenant == "acme" else {}

    who = await verifier.verify(tok, custom_roles)
    assert (who.user_id, who.tenant_id, who.name, who.email) == (
        "alice",
        "acme",
        "Alice",
        "alice@example.com",
    )
    assert who.groups == ("tenant_user", "auditors", "unrelated")
    assert who.roles == ("tenant_user", "auditors")
    assert who.permissions == USER_PERMS | {auth.AUDIT}
    assert who.permission_sources[auth.AUDIT] == ("auditors",)
    assert calls == ["acme"], "custom roles are looked up for the token's own tenant"
    # without a lookup the verifier's own (set by the app) applies; without either, none
    assert (await verifier.verify(tok)).permissions == USER_PERMS
    verifier.custom_roles = custom_roles
    assert auth.AUDIT in (await verifier.verify(tok)).permissions


@pytest.mark.anyio
async def test_group_role_map_from_settings(key: bytes) -> None:
    verifier = TokenVerifier(
        settings(jwt_public_key=public_pem(key), group_role_map={"eng-admins": "tenant_admin"})
    )
    who = await verifier.verify(token(key, groups=["eng-admins"]))
    assert who.roles == ("tenant_admin",) and who.permissions == auth.ALL_PERMISSIONS


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 120}, "^token expired$"),
        ({"nbf": int(time.time()) + 120}, "^token not yet valid$"),
        ({"aud": "someone-else"}, "^wrong audience$"),
        ({"aud": None}, "^token has no aud claim$"),
        ({"exp": None}, "^token has no exp claim$"),
        ({"exp": "tomorrow"}, "^malformed token$"),
        ({"groups": None}, "^token has no groups claim$"),
        ({"groups": "tenant_user"}, "^groups claim must be a list of strings$"),
        ({"groups": ["tenant_user", 7]}, "^groups claim must be a list of strings$"),
        ({"groups": {"tenant_user": True}}, "^groups claim must be a list of strings$"),
        ({"sub": None}, "^token has no sub claim$"),
        ({"sub": ""}, "^token has no sub claim$"),
        ({"sub": 42}, "^sub claim must be a string$"),
        ({"tenant_id": None}, "^token has no tenant_id claim$"),
        ({"tenant_id": 7}, "^tenant_id claim must be a non-empty string$"),
        ({"pad": "x" * 9000}, "^token too large$"),
    ],
)
async def test_claim_checks(
    key: bytes, verifier: TokenVerifier, claims: dict[str, Any], message: str
) -> None:
    await refused(verifier, token(key, **claims), message)


@pytest.mark.anyio
async def test_leeway(key: bytes, verifier: TokenVerifier) -> None:
    now = int(time.time())
    # 30 s leeway: 20 s past exp or 20 s before nbf is accepted, 40 s is not
    assert (await verifier.verify(token(key, exp=now - 20))).expires_at == now - 20
    assert (await verifier.verify(token(key, nbf=now + 20))).identity == U1
    await refused(verifier, token(key, exp=now - 40), "token expired")
    await refused(verifier, token(key, nbf=now + 40), "token not yet valid")
    strict = TokenVerifier(settings(jwt_public_key=public_pem(key), jwt_leeway_s=0))
    await refused(strict, token(key, exp=now - 5), "token expired")


@pytest.mark.anyio
async def test_audience_and_issuer(key: bytes) -> None:
    verifier = TokenVerifier(settings(jwt_public_key=public_pem(key), jwt_audience="gw"))
    assert (await verifier.verify(token(key, aud="gw"))).identity == U1
    assert (await verifier.verify(token(key, aud=["other", "gw"]))).identity == U1, (
        "RFC 7519: aud may be a list"
    )
    await refused(verifier, token(key), "wrong audience")
    # no issuer configured: any iss; configured: exactly that one, and present
    assert (await verifier.verify(token(key, aud="gw", iss="https://anyone"))).identity == U1
    pinned = TokenVerifier(settings(jwt_public_key=public_pem(key), jwt_issuer="https://idp"))
    assert (await pinned.verify(token(key, iss="https://idp"))).identity == U1
    await refused(pinned, token(key, iss="https://evil"), "wrong issuer")
    await refused(pinned, token(key), "token has no iss claim")


@pytest.mark.anyio
async def test_size_cap(key: bytes) -> None:
    verifier = TokenVerifier(settings(jwt_public_key=public_pem(key)))
    big = token(key, pad="x" * 5800)  # base64 makes it about 4/3 larger
    assert 7800 < len(big) <= 8192
    assert (await verifier.verify(big)).identity == U1
    tight = TokenVerifier(settings(jwt_public_key=public_pem(key), jwt_max_token_bytes=1024))
    await refused(tight, token(key, pad="x" * 1000), "token too large")


@pytest.mark.anyio
@pytest.mark.parametrize("bad", ["", "abc.def", "not a token", "a.b.c", "é.é.é", "\ud800.x.y"])
async def test_malformed(verifier: TokenVerifier, bad: str) -> None:
    await refused(verifier, bad, "^malformed token$")


@pytest.mark.anyio
async def test_signature_checks(key: bytes, verifier: TokenVerifier) -> None:
    await refused(verifier, token(ed_key()), "^bad signature$")
    header, body, signature = token(key).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    tampered = f"{header}.{b64(json.dumps({**claims, 'groups': ['tenant_admin']}).encode())}.{signature}"
    await refused(verifier, tampered, "^bad signature$")
    # an allowed algorithm of another key type never reaches the Ed25519 key
    await refused(
        verifier, token(ec_key(), algorithm="ES256"), "token algorithm does not match the signing key"
    )


@pytest.mark.anyio
async def test_algorithm_confusion_refused(key: bytes) -> None:
    pem = public_pem(key)
    # even when a deployment lists them, symmetric algorithms and `none` are dropped
    verifier = TokenVerifier(settings(jwt_public_key=pem, jwt_algorithms="EdDSA,HS256,none"))
    assert verifier.algorithms == ("EdDSA",)
    forged = unsigned({"alg": "HS256", "typ": "JWT"}, valid_claims(), pem.encode())
    await refused(verifier, forged, "token algorithm not allowed")
    await refused(verifier, unsigned({"alg": "none"}, valid_claims(), None), "token algorithm not allowed")
    await refused(verifier, unsigned({"typ": "JWT"}, valid_claims(), None), "token algorithm not allowed")
    # the list comes from settings, not from the token
    rsa_only = TokenVerifier(settings(jwt_public_key=pem, jwt_algorithms="RS256"))
    await refused(rsa_only, token(key), "token algorithm not allowed")
    with pytest.raises(ValueError, match="no asymmetric algorithm"):
        TokenVerifier(settings(jwt_public_key=pem, jwt_algorithms="HS256,none"))


@pytest.mark.anyio
async def test_pem_path_and_other_key_types(tmp_path: Path) -> None:
    for private, algorithm in (
        (ed_key(), "EdDSA"),
        (ec_key(), "ES256"),
        (rsa_key(), "RS256"),
        (rsa_key(), "PS256"),
    ):
        path = tmp_path / f"{algorithm}.pem"
        path.write_text(public_pem(private))
        verifier = TokenVerifier(settings(jwt_public_key=str(path), jwt_algorithms=[algorithm]))
        assert (await verifier.verify(token(private, algorithm=algorithm))).user_id == "u1"


def test_bad_configured_key_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier(settings(jwt_public_key="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"))
    weak = private_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(ValueError, match="2048"):
        TokenVerifier(settings(jwt_public_key=public_pem(weak)))
    with pytest.raises(OSError):
        TokenVerifier(settings(jwt_public_key=str(tmp_path / "missing.pem")))


@pytest.mark.anyio
async def test_no_key_configured_and_dev_key_never_implied(tmp_path: Path) -> None:
    path = tmp_path / "dev.pem"
    auth.generate_dev_key(path)
    verifier = TokenVerifier(settings(dev_signing_key_path=path))
    await refused(verifier, token(path.read_bytes()), "no token verification key is configured")


# ---- JWKS over real HTTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


@pytest.fixture
def jwks(jwks_server: JwksServer) -> JwksServer:
    jwks_server.reset()
    return jwks_server


def jwks_verifier(jwks: JwksServer, clock: Clock, **values: Any) -> TokenVerifier:
    return TokenVerifier(settings(jwt_jwks_url=jwks.url, **values), clock=clock)


@pytest.mark.anyio
async def test_jwks_is_cached_for_its_ttl(jwks: JwksServer, key: bytes) -> None:
    jwks.keys = [jwk(key, "k1")]
    clock = Clock()
    verifier = jwks_verifier(jwks, clock)
    assert (await verifier.verify(token(key, kid="k1"))).user_id == "u1"
    assert (await verifier.verify(token(key, kid="k1"))).tenant_id == "t1"
    assert jwks.fetches == 1
    clock.now += 299
    await verifier.verify(token(key, kid="k1"))
    assert jwks.fetches == 1
    clock.now += 1
    await verifier.verify(token(key, kid="k1"))
    assert jwks.fetches == 2, "refetched once the 300 s TTL ran out"


@pytest.mark.anyio
async def test_unknown_kid_refetch_is_bounded(jwks: JwksServer, key: bytes) -> None:
    jwks.keys = [jwk(key, "k1")]
    clock = Clock()
    verifier = jwks_verifier(jwks, clock)
    await verifier.verify(token(key, kid="k1"))
    # keys fetched under 30 s ago: an unknown kid does not refetch
    await refused(verifier, token(ed_key(), kid="ghost"), "^unknown signing key$")
    assert jwks.fetches == 1
    clock.now += 31
    await refused(verifier, token(ed_key(), kid="ghost"), "^unknown signing key$")
    assert jwks.fetches == 2, "an unknown kid refetches once"
    await refused(verifier, token(ed_key(), kid="ghost-2"), "^unknown signing key$")
    clock.now += 29
    await refused(verifier, token(ed_key(), kid="ghost-3"), "^unknown signing key$")
    assert jwks.fetches == 2, "no second refetch within 30 s"
    clock.now += 2
    await refused(verifier, token(ed_key(), kid="ghost-3"), "^unknown signing key$")
    assert jwks.fetches == 3
    # known kids never wait on a refetch
    await verifier.verify(token(key, kid="k1"))
    assert jwks.fetches == 3


@pytest.mark.anyio
async def test_key_rotation(jwks: JwksServer) -> None:
    old, new = ed_key(), ec_key()
    jwks.keys = [jwk(old, "2024")]
    clock = Clock()
    verifier = jwks_verifier(jwks, clock)
    await verifier.verify(token(old, kid="2024"))
    # the provider publishes a new key and starts signing with it
    jwks.keys = [jwk(old, "2024"), jwk(new, "2025", alg="ES256")]
    clock.now += 31
    assert (await verifier.verify(token(new, kid="2025", algorithm="ES256"))).user_id == "u1"
    assert jwks.fetches == 2
    # then retires the old one: still cached until the TTL, gone after
    jwks.keys = [jwk(new, "2025", alg="ES256")]
    await verifier.verify(token(old, kid="2024"))
    clock.now += 300
    await refused(verifier, token(old, kid="2024"), "^unknown signing key$")
    await verifier.verify(token(new, kid="2025", algorithm="ES256"))
    assert jwks.fetches == 3


@pytest.mark.anyio
async def test_concurrent_cold_start_fetches_once(jwks: JwksServer, key: bytes) -> None:
    jwks.keys = [jwk(key, "k1")]
    verifier = jwks_verifier(jwks, Clock())
    results: list[Principal] = []

    async def one() -> None:
        results.append(await verifier.verify(token(key, kid="k1")))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    assert len(results) == 10 and jwks.fetches == 1


@pytest.mark.anyio
async def test_jwks_unavailable(jwks: JwksServer, key: bytes) -> None:
    jwks.status = 503
    clock = Clock()
    verifier = jwks_verifier(jwks, clock)
    await refused(verifier, token(key, kid="k1"), "^signing keys unavailable$")
    await refused(verifier, token(key, kid="k1"), "^signing keys unavailable$")
    assert jwks.fetches == 1, "a failing provider is not hammered either"
    jwks.status, jwks.keys = 200, [jwk(key, "k1")]
    clock.now += 30
    await verifier.verify(token(key, kid="k1"))
    # an outage after the TTL keeps the keys already held
    jwks.status = 500
    clock.now += 300
    await verifier.verify(token(key, kid="k1"))
    assert jwks.fetches == 3


@pytest.mark.anyio
async def test_jwks_entries_that_must_not_verify(jwks: JwksServer, key: bytes) -> None:
    secret = b"s" * 32
    signer_rsa = rsa_key()
    jwks.keys = [
        {"kty": "oct", "kid": "hmac", "k": b64(secret)},  # symmetric: never a verification key
        {**jwk(key, "enc"), "use": "enc"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        jwk(signer_rsa, "rsa", alg="RS256"),
        jwk(key, "ed"),
    ]
    verifier = jwks_verifier(jwks, Clock(), jwt_algorithms="RS256,PS256,EdDSA,HS256")
    hs = unsigned({"alg": "HS256", "kid": "hmac"}, valid_claims(), secret)
    await refused(verifier, hs, "token algorithm not allowed")
    await refused(verifier, token(key, kid="enc"), "^unknown signing key$")
    await refused(verifier, token(key, kid="broken"), "^unknown signing key$")
    # a JWK's `alg` pins it: PS256 with an RS256 key is refused
    assert (await verifier.verify(token(signer_rsa, kid="rsa", algorithm="RS256"))).identity == U1
    await refused(
        verifier,
        token(signer_rsa, kid="rsa", algorithm="PS256"),
        "token algorithm does not match the signing key",
    )
    assert (await verifier.verify(token(key, kid="ed"))).identity == U1
    await refused(verifier, token(key), "token has no key id")
    assert jwks.fetches == 1


@pytest.mark.anyio
async def test_injected_http_client(jwks: JwksServer, key: bytes) -> None:
    jwks.keys = [jwk(key, "k1")]
    async with httpx.AsyncClient() as client:
        verifier = TokenVerifier(settings(jwt_jwks_url=jwks.url), http_client=client, clock=Clock())
        assert (await verifier.verify(token(key, kid="k1"))).user_id == "u1"
    assert jwks.fetches == 1


# ---- the dev issuer ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_dev_issuer(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "dev.pem"
    auth.generate_dev_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    auth.generate_dev_key(path)  # overwriting also tightens the mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tok = mint_token(
        path.read_text(),
        user_id="dev-admin",
        tenant_id="dev",
        groups=("tenant_admin",),
        issuer="https://dev",
        kid="dev-1",
        ttl_s=60,
        extra_claims={"email": "dev@example.com"},
    )
    assert jwt.get_unverified_header(tok) == {"alg": "EdDSA", "kid": "dev-1", "typ": "JWT"}
    verifier = TokenVerifier(
        settings(jwt_public_key=auth.public_pem_from_private(path), jwt_issuer="https://dev")
    )
    who = await verifier.verify(tok)
    assert (who.user_id, who.tenant_id, who.email) == ("dev-admin", "dev", "dev@example.com")
    assert who.permissions == auth.ALL_PERMISSIONS
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60
    with pytest.raises(TypeError):
        mint_token(path.read_bytes(), user_id="u", tenant_id="t", groups="tenant_admin")
