"""Changed keys → batched, idempotent REPLACE … SELECT / DELETE on the ghost.

The applier never decodes row values from the binlog.  For every key the
binlog says changed it makes the ghost row equal to the original row *as it
is now*: deleted keys are deleted from the ghost, the rest are re-read from
the original with ``REPLACE INTO ghost SELECT … WHERE key IN (…)``.  That is
idempotent, so replaying after a resume is safe, and it is applied before any
further copy chunk so the ghost is never behind a chunk it overlaps.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import trio

from migrator.binlog import BinlogItem
from migrator.chunker import key_in
from migrator.db import Connection, Statement, qualified, quote
from migrator.inspector import Plan

log = logging.getLogger("tidegate.migrator.applier")

KeyValues = tuple[Any, ...]


class DDLDetected(RuntimeError):
    pass


def copy_select(plan: Plan, schema: str, original: str, ghost: str) -> tuple[str, str]:
    """(``REPLACE INTO ghost (…) SELECT … FROM orig`` prefix, ``DELETE FROM ghost`` prefix)."""
    targets = ", ".join(quote(c) for c in plan.target_columns)
    sources = ", ".join(quote(c) for c in plan.source_columns)
    replace = f"REPLACE INTO {qualified(schema, ghost)} ({targets}) SELECT {sources} FROM {qualified(schema, original)}"
    delete = f"DELETE FROM {qualified(schema, ghost)}"
    return replace, delete


class Applier:
    """Owns the set of keys changed in the original but not yet applied to the ghost."""

    def __init__(
        self, plan: Plan, schema: str, original: str, ghost: str, *, batch_size: int = 500, hop_keys: int = 5000
    ) -> None:
        self.plan = plan
        self._replace, self._delete = copy_select(plan, schema, original, ghost)
        self._batch_size = batch_size
        self.hop_keys = hop_keys
        self.flushes = 0
        self.pending: dict[KeyValues, bool] = {}  # key -> deleted, last event wins
        #: every binlog change before this position is in ``pending`` or in the ghost
        self.received_gtid: str | None = None
        #: every binlog change before this position is in the ghost
        self.applied_gtid: str | None = None
        self.changelog_seen: dict[str, str] = {}
        self._changelog_event = trio.Event()
        self.ddl: list[str] = []
        self.rows_applied = 0
        self.last_heartbeat: str | None = None
        self.tracking: set[KeyValues] | None = None  # keys applied while a delta is tracked
        self.paused = False
        self._in_flight = 0
        #: while the copy runs, (watermark, upper): upserts of keys in (watermark, upper] are left
        #: to the copy (see :meth:`flush`); None: every key is applied
        self.ahead_of_copy: tuple[KeyValues | None, KeyValues] | None = None
        self.left_to_copy = 0  # upserts skipped that way

    # -- receiving -------------------------------------------------------------

    def receive(self, item: BinlogItem) -> None:
        for key, deleted in item.keys:
            self.pending.pop(key, None)  # keep insertion order = order of last change
            self.pending[key] = deleted
        for hint, value in item.changelog:
            self.changelog_seen[hint] = value
            if hint == "heartbeat":
                self.last_heartbeat = value
        if item.changelog:
            self._changelog_event.set()
            self._changelog_event = trio.Event()
        self.ddl.extend(item.ddl)
        if item.gtid is not None:
            self.received_gtid = item.gtid
            if not self.pending and not self._in_flight:
                self.applied_gtid = item.gtid

    @property
    def in_flight(self) -> bool:
        """A batch taken from ``pending`` is being written (its keys are not tracked yet)."""
        return self._in_flight > 0

    async def consume(self, receive_channel: trio.MemoryReceiveChannel[BinlogItem]) -> None:
        async with receive_channel:
            async for item in receive_channel:
                self.receive(item)

    async def wait_changelog(self, hint: str, value: str) -> None:
        """Return once the binlog has delivered changelog row (hint, value)."""
        while self.changelog_seen.get(hint) != value:
            event = self._changelog_event
            await event.wait()

    # -- applying --------------------------------------------------------------

    async def pause(self) -> None:
        """Stop ordinary flushes and wait for one in flight to finish.

        A cut-over or checksum lock must not be granted between the DELETE and
        the REPLACE of a batch: that batch would then land after the snapshot.
        """
        self.paused = True
        while self._in_flight:
            await trio.sleep(0.001)

    async def resync(self, connection: Connection, keys: Sequence[KeyValues]) -> None:
        """Make the ghost rows of ``keys`` equal to the original's, unconditionally.

        Used for keys a checksum found different and under the cut-over lock,
        where every writer has finished and reads are exact: it removes any
        effect of a binlog event that arrived before its transaction became
        visible to our REPLACE … SELECT.  One thread hop.
        """
        keys = list(keys)
        statements: list[Statement] = []
        for start in range(0, len(keys), self._batch_size):
            part = keys[start : start + self._batch_size]
            statements += self.statements([(k, True) for k in part]) + self.statements([(k, False) for k in part])
        if statements:
            await connection.execute_many(statements)

    def resume(self) -> None:
        self.paused = False

    def statements(self, batch: Sequence[tuple[KeyValues, bool]]) -> list[Statement]:
        deletes = [k for k, deleted in batch if deleted]
        upserts = [k for k, deleted in batch if not deleted]
        statements: list[Statement] = []
        if deletes:
            where = key_in(self.plan.ghost_key_columns, len(deletes))
            statements.append((f"{self._delete} WHERE {where}", _flatten(deletes)))
        if upserts:
            where = key_in(self.plan.key_columns, len(upserts))
            statements.append((f"{self._replace} WHERE {where}", _flatten(upserts)))
        return statements

    async def flush(self, connection: Connection, *, limit: int | None = None, force: bool = False) -> int:
        """Apply pending keys (all, or up to ``limit``) through ``connection``; keys applied.

        Up to ``hop_keys`` keys go to the server per thread hop (~80 µs each),
        as DELETE / REPLACE … SELECT statements of ``batch_size`` keys.
        While ``paused`` (a cut-over owns the tables) only ``force`` flushes run.
        """
        if self.paused and not force:
            return 0
        applied = 0
        while self.pending and (limit is None or applied < limit):
            gtid_at_snapshot = self.received_gtid
            count = self.hop_keys if limit is None else min(self.hop_keys, limit - applied)
            batch = _take(self.pending, count)
            if self.ahead_of_copy is not None:
                batch = self._leave_to_copy(batch, *self.ahead_of_copy)
            statements: list[Statement] = []
            for start in range(0, len(batch), self._batch_size):
                statements += self.statements(batch[start : start + self._batch_size])
            self._in_flight += 1
            try:
                # Autocommit statements, not BEGIN…COMMIT: under LOCK TABLES (cut-over)
                # BEGIN would silently release the table locks.
                await connection.execute_many(statements)
            except BaseException:
                # Put them back (newer changes received meanwhile win).
                for key, deleted in batch:
                    self.pending.setdefault(key, deleted)
                raise
            finally:
                self._in_flight -= 1
            if self.tracking is not None:
                self.tracking.update(k for k, _ in batch)
            applied += len(batch)
            self.rows_applied += len(batch)
            self.flushes += 1
            if not self.pending and not self._in_flight:
                self.applied_gtid = gtid_at_snapshot
        if not self.pending and not self._in_flight:
            self.applied_gtid = self.received_gtid
        return applied

    def _leave_to_copy(self, batch: list[tuple[KeyValues, bool]], watermark: KeyValues | None,
                       upper: KeyValues) -> list[tuple[KeyValues, bool]]:
        """Drop the upserts of keys the copy has not reached yet: it will read them itself.

        A later chunk's ``REPLACE … SELECT`` reads such a row after this
        moment, so it copies this change or a newer one: applying it now
        would write the row twice.  Deletes always run (the ghost may hold
        the row from before a resume).  Only for keys whose order in Python
        is the server's (integers; the runner decides); with a steady write
        rate, half of the changes during a copy fall ahead of it (Spirit
        skips them the same way).
        """
        kept = [(key, deleted) for key, deleted in batch
                if deleted or not ((watermark is None or key > watermark) and key <= upper)]
        self.left_to_copy += len(batch) - len(kept)
        return kept


def _take(pending: dict[KeyValues, bool], count: int) -> list[tuple[KeyValues, bool]]:
    keys = list(itertools.islice(pending, count))
    return [(key, pending.pop(key)) for key in keys]


def _flatten(keys: Sequence[KeyValues]) -> list[Any]:
    return [value for key in keys for value in key]
