"""The swap: stop writes, prove the ghost caught up, rename atomically.

Standalone algorithm (works for traffic that goes through no proxy):

1. ``A``: create the sentry table ``_<t>_del`` (the rename's target name, so an
   unsupervised rename fails), then ``LOCK TABLES t WRITE, ghost WRITE,
   changelog WRITE, sentry WRITE`` with ``lock_wait_timeout`` =
   ``--cut-over-lock-timeout-seconds``.  Timeout: drop the sentry, retry later.
2. ``A`` writes a sentinel row to the changelog; we wait until the binlog
   delivers it, then ``A`` applies every pending key (it holds both tables) and
   checks the final delta (keys applied since the checksum snapshot).
3. ``A`` creates mirror triggers on ``t`` (insert/update/delete → same change
   on the ghost).  This is what closes the unlock→rename window *by
   construction*: on MariaDB a statement queued on ``t`` may run between
   ``UNLOCK TABLES`` and the waiting ``RENAME`` (gh-ost lost rows exactly
   there); with the triggers such a write lands in the ghost too, in the same
   transaction.
4. ``B``: ``RENAME TABLE t TO _<t>_del, ghost TO t`` — blocks behind ``A``.
5. ``A``: drop the sentry, ``UNLOCK TABLES``; ``B``'s rename completes.
   The triggers move with the old table and are dropped there.

If ``A`` dies at any point before step 5 the sentry still exists and ``B``'s
rename fails; the original table is untouched (a resumed run drops leftover
triggers and re-syncs every key from the binlog checkpoint).

:class:`TrafficGate` lets a sidecar drain and hold the application's
statements before step 1 so they never wait on the database lock; the lock and
rename still run underneath as the safety net.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import trio

from migrator import db
from migrator.applier import Applier
from migrator.checksum import Checksummer
from migrator.db import Connection, DatabaseError, qualified, quote
from migrator.inspector import Plan
from migrator.spec import MigrationSpec

log = logging.getLogger("tidegate.migrator.cutover")

SENTRY_COMMENT = "tidegate cut-over sentry"


class TrafficGate(Protocol):
    async def hold(self, schema: str, table: str, *, drain_timeout: float, hold_timeout: float) -> bool:
        """True = drained and now holding new statements; False = not now, retry later."""
        ...

    async def release(self, schema: str, table: str) -> None: ...


class NoGate:
    """No proxy in front: nothing to drain; the database lock does the work."""

    async def hold(self, schema: str, table: str, *, drain_timeout: float, hold_timeout: float) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def release(self, schema: str, table: str) -> None:
        await trio.lowlevel.checkpoint()


class Outcome(StrEnum):
    DONE = "done"
    RETRY = "retry"  # rolled back; original untouched


@dataclass
class AttemptResult:
    outcome: Outcome
    reason: str = ""
    hold_seconds: float = 0.0


class DeltaMismatch(RuntimeError):
    pass


class CutOver:
    def __init__(self, spec: MigrationSpec, plan: Plan, applier: Applier, checksummer: Checksummer | None) -> None:
        self.spec = spec
        self.plan = plan
        self.applier = applier
        self.checksummer = checksummer
        s = spec.database
        self.original = qualified(s, spec.table)
        self.ghost = qualified(s, spec.ghost_table)
        self.changelog = qualified(s, spec.changelog_table)
        self.sentry = qualified(s, spec.old_table_name)
        self.timeout = spec.cut_over_lock_timeout_seconds
        self.delta_keys = 0  # keys compared under the lock in the last attempt
        self.delta_resynced = 0  # of which re-synced

    # -- helpers shared with the checksum snapshot ----------------------------------

    async def write_sentinel(self, connection: Connection) -> str:
        token = uuid.uuid4().hex
        await connection.execute(
            f"INSERT INTO {self.changelog} (id, hint, value) VALUES (2, 'sentinel', %s) "
            "ON DUPLICATE KEY UPDATE value = VALUES(value)",
            (token,),
        )
        return token

    async def lock_and_catch_up(self, locker: Connection, *, with_sentry: bool) -> float:
        """LOCK TABLES, sentinel round trip, flush; returns seconds spent waiting for the sentinel.

        Raises ``DatabaseError`` (1205) when the lock was not granted in time and
        ``trio.TooSlowError`` when the sentinel did not come back in time; the
        caller unlocks.
        """
        tables = [f"{self.original} WRITE", f"{self.ghost} WRITE", f"{self.changelog} WRITE"]
        if with_sentry:
            tables.append(f"{self.sentry} WRITE")
        await locker.execute_many(
            [
                (f"SET SESSION lock_wait_timeout = {max(1, round(self.timeout))}", None),
                ("SET SESSION innodb_lock_wait_timeout = %s", (max(1, round(self.timeout)),)),
                ("LOCK TABLES " + ", ".join(tables), None),
            ]
        )
        token = await self.write_sentinel(locker)
        started = trio.current_time()
        with trio.fail_after(self.timeout):
            await self.applier.wait_changelog("sentinel", token)
        waited = trio.current_time() - started
        await self.applier.flush(locker, force=True)
        return waited

    # -- the attempt -------------------------------------------------------------------

    def _trigger_sql(self) -> list[str]:
        ins, upd, delete = (qualified(self.spec.database, n) for n in self.spec.trigger_names())
        targets = ", ".join(quote(c) for c in self.plan.target_columns)
        new_values = ", ".join(f"NEW.{quote(c)}" for c in self.plan.source_columns)
        where_old = " AND ".join(
            f"{quote(g)} = OLD.{quote(o)}" for o, g in zip(self.plan.key_columns, self.plan.ghost_key_columns, strict=True)
        )
        replace = f"REPLACE INTO {self.ghost} ({targets}) VALUES ({new_values})"
        return [
            f"CREATE TRIGGER {ins} AFTER INSERT ON {self.original} FOR EACH ROW {replace}",
            f"CREATE TRIGGER {upd} AFTER UPDATE ON {self.original} FOR EACH ROW BEGIN "
            f"DELETE FROM {self.ghost} WHERE {where_old}; {replace}; END",
            f"CREATE TRIGGER {delete} AFTER DELETE ON {self.original} FOR EACH ROW "
            f"DELETE FROM {self.ghost} WHERE {where_old}",
        ]

    async def drop_triggers(self, connection: Connection, table: str | None = None) -> None:
        """Drop our mirror triggers wherever they are (by name; they belong to one table)."""
        for name in self.spec.trigger_names():
            try:
                await connection.execute(f"DROP TRIGGER IF EXISTS {qualified(self.spec.database, name)}")
            except DatabaseError as error:
                log.warning("could not drop trigger %s: %s", name, error)
                raise

    async def drop_sentry(self, connection: Connection) -> None:
        rows = await connection.query(
            "SELECT TABLE_COMMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (self.spec.database, self.spec.old_table_name),
        )
        if rows and str(rows[0][0]) == SENTRY_COMMENT:
            await connection.execute(f"DROP TABLE IF EXISTS {self.sentry}")

    async def attempt(
        self,
        locker: Connection,
        renamer: Connection,
        cleaner: Connection,
        tracked_keys: set[tuple[object, ...]] | None,
    ) -> AttemptResult:
        """One cut-over attempt.  DONE, or RETRY with the original untouched."""
        await cleaner.execute(
            f"CREATE TABLE {self.sentry} (id INT NOT NULL PRIMARY KEY) ENGINE=InnoDB COMMENT=%s",
            (SENTRY_COMMENT,),
        )
        await self.applier.pause()
        started = trio.current_time()
        locked = False
        renamed = False
        try:
            try:
                await self.lock_and_catch_up(locker, with_sentry=True)
                locked = True
            except DatabaseError as error:
                if error.code in (db.ER_LOCK_WAIT_TIMEOUT, db.ER_LOCK_DEADLOCK):
                    return AttemptResult(Outcome.RETRY, f"lock not granted in {self.timeout:g}s ({error.code})")
                raise
            except trio.TooSlowError:
                locked = True
                return AttemptResult(Outcome.RETRY, "sentinel did not come back through the binlog in time")
            if self.checksummer is not None and tracked_keys is not None:
                # Exact under the lock: compare every key changed since the checksum
                # snapshot; re-sync the few a commit-visibility race left stale.
                keys = sorted(tracked_keys, key=repr)
                differing = await self.checksummer.compare_keys(locker, keys)
                if differing:
                    await self.applier.resync(locker, differing)
                    still = await self.checksummer.compare_keys(locker, differing)
                    if still:
                        raise DeltaMismatch(
                            f"{len(still)} keys changed since the checksum differ between original and ghost "
                            f"even after a re-sync under the lock (first: {still[:5]!r})"
                        )
                self.delta_keys, self.delta_resynced = len(keys), len(differing)
            await locker.execute_many([(sql, None) for sql in self._trigger_sql()])
            rename_error: list[BaseException] = []

            async def rename() -> None:
                nonlocal renamed
                try:
                    await renamer.execute_many(
                        [
                            (f"SET SESSION lock_wait_timeout = {max(2, round(self.timeout * 2 + 2))}", None),
                            (
                                f"RENAME TABLE {self.original} TO {self.sentry}, {self.ghost} TO {self.original}",
                                None,
                            ),
                        ]
                    )
                    renamed = True
                except DatabaseError as error:
                    rename_error.append(error)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(rename)
                await self._wait_rename_queued(cleaner, renamer)
                await locker.execute_many([(f"DROP TABLE {self.sentry}", None), ("UNLOCK TABLES", None)])
                locked = False
            if not renamed:
                return AttemptResult(Outcome.RETRY, f"rename failed: {rename_error[0] if rename_error else '?'}")
            return AttemptResult(Outcome.DONE, hold_seconds=trio.current_time() - started)
        finally:
            with trio.CancelScope(shield=True):
                if locked:
                    try:
                        await locker.execute("UNLOCK TABLES")
                    except DatabaseError:
                        await locker.close()  # closing the session releases its locks
                if not renamed:
                    await self.drop_triggers(cleaner)
                    await self.drop_sentry(cleaner)
                self.applier.paused = False

    async def _wait_rename_queued(self, observer: Connection, renamer: Connection) -> None:
        """Best effort: let the RENAME reach its metadata-lock wait before we unlock.

        Not needed for correctness (the triggers are), only so that statements
        queued on the table run after the rename, on the new table.
        """
        with trio.move_on_after(min(1.0, self.timeout)):
            while True:
                await trio.sleep(0.002)
                if renamer.thread_id is None:
                    continue
                rows = await observer.query(
                    "SELECT STATE FROM information_schema.PROCESSLIST WHERE ID = %s", (renamer.thread_id,)
                )
                if rows and "lock" in str(rows[0][0] or "").lower():
                    return
