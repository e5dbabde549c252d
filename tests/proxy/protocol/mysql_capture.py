"""Real server responses for the ResponseTracker tests: capture and replay.

``exchange`` sends one command on a raw backend connection and captures the
server's bytes until a live ``ResponseTracker`` says the response is over,
then proves the stream is still aligned with a COM_PING.  ``replay`` feeds a
capture to a fresh tracker in any chunking; every chunking must give the same
``Facts``.  ``decode`` is an independent reference reading of a response from
whole logical packets, for the assertions the tests make about content.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.backends import (
    DEFAULT_CLIENT_CAPABILITIES,
    BackendConnection,
    Credentials,
    Endpoint,
    connect,
)
from proxy.protocol.constants import MAX_PACKET_PAYLOAD, Capability, Command, Status
from proxy.protocol.framing import Packet, PacketReader, frame
from proxy.protocol.packets import Column, Eof, Err, Ok, parse_text_row
from proxy.protocol.response import ResponseTracker
from proxy.protocol.wire import Reader, lenenc_bytes

#: Capability variants every scenario runs under.
VARIANTS = {
    "eof": 0,
    "deprecate_eof": int(Capability.DEPRECATE_EOF),
    "deprecate_eof+session_track": int(Capability.DEPRECATE_EOF | Capability.SESSION_TRACK),
}
CURSOR_TYPE_READ_ONLY = 0x01
#: Captures above this size are replayed byte by byte only around frame headers.
BYTEWISE_LIMIT = 1 << 20


async def open_connection(
    port: int, database: str | None, extra_capabilities: int = 0, *, local_files: bool = False
) -> BackendConnection:
    capabilities = DEFAULT_CLIENT_CAPABILITIES | extra_capabilities
    if local_files:
        capabilities |= Capability.LOCAL_FILES
    else:
        capabilities &= ~Capability.LOCAL_FILES
    connection = await connect(
        Endpoint("primary", "127.0.0.1", port),
        Credentials.from_password("root", "root"),
        database=database,
        client_capabilities=capabilities,
    )
    for flag in (Capability.DEPRECATE_EOF, Capability.SESSION_TRACK, Capability.LOCAL_FILES):
        assert bool(connection.capabilities & flag) == bool(capabilities & flag), flag
    assert connection.reader.pending() == 0
    return connection


# -- facts and replay ---------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """Everything a tracker reports about one response."""

    ends: tuple[int, ...]  # feed()'s end offset per segment, relative to its start
    done: bool
    status: int
    error_code: int
    results: int
    prepared: tuple[int, int, int] | None
    last_sequence: int


def facts_of(tracker: ResponseTracker, ends: Sequence[int]) -> Facts:
    return Facts(
        tuple(ends),
        tracker.done,
        tracker.status,
        tracker.error_code,
        tracker.results,
        tracker.prepared,
        tracker.last_sequence,
    )


@dataclass(frozen=True)
class Capture:
    """One command's response as the server sent it.

    ``segments`` are the server's bytes split where the response paused for a
    LOCAL INFILE upload (one segment when there was none)."""

    name: str
    command: int
    capabilities: int
    segments: tuple[bytes, ...]
    facts: Facts
    packets: tuple[Packet, ...] = field(repr=False)

    @property
    def deprecate_eof(self) -> bool:
        return bool(self.capabilities & Capability.DEPRECATE_EOF)

    @property
    def size(self) -> int:
        return sum(len(segment) for segment in self.segments)


def pieces(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    start = 0
    for cut in (*cuts, len(data)):
        if cut > start:
            yield data[start:cut]
            start = cut


def replay(capture: Capture, cuts: Sequence[Sequence[int]] | None = None) -> Facts:
    """Feed ``capture`` to a fresh tracker, each segment cut at ``cuts``."""
    tracker = ResponseTracker(capture.command, capture.capabilities)
    ends = []
    for index, segment in enumerate(capture.segments):
        if index:
            tracker.resume_after_infile()
        end = -1
        consumed = 0
        for piece in pieces(segment, cuts[index] if cuts else ()):
            offset = tracker.feed(piece)
            if offset >= 0:
                end = consumed + offset
                break
            consumed += len(piece)
        ends.append(end)
    return facts_of(tracker, ends)


def bytewise_cuts(segment: bytes) -> list[int]:
    """Every byte on its own; for big segments, every byte near a frame header."""
    if len(segment) <= BYTEWISE_LIMIT:
        return list(range(1, len(segment)))
    cuts: set[int] = set()
    offset = 0
    while offset < len(segment):
        cuts.update(range(max(1, offset - 40), min(len(segment), offset + 40)))
        offset += 4 + int.from_bytes(segment[offset : offset + 3], "little")
    cuts.update(range(max(1, len(segment) - 40), len(segment)))
    return sorted(cuts)


def check_replays(capture: Capture, examples: int = 15) -> None:
    """Whole, byte by byte, and in random splits: the same facts every time."""
    assert replay(capture) == capture.facts, capture.name
    bytewise = [bytewise_cuts(segment) for segment in capture.segments]
    assert replay(capture, bytewise) == capture.facts, capture.name

    @settings(
        max_examples=examples if capture.size <= BYTEWISE_LIMIT else 3,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def random_splits(data: st.DataObject) -> None:
        cuts = [
            sorted(
                data.draw(
                    st.sets(
                        st.integers(1, max(1, len(segment) - 1)), max_size=min(80, len(segment))
                    ),
                    label=f"cuts[{index}]",
                )
            )
            for index, segment in enumerate(capture.segments)
        ]
        assert replay(capture, cuts) == capture.facts, capture.name

    random_splits()


# -- talking to the server ----------------------------------------------------


async def read_packets(connection: BackendConnection, count: int) -> list[Packet]:
    reader = PacketReader()
    packets: list[Packet] = []
    while len(packets) < count:
        while len(packets) < count and (packet := reader.next_packet()) is not None:
            packets.append(packet)
        if len(packets) < count:
            data = await connection.receive_some()
            assert data, "server closed the connection"
            reader.feed(data)
    assert reader.pending() == 0, f"{reader.pending()} unexpected bytes after {count} packets"
    return packets


async def assert_aligned(connection: BackendConnection) -> None:
    """A COM_PING answered by exactly one OK proves nothing of the last
    response was left unread (the tracker did not stop early)."""
    await connection.send_all(frame(bytes((Command.PING,)), 0)[0])
    with trio.fail_after(10):
        (packet,) = await read_packets(connection, 1)
    assert packet.first == 0x00 and packet.sequence == 1, f"stream misaligned: {packet.raw[:40]!r}"


async def exchange(
    connection: BackendConnection,
    payload: bytes,
    name: str = "",
    *,
    infile: Sequence[bytes] = (),
    timeout: float = 30,
) -> Capture:
    """Send one command and capture its response; LOCAL INFILE requests are
    answered with the ``infile`` chunks and an empty packet."""
    tracker = ResponseTracker(payload[0], connection.capabilities)
    await connection.send_all(frame(payload, 0)[0])
    segments: list[bytes] = []
    current = bytearray()
    with trio.fail_after(timeout):
        while True:
            data = await connection.receive_some()
            assert data, "server closed the connection"
            current += data
            end = tracker.feed(data)
            if end < 0:
                continue
            assert end == len(data), f"tracker ended {len(data) - end} bytes before the data"
            segments.append(bytes(current))
            current.clear()
            if tracker.done:
                break
            assert tracker.infile_requested
            sequence = tracker.last_sequence + 1
            upload = bytearray()
            for chunk in (*infile, b""):
                framed, sequence = frame(chunk, sequence)
                upload += framed
            await connection.send_all(upload)
            tracker.resume_after_infile()
    await assert_aligned(connection)
    ends = [len(segment) for segment in segments]
    packets = split_packets(segments)
    capture = Capture(
        name or f"0x{payload[0]:02x}",
        payload[0],
        connection.capabilities,
        tuple(segments),
        facts_of(tracker, ends),
        tuple(packets),
    )
    assert capture.facts.last_sequence == packets[-1].last_sequence
    return capture


def split_packets(segments: Sequence[bytes]) -> list[Packet]:
    """Logical packets per PacketReader: segments hold whole packets only,
    numbered 1, 2, 3 ... (mod 256) within a segment."""
    packets: list[Packet] = []
    for segment in segments:
        reader = PacketReader()
        reader.feed(segment)
        expected = None
        while (packet := reader.next_packet()) is not None:
            if expected is not None:
                assert packet.sequence == expected, (packet.sequence, expected)
            expected = (packet.last_sequence + 1) & 0xFF
            packets.append(packet)
        assert reader.pending() == 0
    return packets


async def query(
    connection: BackendConnection, sql: str, name: str = "", **kwargs: object
) -> Capture:
    payload = bytes((Command.QUERY,)) + sql.encode("utf-8")
    return await exchange(connection, payload, name or sql[:40], **kwargs)  # type: ignore[arg-type]


# -- commands -------------------------------------------------------------


def u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def execute_payload(statement: int, params: Sequence[object] = (), flags: int = 0) -> bytes:
    """COM_STMT_EXECUTE with ints as LONGLONG, str/bytes as VAR_STRING, None as NULL."""
    out = bytearray((Command.STMT_EXECUTE,)) + u32(statement) + bytes((flags,)) + u32(1)
    if params:
        bitmap = bytearray((len(params) + 7) // 8)
        types = bytearray()
        values = bytearray()
        for index, value in enumerate(params):
            if value is None:
                bitmap[index // 8] |= 1 << (index % 8)
                types += b"\x06\x00"
            elif isinstance(value, int):
                types += b"\x08\x00"
                values += value.to_bytes(8, "little", signed=True)
            else:
                raw = value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
                types += b"\xfd\x00"
                values += lenenc_bytes(raw)
        out += bitmap + b"\x01" + types + values
    return bytes(out)


def fetch_payload(statement: int, rows: int) -> bytes:
    return bytes((Command.STMT_FETCH,)) + u32(statement) + u32(rows)


def statement_payload(command: int, statement: int) -> bytes:
    return bytes((command,)) + u32(statement)


# -- reference decoding -------------------------------------------------------


@dataclass
class Result:
    kind: str  # "ok" | "err" | "rows" | "infile"
    status: int = 0
    ok: Ok | None = None
    err: Err | None = None
    columns: list[Column] = field(default_factory=list)
    rows: list[bytes] = field(default_factory=list)  # raw row payloads
    infile: bytes = b""


def is_terminator(payload: bytes, deprecate_eof: bool) -> bool:
    if not payload or payload[0] != 0xFE:
        return False
    return len(payload) < MAX_PACKET_PAYLOAD if deprecate_eof else len(payload) < 9


def terminator_status(payload: bytes, capabilities: int) -> int:
    if capabilities & Capability.DEPRECATE_EOF:
        return Ok.parse(payload, capabilities).status
    return Eof.parse(payload).status


def decode(capture: Capture) -> list[Result]:
    """Read a COM_QUERY / COM_STMT_EXECUTE / COM_STMT_FETCH / COM_FIELD_LIST
    response from whole packets, the way a client library would."""
    caps = capture.capabilities
    deprecate = capture.deprecate_eof
    packets = [p.payload for p in capture.packets]
    # COM_STMT_FETCH sends rows and COM_FIELD_LIST column definitions, with no
    # column count in front and no EOF after the (absent) metadata.
    headless = capture.command in (Command.STMT_FETCH, Command.FIELD_LIST)
    results: list[Result] = []
    index = 0
    while index < len(packets):
        payload = packets[index]
        if payload[0] == 0xFF:
            results.append(Result("err", err=Err.parse(payload)))
            index += 1
            continue
        if not headless and payload[0] == 0x00:
            ok = Ok.parse(payload, caps)
            results.append(Result("ok", ok.status, ok=ok))
            index += 1
            continue
        if not headless and payload[0] == 0xFB:
            results.append(Result("infile", infile=payload[1:]))
            index += 1
            continue
        result = Result("rows")
        if not headless:
            count = Reader(payload).lenenc_int()
            result.columns = [Column.parse(p) for p in packets[index + 1 : index + 1 + count]]
            assert len(result.columns) == count
            index += 1 + count
            if not deprecate:
                result.status = Eof.parse(packets[index]).status
                index += 1
                if result.status & Status.CURSOR_EXISTS and capture.command == Command.STMT_EXECUTE:
                    results.append(result)
                    continue
        while True:
            payload = packets[index]
            index += 1
            if is_terminator(payload, deprecate):
                result.status = terminator_status(payload, caps)
                break
            if payload[0] == 0xFF:
                result.err = Err.parse(payload)
                break
            if capture.command == Command.FIELD_LIST:
                result.columns.append(Column.parse(payload))
            else:
                result.rows.append(payload)
        results.append(result)
    return results


def completed(results: Sequence[Result]) -> int:
    """How many results ended without an error: what ``tracker.results`` counts."""
    return sum(1 for r in results if r.kind == "ok" or (r.kind == "rows" and r.err is None))


def text_rows(result: Result) -> list[tuple[bytes | None, ...]]:
    return [parse_text_row(row, len(result.columns)) for row in result.rows]


_FIXED = {0x01: 1, 0x02: 2, 0x03: 4, 0x04: 4, 0x05: 8, 0x08: 8, 0x09: 4, 0x0D: 2}


def binary_rows(result: Result) -> list[tuple[object, ...]]:
    """Binary-protocol rows for the column types these tests select."""
    out = []
    count = len(result.columns)
    for payload in result.rows:
        reader = Reader(payload)
        assert reader.u8() == 0x00
        bitmap = reader.fixed((count + 7 + 2) // 8)
        values: list[object] = []
        for position, column in enumerate(result.columns):
            bit = position + 2
            if bitmap[bit // 8] & (1 << (bit % 8)):
                values.append(None)
            elif column.type in _FIXED:
                values.append(
                    int.from_bytes(reader.fixed(_FIXED[column.type]), "little", signed=True)
                )
            else:
                values.append(reader.lenenc_bytes())
        assert reader.at_end()
        out.append(tuple(values))
    return out


def result_statuses(capture: Capture) -> list[int]:
    """The tracker's status at the end of each result, packet by packet."""
    tracker = ResponseTracker(capture.command, capture.capabilities)
    statuses = []
    for packet in capture.packets:
        before = tracker.results
        tracker.feed(packet.raw)
        if tracker.results != before:
            statuses.append(tracker.status)
        if tracker.infile_requested:
            tracker.resume_after_infile()
    return statuses


