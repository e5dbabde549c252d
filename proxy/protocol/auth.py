"""Password scrambles: mysql_native_password and caching_sha2_password.

The proxy terminates authentication.  For native passwords it recovers the
client's stage-1 hash (SHA1(password)) from the scramble response, checks it
against the stored SHA1(SHA1(password)), and later uses it to log into the
backend as the same user without ever knowing the password.
"""

from __future__ import annotations

import hashlib
import hmac

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
CLEAR = "mysql_clear_password"

# caching_sha2_password AuthMoreData status bytes
FAST_AUTH_SUCCESS = b"\x03"
PERFORM_FULL_AUTH = b"\x04"
REQUEST_PUBLIC_KEY = b"\x02"


def _xor(left: bytes, right: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


def native_stage1(password: str | bytes) -> bytes:
    raw = password.encode("utf-8") if isinstance(password, str) else password
    return sha1(raw)


def native_stage2_from_hash(text: str) -> bytes:
    """'*6BB4...' (mysql.user authentication_string) -> 20 raw bytes."""
    value = text.strip()
    if len(value) != 41 or not value.startswith("*"):
        raise ValueError("native password hash must be '*' followed by 40 hex digits")
    return bytes.fromhex(value[1:])


def native_hash_text(password: str) -> str:
    return "*" + sha1(native_stage1(password)).hex().upper()


def native_token(stage1: bytes, scramble: bytes) -> bytes:
    """The client's scramble response, computed from SHA1(password)."""
    if not stage1:
        return b""
    return _xor(stage1, sha1(scramble[:20] + sha1(stage1)))


def native_recover_stage1(token: bytes, scramble: bytes, stage2: bytes) -> bytes | None:
    """Return SHA1(password) if ``token`` proves knowledge of it, else None."""
    if len(token) != 20 or len(stage2) != 20:
        return None
    stage1 = _xor(token, sha1(scramble[:20] + stage2))
    if hmac.compare_digest(sha1(stage1), stage2):
        return stage1
    return None


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def caching_sha2_token(password: str | bytes, nonce: bytes) -> bytes:
    raw = password.encode("utf-8") if isinstance(password, str) else password
    if not raw:
        return b""
    first = sha256(raw)
    return _xor(first, sha256(sha256(first) + nonce[:20]))


def caching_sha2_digest(password: str | bytes) -> bytes:
    """What the fast path is verified against: SHA256(SHA256(password))."""
    raw = password.encode("utf-8") if isinstance(password, str) else password
    return sha256(sha256(raw))


def caching_sha2_verify(token: bytes, nonce: bytes, digest: bytes) -> bool:
    if len(token) != 32:
        return False
    first = _xor(token, sha256(digest + nonce[:20]))
    return hmac.compare_digest(sha256(first), digest)


def xor_password(password: bytes, nonce: bytes) -> bytes:
    """The obfuscation caching_sha2 applies before RSA encryption."""
    return bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(password))
