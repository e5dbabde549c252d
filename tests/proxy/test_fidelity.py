"""Protocol fidelity at the frame level: the same commands, direct and proxied.

A raw client (logged in with ``proxy.backends.connect``, which works against
the proxy as well as against the server) sends hand-built command packets and
collects every response packet.  The response reader here is written
independently of ``proxy.protocol.response`` so that a tracker bug shows up as
a difference (or a timeout) instead of being mirrored on both sides.  Each
scenario runs on a direct connection and on a proxied one with the same
capabilities; the transcripts must be byte-identical.  After the steps that
change session state, the relay's ``SessionState`` is compared with what the
server itself reports.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from proxy import sandbox
from proxy.backends import (
    DEFAULT_CLIENT_CAPABILITIES,
    BackendConnection,
    BackendError,
    Credentials,
    Endpoint,
    connect,
)
from proxy.protocol.constants import Capability
from proxy.protocol.framing import frame
from tests.proxy.conftest import RunningProxy

COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_STATISTICS = 0x09
COM_PING = 0x0E
COM_TIME = 0x0F
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_RESET_CONNECTION = 0x1F
COM_STMT_BULK_EXECUTE = 0xFA

SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_LAST_ROW_SENT = 0x0080
CURSOR_TYPE_READ_ONLY = 0x01

# MYSQL_TYPE_* and the binary protocol's unsigned flag
T_TINY, T_SHORT, T_LONG, T_FLOAT, T_DOUBLE, T_NULL = 1, 2, 3, 4, 5, 6
T_TIMESTAMP, T_LONGLONG, T_INT24, T_DATE, T_TIME, T_DATETIME, T_YEAR = 7, 8, 9, 10, 11, 12, 13
T_NEWDECIMAL, T_BLOB, T_VAR_STRING, T_STRING = 0xF6, 0xFC, 0xFD, 0xFE
UNSIGNED = 0x80

NO_EOF = int(DEFAULT_CLIENT_CAPABILITIES)
WITH_EOF_DEPRECATED = int(DEFAULT_CLIENT_CAPABILITIES | Capability.DEPRECATE_EOF)
TRACKED = int(DEFAULT_CLIENT_CAPABILITIES | Capability.DEPRECATE_EOF | Capability.SESSION_TRACK)
CAPABILITY_SETS = {
    "eof": NO_EOF,
    "deprecate_eof": WITH_EOF_DEPRECATED,
    "deprecate_eof+session_track": TRACKED,
}

RESPONSE_TIMEOUT = 10.0
#: Errors whose message names a statement id (which differ between connections)
STATEMENT_ID_ERRORS = frozenset({1243, 1421})


def lenenc(value: int) -> bytes:
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + struct.pack("<H", value)
    if value < 1 << 24:
        return b"\xfd" + struct.pack("<I", value)[:3]
    return b"\xfe" + struct.pack("<Q", value)


def read_lenenc(data: bytes, position: int = 0) -> tuple[int, int]:
    first = data[position]
    if first < 0xFB:
        return first, position + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(data[position + 1 : position + 1 + size], "little"), position + 1 + size


def ok_status(payload: bytes) -> int:
    _, position = read_lenenc(payload, 1)
    _, position = read_lenenc(payload, position)
    return int.from_bytes(payload[position : position + 2], "little")


def error_code(payload: bytes) -> int:
    assert payload[0] == 0xFF, payload
    return int.from_bytes(payload[1:3], "little")


# -- binary protocol parameters ----------------------------------------------


@dataclass(frozen=True)
class Param:
    type: int
    value: bytes | None  # encoded binary value; None = NULL
    unsigned: bool = False


def p_int(value: int, kind: int = T_LONGLONG, unsigned: bool = False) -> Param:
    size = {T_TINY: 1, T_SHORT: 2, T_YEAR: 2, T_LONG: 4, T_INT24: 4, T_LONGLONG: 8}[kind]
    return Param(kind, value.to_bytes(size, "little", signed=not unsigned), unsigned)


def p_str(value: str | bytes, kind: int = T_VAR_STRING) -> Param:
    data = value.encode() if isinstance(value, str) else value
    return Param(kind, lenenc(len(data)) + data)


def p_datetime(kind: int, *fields: int, micro: int = 0) -> Param:
    body = struct.pack("<HBB", *fields[:3])
    if len(fields) > 3 or micro:
        body += bytes(fields[3:6])
    if micro:
        body += struct.pack("<I", micro)
    return Param(kind, bytes((len(body),)) + body)


def p_time(
    negative: bool, days: int, hours: int, minutes: int, seconds: int, micro: int = 0
) -> Param:
    body = struct.pack("<BIBBB", negative, days, hours, minutes, seconds)
    if micro:
        body += struct.pack("<I", micro)
    return Param(T_TIME, bytes((len(body),)) + body)


NULL = Param(T_NULL, None)


def execute_payload(
    statement: int, params: list[Param], *, flags: int = 0, bind: bool = True
) -> bytes:
    payload = bytes((COM_STMT_EXECUTE,)) + struct.pack("<IBI", statement, flags, 1)
    if params:
        bitmap = bytearray((len(params) + 7) // 8)
        for index, param in enumerate(params):
            if param.value is None:
                bitmap[index // 8] |= 1 << (index % 8)
        payload += bytes(bitmap) + bytes((1 if bind else 0,))
        if bind:
            for param in params:
                payload += bytes((param.type, UNSIGNED if param.unsigned else 0))
        for param in params:
            if param.value is not None:
                payload += param.value
    return payload


# -- the raw client ------------------------------------------------------------


@dataclass
class Raw:
    """One logged-in connection speaking raw frames, recording a transcript."""

    connection: BackendConnection
    capabilities: int
    transcript: list[tuple[str, list[bytes]]] = field(default_factory=list)

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        database: str | None,
        capabilities: int,
        user: str = "app",
        password: str = "app-secret",
    ) -> Raw:
        connection = await connect(
            Endpoint("raw", host, port),
            Credentials.from_password(user, password),
            database=database,
            client_capabilities=capabilities,
        )
        return cls(connection, connection.capabilities)

    @property
    def connection_id(self) -> int:
        return self.connection.handshake.connection_id

    @property
    def deprecate_eof(self) -> bool:
        return bool(self.capabilities & Capability.DEPRECATE_EOF)

    async def send(self, payload: bytes, sequence: int = 0) -> None:
        await self.connection.send_all(frame(payload, sequence)[0])

    async def packet(self) -> bytes:
        return (await self.connection._read_packet()).payload

    def _is_terminator(self, payload: bytes) -> bool:
        if payload[:1] != b"\xfe":
            return False
        return len(payload) < 0xFFFFFF if self.deprecate_eof else len(payload) < 9

    def _terminator_status(self, payload: bytes) -> int:
        if self.deprecate_eof:
            return ok_status(payload)
        return int.from_bytes(payload[3:5], "little")

    async def command(self, payload: bytes, label: str | None = None) -> list[bytes]:
        """Send one command, read its whole response, record and return it."""
        await self.send(payload)
        with trio.fail_after(RESPONSE_TIMEOUT):
            response = await self._response(payload)
        self.transcript.append((label or payload[:40].hex(), response))
        return response

    async def no_response(self, payload: bytes, label: str | None = None) -> None:
        """Commands the server never answers (SEND_LONG_DATA, STMT_CLOSE)."""
        await self.send(payload)
        self.transcript.append((label or payload[:40].hex(), []))

    async def query(self, sql: str) -> list[bytes]:
        return await self.command(bytes((COM_QUERY,)) + sql.encode(), sql)

    async def prepare(self, sql: str) -> tuple[int, list[bytes]]:
        response = await self.command(bytes((COM_STMT_PREPARE,)) + sql.encode(), "PREPARE " + sql)
        assert response[0][0] == 0x00, response[0]
        return int.from_bytes(response[0][1:5], "little"), response

    async def _response(self, payload: bytes) -> list[bytes]:
        command = payload[0]
        out: list[bytes] = []
        if command in (COM_QUERY, COM_STMT_EXECUTE):
            cursor = command == COM_STMT_EXECUTE and bool(payload[5] & CURSOR_TYPE_READ_ONLY)
            await self._results(out, cursor)
        elif command in (COM_STMT_FETCH, COM_FIELD_LIST):
            await self._rows(out)
        elif command == COM_STMT_PREPARE:
            first = await self.packet()
            out.append(first)
            if first[0] == 0x00:
                columns, params = struct.unpack("<HH", first[5:9])
                for count in (params, columns):
                    if count:
                        out.extend([await self.packet() for _ in range(count)])
                        if not self.deprecate_eof:
                            out.append(await self.packet())
        else:
            out.append(await self.packet())
        return out

    async def _rows(self, out: list[bytes]) -> int:
        """Rows (or column definitions) up to the terminator; returns its status."""
        while True:
            packet = await self.packet()
            out.append(packet)
            if packet[0] == 0xFF:
                return -1
            if self._is_terminator(packet):
                return self._terminator_status(packet)

    async def _results(self, out: list[bytes], cursor: bool) -> None:
        while True:
            first = await self.packet()
            out.append(first)
            if first[0] == 0xFF:
                return
            if first[0] == 0x00:
                if ok_status(first) & SERVER_MORE_RESULTS_EXISTS:
                    continue
                return
            if first[0] == 0xFB:
                raise AssertionError("LOCAL INFILE request not expected here")
            columns, _ = read_lenenc(first)
            out.extend([await self.packet() for _ in range(columns)])
            if not self.deprecate_eof or cursor:
                # Without DEPRECATE_EOF an EOF follows the column definitions;
                # with it, a cursor still gets one (carrying CURSOR_EXISTS).
                eof = await self.packet()
                out.append(eof)
                if eof[0] == 0xFF:
                    return
                status = self._terminator_status(eof)
                if cursor and status & SERVER_STATUS_CURSOR_EXISTS:
                    return
                if cursor and self.deprecate_eof:
                    # No cursor was opened (e.g. a CALL): eof was really a row or the end.
                    if self._is_terminator(eof):
                        if status & SERVER_MORE_RESULTS_EXISTS:
                            continue
                        return
            status = await self._rows(out)
            if status < 0 or not status & SERVER_MORE_RESULTS_EXISTS:
                return

    async def close(self) -> None:
        await self.connection.aclose()


Scenario = Callable[[Raw], Awaitable[None]]


async def both(
    tidegate: RunningProxy,
    primary: sandbox.Instance,
    database: str | None,
    capabilities: int,
    scenario: Scenario,
) -> tuple[Raw, Raw]:
    """Run a scenario direct and proxied; the transcripts must be identical."""
    direct = await Raw.open(primary.host, primary.port, database, capabilities)
    proxied = await Raw.open(tidegate.host, tidegate.port, database, capabilities)
    assert proxied.capabilities == direct.capabilities
    await scenario(direct)
    await scenario(proxied)
    assert len(proxied.transcript) == len(direct.transcript)
    for (label, expected), (_, got) in zip(direct.transcript, proxied.transcript, strict=True):
        if label.startswith("PREPARE ") and expected[0][:1] == b"\x00" == got[0][:1]:
            # Statement ids come from a server-wide counter: compare the rest.
            expected = [expected[0][:1] + expected[0][5:], *expected[1:]]
            got = [got[0][:1] + got[0][5:], *got[1:]]
        if (
            expected[:1]
            and expected[0][:1] == b"\xff"
            and error_code(expected[0]) in STATEMENT_ID_ERRORS
        ):
            expected = [re.sub(rb"\(\d+\)", b"(id)", expected[0])]
            got = [re.sub(rb"\(\d+\)", b"(id)", got[0])] if got else got
        assert got == expected, f"response to {label!r} differs through the proxy"
    return direct, proxied


async def relay_state(tidegate: RunningProxy, connection_id: int) -> dict[str, Any]:
    """The relay's SessionState for one proxied connection, read in the proxy's thread."""

    def snapshot() -> dict[str, Any]:
        session = tidegate.proxy.relays[connection_id].session
        return {
            "schema": session.schema,
            "in_transaction": session.in_transaction,
            "autocommit": session.autocommit,
            "prepared": sorted(session.prepared),
        }

    return dict(await trio.to_thread.run_sync(tidegate.call, snapshot))


async def server_state(primary: sandbox.Instance, raw: Raw) -> dict[str, Any]:
    """The same facts as the server sees them, asked on a side connection."""
    backend_thread = await _backend_thread_id(raw)

    def ask() -> dict[str, Any]:
        connection = primary.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT p.STATEMENT_ID FROM performance_schema.prepared_statements_instances p "
                    "JOIN performance_schema.threads t ON p.OWNER_THREAD_ID = t.THREAD_ID "
                    "WHERE t.PROCESSLIST_ID = %s AND p.STATEMENT_NAME IS NULL",
                    (backend_thread,),
                )
                prepared = sorted(int(row[0]) for row in cursor.fetchall())
        finally:
            connection.close()
        return {"prepared": prepared}

    state = await trio.to_thread.run_sync(ask)
    rows = _text_rows(await raw.query("SELECT DATABASE(), @@in_transaction, @@autocommit"))
    schema, in_transaction, autocommit = rows[0]
    raw.transcript.pop()
    state.update(
        schema=schema.decode() if schema is not None else None,
        in_transaction=in_transaction == b"1",
        autocommit=autocommit == b"1",
    )
    return state


async def _backend_thread_id(raw: Raw) -> int:
    rows = _text_rows(await raw.query("SELECT CONNECTION_ID()"))
    raw.transcript.pop()
    value = rows[0][0]
    assert value is not None
    return int(value)


def _text_rows(response: list[bytes]) -> list[tuple[bytes | None, ...]]:
    columns, _ = read_lenenc(response[0])
    rows = []
    for payload in response[1 + columns :]:
        if payload[0] == 0xFE and len(payload) < 0xFFFFFF:
            continue
        values: list[bytes | None] = []
        position = 0
        for _ in range(columns):
            if payload[position] == 0xFB:
                values.append(None)
                position += 1
            else:
                size, position = read_lenenc(payload, position)
                values.append(payload[position : position + size])
                position += size
        rows.append(tuple(values))
    return rows


async def assert_state_matches(
    tidegate: RunningProxy, primary: sandbox.Instance, raw: Raw, after: str = ""
) -> dict[str, Any]:
    # Read the relay first: the server_state queries themselves must not be what fixes it.
    relay = await relay_state(tidegate, raw.connection_id)
    server = await server_state(primary, raw)
    # A USE inside a multi-statement batch is learnt with one more round trip after the
    # client has its response (the client's next command waits for it; this look does not).
    with trio.move_on_after(2):
        while relay != server:
            await trio.sleep(0.02)
            relay = await relay_state(tidegate, raw.connection_id)
    assert relay == server, f"after {after!r}: relay session state {relay} != server {server}"
    return relay


# -- scenarios -----------------------------------------------------------------

capability_sets = pytest.mark.parametrize(
    "capabilities", list(CAPABILITY_SETS.values()), ids=list(CAPABILITY_SETS)
)


@capability_sets
async def test_text_protocol_results(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    async def scenario(raw: Raw) -> None:
        await raw.query(
            "CREATE TEMPORARY TABLE t (id INT PRIMARY KEY, v VARCHAR(20), b BLOB, j JSON)"
        )
        await raw.query(
            "INSERT INTO t VALUES (1, 'a', x'00fffe', '{\"k\": [1, 2]}'), (2, NULL, '', 'null'),"
            " (3, 'émoji 🐟', REPEAT(x'fe', 300), NULL)"
        )
        await raw.query("SELECT * FROM t ORDER BY id")
        await raw.query("SELECT * FROM t WHERE id < 0")  # empty result
        await raw.query(
            "SELECT 1; SELECT 'two', 2; UPDATE t SET v = 'x' WHERE id = 1; SELECT v FROM t"
        )
        await raw.query("SELECT 1; SELECT * FROM no_such_table; SELECT 3")  # error mid-batch
        await raw.query("SELECT 'still usable'")
        await raw.query("DO 1")
        await raw.query("SET @a = 1")
        await raw.query("SELECT 1 FROM DUAL WHERE 1 = 0 UNION SELECT 2")
        await raw.query("SHOW WARNINGS")
        await raw.query("SELECT CAST('x' AS SIGNED)")  # a warning in the EOF/OK
        await raw.query("SHOW WARNINGS")

    await both(tidegate, primary, database, capabilities, scenario)


@capability_sets
async def test_stored_procedure_results(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    primary.execute(
        f"CREATE PROCEDURE `{database}`.two_sets(IN n INT, OUT total INT) BEGIN "
        "SELECT n AS first; SELECT n + 1 AS second, 'x' AS label; SET total = n * 10; END",
        f"CREATE PROCEDURE `{database}`.failing() BEGIN "
        "SELECT 1 AS ok_first; SELECT * FROM no_such_table; END",
    )

    async def scenario(raw: Raw) -> None:
        await raw.query("CALL two_sets(5, @total)")
        await raw.query("SELECT @total")
        await raw.query("CALL failing()")
        await raw.query("SELECT 'after failing call'")
        statement, _ = await raw.prepare("CALL two_sets(?, ?)")
        await raw.command(execute_payload(statement, [p_int(7), NULL]), "EXECUTE CALL")
        await raw.command(execute_payload(statement, [p_int(8), NULL]), "EXECUTE CALL again")
        await raw.query("SELECT 'after prepared call'")

    await both(tidegate, primary, database, capabilities, scenario)


@capability_sets
async def test_prepared_statement_parameter_types(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    """Every binary parameter type, NULL bitmaps, and re-bound types on one statement."""
    columns = (
        "ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, i INT, iu INT UNSIGNED, bi BIGINT,"
        " biu BIGINT UNSIGNED, f FLOAT, d DOUBLE, dec1 DECIMAL(30,10), dt DATE,"
        " dtm DATETIME(6), ts TIMESTAMP(6) NULL, tm TIME(6), y YEAR, vc VARCHAR(64),"
        " bl BLOB, ch CHAR(3), js JSON"
    )
    count = 19
    values = [
        p_int(-128, T_TINY),
        p_int(255, T_TINY, unsigned=True),
        p_int(-32768, T_SHORT),
        p_int(-2147483648, T_LONG),
        p_int(4294967295, T_LONG, unsigned=True),
        p_int(-(2**63), T_LONGLONG),
        p_int(2**64 - 1, T_LONGLONG, unsigned=True),
        Param(T_FLOAT, struct.pack("<f", 1.5)),
        Param(T_DOUBLE, struct.pack("<d", -2.25e-300)),
        p_str("12345678901234567890.0123456789", T_NEWDECIMAL),
        p_datetime(T_DATE, 2024, 2, 29),
        p_datetime(T_DATETIME, 1999, 12, 31, 23, 59, 58, micro=999999),
        p_datetime(T_TIMESTAMP, 2038, 1, 19, 3, 14, 7, micro=1),
        p_time(True, 1, 2, 3, 4, micro=500000),
        p_int(2155, T_SHORT),
        p_str("héllo 🐟 wörld"),
        p_str(bytes(range(256)), T_BLOB),
        p_str("abc", T_STRING),
        p_str('{"a": [1, null, "x"]}'),
    ]
    assert len(values) == count
    # The same row again, re-bound with other types the server must convert.
    rebound = [
        p_str("-1"),
        p_int(7, T_LONGLONG),
        Param(T_DOUBLE, struct.pack("<d", 12.0)),
        p_str("42"),
        p_int(1, T_TINY, unsigned=True),
        p_str("-9223372036854775808"),
        p_str("18446744073709551615"),
        p_str("0.5"),
        p_int(3, T_LONG),
        Param(T_DOUBLE, struct.pack("<d", 0.125)),
        p_str("2001-01-01"),
        p_str("2001-01-01 01:02:03.5"),
        NULL,
        p_str("-838:59:59"),
        p_str("1999"),
        p_int(123456, T_LONG),
        NULL,
        NULL,
        p_str("[]"),
    ]

    async def scenario(raw: Raw) -> None:
        await raw.query("SET time_zone = '+00:00'")
        await raw.query(f"CREATE TEMPORARY TABLE p (id INT PRIMARY KEY, {columns})")
        marks = ", ".join(["?"] * (count + 1))
        insert, _ = await raw.prepare(f"INSERT INTO p VALUES ({marks})")
        await raw.command(execute_payload(insert, [p_int(1, T_LONG), *values]), "all types")
        await raw.command(execute_payload(insert, [p_int(2, T_LONG), *rebound]), "re-bound types")
        await raw.command(execute_payload(insert, [p_int(3, T_LONG)] + [NULL] * count), "all NULL")
        # Same types as last time, without re-sending them (new_params_bound_flag = 0).
        await raw.command(
            execute_payload(insert, [p_int(4, T_LONG)] + [NULL] * count, bind=False),
            "no re-bind",
        )
        await raw.command(execute_payload(insert, [p_int(1, T_LONG), *values]), "duplicate key")
        select, _ = await raw.prepare("SELECT * FROM p WHERE id >= ? ORDER BY id")
        await raw.command(execute_payload(select, [p_int(0)]), "binary rows")
        await raw.command(execute_payload(select, [p_str("2")]), "binary rows, re-bound param")
        await raw.query("SELECT * FROM p ORDER BY id")
        # Parameter and column counts far from the usual: no params, many columns.
        wide, _ = await raw.prepare("SELECT " + ", ".join(f"{n} AS c{n}" for n in range(300)))
        await raw.command(execute_payload(wide, []), "300 columns")

    await both(tidegate, primary, database, capabilities, scenario)


@capability_sets
async def test_long_data_reset_close(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB

    async def scenario(raw: Raw) -> None:
        await raw.query("CREATE TEMPORARY TABLE l (id INT PRIMARY KEY, b LONGBLOB, t TEXT)")
        insert, _ = await raw.prepare("INSERT INTO l VALUES (?, ?, ?)")
        for _ in range(5):
            await raw.no_response(
                bytes((COM_STMT_SEND_LONG_DATA,)) + struct.pack("<IH", insert, 1) + chunk,
                "long data b",
            )
        await raw.no_response(
            bytes((COM_STMT_SEND_LONG_DATA,)) + struct.pack("<IH", insert, 2) + "ü🐟".encode(),
            "long data t",
        )
        params = [p_int(1, T_LONG), Param(T_BLOB, b""), Param(T_BLOB, b"")]
        # Long-data parameters send no value in the execute packet.
        payload = bytes((COM_STMT_EXECUTE,)) + struct.pack("<IBI", insert, 0, 1)
        payload += b"\x00\x01" + b"".join(bytes((p.type, 0)) for p in params)
        payload += p_int(1, T_LONG).value or b""
        await raw.command(payload, "execute with long data")
        # Long data then RESET: the buffered data is dropped.
        await raw.no_response(
            bytes((COM_STMT_SEND_LONG_DATA,)) + struct.pack("<IH", insert, 1) + b"dropped",
        )
        await raw.command(bytes((COM_STMT_RESET,)) + struct.pack("<I", insert), "reset")
        await raw.command(
            execute_payload(insert, [p_int(2, T_LONG), p_str(b"after reset", T_BLOB), NULL]),
            "execute after reset",
        )
        await raw.query("SELECT id, LENGTH(b), MD5(b), t FROM l ORDER BY id")
        await raw.command(bytes((COM_STMT_RESET,)) + struct.pack("<I", 999999), "reset unknown")
        await raw.no_response(bytes((COM_STMT_CLOSE,)) + struct.pack("<I", insert), "close")
        await raw.command(
            execute_payload(insert, [p_int(3, T_LONG), NULL, NULL]), "execute after close"
        )
        await raw.query("SELECT COUNT(*) FROM l")

    _direct, proxied = await both(tidegate, primary, database, capabilities, scenario)
    (_, closed) = proxied.transcript[-2]
    assert error_code(closed[0]) == 1243  # ER_UNKNOWN_STMT_HANDLER
    rows = _text_rows(proxied.transcript[-5][1])
    assert rows[0][1] == b"327680"


@capability_sets
async def test_server_side_cursor_fetch(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    async def scenario(raw: Raw) -> None:
        await raw.query("CREATE TEMPORARY TABLE c (id INT PRIMARY KEY, v VARCHAR(20))")
        await raw.query(
            "INSERT INTO c VALUES " + ", ".join(f"({n}, 'row {n}')" for n in range(1, 11))
        )
        statement, _ = await raw.prepare("SELECT id, v FROM c WHERE id > ? ORDER BY id")
        cursor = CURSOR_TYPE_READ_ONLY
        await raw.command(execute_payload(statement, [p_int(0)], flags=cursor), "open cursor")
        fetch = bytes((COM_STMT_FETCH,)) + struct.pack("<I", statement)
        await raw.command(fetch + struct.pack("<I", 3), "fetch 3")
        await raw.command(fetch + struct.pack("<I", 3), "fetch 3 more")
        await raw.command(fetch + struct.pack("<I", 100), "fetch the rest")
        await raw.command(fetch + struct.pack("<I", 1), "fetch past the end")
        # Re-open the cursor, fetch part, then reset closes it.
        await raw.command(execute_payload(statement, [p_int(5)], flags=cursor), "reopen")
        await raw.command(fetch + struct.pack("<I", 2), "fetch 2")
        await raw.command(bytes((COM_STMT_RESET,)) + struct.pack("<I", statement), "reset")
        await raw.command(fetch + struct.pack("<I", 2), "fetch after reset")
        # A cursor on a statement without a result set just answers OK.
        update, _ = await raw.prepare("UPDATE c SET v = ? WHERE id = 1")
        await raw.command(execute_payload(update, [p_str("u")], flags=cursor), "cursor on UPDATE")
        # Cursor with an empty result.
        await raw.command(execute_payload(statement, [p_int(99)], flags=cursor), "empty cursor")
        await raw.command(fetch + struct.pack("<I", 5), "fetch from empty")
        # Two cursors open at once on two statements.
        other, _ = await raw.prepare("SELECT v FROM c ORDER BY id DESC")
        await raw.command(execute_payload(statement, [p_int(0)], flags=cursor), "cursor A")
        await raw.command(execute_payload(other, [], flags=cursor), "cursor B")
        fetch_other = bytes((COM_STMT_FETCH,)) + struct.pack("<I", other)
        await raw.command(fetch_other + struct.pack("<I", 2), "fetch B")
        await raw.command(fetch + struct.pack("<I", 2), "fetch A")
        await raw.query("SELECT 'usable'")

    _direct, proxied = await both(tidegate, primary, database, capabilities, scenario)
    labels = dict(proxied.transcript)
    assert len(labels["fetch 3"]) == 4  # 3 rows and the terminator
    assert ok_or_eof_status(proxied, labels["fetch the rest"][-1]) & SERVER_STATUS_LAST_ROW_SENT
    state = await assert_state_matches(tidegate, primary, proxied)
    assert len(state["prepared"]) == 3


@pytest.mark.parametrize(
    "capabilities", [NO_EOF, WITH_EOF_DEPRECATED], ids=["eof", "deprecate_eof"]
)
async def test_payloads_of_16_mib_and_more(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    """Packets over the 16 MiB frame limit both ways, and exactly 0xFFFFFF long (which
    ends with an empty continuation frame), in the text and the binary protocol."""
    hexed = bytes(range(256)) * (8704 * 4)  # 8.5 MiB, 17 MiB as hex
    big = hexed * 2 + b"tail"  # 17 MiB + 4
    exact_text = 0xFFFFFF - 4  # text row: 0xfd + 3-byte length + value
    exact_binary = 0xFFFFFF - 6  # binary row: header, NULL bitmap, 0xfd + 3 bytes, value
    exact_query = 0xFFFFFF - 1 - len("SELECT LENGTH('')")

    # Client -> server sizes do not depend on the capabilities: send them once.
    upload = capabilities == WITH_EOF_DEPRECATED

    async def scenario(raw: Raw) -> None:
        await raw.query("CREATE TEMPORARY TABLE big (id INT PRIMARY KEY, b LONGBLOB)")
        # client -> server: COM_QUERY of 18 MiB and COM_STMT_EXECUTE of 17 MiB
        await raw.query(f"INSERT INTO big VALUES (1, x'{hexed.hex()}')")
        insert, _ = await raw.prepare("INSERT INTO big VALUES (?, ?)")
        if upload:
            await raw.command(
                execute_payload(insert, [p_int(2, T_LONG), p_str(big, T_BLOB)]), "execute 17 MiB"
            )
            # ... and a payload of exactly 0xFFFFFF bytes (then an empty frame)
            await raw.command(
                bytes((COM_QUERY,)) + b"SELECT LENGTH('" + b"q" * exact_query + b"')",
                "exact query",
            )
        else:
            await raw.query("INSERT INTO big SELECT 2, CONCAT(REPEAT(b, 2), 'tail') FROM big")
        # server -> client: rows over 16 MiB whose first byte is 0xfe (8-byte length)
        await raw.query("SELECT b, id FROM big ORDER BY id")
        select, _ = await raw.prepare("SELECT b, id FROM big WHERE id >= ? ORDER BY id")
        await raw.command(execute_payload(select, [p_int(0)]), "binary rows")
        # rows of exactly 0xFFFFFF bytes
        await raw.query(f"SELECT REPEAT('a', {exact_text})")
        repeat, _ = await raw.prepare("SELECT REPEAT('b', ?)")
        await raw.command(execute_payload(repeat, [p_int(exact_binary)]), "exact binary row")
        await raw.query("SELECT MD5(b), LENGTH(b) FROM big ORDER BY id")

    _direct, proxied = await both(tidegate, primary, database, capabilities, scenario)
    labels = dict(proxied.transcript)
    if upload:
        assert _text_rows(labels["exact query"])[0][0] == str(exact_query).encode()
    (row,) = [p for p in labels[f"SELECT REPEAT('a', {exact_text})"] if len(p) > 1000]
    assert len(row) == 0xFFFFFF
    rows = [p for p in labels["SELECT b, id FROM big ORDER BY id"] if len(p) > 1000]
    assert rows[1][:1] == b"\xfe" and rows[1][9 : 9 + len(big)] == big
    assert any(len(p) == 0xFFFFFF for p in labels["exact binary row"])
    digests = _text_rows(proxied.transcript[-1][1])
    assert digests[1] == (hashlib.md5(big).hexdigest().encode(), str(len(big)).encode())


def ok_or_eof_status(raw: Raw, payload: bytes) -> int:
    return raw._terminator_status(payload)


@capability_sets
async def test_admin_commands(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    """COM_PING, COM_INIT_DB, COM_FIELD_LIST, COM_SET_OPTION, unknown and refused commands."""
    primary.execute(
        f"CREATE TABLE `{database}`.fl (id INT PRIMARY KEY, name VARCHAR(10) DEFAULT 'x', "
        "price DECIMAL(8,2), note TEXT)"
    )

    async def scenario(raw: Raw) -> None:
        await raw.command(bytes((COM_PING,)), "ping")
        await raw.command(bytes((COM_FIELD_LIST,)) + b"fl\x00", "field list")
        await raw.command(bytes((COM_FIELD_LIST,)) + b"fl\x00na%", "field list wildcard")
        await raw.command(bytes((COM_FIELD_LIST,)) + b"nope\x00", "field list unknown table")
        await raw.command(bytes((COM_INIT_DB,)) + b"no_such_db", "init_db unknown")
        await raw.command(bytes((COM_INIT_DB,)) + b"mysql", "init_db mysql")
        await raw.query("SELECT DATABASE()")
        await raw.command(bytes((COM_INIT_DB,)) + database.encode(), "init_db back")
        await raw.command(bytes((COM_SET_OPTION,)) + struct.pack("<H", 1), "multi off")
        await raw.command(bytes((COM_QUERY,)) + b"SELECT 1; SELECT 2", "multi while off")
        await raw.command(bytes((COM_SET_OPTION,)) + struct.pack("<H", 0), "multi on")
        await raw.command(bytes((COM_QUERY,)) + b"SELECT 1; SELECT 2", "multi while on")
        await raw.command(bytes((COM_SET_OPTION,)) + struct.pack("<H", 7), "bad option")
        await raw.command(bytes((COM_PING,)), "ping after")

    _direct, proxied = await both(tidegate, primary, database, capabilities, scenario)
    labels = dict(proxied.transcript)
    assert error_code(labels["init_db unknown"][0]) == 1049
    assert labels["multi off"][0][0] in (0x00, 0xFE)
    assert error_code(labels["multi while off"][0]) == 1064
    assert len(labels["multi while on"]) == (10 if capabilities == NO_EOF else 8)
    await assert_state_matches(tidegate, primary, proxied)


async def test_statistics(tidegate: RunningProxy, primary: sandbox.Instance) -> None:
    raw = await Raw.open(tidegate.host, tidegate.port, None, TRACKED)
    try:
        (text,) = await raw.command(bytes((COM_STATISTICS,)), "statistics")
        assert text.startswith(b"Uptime: ") and b"Threads: " in text and b"Questions: " in text
        assert (await raw.command(bytes((COM_PING,)), "ping"))[0][0] == 0x00
    finally:
        await raw.close()


async def test_refused_commands_do_not_hang(tidegate: RunningProxy) -> None:
    """Replication and internal commands get a clear MySQL error; the session lives on."""
    raw = await Raw.open(tidegate.host, tidegate.port, None, NO_EOF)
    try:
        for payload in (
            bytes((COM_BINLOG_DUMP,)) + struct.pack("<IHI", 4, 0, 99) + b"x-bin.000001",
            bytes((0x1E,)) + b"\x00" * 20,  # COM_BINLOG_DUMP_GTID
            bytes((0x15,)) + b"\x00" * 16,  # COM_REGISTER_SLAVE
            bytes((COM_STMT_BULK_EXECUTE,)) + b"\x00" * 8,  # MariaDB bulk: not negotiated
            bytes((0x00,)),  # COM_SLEEP
            bytes((0x60,)),  # not a command at all
        ):
            (response,) = await raw.command(payload)
            assert error_code(response) == 1047, response
            assert b"tidegate" in response
        assert (await raw.query("SELECT 1"))[-2] == b"\x011"
    finally:
        await raw.close()


@pytest.mark.parametrize("capabilities", [NO_EOF, TRACKED], ids=["eof", "tracked"])
async def test_reset_connection(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, capabilities: int
) -> None:
    async def scenario(raw: Raw) -> None:
        await raw.query("SET autocommit = 0")
        await raw.query("CREATE TEMPORARY TABLE r (id INT)")
        await raw.query("INSERT INTO r VALUES (1)")
        await raw.query("SET @user_var = 'kept?'")
        statement, _ = await raw.prepare("SELECT 1")
        await raw.command(bytes((COM_RESET_CONNECTION,)), "reset connection")
        await raw.query("SELECT @user_var, @@autocommit, @@in_transaction, DATABASE()")
        await raw.query("SELECT * FROM r")
        await raw.command(execute_payload(statement, []), "execute dropped statement")

    _direct, proxied = await both(tidegate, primary, database, capabilities, scenario)
    labels = dict(proxied.transcript)
    assert labels["reset connection"][0][0] == 0x00
    assert error_code(labels["SELECT * FROM r"][0]) == 1146
    state = await assert_state_matches(tidegate, primary, proxied)
    assert state == {
        "schema": database,
        "in_transaction": False,
        "autocommit": True,
        "prepared": [],
    }


async def test_session_state_tracking(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    """Schema, autocommit, transaction and prepared ids follow every kind of change."""
    primary.execute(f"CREATE TABLE `{database}`.s (id INT PRIMARY KEY)")
    raw = await Raw.open(tidegate.host, tidegate.port, database, TRACKED)
    try:
        checks = [
            "SELECT 1",
            "BEGIN",
            "INSERT INTO s VALUES (1)",
            "COMMIT",
            "SET autocommit = 0",  # with SESSION_TRACK the OK's status is 0x4000, not 0
            "INSERT INTO s VALUES (2)",
            "SET autocommit = 1",  # implicit commit
            "BEGIN",
            "INSERT INTO s VALUES (5)",
            "ROLLBACK",
            "START TRANSACTION READ ONLY",
            "SELECT * FROM s",
            "COMMIT",
            "USE mysql",
            "use `" + database + "`",
            "BEGIN; INSERT INTO s VALUES (3)",
            "COMMIT; SELECT 1",
            "BEGIN",
            "CREATE TABLE s2 (id INT)",  # implicit commit
            "XA START 'x'",
            "INSERT INTO s VALUES (4)",
            "XA END 'x'",
            "XA PREPARE 'x'",
            "XA COMMIT 'x'",
        ]
        for sql in checks:
            response = await raw.query(sql)
            assert response[-1][0] != 0xFF, (sql, response)
            await assert_state_matches(tidegate, primary, raw, sql)
        # prepared ids: prepare, close one, prepare again
        first, _ = await raw.prepare("SELECT ?")
        second, _ = await raw.prepare("SELECT ? + 1")
        await assert_state_matches(tidegate, primary, raw)
        await raw.no_response(bytes((COM_STMT_CLOSE,)) + struct.pack("<I", first))
        await raw.command(bytes((COM_PING,)))
        state = await assert_state_matches(tidegate, primary, raw)
        assert state["prepared"] == [second]
        # a failed prepare adds nothing
        response = await raw.command(bytes((COM_STMT_PREPARE,)) + b"SELECT * FROM nope")
        assert error_code(response[0]) == 1146
        await assert_state_matches(tidegate, primary, raw)
    finally:
        await raw.close()


async def test_autocommit_off_is_tracked(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    """Without SESSION_TRACK, ``SET autocommit = 0`` answers OK with status 0x0000."""
    raw = await Raw.open(tidegate.host, tidegate.port, database, NO_EOF)
    try:
        response = await raw.query("SET autocommit = 0")
        assert ok_status(response[0]) == 0
        await assert_state_matches(tidegate, primary, raw, "SET autocommit = 0")
    finally:
        await raw.close()


async def test_rollback_with_autocommit_off_ends_the_transaction(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    """Even with SESSION_TRACK, COMMIT/ROLLBACK under autocommit=0 answer status 0x0000."""
    primary.execute(f"CREATE TABLE `{database}`.z (id INT PRIMARY KEY)")
    raw = await Raw.open(tidegate.host, tidegate.port, database, TRACKED)
    try:
        await raw.query("SET autocommit = 0")
        await raw.query("INSERT INTO z VALUES (1)")
        assert (await relay_state(tidegate, raw.connection_id))["in_transaction"]
        for sql in ("ROLLBACK", "INSERT INTO z VALUES (2)", "COMMIT"):
            response = await raw.query(sql)
            await assert_state_matches(tidegate, primary, raw, sql)
        assert ok_status(response[0]) == 0
    finally:
        await raw.close()


async def test_schema_tracked_through_multi_statement_use(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    raw = await Raw.open(tidegate.host, tidegate.port, database, NO_EOF)
    try:
        await raw.query("USE mysql; SELECT 1")
        await assert_state_matches(tidegate, primary, raw)
    finally:
        await raw.close()


async def test_schema_tracked_through_drop_database(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    primary.execute(f"CREATE DATABASE `{database}_gone`")
    raw = await Raw.open(tidegate.host, tidegate.port, f"{database}_gone", NO_EOF)
    try:
        await raw.query(f"DROP DATABASE `{database}_gone`")
        await assert_state_matches(tidegate, primary, raw)
    finally:
        await raw.close()


async def test_transaction_state_after_deadlock(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    primary.execute(
        f"CREATE TABLE `{database}`.dl (id INT PRIMARY KEY, v INT)",
        f"INSERT INTO `{database}`.dl VALUES (1, 0), (2, 0)",
    )
    a = await Raw.open(tidegate.host, tidegate.port, database, NO_EOF)
    b = await Raw.open(tidegate.host, tidegate.port, database, NO_EOF)
    try:
        await a.query("BEGIN")
        await a.query("UPDATE dl SET v = 1 WHERE id = 1")
        await b.query("BEGIN")
        await b.query("UPDATE dl SET v = 2 WHERE id = 2")
        results: dict[str, list[bytes]] = {}

        async def blocked() -> None:
            results["a"] = await a.query("UPDATE dl SET v = 1 WHERE id = 2")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            await trio.sleep(0.3)
            results["b"] = await b.query("UPDATE dl SET v = 2 WHERE id = 1")
        codes = {name: r[0][0] == 0xFF and error_code(r[0]) for name, r in results.items()}
        assert 1213 in codes.values(), codes
        victim = b if codes["b"] == 1213 else a
        await assert_state_matches(tidegate, primary, victim)
    finally:
        await a.close()
        await b.close()


async def test_unknown_database_is_forwarded(
    tidegate: RunningProxy, primary: sandbox.Instance
) -> None:
    errors = []
    for host, port in ((primary.host, primary.port), (tidegate.host, tidegate.port)):
        with pytest.raises(BackendError) as info:
            await Raw.open(host, port, "no_such_database", NO_EOF)
        errors.append((info.value.err.code, info.value.err.sql_state, info.value.err.message))
    assert errors[0] == errors[1]
    assert errors[1][0] == 1049
