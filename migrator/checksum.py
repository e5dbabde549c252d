"""Prove the ghost equals the original over the shared columns, byte for byte.

Each side of a key range is reduced to (row count, two 64-bit XORs of the
MD5 of a length-prefixed concatenation of the columns' bytes).  Columns are
compared as binary strings (``CAST(… AS BINARY)``), never through a
collation, so 'é' vs 'e' or a label rewritten to '' is a difference.  Widened
types are first brought to a common form (DECIMAL(65,30), DATETIME(6), …).

The caller runs :func:`compare_table` inside a consistent snapshot taken while
writes to the table were stopped, and :func:`compare_keys` on the final delta
while it holds the cut-over lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from migrator.chunker import KeyValues, compare, compare_args, key_in
from migrator.db import Connection, qualified, quote
from migrator.inspector import Column, Plan


def column_expression(column: Column, other: Column, alias: str = "") -> str:
    name = (f"{alias}." if alias else "") + quote(column.name)
    if column.column_type != other.column_type:
        kind = column.data_type
        if kind == "decimal":
            return f"CAST(CAST({name} AS DECIMAL(65,30)) AS BINARY)"
        if kind in ("datetime", "timestamp"):
            return f"CAST(CAST({name} AS DATETIME(6)) AS BINARY)"
        if kind == "time":
            return f"CAST(CAST({name} AS TIME(6)) AS BINARY)"
        if kind in ("float", "double"):
            return f"CAST(CAST({name} AS DOUBLE) AS BINARY)"
    if column.charset is not None and other.charset is not None and column.charset != other.charset:
        return f"CAST(CONVERT({name} USING {other.charset}) AS BINARY)"
    return f"CAST({name} AS BINARY)"


def row_digest(expressions: Sequence[str]) -> str:
    parts = [f"COALESCE(CONCAT(LENGTH({e}), ':', {e}), 'N')" for e in expressions]
    return "MD5(CONCAT(" + ", '|', ".join(parts) + "))"


def aggregate(expressions: Sequence[str]) -> str:
    digest = row_digest(expressions)
    return (
        f"COUNT(*), COALESCE(BIT_XOR(CAST(CONV(LEFT({digest}, 16), 16, 10) AS UNSIGNED)), 0), "
        f"COALESCE(BIT_XOR(CAST(CONV(RIGHT({digest}, 16), 16, 10) AS UNSIGNED)), 0)"
    )


@dataclass(frozen=True)
class Mismatch:
    lower: KeyValues | None
    upper: KeyValues | None
    original: tuple[int, int, int]
    ghost: tuple[int, int, int]

    def describe(self) -> str:
        return (
            f"keys ({self.lower!r}, {self.upper!r}]: original {self.original[0]} rows, "
            f"ghost {self.ghost[0]} rows, digests {'equal' if self.original[1:] == self.ghost[1:] else 'differ'}"
        )


class Checksummer:
    def __init__(self, plan: Plan, schema: str, original: str, ghost: str) -> None:
        self.plan = plan
        self.original = qualified(schema, original)
        self.ghost = qualified(schema, ghost)
        self.original_aggregate = aggregate([column_expression(o, g) for o, g in plan.compared])
        self.ghost_aggregate = aggregate([column_expression(g, o) for o, g in plan.compared])
        self.key = list(plan.key_columns)
        self.ghost_key = list(plan.ghost_key_columns)

    def _range(
        self, columns: Sequence[str], lower: KeyValues | None, upper: KeyValues | None, alias: str = ""
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if lower is not None:
            clauses.append(compare(columns, ">", alias))
            args += compare_args(lower)
        if upper is not None:
            clauses.append(compare(columns, "<=", alias))
            args += compare_args(upper)
        return (" AND ".join(clauses) or "TRUE"), args

    async def compare_table(self, connection: Connection, chunk_rows: int = 5000) -> tuple[list[Mismatch], int]:
        """Walk the whole table in key ranges on ``connection`` (one snapshot); mismatches and rows."""
        key_list = ", ".join(quote(c) for c in self.key)
        mismatches: list[Mismatch] = []
        rows_checked = 0
        lower: KeyValues | None = None
        while True:
            where, args = self._range(self.key, lower, None)
            boundary = await connection.query(
                f"SELECT {key_list} FROM {self.original} WHERE {where} ORDER BY {key_list} "
                f"LIMIT 1 OFFSET {chunk_rows - 1}",
                args,
            )
            upper = tuple(boundary[0]) if boundary else None
            mismatch, count = await self._compare_range(connection, lower, upper)
            rows_checked += count
            if mismatch:
                mismatches.append(mismatch)
            if upper is None:
                return mismatches, rows_checked
            lower = upper

    async def _compare_range(
        self, connection: Connection, lower: KeyValues | None, upper: KeyValues | None
    ) -> tuple[Mismatch | None, int]:
        where_o, args_o = self._range(self.key, lower, upper)
        where_g, args_g = self._range(self.ghost_key, lower, upper)
        original_sql = f"SELECT {self.original_aggregate} FROM {self.original} WHERE {where_o}"
        ghost_sql = f"SELECT {self.ghost_aggregate} FROM {self.ghost} WHERE {where_g}"

        def work(cursor: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
            cursor.execute(original_sql, args_o)
            o = tuple(int(v) for v in cursor.fetchall()[0])
            cursor.execute(ghost_sql, args_g)
            g = tuple(int(v) for v in cursor.fetchall()[0])
            return o, g  # type: ignore[return-value]

        original, ghost = await connection.run(work)
        if original != ghost:
            return Mismatch(lower, upper, original, ghost), original[0]
        return None, original[0]

    async def differing_keys(self, connection: Connection, mismatch: Mismatch, limit: int = 20) -> list[KeyValues]:
        """Keys inside a mismatching range whose rows differ (or exist on one side only)."""
        where_o, args_o = self._range(self.key, mismatch.lower, mismatch.upper)
        where_g, args_g = self._range(self.ghost_key, mismatch.lower, mismatch.upper)
        key_o = ", ".join(quote(c) for c in self.key)
        key_g = ", ".join(quote(c) for c in self.ghost_key)
        digest_o = row_digest([column_expression(o, g) for o, g in self.plan.compared])
        digest_g = row_digest([column_expression(g, o) for o, g in self.plan.compared])
        original = await connection.query(f"SELECT {key_o}, {digest_o} FROM {self.original} WHERE {where_o}", args_o)
        ghost = await connection.query(f"SELECT {key_g}, {digest_g} FROM {self.ghost} WHERE {where_g}", args_g)
        left = {tuple(r[:-1]): r[-1] for r in original}
        right = {tuple(r[:-1]): r[-1] for r in ghost}
        keys = [k for k in left.keys() | right.keys() if left.get(k) != right.get(k)]
        return sorted(keys, key=repr)[:limit]

    async def repair_range(self, connection: Connection, mismatch: Mismatch, replace_sql: str) -> None:
        """Make the ghost's rows in a range equal to the original's again."""
        where_o, args_o = self._range(self.key, mismatch.lower, mismatch.upper)
        where_g, args_g = self._range(self.ghost_key, mismatch.lower, mismatch.upper, "g")
        join = " AND ".join(f"o.{quote(k)} = g.{quote(gk)}" for k, gk in zip(self.key, self.ghost_key, strict=True))
        first = quote(self.key[0])
        await connection.transaction(
            [
                (
                    f"DELETE g FROM {self.ghost} AS g LEFT JOIN {self.original} AS o ON {join} "
                    f"WHERE {where_g} AND o.{first} IS NULL",
                    args_g,
                ),
                (f"{replace_sql} WHERE {where_o}", args_o),
            ]
        )

    async def compare_keys(self, connection: Connection, keys: Sequence[KeyValues], batch: int = 1000) -> list[KeyValues]:
        """Compare the given keys on both sides; return keys of batches that differ."""
        differing: list[KeyValues] = []
        for start in range(0, len(keys), batch):
            part = list(keys[start : start + batch])
            args = [v for key in part for v in key]
            original_sql = f"SELECT {self.original_aggregate} FROM {self.original} WHERE {key_in(self.key, len(part))}"
            ghost_sql = f"SELECT {self.ghost_aggregate} FROM {self.ghost} WHERE {key_in(self.ghost_key, len(part))}"

            def work(cursor: Any, original_sql: str = original_sql, ghost_sql: str = ghost_sql, args: list[Any] = args) -> bool:
                cursor.execute(original_sql, args)
                o = cursor.fetchall()[0]
                cursor.execute(ghost_sql, args)
                g = cursor.fetchall()[0]
                return tuple(o) == tuple(g)

            if not await connection.run(work):
                differing.extend(part)
        return differing
