"""OK / ERR / EOF / handshake / handshake response / auth switch payloads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.constants import SQLSTATE, Capability, ErrorCode, Status
from proxy.protocol.packets import (
    AuthSwitch,
    Column,
    Eof,
    Err,
    Handshake,
    HandshakeResponse,
    Ok,
    auth_more_data,
    parse_text_row,
    ssl_request,
)
from proxy.protocol.wire import ProtocolError, lenenc_bytes, lenenc_int

P41 = int(Capability.PROTOCOL_41)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)
#: Text fields that are NUL-terminated on the wire cannot contain NUL.
nul_free_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
ascii_name = st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=30)
capabilities = st.integers(0, 0xFFFFFFFF)

# -- OK ---------------------------------------------------------------------

oks = st.builds(
    Ok,
    affected_rows=U64,
    last_insert_id=U64,
    status=U16,
    warnings=U16,
    info=st.binary(max_size=40),
    header=st.sampled_from([0x00, 0xFE]),
)


@given(oks)
def test_ok_round_trip(ok: Ok) -> None:
    assert Ok.parse(ok.encode(), P41) == ok


def test_ok_known_bytes() -> None:
    # What MariaDB sends for "INSERT ... (id 300)" in autocommit mode.
    payload = b"\x00\x01\xfc\x2c\x01\x02\x00\x00\x00"
    ok = Ok.parse(payload, P41)
    assert ok == Ok(1, 300, int(Status.AUTOCOMMIT), 0, b"", 0x00)
    assert ok.encode() == payload


def test_ok_without_protocol_41() -> None:
    payload = b"\x00\x00\x00\x03\x00rest"
    assert Ok.parse(payload, int(Capability.TRANSACTIONS)) == Ok(0, 0, 3, 0, b"rest")
    assert Ok.parse(payload, 0) == Ok(0, 0, 0, 0, b"\x03\x00rest")


@pytest.mark.parametrize(
    "payload", [b"", b"\x00", b"\x00\x00", b"\x00\x00\x00\x02", b"\xff\x00\x00\x00\x00\x00\x00"]
)
def test_ok_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        Ok.parse(payload, P41)


# -- ERR --------------------------------------------------------------------

sql_states = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=5, max_size=5)
errs = st.builds(Err, code=U16, message=st.text(max_size=60), sql_state=sql_states)


@given(errs)
def test_err_round_trip(err: Err) -> None:
    assert Err.parse(err.encode()) == err


def test_err_known_bytes() -> None:
    payload = b"\xff\x7a\x04#42S02Table 'x.nope' doesn't exist"
    assert Err.parse(payload) == Err(1146, "Table 'x.nope' doesn't exist", "42S02")
    assert Err.parse(payload).encode() == payload


def test_err_without_sql_state() -> None:
    # Pre-4.1 servers and errors before the handshake carry no '#' marker.
    assert Err.parse(b"\xff\x10\x04Too many connections") == Err(1040, "Too many connections")


def test_err_of_uses_the_sqlstate_table() -> None:
    err = Err.of(ErrorCode.ACCESS_DENIED, "no")
    assert (err.code, err.sql_state) == (1045, SQLSTATE[ErrorCode.ACCESS_DENIED])
    assert Err.of(ErrorCode.SERVER_LOST, "gone").sql_state == "HY000"


def test_err_pads_a_short_sql_state() -> None:
    assert Err.parse(Err(1, "m", "HY").encode()).sql_state == "HY000"


@pytest.mark.parametrize(
    "payload", [b"", b"\xff", b"\xff\x01", b"\x00\x01\x02", b"\xff\x01\x00#42S"]
)
def test_err_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        Err.parse(payload)


# -- EOF --------------------------------------------------------------------


@given(st.builds(Eof, warnings=U16, status=U16))
def test_eof_round_trip(eof: Eof) -> None:
    payload = eof.encode()
    assert len(payload) == 5
    assert Eof.parse(payload) == eof


def test_eof_short_forms() -> None:
    assert Eof.parse(b"\xfe") == Eof()  # pre-4.1
    assert Eof.parse(b"\xfe\x01\x00\x22\x00") == Eof(1, 0x22)
    for payload in (b"", b"\x00\x00\x00\x00\x00"):
        with pytest.raises(ProtocolError):
            Eof.parse(payload)


# -- Handshake v10 ----------------------------------------------------------

#: Servers build the scramble from printable bytes so it survives NUL termination.
scrambles = st.binary(min_size=20, max_size=20).map(lambda b: bytes(1 + x % 127 for x in b))
handshakes = st.builds(
    Handshake,
    server_version=nul_free_text,
    connection_id=U32,
    scramble=scrambles,
    # The v10 encoder always writes the 4.1 tail: 20-byte scramble and plugin name.
    capabilities=capabilities.map(
        lambda c: c | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH | Capability.PROTOCOL_41
    ),
    character_set=st.integers(0, 255),
    status=U16,
    auth_plugin=ascii_name.filter(lambda s: "\x00" not in s),
    extended=st.binary(min_size=10, max_size=10),
)


@given(handshakes)
def test_handshake_round_trip(handshake: Handshake) -> None:
    assert Handshake.parse(handshake.encode()) == handshake


# A MariaDB 10.11 greeting, captured from the test server.
MARIADB_GREETING = bytes.fromhex(
    "0a352e352e352d31302e31312e31392d4d6172696144422d302b646562313275312d6c6f6700"
    "05000000"
    "75213f59223d4a40"
    "00"
    "fef7"
    "2d"
    "0200"
    "ff81"
    "15"
    "0000000000001d000000"
    "3e5677735b4d502a7d5b307a00"
    "6d7973716c5f6e61746976655f70617373776f726400"
)


def test_handshake_known_mariadb_greeting() -> None:
    handshake = Handshake.parse(MARIADB_GREETING)
    assert handshake.server_version == "5.5.5-10.11.19-MariaDB-0+deb12u1-log"
    assert handshake.connection_id == 5
    assert handshake.scramble == b'u!?Y"=J@>Vws[MP*}[0z'
    assert handshake.character_set == 45
    assert handshake.status == int(Status.AUTOCOMMIT)
    assert handshake.capabilities & Capability.PROTOCOL_41
    assert handshake.capabilities & Capability.DEPRECATE_EOF
    assert handshake.auth_plugin == "mysql_native_password"
    assert handshake.extended == b"\x00" * 6 + b"\x1d\x00\x00\x00"  # MariaDB extended caps
    assert handshake.encode() == MARIADB_GREETING


def test_handshake_pre_41_greeting() -> None:
    # Only the mandatory fields: 8-byte scramble, lower capability flags.
    payload = b"\x0a4.0.1\x00" + (7).to_bytes(4, "little") + b"abcdefgh\x00" + b"\x00\x02"
    handshake = Handshake.parse(payload)
    assert (handshake.server_version, handshake.connection_id) == ("4.0.1", 7)
    assert handshake.scramble == b"abcdefgh"
    assert handshake.capabilities == 0x0200


def test_handshake_error_and_wrong_version() -> None:
    with pytest.raises(ProtocolError, match="refused"):
        Handshake.parse(Err(1040, "Too many connections", "08004").encode())
    with pytest.raises(ProtocolError):
        Handshake.parse(b"\x09" + MARIADB_GREETING[1:])
    for cut in range(len(MARIADB_GREETING) - len(b"mysql_native_password\x00") - 1):
        if cut == 1 + 37 + 4 + 8 + 1 + 2:  # the mandatory part alone is a valid greeting
            continue
        with pytest.raises(ProtocolError):
            Handshake.parse(MARIADB_GREETING[:cut])


# -- HandshakeResponse41 ----------------------------------------------------

attributes = st.dictionaries(st.text(max_size=12), st.text(max_size=20), max_size=4)


@st.composite
def handshake_responses(draw: st.DrawFn, auth_width: str | None = None) -> HandshakeResponse:
    caps = draw(capabilities) | P41
    width = auth_width or draw(st.sampled_from(["lenenc", "byte", "nul"]))
    caps &= ~(Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA | Capability.SECURE_CONNECTION)
    if width == "lenenc":
        caps |= Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA
        auth = draw(st.binary(max_size=300))
    elif width == "byte":
        caps |= Capability.SECURE_CONNECTION
        auth = draw(st.binary(max_size=255))
    else:  # neither flag: a NUL-terminated auth response
        auth = draw(st.binary(max_size=40).filter(lambda b: b"\x00" not in b))
    return HandshakeResponse(
        capabilities=caps,
        max_packet=draw(U32),
        character_set=draw(st.integers(0, 255)),
        username=draw(nul_free_text),
        auth_response=auth,
        database=draw(nul_free_text.filter(bool)) if caps & Capability.CONNECT_WITH_DB else None,
        auth_plugin=draw(ascii_name) if caps & Capability.PLUGIN_AUTH else None,
        attributes=draw(attributes) if caps & Capability.CONNECT_ATTRS else {},
    )


@given(handshake_responses())
def test_handshake_response_round_trip(response: HandshakeResponse) -> None:
    assert HandshakeResponse.parse(response.encode()) == response


def test_handshake_response_known_bytes() -> None:
    caps = int(
        Capability.PROTOCOL_41
        | Capability.SECURE_CONNECTION
        | Capability.PLUGIN_AUTH
        | Capability.CONNECT_WITH_DB
        | Capability.CONNECT_ATTRS
    )
    payload = (
        caps.to_bytes(4, "little")
        + (1 << 24).to_bytes(4, "little")
        + b"\x2d"
        + b"\x00" * 23
        + b"app\x00"
        + b"\x14"
        + b"T" * 20
        + b"shop\x00"
        + b"mysql_native_password\x00"
        + lenenc_bytes(lenenc_bytes(b"_client_name") + lenenc_bytes(b"pymysql"))
    )
    response = HandshakeResponse.parse(payload)
    assert response == HandshakeResponse(
        caps,
        1 << 24,
        45,
        "app",
        b"T" * 20,
        "shop",
        "mysql_native_password",
        {"_client_name": "pymysql"},
    )
    assert response.encode() == payload


def test_handshake_response_optional_tail_missing() -> None:
    # Capability bits promise a database, plugin and attributes that are absent.
    caps = int(
        Capability.PROTOCOL_41
        | Capability.SECURE_CONNECTION
        | Capability.PLUGIN_AUTH
        | Capability.CONNECT_WITH_DB
        | Capability.CONNECT_ATTRS
    )
    payload = caps.to_bytes(4, "little") + b"\x00" * 4 + b"\x21" + b"\x00" * 23 + b"u\x00\x00"
    response = HandshakeResponse.parse(payload)
    assert (response.username, response.auth_response, response.database) == ("u", b"", None)
    assert (response.auth_plugin, response.attributes) == (None, {})


def test_handshake_response_rejects_protocol_320() -> None:
    payload = (0).to_bytes(4, "little") + b"\x00" * 28 + b"u\x00"
    with pytest.raises(ProtocolError):
        HandshakeResponse.parse(payload)


@given(handshake_responses())
def test_handshake_response_truncated_raises(response: HandshakeResponse) -> None:
    payload = response.encode()
    fixed_part = 4 + 4 + 1 + 23
    for cut in range(fixed_part + len(response.username.encode()) + 1):
        with pytest.raises(ProtocolError):
            HandshakeResponse.parse(payload[:cut])


def test_ssl_request() -> None:
    payload = ssl_request(int(Capability.PROTOCOL_41), 1 << 24, 45)
    assert len(payload) == 32
    assert HandshakeResponse.is_ssl_request(payload)
    assert not HandshakeResponse.is_ssl_request(payload + b"u\x00")
    assert not HandshakeResponse.is_ssl_request(b"\x00" * 32)
    assert not HandshakeResponse.is_ssl_request(b"")


# -- AuthSwitch -------------------------------------------------------------

auth_switches = st.builds(AuthSwitch, plugin=ascii_name, data=st.binary(max_size=40))


@given(auth_switches)
def test_auth_switch_round_trip(switch: AuthSwitch) -> None:
    assert AuthSwitch.parse(switch.encode()) == switch


def test_auth_switch_known_bytes() -> None:
    payload = b"\xfemysql_native_password\x00" + b"N" * 20 + b"\x00"
    assert AuthSwitch.parse(payload) == AuthSwitch("mysql_native_password", b"N" * 20 + b"\x00")
    assert AuthSwitch.parse(b"\xfe") == AuthSwitch("mysql_old_password", b"")
    for bad in (b"", b"\x00plugin\x00", b"\xfeno-terminator"):
        with pytest.raises(ProtocolError):
            AuthSwitch.parse(bad)


def test_auth_more_data() -> None:
    assert auth_more_data(b"\x03") == b"\x01\x03"


# -- Column definition and text rows ---------------------------------------


def column_payload(name: bytes, *, type_: int = 0xFD, charset: int = 45, flags: int = 0) -> bytes:
    return (
        lenenc_bytes(b"def")
        + lenenc_bytes(b"shop")
        + lenenc_bytes(b"o")
        + lenenc_bytes(b"orders")
        + lenenc_bytes(name)
        + lenenc_bytes(name)
        + lenenc_int(0x0C)
        + charset.to_bytes(2, "little")
        + (1020).to_bytes(4, "little")
        + bytes((type_,))
        + flags.to_bytes(2, "little")
        + b"\x00"
        + b"\x00\x00"
    )


def test_column_parse() -> None:
    column = Column.parse(column_payload(b"total", type_=0x08, charset=63, flags=0x1003))
    assert column == Column("shop", "o", "total", 63, 1020, 0x08, 0x1003, 0)
    payload = column_payload(b"total")
    for cut in range(len(payload) - 2):  # the trailing filler is optional
        with pytest.raises(ProtocolError):
            Column.parse(payload[:cut])


text_values = st.lists(st.none() | st.binary(max_size=300), max_size=6)


@given(text_values)
def test_text_row_round_trip(values: list[bytes | None]) -> None:
    payload = b"".join(b"\xfb" if v is None else lenenc_bytes(v) for v in values)
    assert parse_text_row(payload, len(values)) == tuple(values)
    if values:
        with pytest.raises(ProtocolError):
            parse_text_row(payload, len(values) + 1)  # a missing column
        with pytest.raises(ProtocolError):
            parse_text_row(payload + b"\x00", len(values))  # trailing bytes


def test_handshake_real_greeting_round_trip(greeting: bytes) -> None:
    """The test server's own greeting parses and re-encodes byte for byte."""
    handshake = Handshake.parse(greeting)
    assert "MariaDB" in handshake.server_version
    assert len(handshake.scramble) == 20 and b"\x00" not in handshake.scramble
    assert handshake.capabilities & Capability.PROTOCOL_41
    assert handshake.capabilities & Capability.PLUGIN_AUTH
    assert handshake.encode() == greeting
