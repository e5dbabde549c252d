"""Primitive encodings: fixed and length-encoded integers and strings."""

from __future__ import annotations

import struct


class ProtocolError(Exception):
    """The peer sent bytes that are not valid MySQL protocol here."""


_U16 = struct.Struct("<H")
_U24_LOW = struct.Struct("<HB")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Reader:
    """Cursor over one packet payload; every overrun raises ProtocolError."""

    __slots__ = ("_data", "_end", "position")

    def __init__(self, data: bytes | bytearray | memoryview, position: int = 0) -> None:
        self._data = bytes(data) if not isinstance(data, bytes) else data
        self._end = len(self._data)
        self.position = position

    def remaining(self) -> int:
        return self._end - self.position

    def at_end(self) -> bool:
        return self.position >= self._end

    def _take(self, count: int) -> bytes:
        if count < 0 or self.position + count > self._end:
            raise ProtocolError(
                f"truncated packet: need {count} bytes at offset {self.position}, "
                f"have {self._end - self.position}"
            )
        start = self.position
        self.position += count
        return self._data[start : self.position]

    def u8(self) -> int:
        if self.position >= self._end:
            raise ProtocolError(f"truncated packet at offset {self.position}")
        value = self._data[self.position]
        self.position += 1
        return value

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u24(self) -> int:
        low, high = _U24_LOW.unpack(self._take(3))
        return int(low | (high << 16))

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def fixed(self, count: int) -> bytes:
        return self._take(count)

    def lenenc_int(self) -> int:
        first = self.u8()
        if first < 0xFB:
            return first
        if first == 0xFC:
            return self.u16()
        if first == 0xFD:
            return self.u24()
        if first == 0xFE:
            return self.u64()
        raise ProtocolError(f"invalid length-encoded integer prefix 0x{first:02x}")

    def lenenc_bytes(self) -> bytes:
        return self._take(self.lenenc_int())

    def nul_bytes(self) -> bytes:
        end = self._data.find(b"\x00", self.position, self._end)
        if end < 0:
            raise ProtocolError(f"unterminated string at offset {self.position}")
        value = self._data[self.position : end]
        self.position = end + 1
        return value

    def rest(self) -> bytes:
        value = self._data[self.position : self._end]
        self.position = self._end
        return value


def lenenc_int(value: int) -> bytes:
    if value < 0 or value >= 1 << 64:
        raise ValueError("length-encoded integers are unsigned 64-bit")
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + _U16.pack(value)
    if value < 1 << 24:
        return b"\xfd" + _U32.pack(value)[:3]
    return b"\xfe" + _U64.pack(value)


def lenenc_bytes(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


def u16(value: int) -> bytes:
    return _U16.pack(value)


def u32(value: int) -> bytes:
    return _U32.pack(value)
