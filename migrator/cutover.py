"""The swap: stop writes, prove the ghost caught up, rename atomically.

Standalone algorithm (works for traffic that goes through no proxy):

1. ``A``: ``LOCK TABLES t WRITE, ghost WRITE, changelog WRITE`` with
   ``lock_wait_timeout`` = ``--cut-over-lock-timeout-seconds`` (timeout: the
   attempt is rolled back and retried later).  Once granted, no session holds
   or can take any lock on ``t``.
2. ``A`` writes a sentinel row to the changelog; when the binlog delivers it,
   every committed change to ``t`` has been received; ``A`` applies the
   pending keys and compares every key changed since the checksum snapshot
   (re-syncing the few a commit-visibility race left stale).  Ghost = ``t``.
3. ``B`` asks for ``LOCK TABLES t WRITE`` (it queues behind ``A``); ``A``
   unlocks.  A waiting exclusive request is granted before waiting
   application statements, so ``B`` takes ``t`` over with nothing in between;
   a second sentinel proves it (no change to ``t`` may arrive).
4. ``C``: ``RENAME TABLE t TO _t_del, ghost TO t``.  ``B`` holds only ``t``,
   so the rename takes the other names at once and queues on ``t``, ahead of
   every application statement (checked: its processlist state, and — when
   the helper names sort before ``t`` — a ``SHOW CREATE TABLE ghost`` that
   must block on the rename's exclusive lock).
5. ``B`` unlocks; the rename runs first; queued statements reach the new table.

Why not gh-ost's ``LOCK TABLES t, ghost, sentry`` + blocked rename + unlock:
MariaDB grants metadata locks in sorted name order, so that rename waits on
``_t_del``/``_t_gho`` (sorted before ``t``), not on ``t``, and at the unlock
the statements queued on ``t`` run on the old table first — measured here, 72
lost writes in 12 swaps (gh-ost loses rows exactly there).  Mirror triggers
close that window but make every such statement need the ghost while the
rename holds it: a metadata-lock deadlock whose victim is the application.

If the process dies before step 4 nothing happened; after step 4 the rename
completes on its own, which is right because every check passed before it.
An application transaction that had read ``t`` and writes it while our lock
request of step 1 waits is chosen as a metadata-lock deadlock victim by the
server (1213).  So every lock request is made politely first: ``LOCK TABLES
… NOWAIT`` is tried every 2 ms for half the lock timeout, and is granted
only at an instant when no session holds a conflicting lock; until then it
is never pending, so nobody waits behind it and nobody can be made its
deadlock victim.  Only on a table that is never free for that long is the
ordinary waiting request made (for up to the lock timeout), with the old
exposure.  A sidecar that drains traffic (:class:`TrafficGate`) removes the
window altogether: the lock is then granted at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import trio

from migrator import db
from migrator.applier import Applier
from migrator.checksum import Checksummer
from migrator.db import Connection, DatabaseError, qualified
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
        self.locked_at = 0.0  # time.monotonic() when lock_and_catch_up's lock was last granted

    # -- helpers shared with the checksum snapshot ----------------------------------

    async def write_sentinel(self, connection: Connection) -> str:
        token = uuid.uuid4().hex
        await connection.execute(
            f"INSERT INTO {self.changelog} (id, hint, value) VALUES (2, 'sentinel', %s) "
            "ON DUPLICATE KEY UPDATE value = VALUES(value)",
            (token,),
        )
        return token

    async def lock_and_catch_up(self, locker: Connection, *, original_mode: str = "WRITE",
                                flusher: Connection | None = None) -> float:
        """LOCK TABLES, sentinel round trip, flush; returns seconds spent waiting for the sentinel.

        ``original_mode`` READ stops writers only (readers go on, and an
        application transaction that read ``t`` can never be a deadlock victim
        of the request); WRITE stops everyone.  With a ``flusher`` session the
        ghost is not locked: the pending keys are applied through that session
        (the paused applier is the ghost's only writer), so the lock does not
        wait for, nor block, an online ``ALTER`` of the ghost (the secondary
        indexes built after the copy).  Raises ``DatabaseError`` (1205) when
        the lock was not granted in time and ``trio.TooSlowError`` when the
        sentinel did not come back in time; the caller unlocks.
        """
        tables = [f"{self.original} {original_mode}", *([] if flusher else [f"{self.ghost} WRITE"]),
                  f"{self.changelog} WRITE"]
        lock = "LOCK TABLES " + ", ".join(tables)
        await locker.execute_many(
            [
                (f"SET SESSION lock_wait_timeout = {max(1, round(self.timeout))}", None),
                ("SET SESSION innodb_lock_wait_timeout = %s", (max(1, round(self.timeout)),)),
            ]
        )
        if locker.mariadb:
            granted = await self.lock_politely(locker, lock, self.timeout / 2)
        else:
            granted = False
            await self.wait_until_free(locker, original_mode, self.timeout / 2, ghost=flusher is None)
        if not granted:
            await locker.execute(lock)  # a waiting request, bounded by lock_wait_timeout
        self.locked_at = time.monotonic()
        waited = await self.sentinel_round_trip(locker)
        await self.applier.flush(flusher or locker, force=True)
        return waited

    async def lock_politely(self, connection: Connection, lock: str, seconds: float) -> bool:
        """Try ``lock`` with NOWAIT every 2 ms for ``seconds``; whether it was granted.

        A request that is never left pending cannot queue application
        statements behind it nor make a transaction that read the table and
        now writes it a metadata-lock deadlock victim.
        """
        deadline = trio.current_time() + seconds
        while True:
            try:
                await connection.execute(lock + " NOWAIT")
                return True
            except DatabaseError as error:
                if error.code != db.ER_LOCK_WAIT_TIMEOUT:
                    raise
            if trio.current_time() >= deadline:
                return False
            await trio.sleep(0.002)

    async def wait_until_free(self, connection: Connection, original_mode: str, seconds: float, *,
                              ghost: bool = True) -> bool:
        """MySQL: until no other session holds a conflicting lock on the tables (bounded).

        MySQL's ``LOCK TABLES`` has no ``NOWAIT``; instead the request is made
        at a moment when ``performance_schema.metadata_locks`` shows the tables
        free, so it is granted at once and is not pending while a transaction
        that read ``t`` goes on to write it.  Left: a transaction that reads
        ``t`` in the instant between that look and the request.  Without the
        instrument (performance_schema off) it returns False at once.  Without
        ``ghost`` the ghost's locks are not looked at (it is not requested).
        """
        tolerated = ("SHARED_READ", "SHARED_HIGH_PRIO", "SHARED", "SHARED_READ_ONLY") if original_mode == "READ" else ()
        schema = self.spec.database
        helpers = (*([self.spec.ghost_table] if ghost else []), self.spec.changelog_table)
        sql = (
            "SELECT COUNT(*) FROM performance_schema.metadata_locks WHERE OBJECT_TYPE = 'TABLE' "
            "AND OBJECT_SCHEMA = %s AND LOCK_STATUS = 'GRANTED' AND OWNER_THREAD_ID <> (SELECT THREAD_ID FROM "
            "performance_schema.threads WHERE PROCESSLIST_ID = CONNECTION_ID()) "
            f"AND (OBJECT_NAME IN ({', '.join(['%s'] * len(helpers))}) OR (OBJECT_NAME = %s"
            + (f" AND LOCK_TYPE NOT IN ({', '.join(['%s'] * len(tolerated))})" if tolerated else "")
            + "))"
        )
        args = (schema, *helpers, self.spec.table, *tolerated)
        deadline = trio.current_time() + seconds
        while True:
            try:
                rows = await connection.query(sql, args)
            except DatabaseError as error:
                log.info("cannot see metadata locks (%s); asking for the lock directly", error)
                return False
            if rows and int(rows[0][0]) == 0:
                return True
            if trio.current_time() >= deadline:
                return False
            await trio.sleep(0.002)

    async def sentinel_round_trip(self, connection: Connection) -> float:
        token = await self.write_sentinel(connection)
        started = trio.current_time()
        with trio.fail_after(self.timeout):
            await self.applier.wait_changelog("sentinel", token)
        return trio.current_time() - started

    # -- the attempt -------------------------------------------------------------------

    async def drop_triggers(self, connection: Connection, table: str | None = None) -> None:
        """Drop mirror triggers an older version may have left (by name)."""
        for name in self.spec.trigger_names():
            try:
                await connection.execute(f"DROP TRIGGER IF EXISTS {qualified(self.spec.database, name)}")
            except DatabaseError as error:
                log.warning("could not drop trigger %s: %s", name, error)
                raise

    async def drop_sentry(self, connection: Connection) -> None:
        """Drop a sentry table an older version may have left."""
        rows = await connection.query(
            "SELECT TABLE_COMMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (self.spec.database, self.spec.old_table_name),
        )
        if rows and str(rows[0][0]) == SENTRY_COMMENT:
            await connection.execute(f"DROP TABLE IF EXISTS {self.sentry}")

    async def attempt(
        self,
        locker: Connection,
        holder: Connection,
        renamer: Connection,
        observer: Connection,
        tracked_keys: set[tuple[object, ...]] | None,
    ) -> AttemptResult:
        """One cut-over attempt.  DONE, or RETRY with the original untouched."""
        if not locker.mariadb:
            return await self.attempt_atomic(locker, tracked_keys)
        await self.applier.pause()
        started = trio.current_time()
        locked = True  # a LOCK TABLES that failed holds nothing; UNLOCK is harmless
        held = renamed = False
        try:
            not_now = await self._lock_or_retry(locker)
            if not_now is not None:
                return not_now
            await self._check_delta(locker, tracked_keys)

            # 3. Hand t over to a lock on t alone.
            hold_error: list[DatabaseError] = []

            async def hold() -> None:
                try:
                    await holder.execute_many(
                        [
                            (f"SET SESSION lock_wait_timeout = {max(2, round(self.timeout * 2 + 2))}", None),
                            (f"LOCK TABLES {self.original} WRITE", None),
                        ]
                    )
                except DatabaseError as error:
                    hold_error.append(error)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                queued = await self._wait_metadata_lock(observer, holder)
                await locker.execute("UNLOCK TABLES")
                locked = False
            if hold_error:
                return AttemptResult(Outcome.RETRY, f"hand-over lock failed: {hold_error[0]}")
            held = True
            try:
                await self.sentinel_round_trip(observer)
            except trio.TooSlowError:
                return AttemptResult(Outcome.RETRY, "second sentinel did not come back in time")
            if self.applier.pending:
                return AttemptResult(
                    Outcome.RETRY,
                    f"{len(self.applier.pending)} changes reached t between the two locks"
                    + ("" if queued else " (the hand-over lock was not seen queued)"),
                )

            # 4./5. The rename queues on t alone, then t is released to it.
            rename_error: list[DatabaseError] = []

            async def rename() -> None:
                nonlocal renamed
                try:
                    await renamer.execute_many(
                        [
                            (f"SET SESSION lock_wait_timeout = {max(2, round(self.timeout * 2 + 2))}", None),
                            (f"RENAME TABLE {self.original} TO {self.sentry}, {self.ghost} TO {self.original}", None),
                        ]
                    )
                    renamed = True
                except DatabaseError as error:
                    rename_error.append(error)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(rename)
                if await self._rename_queued_on_original(observer, renamer):
                    await holder.execute("UNLOCK TABLES")
                    held = False
                else:
                    await self._kill_query(observer, renamer)
            if not renamed:
                reason = rename_error[0] if rename_error else "?"
                return AttemptResult(Outcome.RETRY, f"rename did not queue on the table alone or failed: {reason}")
            return AttemptResult(Outcome.DONE, hold_seconds=trio.current_time() - started)
        finally:
            await self._unlock(*([locker] if locked else []), *([holder] if held else []))
            if not renamed:
                # After a rename the ghost is gone: the applier stays paused for good.
                self.applier.paused = False

    async def attempt_atomic(self, locker: Connection, tracked_keys: set[tuple[object, ...]] | None) -> AttemptResult:
        """MySQL 8.0.13+: the rename runs inside the session that holds the write locks.

        ``LOCK TABLES t WRITE, ghost WRITE, changelog WRITE``; sentinel round
        trip and delta check as on MariaDB; then ``RENAME TABLE t TO _t_del,
        ghost TO t`` in the same session, which MySQL allows on write-locked
        tables; ``UNLOCK TABLES``.  Nothing can reach ``t`` between the lock
        and the rename, statements queued on ``t`` open the new table, and if
        the process dies at any point the session's end releases the locks
        with either nothing or everything done.
        """
        await self.applier.pause()
        started = trio.current_time()
        renamed = False
        try:
            not_now = await self._lock_or_retry(locker)
            if not_now is not None:
                return not_now
            await self._check_delta(locker, tracked_keys)
            await locker.execute(f"RENAME TABLE {self.original} TO {self.sentry}, {self.ghost} TO {self.original}")
            renamed = True
            return AttemptResult(Outcome.DONE, hold_seconds=trio.current_time() - started)
        finally:
            await self._unlock(locker)
            if not renamed:
                self.applier.paused = False

    async def _lock_or_retry(self, locker: Connection) -> AttemptResult | None:
        """Steps 1-2 (lock, sentinel, flush); a RETRY result when it cannot be done now."""
        try:
            await self.lock_and_catch_up(locker)
        except DatabaseError as error:
            if error.code in (db.ER_LOCK_WAIT_TIMEOUT, db.ER_LOCK_DEADLOCK):
                return AttemptResult(Outcome.RETRY, f"lock not granted in {self.timeout:g}s ({error.code})")
            raise
        except trio.TooSlowError:
            return AttemptResult(Outcome.RETRY, "sentinel did not come back through the binlog in time")
        return None

    @staticmethod
    async def _unlock(*connections: Connection) -> None:
        with trio.CancelScope(shield=True):
            for connection in connections:
                try:
                    await connection.execute("UNLOCK TABLES")
                except DatabaseError:
                    await connection.close()  # closing the session releases its locks

    async def _check_delta(self, locker: Connection, tracked_keys: set[tuple[object, ...]] | None) -> None:
        """Exact under the lock: every key changed since the checksum snapshot."""
        if self.checksummer is None or tracked_keys is None:
            return
        keys = sorted(tracked_keys, key=repr)
        differing = await self.checksummer.compare_keys(locker, keys)
        if differing:
            # A commit-visibility race left these stale; reads are exact now.
            await self.applier.resync(locker, differing)
            still = await self.checksummer.compare_keys(locker, differing)
            if still:
                raise DeltaMismatch(
                    f"{len(still)} keys changed since the checksum differ between original and ghost "
                    f"even after a re-sync under the lock (first: {still[:5]!r})"
                )
        self.delta_keys, self.delta_resynced = len(keys), len(differing)

    async def _wait_metadata_lock(self, observer: Connection, waiter: Connection) -> bool:
        """Until ``waiter`` waits on a table metadata lock (bounded); whether it was seen."""
        with trio.move_on_after(min(1.0, self.timeout)):
            while True:
                await trio.sleep(0.001)
                if waiter.thread_id is None:
                    continue
                rows = await observer.query(
                    "SELECT STATE FROM information_schema.PROCESSLIST WHERE ID = %s", (waiter.thread_id,)
                )
                if rows and str(rows[0][0] or "") == "Waiting for table metadata lock":
                    return True
        return False

    def _original_sorts_first(self) -> bool:
        """Does the server request the lock on ``t`` before those on the helper names?"""
        original = self.spec.table.encode()
        return all(original < name.encode() for name in (self.spec.ghost_table, self.spec.old_table_name))

    async def _rename_queued_on_original(self, observer: Connection, renamer: Connection) -> bool:
        """Whether the rename now waits for ``t`` and holds every other name it needs."""
        if not await self._wait_metadata_lock(observer, renamer):
            return False
        if self._original_sorts_first():
            return True  # t is its first table lock, and it is waiting
        # It holds the helper names (sorted first) iff a high-priority shared lock on
        # the ghost blocks — granted exclusive locks block it, waiting ones do not.
        with trio.move_on_after(min(1.0, self.timeout)):
            while True:
                try:
                    await observer.query(f"SET STATEMENT max_statement_time = 0.03 FOR SHOW CREATE TABLE {self.ghost}")
                except DatabaseError as error:
                    if error.code == db.ER_STATEMENT_TIMEOUT:
                        return True
                    raise
                await trio.sleep(0.005)
        return False

    async def _kill_query(self, observer: Connection, victim: Connection) -> None:
        if victim.thread_id is not None:
            with contextlib.suppress(DatabaseError):
                await observer.execute(f"KILL QUERY {int(victim.thread_id)}")
