"""Every message and session state ScaiLink puts in Redis is signed with the cluster secret
(`redis_link.Signer`, SPEC section 10); what does not verify is refused, and replicas of another
secret cannot read each other's traffic as their own."""

from __future__ import annotations

import base64
import os

import pytest
from pydantic import SecretStr, ValidationError

from scailink_mcp.config import Settings
from scailink_mcp.redis_link import Signer, cluster_signer


def test_a_signed_text_verifies_and_a_changed_one_does_not() -> None:
    signer = Signer(os.urandom(32))
    signed = signer.sign('{"op": "upsert"}')
    assert signer.verify(signed) == '{"op": "upsert"}'
    assert signer.verify(signed.encode()) == '{"op": "upsert"}'
    for forged in ('{"op": "upsert"}', signed.replace("upsert", "invoke"), "x." + signed.split(".", 1)[1]):
        with pytest.raises(ValueError):
            signer.verify(forged)
    with pytest.raises(ValueError):
        Signer(os.urandom(32)).verify(signed)  # another gateway's secret


def test_the_secret_comes_from_settings_or_the_kek() -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    kek = base64.b64encode(os.urandom(32)).decode()
    explicit = cluster_signer(Settings(cluster_secret=SecretStr(secret), encryption_local_kek=SecretStr(kek)))
    same = cluster_signer(Settings(cluster_secret=SecretStr(secret)))
    derived = cluster_signer(Settings(encryption_local_kek=SecretStr(kek)))
    text = "hello"
    assert same.verify(explicit.sign(text)) == text
    with pytest.raises(ValueError):
        derived.verify(explicit.sign(text))
    assert cluster_signer(Settings(encryption_local_kek=SecretStr(kek))).verify(derived.sign(text)) == text
    with pytest.raises(ValueError, match="SCAILINK_CLUSTER_SECRET"):
        cluster_signer(Settings())


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode()])
def test_a_bad_cluster_secret_is_refused_at_start(value: str) -> None:
    with pytest.raises(ValidationError, match="SCAILINK_CLUSTER_SECRET"):
        Settings(cluster_secret=SecretStr(value))