# -- a corpus of real responses for the fuzz tests -----------------------------


async def collect_corpus(port: int, database: str) -> list[Capture]:
    """A small, varied set of real responses in both EOF modes."""
    captures: list[Capture] = []
    for extra in (0, int(Capability.DEPRECATE_EOF | Capability.SESSION_TRACK)):
        connection = await open_connection(port, database, extra, local_files=True)
        try:
            add = captures.append
            await query(connection, "DROP TABLE IF EXISTS t, d")
            await query(connection, "DROP PROCEDURE IF EXISTS p")
            add(
                await query(
                    connection, "CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(9), note TEXT)"
                )
            )
            add(
                await query(
                    connection, "INSERT INTO t VALUES (1, 'a', NULL), (2, '', 'x'), (3, 'c', 'y')"
                )
            )
            add(await query(connection, "SELECT id, name, note FROM t ORDER BY id"))
            add(await query(connection, "SELECT id FROM t WHERE id < 0"))
            add(await query(connection, "SELECT 1; SELECT * FROM nope; SELECT 2"))
            add(await query(connection, "BEGIN; SELECT note FROM t; COMMIT"))
            await query(
                connection, "CREATE PROCEDURE p() BEGIN SELECT 1 AS a; SELECT 'x', NULL; END"
            )
            add(await query(connection, "CALL p()"))
            add(
                await query(
                    connection, "LOAD DATA LOCAL INFILE 'f' INTO TABLE t", infile=[b"4\tz\tq\n"]
                )
            )
            add(await exchange(connection, bytes((Command.PING,)), "ping"))
            add(await exchange(connection, bytes((Command.STATISTICS,)), "statistics"))
            add(await exchange(connection, bytes((Command.FIELD_LIST,)) + b"t\x00", "field list"))
            add(
                await exchange(connection, bytes((Command.SET_OPTION,)) + b"\x00\x00", "set option")
            )
            add(await exchange(connection, bytes((Command.INIT_DB,)) + b"no_such_db", "init db"))
            prepare = await exchange(
                connection,
                bytes((Command.STMT_PREPARE,)) + b"SELECT id, name FROM t WHERE id > ?",
                "prepare",
            )
            add(prepare)
            assert prepare.facts.prepared is not None
            statement = prepare.facts.prepared[0]
            add(await exchange(connection, execute_payload(statement, (0,)), "execute"))
            add(
                await exchange(
                    connection, execute_payload(statement, (1,), CURSOR_TYPE_READ_ONLY), "cursor"
                )
            )
            add(await exchange(connection, fetch_payload(statement, 2), "fetch"))
            add(
                await exchange(
                    connection, statement_payload(Command.STMT_RESET, statement), "reset"
                )
            )
        finally:
            await connection.aclose()
    return captures
