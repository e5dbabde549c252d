"""Packet framing: 3-byte length, 1-byte sequence id, 16 MiB continuation.

``PacketReader`` turns a byte stream into logical packets (continuation
frames joined); ``frame`` does the reverse.  The raw frame bytes of each
logical packet are kept so a relay can forward them without re-encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.protocol.constants import MAX_PACKET_PAYLOAD
from proxy.protocol.wire import ProtocolError


@dataclass(frozen=True, slots=True)
class Packet:
    sequence: int  # sequence id of the first frame
    payload: bytes
    raw: bytes  # the frames exactly as received (headers included)
    last_sequence: int  # sequence id of the last frame

    @property
    def first(self) -> int:
        return self.payload[0] if self.payload else -1


class PacketReader:
    """Incremental de-framer.  ``feed`` bytes, then ``next_packet`` until None."""

    __slots__ = ("_buffer", "_max_payload")

    def __init__(self, max_payload: int = 1 << 30) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def pending(self) -> int:
        return len(self._buffer)

    def take_pending(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_packet(self) -> Packet | None:
        buffer = self._buffer
        size = len(buffer)
        offset = 0
        parts: list[bytes] = []
        total = 0
        first_sequence = -1
        sequence = -1
        while True:
            if size - offset < 4:
                return None
            length = buffer[offset] | (buffer[offset + 1] << 8) | (buffer[offset + 2] << 16)
            frame_sequence = buffer[offset + 3]
            if first_sequence < 0:
                first_sequence = frame_sequence
            elif frame_sequence != (sequence + 1) & 0xFF:
                raise ProtocolError(
                    f"continuation frame has sequence {frame_sequence}, expected {(sequence + 1) & 0xFF}"
                )
            sequence = frame_sequence
            total += length
            if total > self._max_payload:
                raise ProtocolError(f"packet larger than max_allowed_packet ({self._max_payload})")
            if size - offset - 4 < length:
                return None
            parts.append(bytes(buffer[offset + 4 : offset + 4 + length]))
            offset += 4 + length
            if length < MAX_PACKET_PAYLOAD:
                break
        raw = bytes(buffer[:offset])
        del buffer[:offset]
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        return Packet(first_sequence, payload, raw, sequence)

    def peek_length(self) -> int | None:
        """Payload length of the next frame, once its header has arrived."""
        if len(self._buffer) < 4:
            return None
        b = self._buffer
        return b[0] | (b[1] << 8) | (b[2] << 16)


def frame(payload: bytes | bytearray | memoryview, sequence: int) -> tuple[bytes, int]:
    """Frame one logical packet; returns (bytes, next sequence id)."""
    length = len(payload)
    if length < MAX_PACKET_PAYLOAD:
        header = bytes((length & 0xFF, (length >> 8) & 0xFF, length >> 16, sequence & 0xFF))
        return header + bytes(payload), (sequence + 1) & 0xFF
    view = memoryview(payload)
    out = bytearray()
    offset = 0
    while True:
        chunk = view[offset : offset + MAX_PACKET_PAYLOAD]
        size = len(chunk)
        out += bytes((size & 0xFF, (size >> 8) & 0xFF, size >> 16, sequence & 0xFF))
        out += chunk
        sequence = (sequence + 1) & 0xFF
        offset += size
        if size < MAX_PACKET_PAYLOAD:
            break
    return bytes(out), sequence
