"""Packet framing: 3-byte length, sequence id, 16 MiB continuation frames."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol.constants import MAX_PACKET_PAYLOAD
from proxy.protocol.framing import Packet, PacketReader, frame
from proxy.protocol.wire import ProtocolError

MIB = 1 << 20


def frame_lengths(data: bytes) -> list[tuple[int, int]]:
    """(payload length, sequence) of every physical frame in ``data``."""
    out = []
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 3], "little")
        out.append((length, data[offset + 3]))
        offset += 4 + length
    assert offset == len(data)
    return out


def feed_in_pieces(reader: PacketReader, data: bytes, pieces: list[int]) -> list[Packet]:
    """Feed ``data`` cut at ``pieces`` (sorted offsets), draining after every piece."""
    packets: list[Packet] = []
    start = 0
    for cut in [*pieces, len(data)]:
        reader.feed(data[start:cut])
        start = cut
        while (packet := reader.next_packet()) is not None:
            packets.append(packet)
    return packets


def header_cuts(data: bytes, around: int = 6) -> list[int]:
    """Cut points that make every frame header (and a few bytes each side)
    arrive one byte at a time, with big chunks in between: byte-by-byte
    where it matters, for payloads too large to feed a byte at a time."""
    cuts: set[int] = set()
    offset = 0
    while offset < len(data):
        for point in range(max(1, offset - around), min(len(data), offset + 4 + around)):
            cuts.add(point)
        offset += 4 + int.from_bytes(data[offset : offset + 3], "little")
    for point in range(max(1, len(data) - around), len(data)):
        cuts.add(point)
    return sorted(cuts)


def test_frame_empty_payload() -> None:
    assert frame(b"", 0) == (b"\x00\x00\x00\x00", 1)
    reader = PacketReader()
    reader.feed(b"\x00\x00\x00\x07")
    packet = reader.next_packet()
    assert packet == Packet(7, b"", b"\x00\x00\x00\x07", 7)
    assert packet.first == -1


def test_frame_small_payload() -> None:
    data, sequence = frame(b"\x03SELECT 1", 0)
    assert data == b"\x09\x00\x00\x00\x03SELECT 1"
    assert sequence == 1
    assert frame(bytearray(b"ab"), 3) == (b"\x02\x00\x00\x03ab", 4)
    assert frame(memoryview(b"ab"), 3) == (b"\x02\x00\x00\x03ab", 4)


@pytest.mark.parametrize("sequence", [0, 254, 255])
def test_sequence_wraps_at_255(sequence: int) -> None:
    data, after = frame(b"x", sequence)
    assert data[3] == sequence
    assert after == (sequence + 1) % 256


def test_frame_just_below_the_split() -> None:
    payload = b"a" * (MAX_PACKET_PAYLOAD - 1)
    data, sequence = frame(payload, 0)
    assert frame_lengths(data) == [(MAX_PACKET_PAYLOAD - 1, 0)]
    assert sequence == 1


# (payload size, frames) around and beyond the 16 MiB continuation boundary.
BIG = [
    (MAX_PACKET_PAYLOAD, [MAX_PACKET_PAYLOAD, 0]),  # exactly 0xffffff: an empty trailer
    (16 * MIB, [MAX_PACKET_PAYLOAD, 1]),
    (16 * MIB + 1, [MAX_PACKET_PAYLOAD, 2]),
    (2 * MAX_PACKET_PAYLOAD, [MAX_PACKET_PAYLOAD, MAX_PACKET_PAYLOAD, 0]),
    (32 * MIB, [MAX_PACKET_PAYLOAD, MAX_PACKET_PAYLOAD, 2]),
]


@pytest.mark.parametrize(("size", "frames"), BIG, ids=[str(size) for size, _ in BIG])
def test_big_payload_split_and_join(size: int, frames: list[int]) -> None:
    # Distinct bytes at the frame boundaries so a misplaced join shows.
    payload = bytearray(b"p" * size)
    payload[0] = 0x01
    for boundary in range(MAX_PACKET_PAYLOAD - 2, size, MAX_PACKET_PAYLOAD):
        payload[boundary : boundary + 4] = b"ABCD"[: size - boundary]
    payload = bytes(payload[:size])
    start_sequence = 254  # the continuation crosses the 255 -> 0 wrap
    data, after = frame(payload, start_sequence)
    expected = [(length, (start_sequence + i) % 256) for i, length in enumerate(frames)]
    assert frame_lengths(data) == expected
    assert after == (start_sequence + len(frames)) % 256

    reader = PacketReader()
    packets = feed_in_pieces(reader, data + frame(b"next", after)[0], header_cuts(data))
    assert len(packets) == 2
    big, small = packets
    assert big.sequence == start_sequence
    assert big.last_sequence == (start_sequence + len(frames) - 1) % 256
    assert big.payload == payload
    assert big.raw == data
    assert big.first == 0x01
    assert small.payload == b"next"
    assert small.sequence == after
    assert reader.pending() == 0


def test_reader_waits_for_every_continuation_frame() -> None:
    data, _ = frame(b"z" * (MAX_PACKET_PAYLOAD + 10), 0)
    reader = PacketReader()
    reader.feed(data[:-1])
    assert reader.next_packet() is None
    assert reader.pending() == len(data) - 1
    reader.feed(data[-1:])
    packet = reader.next_packet()
    assert packet is not None and len(packet.payload) == MAX_PACKET_PAYLOAD + 10


def test_wrong_continuation_sequence_raises() -> None:
    data = bytearray(frame(b"q" * (MAX_PACKET_PAYLOAD + 3), 5)[0])
    second = 4 + MAX_PACKET_PAYLOAD
    assert data[second + 3] == 6
    for wrong in (5, 7, 0, 255):
        data[second + 3] = wrong
        reader = PacketReader()
        reader.feed(bytes(data))
        with pytest.raises(ProtocolError):
            reader.next_packet()


def test_continuation_sequence_wraps() -> None:
    payload = b"w" * (MAX_PACKET_PAYLOAD + 1)
    data, after = frame(payload, 255)
    assert frame_lengths(data) == [(MAX_PACKET_PAYLOAD, 255), (1, 0)]
    assert after == 1
    reader = PacketReader()
    reader.feed(data)
    packet = reader.next_packet()
    assert packet is not None
    assert (packet.sequence, packet.last_sequence, packet.payload) == (255, 0, payload)


def test_independent_packets_may_have_any_sequence() -> None:
    # Sequence checking across packets is the caller's job; the reader only
    # checks continuation frames of one logical packet.
    reader = PacketReader()
    reader.feed(frame(b"a", 3)[0] + frame(b"b", 9)[0])
    first, second = reader.next_packet(), reader.next_packet()
    assert first is not None and second is not None
    assert (first.sequence, second.sequence) == (3, 9)


def test_max_payload_small() -> None:
    reader = PacketReader(max_payload=10)
    reader.feed(frame(b"x" * 10, 0)[0])
    packet = reader.next_packet()
    assert packet is not None and packet.payload == b"x" * 10
    # Rejected on the header alone, before the payload has arrived.
    reader.feed(frame(b"x" * 11, 1)[0][:4])
    with pytest.raises(ProtocolError):
        reader.next_packet()


def test_max_payload_counts_continuation_frames() -> None:
    limit = MAX_PACKET_PAYLOAD + 5
    fits, _ = frame(b"y" * limit, 0)
    reader = PacketReader(max_payload=limit)
    reader.feed(fits)
    packet = reader.next_packet()
    assert packet is not None and len(packet.payload) == limit

    too_big, _ = frame(b"y" * (limit + 1), 0)
    reader = PacketReader(max_payload=limit)
    reader.feed(too_big[: 4 + MAX_PACKET_PAYLOAD + 4])  # both headers, no second payload
    with pytest.raises(ProtocolError):
        reader.next_packet()


def test_peek_length_and_take_pending() -> None:
    reader = PacketReader()
    assert reader.peek_length() is None
    reader.feed(b"\x05\x00")
    assert reader.peek_length() is None
    reader.feed(b"\x00\x00hel")
    assert reader.peek_length() == 5
    assert reader.next_packet() is None
    assert reader.take_pending() == b"\x05\x00\x00\x00hel"
    assert reader.pending() == 0


payloads = st.lists(st.binary(max_size=70), min_size=1, max_size=8)


@settings(max_examples=200)
@given(payloads, st.integers(0, 255), st.data())
def test_frame_reader_round_trip_any_chunking(
    items: list[bytes], sequence: int, data: st.DataObject
) -> None:
    stream = bytearray()
    sequences = []
    for payload in items:
        sequences.append(sequence)
        chunk, sequence = frame(payload, sequence)
        stream += chunk
    stream = bytes(stream)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)))))
    for pieces in (cuts, list(range(1, len(stream)))):  # random splits, then byte by byte
        reader = PacketReader()
        packets = feed_in_pieces(reader, stream, pieces)
        assert [p.payload for p in packets] == items
        assert [p.sequence for p in packets] == sequences
        assert [p.last_sequence for p in packets] == sequences
        assert b"".join(p.raw for p in packets) == stream
        assert reader.pending() == 0
