"""The row copy: one keyset chunk of the original into the ghost per call.

A chunk is two statements in one thread hop on the writer connection:

1. the chunk's upper bound, ``SELECT key … WHERE key > low AND key <= upper
   ORDER BY key LIMIT 1 OFFSET size-1`` (an index walk of ``size`` entries,
   about 5% of the chunk's cost on a 1M-row table), and
2. ``REPLACE INTO ghost (…) SELECT … FROM orig FORCE INDEX (key) WHERE
   key > low AND key <= high``.

The writer session is READ COMMITTED, so the SELECT side is a consistent
read: no share locks on the application's rows, nothing the application can
wait on or deadlock with.  REPLACE (not INSERT IGNORE) so that a row the
binlog applier already wrote is overwritten by the fresher copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from migrator.applier import copy_select
from migrator.chunker import KeyValues, compare, compare_args
from migrator.db import Connection, DatabaseError, qualified, quote
from migrator.inspector import Plan


@dataclass(frozen=True)
class ChunkResult:
    high: KeyValues  # inclusive upper key of the chunk: the new watermark
    rows: int  # rows read from the original
    seconds: float  # server time of both statements


class ChunkCopier:
    def __init__(self, plan: Plan, schema: str, original: str, ghost: str) -> None:
        self._key = plan.key_columns
        self._key_list = ", ".join(quote(c) for c in plan.key_columns)
        self._original = qualified(schema, original)
        self._force = f"FORCE INDEX ({quote(plan.key_name)})"
        self._replace, _ = copy_select(plan, schema, original, ghost)
        self._upper_clause = compare(plan.key_columns, "<=")
        self._lower_clause = compare(plan.key_columns, ">")

    def _where(self, low: KeyValues | None) -> str:
        return f"{self._lower_clause if low is not None else 'TRUE'} AND {self._upper_clause}"

    def _range_args(self, low: KeyValues | None, high: KeyValues) -> list[Any]:
        return [*(compare_args(low) if low is not None else []), *compare_args(high)]

    def _boundary_sql(self, low: KeyValues | None, size: int) -> str:
        """The key ``size`` rows after ``low`` (its parameters: :meth:`_range_args` up to the upper bound)."""
        return (f"SELECT {self._key_list} FROM {self._original} {self._force} WHERE {self._where(low)} "
                f"ORDER BY {self._key_list} LIMIT 1 OFFSET {max(0, size - 1)}")

    def _copy_sql(self, low: KeyValues | None) -> str:
        return f"{self._replace} {self._force} WHERE {self._where(low)}"

    async def copy_chunk(self, writer: Connection, low: KeyValues | None, upper: KeyValues, size: int) -> ChunkResult:
        """Copy up to ``size`` rows after ``low`` (exclusive), never past ``upper``."""
        boundary_sql = self._boundary_sql(low, size)
        copy_sql = self._copy_sql(low)

        def work(cursor: Any) -> ChunkResult:
            started = time.monotonic()
            cursor.execute(boundary_sql, self._range_args(low, upper))
            found = cursor.fetchall()
            high = tuple(found[0]) if found else upper
            affected = int(cursor.execute(copy_sql, self._range_args(low, high)))
            # REPLACE counts a replaced row twice; with a boundary the chunk holds exactly `size` rows.
            rows = size if found else min(affected, size)
            return ChunkResult(high, rows, time.monotonic() - started)

        return await writer.run(work)

    async def copy_chunks(
        self, writers: list[Connection], low: KeyValues | None, upper: KeyValues, size: int
    ) -> list[ChunkResult]:
        """Up to ``len(writers)`` consecutive chunks of ``size`` rows, copied at once, one per session.

        The boundaries are found first, in key order, on the first session;
        then each chunk's ``REPLACE … SELECT`` runs on its own session.  The
        caller applies no binlog keys while they run, so no chunk can
        overwrite a fresher row the applier wrote (both sides stay state based).
        """
        if len(writers) == 1:
            return [await self.copy_chunk(writers[0], low, upper, size)]

        def bounds(cursor: Any) -> list[tuple[KeyValues, bool]]:
            found: list[tuple[KeyValues, bool]] = []
            current = low
            for _ in writers:
                cursor.execute(self._boundary_sql(current, size), self._range_args(current, upper))
                rows = cursor.fetchall()
                high = tuple(rows[0]) if rows else upper
                found.append((high, bool(rows)))
                current = high
                if not rows or high == upper:
                    break
            return found

        chunks = await writers[0].run(bounds)
        results: list[ChunkResult | None] = [None] * len(chunks)

        async def copy(index: int) -> None:
            chunk_low = low if index == 0 else chunks[index - 1][0]
            high, full = chunks[index]
            sql, args = self._copy_sql(chunk_low), self._range_args(chunk_low, high)

            def work(cursor: Any) -> ChunkResult:
                started = time.monotonic()
                affected = int(cursor.execute(sql, args))
                return ChunkResult(high, size if full else min(affected, size), time.monotonic() - started)

            try:
                results[index] = await writers[index].run(work)
            except DatabaseError as error:  # the others finish; the caller retries them all
                errors.append(error)

        errors: list[DatabaseError] = []
        async with trio.open_nursery() as nursery:
            for index in range(len(chunks)):
                nursery.start_soon(copy, index)
        if errors:
            raise errors[0]
        return [r for r in results if r is not None]
