"""Garbage in: every parser, the de-framer and the response tracker either
make sense of it or raise ProtocolError; never IndexError, struct.error,
ValueError, AssertionError or a hang.  Fed whole and one byte at a time, and
the two must agree.  Inputs are random bytes, random frame streams built to
reach deep states, and mutations of real MariaDB responses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mysql_capture import Capture, bytewise_cuts, pieces

from proxy.protocol.constants import MAX_PACKET_PAYLOAD, Capability, Command
from proxy.protocol.framing import PacketReader, frame
from proxy.protocol.packets import (
    AuthSwitch,
    Column,
    Eof,
    Err,
    Handshake,
    HandshakeResponse,
    Ok,
    parse_text_row,
)
from proxy.protocol.response import ResponseTracker
from proxy.protocol.wire import ProtocolError

#: TIDEGATE_FUZZ_EXAMPLES=100000 for a long hunt; the default keeps the file fast.
FUZZ = settings(
    max_examples=int(os.environ.get("TIDEGATE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CAPABILITIES = [
    int(Capability.PROTOCOL_41),
    int(Capability.PROTOCOL_41 | Capability.DEPRECATE_EOF),
    int(Capability.PROTOCOL_41 | Capability.DEPRECATE_EOF | Capability.SESSION_TRACK),
    0,
]
INTERESTING_FIRST = [0x00, 0x01, 0x02, 0x03, 0x0A, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF]


# -- mutation -----------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """Flip, overwrite, insert, delete or cut bytes of ``data``."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "header"]))
        if not out and kind != "insert":
            kind = "insert"
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            out[at] = draw(st.sampled_from([*INTERESTING_FIRST, draw(st.integers(0, 255))]))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif kind == "cut":
            del out[at:]
        else:  # a frame-length-like field of interesting size
            size = draw(st.sampled_from([0, 1, 3, 8, 9, 23, 24, 25, 0xFFFF, MAX_PACKET_PAYLOAD]))
            out[at : at + 3] = size.to_bytes(3, "little")
    return bytes(out)


def streams() -> st.SearchStrategy[bytes]:
    """Random, well-framed packet streams whose payloads start with bytes that
    matter to the tracker, so it gets past the first packet."""
    payload = st.builds(
        lambda first, rest: bytes((first,)) + rest,
        st.sampled_from(INTERESTING_FIRST) | st.integers(0, 255),
        st.binary(max_size=30),
    ) | st.just(b"")
    return st.builds(
        lambda items, start: b"".join(frame(p, start + i)[0] for i, p in enumerate(items)),
        st.lists(payload, max_size=12),
        st.integers(0, 255),
    )


# -- PacketReader -------------------------------------------------------------


def drain(reader: PacketReader, data: bytes, cuts: Sequence[int]) -> tuple[list[bytes], bool]:
    packets: list[bytes] = []
    try:
        for piece in pieces(data, cuts):
            reader.feed(piece)
            while (packet := reader.next_packet()) is not None:
                assert packet.raw[4:] == packet.payload or len(packet.payload) >= MAX_PACKET_PAYLOAD
                packets.append(packet.raw)
    except ProtocolError:
        return packets, True
    return packets, False


@FUZZ
@given(
    st.binary(max_size=200) | streams() | streams().flatmap(mutated),
    st.integers(0, 64) | st.just(1 << 30),
)
def test_packet_reader_fuzz(data: bytes, max_payload: int) -> None:
    whole = drain(PacketReader(max_payload), data, ())
    bytewise = drain(PacketReader(max_payload), data, range(1, len(data)))
    assert whole == bytewise
    packets, failed = whole
    if not failed:
        assert b"".join(packets) == data[: sum(len(p) for p in packets)]


# -- parsers ------------------------------------------------------------------

PARSERS: dict[str, Callable[[bytes], object]] = {
    "ok": lambda p: Ok.parse(p, CAPABILITIES[0]),
    "ok_320": lambda p: Ok.parse(p, int(Capability.TRANSACTIONS)),
    "ok_none": lambda p: Ok.parse(p, 0),
    "err": Err.parse,
    "eof": Eof.parse,
    "handshake": Handshake.parse,
    "handshake_response": HandshakeResponse.parse,
    "ssl_request": HandshakeResponse.is_ssl_request,
    "auth_switch": AuthSwitch.parse,
    "column": Column.parse,
    "text_row_1": lambda p: parse_text_row(p, 1),
    "text_row_3": lambda p: parse_text_row(p, 3),
}


def parse_all_prefixes(parse: Callable[[bytes], object], payload: bytes) -> None:
    for cut in [*range(min(len(payload), 64)), *range(64, len(payload), 7), len(payload)]:
        try:
            parse(payload[:cut])
        except ProtocolError:
            pass


@FUZZ
@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=120))
def test_parsers_random_bytes(name: str, payload: bytes) -> None:
    parse_all_prefixes(PARSERS[name], payload)


