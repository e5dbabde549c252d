"""Primary-key values straight from a rows event's bytes, without decoding the other columns.

The applier re-reads changed rows from the original table by key, so from a
``WRITE/UPDATE/DELETE_ROWS`` event it needs only the key columns.
mysql-replication decodes every column of every row image into Python
objects (strings through their charset, decimals, dates): measured here, that
decoding was two thirds of the binlog thread's time and capped the applier at
about 40,000 row events per second.  This reader takes the event's remaining
bytes at once and walks each row image: a non-key column is skipped by the
size its type and table-map metadata give, and the key columns are read as
the integers they are, or, for ``CHAR``/``VARCHAR``/``BINARY``/``VARBINARY``
keys, decoded exactly as mysql-replication decodes them (the column's
character set through the same charset-to-encoding mapping, strictly; bytes
for binary strings).

It is used only when it can be exact: every key column an integer or such a
string type and every column a type whose size it knows (see
:func:`supported`).  Otherwise (a temporal or decimal key, a type it does not
know, MySQL's partial JSON updates) the caller decodes with mysql-replication
as before.  A test compares the two readers over the same binlog for every
column type the migrator's tests use, with integer and with string keys.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from pymysqlreplication.bitmap import BitCount, BitGet
from pymysqlreplication.constants import FIELD_TYPE
from pymysqlreplication.row_event import RowsEvent

#: integer types: (bytes)
_INTEGERS = {FIELD_TYPE.TINY: 1, FIELD_TYPE.SHORT: 2, FIELD_TYPE.INT24: 3, FIELD_TYPE.LONG: 4, FIELD_TYPE.LONGLONG: 8}
#: other types of a fixed size
_FIXED = {
    **_INTEGERS,
    FIELD_TYPE.FLOAT: 4, FIELD_TYPE.DOUBLE: 8, FIELD_TYPE.YEAR: 1, FIELD_TYPE.DATE: 3,
    FIELD_TYPE.TIME: 3, FIELD_TYPE.DATETIME: 8, FIELD_TYPE.TIMESTAMP: 4,
}
#: fractional-second types: (bytes before the fraction)
_FRACTIONAL = {FIELD_TYPE.DATETIME2: 5, FIELD_TYPE.TIME2: 3, FIELD_TYPE.TIMESTAMP2: 4}
#: string key types (mysql-replication reads both through the same string path)
_STRINGS = {FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING}
_DECIMAL_DIGIT_BYTES = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)


def _string_decoder(column: Any) -> Any:
    """How mysql-replication turns a string column's bytes into a value."""
    name = getattr(column, "character_set_name", None)
    if name is None:
        return lambda raw: raw.decode()
    encoding = RowsEvent.charset_to_encoding(name)
    try:
        codecs.lookup(encoding)
    except LookupError:
        # e.g. "binary": the library keeps the bytes, except that Python decodes an
        # empty value without looking the codec up, so b"" comes back as ""
        return lambda raw: raw if raw else ""
    return lambda raw: raw.decode(encoding, "strict")


def _decimal_size(precision: int, decimals: int) -> int:
    integral = precision - decimals
    return (integral // 9 * 4 + _DECIMAL_DIGIT_BYTES[integral % 9]
            + decimals // 9 * 4 + _DECIMAL_DIGIT_BYTES[decimals % 9])


def _skip_plan(column: Any) -> tuple[int, int]:
    """(fixed size, length-prefix size) for a column: one of them is 0.  KeyError: unknown."""
    kind = column.type
    if kind in _FIXED:
        return _FIXED[kind], 0
    if kind in (FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING, FIELD_TYPE.VAR_STRING):
        return 0, (2 if column.max_length > 255 else 1)
    if kind in (FIELD_TYPE.BLOB, FIELD_TYPE.GEOMETRY, FIELD_TYPE.JSON):
        return 0, int(column.length_size)
    if kind == FIELD_TYPE.NEWDECIMAL:
        return _decimal_size(int(column.precision), int(column.decimals)), 0
    if kind in _FRACTIONAL:
        return _FRACTIONAL[kind] + (int(column.fsp) + 1) // 2, 0
    if kind in (FIELD_TYPE.ENUM, FIELD_TYPE.SET):
        return int(column.size), 0
    if kind == FIELD_TYPE.BIT:
        return int(column.bytes), 0
    raise KeyError(kind)


class KeyReader:
    """Reads the key values of every row in a rows event of one table (one table map)."""

    def __init__(self, columns: Sequence[Any], key_columns: Sequence[str]) -> None:
        names = [column.name for column in columns]
        self.key_indexes = [names.index(name) for name in key_columns]
        self.plans = [_skip_plan(column) for column in columns]
        self.signed = [not column.unsigned for column in columns]
        #: per key column: None (an integer) or how to decode its bytes
        self.decoders = {i: (_string_decoder(columns[i]) if columns[i].type in _STRINGS else None)
                         for i in self.key_indexes}
        self._layouts: dict[bytes, tuple[int, list[tuple[int, int, int, bool]]]] = {}

    def _layout(self, present: bytes) -> tuple[int, list[tuple[int, int, int, bool]]]:
        """(null bitmap bytes, [(column, fixed size, length-prefix size, is key)] of the present columns)."""
        layout = self._layouts.get(present)
        if layout is None:
            columns = [index for index in range(len(self.plans)) if BitGet(present, index)]
            keys = set(self.key_indexes)
            layout = ((BitCount(present) + 7) // 8,
                      [(index, *self.plans[index], index in keys) for index in columns])
            self._layouts[present] = layout
        return layout

    def read_image(self, data: bytes, pos: int, present: bytes) -> tuple[tuple[Any, ...] | None, int]:
        """One row image at ``pos``: (its key, or None when a key column is NULL or absent; the next position)."""
        null_bytes, layout = self._layout(present)
        nulls = data[pos : pos + null_bytes]
        pos += null_bytes
        values: dict[int, Any] = {}
        for null_index, (index, fixed, prefix, is_key) in enumerate(layout):
            if nulls[null_index >> 3] & (1 << (null_index & 7)):
                continue
            if prefix:
                start = pos + prefix
                pos = start + int.from_bytes(data[pos:start], "little")
            else:
                start = pos
                pos += fixed
            if is_key:
                decode = self.decoders[index]
                if decode is None:
                    values[index] = int.from_bytes(data[start:pos], "little", signed=self.signed[index])
                else:
                    values[index] = decode(data[start:pos])
        if len(values) != len(self.key_indexes):
            return None, pos
        return tuple(values[index] for index in self.key_indexes), pos


def supported(columns: Sequence[Any], key_columns: Sequence[str]) -> bool:
    """Whether :class:`KeyReader` reads this table exactly."""
    by_name = {column.name: column for column in columns}
    if any(name not in by_name or by_name[name].type not in (_INTEGERS.keys() | _STRINGS) for name in key_columns):
        return False
    try:
        for column in columns:
            _skip_plan(column)
    except (KeyError, AttributeError, TypeError):
        return False
    return True
