"""Primitive encodings: length-encoded integers and strings, and the Reader."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.wire import ProtocolError, Reader, lenenc_bytes, lenenc_int, u16, u32

MAX_U64 = (1 << 64) - 1

# (value, expected encoding) at every boundary between the four widths.
LENENC_VECTORS = [
    (0, b"\x00"),
    (1, b"\x01"),
    (0xFA, b"\xfa"),
    (0xFB, b"\xfc\xfb\x00"),
    (0xFC, b"\xfc\xfc\x00"),
    (0xFD, b"\xfc\xfd\x00"),
    (0xFE, b"\xfc\xfe\x00"),
    (0xFF, b"\xfc\xff\x00"),
    ((1 << 16) - 1, b"\xfc\xff\xff"),
    (1 << 16, b"\xfd\x00\x00\x01"),
    ((1 << 24) - 1, b"\xfd\xff\xff\xff"),
    (1 << 24, b"\xfe\x00\x00\x00\x01\x00\x00\x00\x00"),
    ((1 << 32) + 5, b"\xfe\x05\x00\x00\x00\x01\x00\x00\x00"),
    (MAX_U64, b"\xfe" + b"\xff" * 8),
]


@pytest.mark.parametrize(("value", "encoded"), LENENC_VECTORS)
def test_lenenc_int_boundaries(value: int, encoded: bytes) -> None:
    assert lenenc_int(value) == encoded
    reader = Reader(encoded)
    assert reader.lenenc_int() == value
    assert reader.at_end()


@given(st.integers(min_value=0, max_value=MAX_U64))
def test_lenenc_int_round_trip(value: int) -> None:
    encoded = lenenc_int(value)
    reader = Reader(encoded + b"tail")
    assert reader.lenenc_int() == value
    assert reader.rest() == b"tail"
    # The shortest form is always chosen.
    expected_size = 1 if value < 0xFB else 3 if value < 1 << 16 else 4 if value < 1 << 24 else 9
    assert len(encoded) == expected_size


@pytest.mark.parametrize("prefix", [0xFB, 0xFF])
def test_lenenc_int_rejects_null_and_err_prefixes(prefix: int) -> None:
    with pytest.raises(ProtocolError):
        Reader(bytes((prefix,)) + b"\x00" * 8).lenenc_int()


@pytest.mark.parametrize(
    "encoded",
    [b"", b"\xfc", b"\xfc\x01", b"\xfd\x01\x02", b"\xfe", b"\xfe\x01\x02\x03\x04\x05\x06\x07"],
)
def test_lenenc_int_truncated_raises(encoded: bytes) -> None:
    with pytest.raises(ProtocolError):
        Reader(encoded).lenenc_int()


def test_lenenc_int_rejects_negative() -> None:
    with pytest.raises(ValueError):
        lenenc_int(-1)


def test_lenenc_int_rejects_values_beyond_u64() -> None:
    with pytest.raises(ValueError):
        lenenc_int(1 << 64)


@pytest.mark.parametrize("size", [0, 1, 0xFA, 0xFB, 0xFFFF, 1 << 16, (1 << 16) + 1])
def test_lenenc_bytes_boundaries(size: int) -> None:
    value = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    encoded = lenenc_bytes(value)
    assert encoded == lenenc_int(size) + value
    reader = Reader(encoded)
    assert reader.lenenc_bytes() == value
    assert reader.at_end()


def test_lenenc_bytes_large_boundary() -> None:
    value = b"x" * (1 << 24)
    encoded = lenenc_bytes(value)
    assert encoded[:9] == b"\xfe\x00\x00\x00\x01\x00\x00\x00\x00"
    assert Reader(encoded).lenenc_bytes() == value


@given(st.binary(max_size=300), st.binary(max_size=10))
def test_lenenc_bytes_round_trip(value: bytes, tail: bytes) -> None:
    reader = Reader(lenenc_bytes(value) + tail)
    assert reader.lenenc_bytes() == value
    assert reader.rest() == tail


@given(st.binary(min_size=1, max_size=300))
def test_lenenc_bytes_truncated_raises(value: bytes) -> None:
    encoded = lenenc_bytes(value)
    for cut in range(len(encoded)):
        with pytest.raises(ProtocolError):
            Reader(encoded[:cut]).lenenc_bytes()


def test_fixed_integers() -> None:
    reader = Reader(
        b"\x01" + u16(0xBEEF) + b"\x03\x02\x01" + u32(0xDEADBEEF) + (MAX_U64).to_bytes(8, "little")
    )
    assert reader.u8() == 1
    assert reader.u16() == 0xBEEF
    assert reader.u24() == 0x010203
    assert reader.u32() == 0xDEADBEEF
    assert reader.u64() == MAX_U64
    assert reader.at_end()
    assert reader.remaining() == 0


READS = {
    "u8": (1, lambda r: r.u8()),
    "u16": (2, lambda r: r.u16()),
    "u24": (3, lambda r: r.u24()),
    "u32": (4, lambda r: r.u32()),
    "u64": (8, lambda r: r.u64()),
    "fixed5": (5, lambda r: r.fixed(5)),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_reader_overruns_raise_protocol_error(name: str) -> None:
    size, read = READS[name]
    for available in range(size):
        with pytest.raises(ProtocolError):
            read(Reader(b"\x07" * available))
        # ...also when the cursor is already part-way through the data.
        reader = Reader(b"\x07" * (available + 3), position=3)
        with pytest.raises(ProtocolError):
            read(reader)
    reader = Reader(b"\x07" * size)
    read(reader)
    assert reader.at_end()
    with pytest.raises(ProtocolError):
        read(reader)


def test_reader_fixed_negative_count_raises() -> None:
    with pytest.raises(ProtocolError):
        Reader(b"abc").fixed(-1)


def test_reader_nul_bytes() -> None:
    reader = Reader(b"root\x00\x00db")
    assert reader.nul_bytes() == b"root"
    assert reader.nul_bytes() == b""
    with pytest.raises(ProtocolError):
        reader.nul_bytes()
    assert reader.rest() == b"db"
    assert reader.rest() == b""


def test_reader_accepts_bytearray_and_memoryview() -> None:
    for data in (bytearray(b"\x05hello"), memoryview(b"\x05hello")):
        assert Reader(data).lenenc_bytes() == b"hello"


ALL_READS = [*sorted(READS), "lenenc_int", "lenenc_bytes", "nul_bytes"]


@given(st.binary(max_size=40), st.lists(st.sampled_from(ALL_READS), max_size=12))
def test_reader_any_read_sequence_only_raises_protocol_error(data: bytes, reads: list[str]) -> None:
    reader = Reader(data)
    for name in reads:
        try:
            if name in READS:
                READS[name][1](reader)
            else:
                getattr(reader, name)()
        except ProtocolError:
            break  # the payload is malformed; a caller abandons it
        assert reader.position <= len(data)
