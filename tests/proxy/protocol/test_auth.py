"""mysql_native_password (incl. stage-1 recovery) and caching_sha2_password."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import sandbox
from proxy.backends import BackendError, Credentials, Endpoint, connect
from proxy.protocol import auth

passwords = st.text(max_size=40)
nonces = st.binary(min_size=20, max_size=20)


def reference_native_token(password: str, scramble: bytes) -> bytes:
    """The documented formula: SHA1(pw) XOR SHA1(scramble + SHA1(SHA1(pw)))."""
    stage1 = hashlib.sha1(password.encode()).digest()
    mask = hashlib.sha1(scramble + hashlib.sha1(stage1).digest()).digest()
    return bytes(a ^ b for a, b in zip(stage1, mask, strict=True))


def reference_sha2_token(password: str, nonce: bytes) -> bytes:
    """SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce)."""
    first = hashlib.sha256(password.encode()).digest()
    mask = hashlib.sha256(hashlib.sha256(first).digest() + nonce).digest()
    return bytes(a ^ b for a, b in zip(first, mask, strict=True))


def test_native_hash_text_known_vector() -> None:
    assert auth.native_hash_text("password") == "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"
    assert auth.native_hash_text("root") == "*81F5E21E35407D884A6CD4A731AEBFB6AF209E1B"


def test_native_stage2_from_hash() -> None:
    text = auth.native_hash_text("password")
    assert auth.native_stage2_from_hash(text) == auth.sha1(auth.native_stage1("password"))
    assert auth.native_stage2_from_hash(f"  {text.lower()}\n") == auth.native_stage2_from_hash(text)
    for bad in ("", "2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19", text[:-1], "*" + "Z" * 40):
        with pytest.raises(ValueError):
            auth.native_stage2_from_hash(bad)


@given(passwords.filter(bool), nonces)
def test_native_token_matches_reference_and_recovers_stage1(password: str, scramble: bytes) -> None:
    stage1 = auth.native_stage1(password)
    assert stage1 == hashlib.sha1(password.encode()).digest()
    token = auth.native_token(stage1, scramble)
    assert token == reference_native_token(password, scramble)
    stage2 = auth.native_stage2_from_hash(auth.native_hash_text(password))
    assert auth.native_recover_stage1(token, scramble, stage2) == stage1
    # Only the first 20 bytes of the scramble count (servers may append a NUL).
    assert auth.native_token(stage1, scramble + b"\x00") == token


@given(passwords.filter(bool), passwords.filter(bool), nonces)
def test_native_wrong_password_is_rejected(password: str, other: str, scramble: bytes) -> None:
    stage2 = auth.native_stage2_from_hash(auth.native_hash_text(password))
    token = auth.native_token(auth.native_stage1(other), scramble)
    expected = auth.native_stage1(password) if other == password else None
    assert auth.native_recover_stage1(token, scramble, stage2) == expected


@given(passwords.filter(bool), nonces, nonces)
def test_native_token_is_bound_to_the_scramble(
    password: str, scramble: bytes, other: bytes
) -> None:
    stage1 = auth.native_stage1(password)
    stage2 = auth.sha1(stage1)
    token = auth.native_token(stage1, scramble)
    assert (auth.native_recover_stage1(token, other, stage2) is not None) == (other == scramble)


def test_native_malformed_inputs() -> None:
    scramble = b"s" * 20
    stage2 = auth.sha1(auth.native_stage1("pw"))
    assert auth.native_token(b"", scramble) == b""  # empty password: empty response
    token = auth.native_token(auth.native_stage1("pw"), scramble)
    assert auth.native_recover_stage1(b"", scramble, stage2) is None
    assert auth.native_recover_stage1(token[:19], scramble, stage2) is None
    assert auth.native_recover_stage1(token + b"\x00", scramble, stage2) is None
    assert auth.native_recover_stage1(token, scramble, stage2[:19]) is None
    flipped = bytes([token[0] ^ 1]) + token[1:]
    assert auth.native_recover_stage1(flipped, scramble, stage2) is None


@given(passwords.filter(bool), nonces)
def test_caching_sha2_token_verifies(password: str, nonce: bytes) -> None:
    token = auth.caching_sha2_token(password, nonce)
    assert token == reference_sha2_token(password, nonce)
    assert auth.caching_sha2_token(password.encode(), nonce + b"\x00") == token
    digest = auth.caching_sha2_digest(password)
    assert digest == hashlib.sha256(hashlib.sha256(password.encode()).digest()).digest()
    assert auth.caching_sha2_verify(token, nonce, digest)


@given(passwords.filter(bool), passwords.filter(bool), nonces, nonces)
def test_caching_sha2_rejects_wrong_password_or_nonce(
    password: str, other: str, nonce: bytes, other_nonce: bytes
) -> None:
    digest = auth.caching_sha2_digest(password)
    token = auth.caching_sha2_token(other, nonce)
    assert auth.caching_sha2_verify(token, nonce, digest) == (other == password)
    good = auth.caching_sha2_token(password, nonce)
    assert auth.caching_sha2_verify(good, other_nonce, digest) == (other_nonce == nonce)


def test_caching_sha2_malformed_inputs() -> None:
    nonce = b"n" * 20
    digest = auth.caching_sha2_digest("pw")
    assert auth.caching_sha2_token("", nonce) == b""
    token = auth.caching_sha2_token("pw", nonce)
    assert not auth.caching_sha2_verify(b"", nonce, digest)
    assert not auth.caching_sha2_verify(token[:31], nonce, digest)
    assert not auth.caching_sha2_verify(token + b"\x00", nonce, digest)


@given(st.binary(max_size=40), st.binary(min_size=1, max_size=20))
def test_xor_password_is_an_involution(password: bytes, nonce: bytes) -> None:
    masked = auth.xor_password(password, nonce)
    assert len(masked) == len(password)
    assert auth.xor_password(masked, nonce) == password


async def test_stage1_recovery_logs_into_a_real_server(primary: sandbox.Instance) -> None:
    """The proxy's trick end to end: recover SHA1(password) from a client's
    scramble response, then log into MariaDB with it, never knowing the password."""
    ((stored,),) = primary.execute(
        "SELECT authentication_string FROM mysql.user WHERE User = 'root' AND Host = '%'"
    )
    assert stored == auth.native_hash_text("root")
    proxy_scramble = bytes(range(1, 21))  # what the proxy sent its client
    client_token = auth.native_token(auth.native_stage1("root"), proxy_scramble)
    stage1 = auth.native_recover_stage1(
        client_token, proxy_scramble, auth.native_stage2_from_hash(stored)
    )
    assert stage1 == hashlib.sha1(b"root").digest()
    endpoint = Endpoint("primary", "127.0.0.1", primary.port)
    connection = await connect(endpoint, Credentials("root", stage1=stage1))
    try:
        result = await connection.query("SELECT CURRENT_USER()")
        assert result.text_rows() == [("root@%",)]
    finally:
        await connection.aclose()
    wrong = auth.native_token(auth.native_stage1("not-root"), proxy_scramble)
    assert (
        auth.native_recover_stage1(wrong, proxy_scramble, auth.native_stage2_from_hash(stored))
        is None
    )
    with pytest.raises(BackendError) as error:
        await connect(endpoint, Credentials("root", stage1=auth.native_stage1("not-root")))
    assert error.value.err.code == 1045
