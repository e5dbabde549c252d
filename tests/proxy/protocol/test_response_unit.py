"""ResponseTracker on synthetic responses: API edges, malformed shapes, and
a model-based property over generated multi-result responses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol.constants import MAX_PACKET_PAYLOAD, Capability, Command, Status
from proxy.protocol.framing import frame
from proxy.protocol.packets import Eof, Err, Ok
from proxy.protocol.response import PEEK, ResponseTracker
from proxy.protocol.wire import ProtocolError, lenenc_bytes, lenenc_int

EOF_MODE = int(Capability.PROTOCOL_41)
DEPRECATE = int(Capability.PROTOCOL_41 | Capability.DEPRECATE_EOF)
MORE = int(Status.MORE_RESULTS_EXISTS)


def stream(*payloads: bytes, start: int = 1) -> bytes:
    out = bytearray()
    sequence = start
    for payload in payloads:
        framed, sequence = frame(payload, sequence)
        out += framed
    return bytes(out)


def feed_bytewise(tracker: ResponseTracker, data: bytes) -> int:
    for index in range(len(data)):
        end = tracker.feed(data[index : index + 1])
        if end >= 0:
            return index + end
    return -1


COLUMN = lenenc_bytes(b"def") + b"\x00" * 5 + lenenc_int(0x0C) + b"\x2d\x00" + b"\x00" * 10


# -- API ------------------------------------------------------------------------


def test_feed_after_done_raises() -> None:
    tracker = ResponseTracker(Command.PING, DEPRECATE)
    assert tracker.feed(stream(Ok(status=2).encode())) == 11
    assert tracker.done
    with pytest.raises(ProtocolError):
        tracker.feed(b"\x00")


def test_resume_without_infile_request_raises() -> None:
    tracker = ResponseTracker(Command.QUERY, DEPRECATE)
    with pytest.raises(ProtocolError):
        tracker.resume_after_infile()


def test_infile_request_pauses_and_resumes() -> None:
    tracker = ResponseTracker(Command.QUERY, EOF_MODE)
    request = stream(b"\xfbdata.csv")
    assert tracker.feed(request) == len(request)
    assert tracker.infile_requested and not tracker.done
    assert tracker.last_sequence == 1
    with pytest.raises(ProtocolError):
        tracker.feed(b"\x00")
    tracker.resume_after_infile()
    answer = stream(Ok(affected_rows=5, status=2).encode(), start=4)
    assert tracker.feed(answer) == len(answer)
    assert (tracker.done, tracker.results, tracker.status, tracker.last_sequence) == (True, 1, 2, 4)


def test_infile_request_longer_than_peek_split_across_feeds() -> None:
    request = stream(b"\xfb/var/lib/imports/orders-2024-11.csv")
    assert len(request) - 4 >= PEEK
    whole = ResponseTracker(Command.QUERY, EOF_MODE)
    assert whole.feed(request) == len(request)
    for cut in range(1, len(request)):
        tracker = ResponseTracker(Command.QUERY, EOF_MODE)
        first = tracker.feed(request[:cut])
        assert first == -1
        assert not tracker.infile_requested  # not before the whole request has arrived
        assert tracker.feed(request[cut:]) == len(request) - cut, cut
        assert tracker.infile_requested


def test_infile_request_outside_com_query_raises() -> None:
    tracker = ResponseTracker(Command.STMT_EXECUTE, EOF_MODE)
    with pytest.raises(ProtocolError):
        tracker.feed(stream(b"\xfbfile"))


def test_offset_points_at_the_next_response() -> None:
    # Two responses back to back, the second starting mid-chunk.
    first = stream(b"\x01", COLUMN, Eof(0, 2).encode(), b"\x01a", Eof(0, 2).encode())
    second = stream(Ok(status=3).encode())
    data = first + second
    tracker = ResponseTracker(Command.QUERY, EOF_MODE)
    assert tracker.feed(data) == len(first)
    following = ResponseTracker(Command.QUERY, EOF_MODE)
    assert following.feed(data[len(first) :]) == len(second)
    assert following.status == 3
    # The same with every chunking of the pair: the end is found where it is.
    for cut in range(1, len(data)):
        tracker = ResponseTracker(Command.QUERY, EOF_MODE)
        end = tracker.feed(data[:cut])
        if end < 0:
            end = cut + tracker.feed(data[cut:])
        assert end == len(first), cut


@pytest.mark.parametrize(
    ("command", "payloads"),
    [
        (Command.QUERY, [b"\x00"]),  # OK without the fields after the header
        (Command.QUERY, [b"\xff\x01"]),  # truncated ERR
        (Command.QUERY, [b"\x00\x00"]),  # column count 0 (OK header with 1 byte)
        (Command.QUERY, [b""]),  # empty packet
        (Command.QUERY, [b"\x01", COLUMN, b"\x01a"]),  # no EOF after the columns
        (Command.PING, [b"\x05hello"]),
        (Command.STMT_PREPARE, [b"\x00\x01\x00\x00\x00"]),  # short prepare OK
        (
            Command.STMT_PREPARE,
            [b"\x00\x01\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00", COLUMN, b"\x01"],
        ),
        (Command.FIELD_LIST, [b""]),
    ],
)
def test_malformed_responses_raise(command: int, payloads: list[bytes]) -> None:
    data = stream(*payloads)
    with pytest.raises(ProtocolError):
        ResponseTracker(command, EOF_MODE).feed(data)
    with pytest.raises(ProtocolError):
        feed_bytewise(ResponseTracker(command, EOF_MODE), data)


def test_statistics_may_be_empty() -> None:
    tracker = ResponseTracker(Command.STATISTICS, EOF_MODE)
    assert tracker.feed(stream(b"")) == 4
    assert tracker.done


@pytest.mark.parametrize(
    ("command", "payload"),
    [
        (Command.STATISTICS, b"U" * (MAX_PACKET_PAYLOAD + 10)),
        (Command.PING, Ok(status=2, info=b"i" * MAX_PACKET_PAYLOAD).encode()),
        (Command.QUERY, Err(1105, "e" * MAX_PACKET_PAYLOAD).encode()),
    ],
    ids=["statistics", "ok", "err"],
)
def test_final_packet_with_continuation_frames(command: int, payload: bytes) -> None:
    data = stream(payload)
    tracker = ResponseTracker(command, DEPRECATE)
    assert tracker.feed(data) == len(data)


# -- model: generated multi-result COM_QUERY / COM_STMT_EXECUTE responses ------------


@dataclass(frozen=True)
class Spec:
    kind: str  # "ok" | "rows" | "err"
    columns: int = 0
    rows: tuple[bytes, ...] = ()
    status: int = 0


text_value = st.none() | st.binary(max_size=40)
text_rows = st.lists(text_value, min_size=1, max_size=3).map(
    lambda values: b"".join(b"\xfb" if v is None else lenenc_bytes(v) for v in values)
)
binary_rows = st.binary(max_size=40).map(lambda body: b"\x00" + body)
statuses = st.integers(0, 0xFFFF).map(lambda s: s & ~(MORE | int(Status.CURSOR_EXISTS)))


@st.composite
def responses(draw: st.DrawFn, binary: bool) -> list[Spec]:
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            specs.append(Spec("ok", status=draw(statuses)))
        else:
            rows = tuple(draw(st.lists(binary_rows if binary else text_rows, max_size=4)))
            columns = draw(st.integers(1, 4) | st.sampled_from([250, 251, 256]))
            specs.append(Spec("rows", columns, rows, draw(statuses)))
    if draw(st.booleans()):
        specs.append(Spec("err"))
    return specs


def encode(specs: list[Spec], capabilities: int) -> bytes:
    deprecate = bool(capabilities & Capability.DEPRECATE_EOF)
    payloads: list[bytes] = []
    for index, spec in enumerate(specs):
        # Every result but the last says more follow (an ERR included: the
        # server announces the next statement before running it).
        status = spec.status | (0 if index == len(specs) - 1 else MORE)
        if spec.kind == "err":
            payloads.append(Err(1146, "no such table", "42S02").encode())
        elif spec.kind == "ok":
            payloads.append(Ok(1, 2, status, 0, b"info").encode())
        else:
            payloads.append(lenenc_int(spec.columns))
            payloads += [COLUMN] * spec.columns
            if not deprecate:
                payloads.append(Eof(0, status & ~MORE).encode())
            payloads += spec.rows
            payloads.append(
                Ok(0, 0, status, 0, b"", 0xFE).encode() if deprecate else Eof(0, status).encode()
            )
    return stream(*payloads)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([Command.QUERY, Command.STMT_EXECUTE]).flatmap(
        lambda command: st.tuples(st.just(command), responses(command == Command.STMT_EXECUTE))
    ),
    st.sampled_from([EOF_MODE, DEPRECATE]),
    st.data(),
)
def test_generated_responses(
    command_and_specs: tuple[int, list[Spec]], capabilities: int, data: st.DataObject
) -> None:
    command, specs = command_and_specs
    body = encode(specs, capabilities)
    following = stream(Ok(status=2).encode())  # the next response, already arrived
    wire = body + following
    completed = [s for s in specs if s.kind != "err"]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=30)))
    for pieces in ([], cuts, list(range(1, len(wire)))):
        tracker = ResponseTracker(command, capabilities)
        end = -1
        start = 0
        for cut in [*pieces, len(wire)]:
            offset = tracker.feed(wire[start:cut])
            if offset >= 0:
                end = start + offset
                break
            start = cut
        assert end == len(body)
        assert tracker.done
        assert tracker.results == len(completed)
        assert tracker.error_code == (1146 if specs[-1].kind == "err" else 0)
        # After an ERR the status is the last result's, less MORE_RESULTS_EXISTS.
        expected = completed[-1].status if completed else 0
        assert tracker.status == expected