def seeds(corpus: list[Capture], greeting: bytes) -> list[bytes]:
    payloads = {p.payload for capture in corpus for p in capture.packets if len(p.payload) < 4096}
    payloads.add(greeting)
    response = HandshakeResponse(
        int(
            Capability.PROTOCOL_41
            | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA
            | Capability.SECURE_CONNECTION
            | Capability.PLUGIN_AUTH
            | Capability.CONNECT_WITH_DB
            | Capability.CONNECT_ATTRS
        ),
        1 << 24,
        45,
        "root",
        b"\x01" * 20,
        "db",
        "mysql_native_password",
        {"_client_name": "fuzz", "k": "v"},
    )
    payloads.add(response.encode())
    payloads.add(AuthSwitch("mysql_native_password", b"n" * 20 + b"\x00").encode())
    return sorted(payloads)


def test_parsers_mutated_real_payloads(corpus: list[Capture], greeting: bytes) -> None:
    payloads = seeds(corpus, greeting)

    @FUZZ
    @given(st.sampled_from(sorted(PARSERS)), st.sampled_from(payloads).flatmap(mutated))
    def check(name: str, payload: bytes) -> None:
        parse_all_prefixes(PARSERS[name], payload)

    check()
    for payload in payloads:  # every real payload through every parser, unmutated
        for parse in PARSERS.values():
            parse_all_prefixes(parse, payload)


# -- ResponseTracker ------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    failed: bool
    ends: tuple[int, ...]  # absolute end offset per segment
    done: bool
    facts: tuple[object, ...]


def track(command: int, capabilities: int, data: bytes, cuts: Sequence[int]) -> Outcome:
    """Feed ``data``; on a LOCAL INFILE pause resume at once and go on with
    the rest.  Stops at the end of the response or of the data."""
    tracker = ResponseTracker(command, capabilities)
    ends: list[int] = []
    consumed = 0
    failed = False
    chunks = list(pieces(data, cuts))
    try:
        while chunks:
            piece = chunks.pop(0)
            offset = tracker.feed(piece)
            if offset < 0:
                consumed += len(piece)
                continue
            assert 0 <= offset <= len(piece), (offset, len(piece))
            consumed += offset
            ends.append(consumed)
            if tracker.done:
                with pytest.raises(ProtocolError):
                    tracker.feed(b"\x00")
                break
            assert tracker.infile_requested
            with pytest.raises(ProtocolError):
                tracker.feed(b"\x00")
            tracker.resume_after_infile()
            if offset < len(piece):
                chunks.insert(0, piece[offset:])
    except ProtocolError:
        failed = True
    facts = (
        tracker.status,
        tracker.error_code,
        tracker.results,
        tracker.prepared,
        tracker.last_sequence,
    )
    return Outcome(failed, tuple(ends), tracker.done, facts if not failed else ())


def packet_boundaries(data: bytes) -> set[int]:
    """Offsets just past a logical packet (a frame shorter than 0xffffff)."""
    boundaries = set()
    offset = 0
    while offset + 4 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "little")
        offset += 4 + length
        if length < MAX_PACKET_PAYLOAD and offset <= len(data):
            boundaries.add(offset)
    return boundaries


def check_tracker(command: int, capabilities: int, data: bytes, splits: Sequence[int] = ()) -> None:
    whole = track(command, capabilities, data, ())
    bytewise = track(command, capabilities, data, range(1, len(data)))
    split = track(command, capabilities, data, splits) if splits else whole
    assert whole == bytewise, (whole, bytewise)
    assert split == whole, (split, whole)
    if not whole.failed:
        assert set(whole.ends) <= packet_boundaries(data), whole


commands = st.sampled_from(sorted({*Command, 0x20, 0x7F, 0xFF})) | st.integers(0, 255)


@FUZZ
@given(commands, st.sampled_from(CAPABILITIES), st.binary(max_size=200) | streams())
def test_tracker_random_input(command: int, capabilities: int, data: bytes) -> None:
    check_tracker(command, capabilities, data)


def test_tracker_mutated_real_responses(corpus: list[Capture]) -> None:
    @FUZZ
    @given(st.sampled_from(corpus), st.data())
    def check(capture: Capture, data: st.DataObject) -> None:
        stream = b"".join(capture.segments)
        mutant = data.draw(mutated(stream), label="mutant")
        command = data.draw(st.just(capture.command) | commands, label="command")
        splits = sorted(data.draw(st.sets(st.integers(1, max(1, len(mutant) - 1)), max_size=20)))
        check_tracker(command, capture.capabilities, mutant, splits)

    check()


def test_tracker_real_responses_under_every_command(corpus: list[Capture]) -> None:
    """Each real response fed to a tracker for each of the 256 command bytes."""
    for capture in corpus:
        stream = b"".join(capture.segments)
        for command in range(256):
            whole = track(command, capture.capabilities, stream, ())
            if command == capture.command:
                assert not whole.failed and whole.done, capture.name
            # bytewise only for a sample; whole for all
            if command % 16 == capture.command % 16:
                cuts = bytewise_cuts(stream)
                assert track(command, capture.capabilities, stream, cuts) == whole
