"""The migration, told as a linear story.

preflight → ghost table → (instant?) → binlog from the current GTID → keyset
copy with the applier always first → checksum in a snapshot → ready /
postponed → cut-over attempts → cleanup and schema version.

Embedding (the sidecar)::

    migration = Migration(spec, gate=my_gate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(migration.run)
        migration.progress()           # snapshot at any time
        migration.throttle("peak")     # / migration.throttle(None)
        migration.postpone(True)       # hold before cut-over / postpone(False)
        migration.cancel()             # drop the ghost, original untouched

Lifecycle hooks (``migrator.hooks``): ``Migration(spec, hooks=Hooks(settings))``
fires ``startup`` (start or resume), ``row_copy_complete``, asks
``before_cut_over`` before the first cut-over attempt (a veto keeps the
migration postponed and is asked again every ``retry_interval``), fires
``after_cut_over`` after the rename, and awaits ``success`` or ``failure``
before ``run`` returns or raises.  A hook's failure never breaks the
migration; only the veto holds it up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from migrator import db, inspector
from migrator.applier import Applier
from migrator.binlog import BinlogItem, BinlogStreamer
from migrator.checksum import Checksummer, Mismatch
from migrator.chunker import ChunkSizer
from migrator.copier import ChunkCopier, ChunkResult
from migrator.cutover import SENTRY_COMMENT, CutOver, NoGate, Outcome, TrafficGate
from migrator.db import Connection, DatabaseError, qualified, quote
from migrator.hooks import MigrationHooks, NoHooks
from migrator.inspector import Plan, Refusal, TableSchema
from migrator.spec import MigrationSpec, OldTablePolicy
from migrator.state import RESUMABLE, Checkpoint, MigrationState, Phase, record_schema_version
from migrator.throttler import Throttle

log = logging.getLogger("tidegate.migrator.runner")


class MigrationFailed(RuntimeError):
    pass


class ChecksumMismatch(MigrationFailed):
    pass


@dataclass
class Progress:
    phase: str = Phase.PENDING.value
    migration_id: int | None = None
    rows_copied: int = 0
    rows_estimate: int = 0
    rows_per_second: float = 0.0
    eta_seconds: float | None = None
    binlog_lag_seconds: float = 0.0
    pending_keys: int = 0
    keys_applied: int = 0
    chunk_size: int = 0
    throttle_reason: str | None = None
    postponed: bool = False
    #: why the cut-over waits besides the postpone flag (a vetoing ``before_cut_over`` hook)
    postponed_by: str | None = None
    cut_over_attempts: int = 0
    elapsed_seconds: float = 0.0
    message: str = ""
    #: a long step besides copying, e.g. "building secondary indexes k_1 for 40s"
    activity: str | None = None
    #: every phase entered by this process, in order: an observer that samples the
    #: progress sees each transition, even one shorter than its sampling interval
    phases: tuple[str, ...] = ()

    def line(self) -> str:
        estimate = max(self.rows_estimate, self.rows_copied)
        percent = 100.0 * self.rows_copied / estimate if estimate else 100.0
        eta = f"{self.eta_seconds:.0f}s" if self.eta_seconds is not None else "-"
        parts = [
            f"[{self.phase}]",
            f"copied {self.rows_copied}/{estimate} ({percent:.1f}%)",
            f"{self.rows_per_second:.0f} rows/s",
            f"binlog lag {self.binlog_lag_seconds * 1000:.0f}ms",
            f"pending {self.pending_keys}",
            f"applied {self.keys_applied}",
            f"eta {eta}",
            f"elapsed {self.elapsed_seconds:.1f}s",
        ]
        if self.activity:
            parts.append(self.activity)
        if self.throttle_reason:
            parts.append(f"throttled: {self.throttle_reason}")
        if self.postponed:
            parts.append(f"cut-over postponed by {self.postponed_by}" if self.postponed_by else "cut-over postponed")
        return " ".join(parts)


@dataclass
class Result:
    phase: Phase
    migration_id: int | None
    instant: bool = False
    rows_copied: int = 0
    seconds: float = 0.0
    cut_over_attempts: int = 0
    plan: list[str] = field(default_factory=list)
    message: str = ""


class _Heartbeat:
    """Writes a numbered heartbeat to the changelog; lag = age of the oldest unseen one."""

    def __init__(self, connection: Connection, changelog: str, interval: float) -> None:
        self._connection = connection
        self._changelog = changelog
        self._interval = interval
        self._sent: dict[int, float] = {}
        self._seq = 0

    async def run(self) -> None:
        while True:
            self._seq += 1
            self._sent[self._seq] = trio.current_time()
            self._sent.pop(self._seq - 1000, None)
            try:
                await self._connection.execute(
                    f"INSERT INTO {self._changelog} (id, hint, value) VALUES (1, 'heartbeat', CONCAT(%s, ' ', UTC_TIMESTAMP(6))) "
                    "ON DUPLICATE KEY UPDATE value = VALUES(value)",
                    (self._seq,),
                )
            except DatabaseError as error:
                if not error.retryable:
                    raise
            await trio.sleep(self._interval)

    def lag(self, seen: str | None) -> float:
        seen_seq = 0
        if seen:
            with contextlib.suppress(ValueError):
                seen_seq = int(seen.split(" ", 1)[0])
        sent = self._sent.get(seen_seq + 1)
        return max(0.0, trio.current_time() - sent) if sent is not None else 0.0


class Migration:
    def __init__(
        self,
        spec: MigrationSpec,
        *,
        gate: TrafficGate | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        output: Callable[[str], None] | None = None,
        hooks: MigrationHooks | None = None,
    ) -> None:
        self.spec = spec
        self.gate: TrafficGate = gate or NoGate()
        self.hooks: MigrationHooks = hooks or NoHooks()
        #: why a ``before_cut_over`` hook holds the cut-over back (None: it does not)
        self._vetoed: str | None = None
        self._resumed = False
        self._on_progress = on_progress
        self._output = output or (lambda line: log.info("%s", line))
        self._progress = Progress()
        self._phases: list[str] = []
        self._state: MigrationState | None = None
        self._throttle: Throttle | None = None
        self._manual_throttle: str | None = None
        self._postponed_manual = False
        self._postpone_changed = trio.Event()
        self._cancel_requested = False
        self._cancel_scope: trio.CancelScope | None = None
        self._started = 0.0
        self._copy_started = 0.0
        self._rows_copied = 0
        self._applier: Applier | None = None
        self._heartbeat: _Heartbeat | None = None
        self._sizer: ChunkSizer | None = None
        self._behind: _BehindCopy | None = None
        #: definitions of the ghost's secondary indexes built after the copy
        self._deferred_indexes: list[str] = []
        self._copy_writers: list[Connection] = []
        self._activity: tuple[str, float] | None = None  # (what, since): shown in the status line
        self._chunks = 0
        #: seconds each checksum snapshot kept the table's writers waiting (lock granted to unlock)
        self._snapshot_holds: list[float] = []
        #: where the copy's time went: chunk statements, applying binlog keys between them, throttled
        self._copy_split: dict[str, float] = {"chunks": 0.0, "applying": 0.0, "throttled": 0.0}

    # -- runtime control (from the embedding process or the CLI) --------------------

    def progress(self) -> Progress:
        p = self._progress
        if self._state is not None:
            p.phase = self._state.phase.value
            p.migration_id = self._state.id
        p.rows_copied = self._rows_copied
        p.phases = tuple(self._phases)
        p.elapsed_seconds = time.monotonic() - self._started if self._started else 0.0
        copy_time = time.monotonic() - self._copy_started if self._copy_started else 0.0
        p.rows_per_second = self._rows_copied / copy_time if copy_time > 0 else 0.0
        remaining = max(0, p.rows_estimate - self._rows_copied)
        p.eta_seconds = remaining / p.rows_per_second if p.rows_per_second > 0 else None
        if self._applier is not None:
            p.pending_keys = len(self._applier.pending)
            p.keys_applied = self._applier.rows_applied
            if self._heartbeat is not None:
                p.binlog_lag_seconds = self._heartbeat.lag(self._applier.last_heartbeat)
        p.throttle_reason = self._throttle.reason if self._throttle is not None else self._manual_throttle
        p.postponed = self._postponed() or self._vetoed is not None
        p.postponed_by = self._vetoed
        p.chunk_size = self._sizer.size if self._sizer else 0
        p.activity = (f"{self._activity[0]} for {time.monotonic() - self._activity[1]:.0f}s"
                      if self._activity is not None else None)
        return p

    def _entered(self, _previous: Phase, phase: Phase, _message: str | None) -> None:
        self._phases.append(phase.value)

    def throttle(self, reason: str | None) -> None:
        self._manual_throttle = reason
        if self._throttle is not None:
            self._throttle.set_manual(reason)

    def postpone(self, on: bool) -> None:
        self._postponed_manual = on
        self._postpone_changed.set()
        self._postpone_changed = trio.Event()

    def cancel(self) -> None:
        """Abandon the migration: ghost dropped, original untouched."""
        self._cancel_requested = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def _postponed(self) -> bool:
        flag = self.spec.postpone_cut_over_flag_file
        return self._postponed_manual or (flag is not None and flag.exists())

    def _say(self, line: str) -> None:
        self._output(line)

    # -- the story ------------------------------------------------------------------

    async def run(self) -> Result:
        self._started = time.monotonic()
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_hooks)
            try:
                result = await self._run_connected()
            except BaseException as error:
                with trio.CancelScope(shield=True):
                    await self._final_hook(None, error)
                if not isinstance(error, Exception):
                    raise  # cancelled: the enclosing cancel scope handles it
                failure = error  # raised below as itself, not inside this nursery's ExceptionGroup
            else:
                await self._final_hook(result, None)
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def _run_connected(self) -> Result:
        control = await db.connect(self.spec.settings)
        try:
            return await self._run(control)
        except BaseExceptionGroup as group:
            # One real failure inside our task nurseries: raise it as itself.
            leaf = _single_failure(group)
            if leaf is None:
                raise
            raise leaf from group
        finally:
            await control.close()

    # -- hooks ------------------------------------------------------------------------

    async def _run_hooks(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.hooks.run(task_status=task_status)
        except Exception as error:  # a hook never breaks the migration
            log.warning("hooks stopped: %s", error)

    def _facts(self, **extra: Any) -> dict[str, Any]:
        """The migration's facts for hooks (``TIDEGATE_MIGRATION_<KEY>``, or the JSON a URL gets)."""
        spec = self.spec
        progress = self.progress()
        record = self._state.record if self._state is not None else None
        facts: dict[str, Any] = {
            "id": progress.migration_id,
            "schema": spec.database,
            "table": spec.table,
            "alter": record.alter_text if record is not None else spec.alter,
            "ghost_table": spec.ghost_table,
            "old_table": spec.old_table_name,
            "host": spec.connection.host,
            "port": spec.connection.port,
            "state_schema": spec.state_schema,
            "phase": progress.phase,
            "resumed": self._resumed,
            "rows_copied": progress.rows_copied,
            "rows_estimate": progress.rows_estimate,
            "cut_over_attempts": progress.cut_over_attempts,
            "binlog_lag_seconds": round(progress.binlog_lag_seconds, 3),
            "elapsed_seconds": round(progress.elapsed_seconds, 3),
        }
        facts.update(extra)
        return facts

    def _fire(self, name: str, **extra: Any) -> None:
        """Queue a hook that does not hold the migration up."""
        try:
            self.hooks.fire(name, self._facts(**extra))
        except Exception as error:  # a hook never breaks the migration
            log.warning("hook %s not run: %s", name, error)

    async def _final_hook(self, result: Result | None, error: BaseException | None) -> None:
        """``success`` or ``failure`` (with the final state and the error), awaited."""
        if not self.spec.execute or (result is not None and result.phase == Phase.PENDING):
            return  # a dry run runs no hooks
        name = "success" if result is not None and result.phase == Phase.COMPLETE else "failure"
        try:
            if result is not None and result.phase == Phase.COMPLETE:
                facts = self._facts(state="complete")
            elif result is not None:
                facts = self._facts(state=result.phase.value, error=result.message or None)
            else:
                assert error is not None
                state = ("interrupted" if _interrupted(error) else "refused" if isinstance(error, Refusal)
                         else "failed")
                facts = self._facts(state=state, error=_describe(error))
            await self.hooks.finish(name, facts)
        except Exception as failure:  # a hook never replaces the migration's own outcome
            log.warning("hook %s not run: %s", name, failure)

    async def _approve_cut_over(self, state: MigrationState) -> bool:
        """Ask ``before_cut_over``; on a veto stay postponed for ``retry_interval`` and return False."""
        try:
            veto = await self.hooks.veto(self._facts(phase=Phase.READY.value))
        except Exception as error:  # cannot ask: do not cut over behind its back
            veto = f"hook before_cut_over could not run: {error}"
        if veto is None:
            if self._vetoed is not None:
                self._vetoed = None
                if state.phase == Phase.POSTPONED:
                    await state.transition(Phase.READY, "hook before_cut_over agreed")
                self._say("hook before_cut_over agreed: cutting over")
            return True
        first = self._vetoed is None
        self._vetoed = veto
        if state.phase != Phase.POSTPONED:
            await state.transition(Phase.POSTPONED, veto[:500])
        if first:
            self._say(f"cut-over postponed by {veto}; asking again every {self.hooks.retry_interval:g}s")
        await trio.sleep(self.hooks.retry_interval)
        return False

    async def _preflight(self, control: Connection) -> TableSchema:
        spec = self.spec
        facts = await inspector.server_facts(control)
        inspector.check_binlog(facts)
        await inspector.check_privileges(control, spec.database, spec.state_schema)
        original = await inspector.read_table(control, spec.database, spec.table)
        inspector.check_table(original)
        return original

    async def _leftovers(self, control: Connection) -> list[str]:
        spec = self.spec
        found = []
        for name in (spec.ghost_table, spec.changelog_table, spec.old_table_name):
            if await inspector.table_exists(control, spec.database, name):
                found.append(name)
        return found

    async def _drop_helpers(self, control: Connection, *, include_old: bool) -> None:
        spec = self.spec
        cut = CutOver(spec, _EMPTY_PLAN, Applier(_EMPTY_PLAN, spec.database, spec.table, spec.ghost_table), None)
        await cut.drop_triggers(control)
        names = [spec.ghost_table, spec.changelog_table]
        if include_old:
            names.append(spec.old_table_name)
        else:
            await cut.drop_sentry(control)
        for name in names:
            await control.execute(f"DROP TABLE IF EXISTS {qualified(spec.database, name)}")

    async def _create_ghost(self, control: Connection, original: TableSchema) -> tuple[TableSchema, Plan]:
        spec = self.spec
        ghost = qualified(spec.database, spec.ghost_table)
        await control.execute_many(
            [
                (f"CREATE TABLE {ghost} LIKE {qualified(spec.database, spec.table)}", None),
            ]
        )
        try:
            await control.execute(f"ALTER TABLE {ghost} {spec.alter_facts.clause}")
        except DatabaseError as error:
            await control.execute(f"DROP TABLE IF EXISTS {ghost}")
            raise Refusal("alter-invalid", f"the server rejected the change on the ghost table: {error}") from error
        ghost_schema = await inspector.read_table(control, spec.database, spec.ghost_table)
        try:
            plan = inspector.plan_migration(spec, original, ghost_schema)
        except Refusal:
            await control.execute(f"DROP TABLE IF EXISTS {ghost}")
            raise
        if spec.defer_secondary_indexes:
            # Built once, sorted, after the copy (_build_deferred_indexes): inserting every
            # copied row into each secondary B-tree at a random place costs more.
            create = str((await control.query(f"SHOW CREATE TABLE {ghost}"))[0][1])
            keys = inspector.plain_secondary_keys(create)
            if keys:
                await control.execute(f"ALTER TABLE {ghost} " + ", ".join(f"DROP INDEX {quote(name)}" for name, _ in keys))
            self._deferred_indexes = [definition for _, definition in keys]
        return ghost_schema, plan

    async def _run(self, control: Connection) -> Result:
        spec = self.spec
        original = await self._preflight(control)
        await MigrationState.ensure_schema(control, spec.state_schema)
        previous = await MigrationState.latest(control, spec.state_schema, spec.database, spec.table)

        if spec.resume:
            if previous is None or previous.phase not in RESUMABLE:
                raise Refusal(
                    "nothing-to-resume",
                    f"no interrupted migration of `{spec.database}`.`{spec.table}` to resume"
                    + (f" (latest is #{previous.id}, {previous.phase.value})" if previous else ""),
                )
            self._state = previous
            previous.listeners.append(self._entered)
            return await self._resume(control, original)

        if previous is not None and previous.phase in RESUMABLE:
            raise Refusal(
                "migration-in-progress",
                f"migration #{previous.id} of this table is {previous.phase.value}; "
                "continue it with --resume or abandon it with --cancel",
            )
        leftovers = await self._leftovers(control)
        if leftovers:
            if not spec.drop_leftovers:
                raise Refusal(
                    "leftover-tables",
                    f"helper tables from an earlier run exist: {', '.join(leftovers)}; "
                    "drop them or pass --drop-leftovers",
                )
            await self._drop_helpers(control, include_old=True)

        rows_estimate = await inspector.estimate_rows(control, spec.database, spec.table, spec.exact_rowcount)
        _ghost_schema, plan = await self._create_ghost(control, original)
        plan_lines = [
            f"migrate `{spec.database}`.`{spec.table}`: {spec.alter_facts.clause}",
            f"rows (estimate{'=exact' if spec.exact_rowcount else ''}): {rows_estimate}",
            "algorithm: " + ("INSTANT if the server can, else ghost copy" if spec.attempt_instant_ddl else "ghost copy"),
            *plan.describe(),
            *(["secondary indexes built after the copy: " + ", ".join(self._deferred_indexes)]
              if self._deferred_indexes else []),
            *self.hooks.describe(),
        ]
        if not spec.execute:
            await control.execute(f"DROP TABLE IF EXISTS {qualified(spec.database, spec.ghost_table)}")
            for line in plan_lines:
                self._say(line)
            self._say("dry run: nothing changed; add --execute to migrate")
            return Result(Phase.PENDING, None, plan=plan_lines, message="dry run")

        for line in plan_lines:
            self._say(line)
        options = {k: v for k, v in vars(spec).items() if k not in ("connection", "replicas")}
        options["deferred_indexes"] = self._deferred_indexes
        self._state = await MigrationState.create(control, spec.state_schema, spec.database, spec.table, spec.alter, options)
        self._state.listeners.append(self._entered)
        await self._state.transition(Phase.VALIDATING)
        await self._state.save_estimate(rows_estimate)
        self._progress.rows_estimate = rows_estimate
        self._fire("startup")

        if spec.attempt_instant_ddl and await self._try_instant(control):
            await control.execute(f"DROP TABLE IF EXISTS {qualified(spec.database, spec.ghost_table)}")
            await self._record_version(control)
            await self._state.transition(Phase.COMPLETE, "applied with ALGORITHM=INSTANT")
            self._say("done: applied with ALGORITHM=INSTANT (no copy)")
            return Result(Phase.COMPLETE, self._state.id, instant=True, plan=plan_lines,
                          seconds=time.monotonic() - self._started, message="instant")

        changelog = qualified(spec.database, spec.changelog_table)
        await control.execute(
            f"CREATE TABLE {changelog} (id INT NOT NULL PRIMARY KEY, hint VARCHAR(64) NOT NULL, "
            "value VARCHAR(255) NOT NULL, UNIQUE KEY hint (hint)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        )
        # The binlog position is taken before the copy starts: every change after
        # it reaches the ghost through the applier.
        gtid = str((await control.query(db.gtid_position_sql(control.mariadb)))[0][0] or "")
        key_list = ", ".join(quote(c) for c in plan.key_columns)
        upper_rows = await control.query(
            f"SELECT {key_list} FROM {qualified(spec.database, spec.table)} ORDER BY "
            + ", ".join(f"{quote(c)} DESC" for c in plan.key_columns)
            + " LIMIT 1"
        )
        upper = tuple(upper_rows[0]) if upper_rows else None
        await self._state.transition(Phase.COPYING)
        await self._state.save_checkpoint(Checkpoint(None, upper, gtid, 0))
        return await self._migrate(control, original, plan, plan_lines)

    async def _try_instant(self, control: Connection) -> bool:
        spec = self.spec
        timeout = max(1, round(spec.cut_over_lock_timeout_seconds))
        for attempt in range(1, 4):
            try:
                await control.execute_many(
                    [
                        (f"SET SESSION lock_wait_timeout = {timeout}", None),
                        (f"ALTER TABLE {qualified(spec.database, spec.table)} {spec.alter_facts.clause}, ALGORITHM=INSTANT", None),
                    ]
                )
                return True
            except DatabaseError as error:
                if error.code in (db.ER_ALTER_OPERATION_NOT_SUPPORTED, db.ER_ALTER_OPERATION_NOT_SUPPORTED_REASON):
                    self._say(f"INSTANT not possible ({error.message}); migrating through a ghost table")
                    return False
                if error.code == db.ER_LOCK_WAIT_TIMEOUT:
                    self._say(f"INSTANT attempt {attempt}: metadata lock not granted in {timeout}s")
                    await trio.sleep(0.5 * attempt)
                    continue
                raise
            finally:
                with contextlib.suppress(DatabaseError):
                    await control.execute("SET SESSION lock_wait_timeout = DEFAULT")
        self._say("INSTANT: table too busy for its metadata lock; migrating through a ghost table")
        return False

    async def _resume(self, control: Connection, original: TableSchema) -> Result:
        spec = self.spec
        state = self._state
        assert state is not None
        self._say(f"resuming migration #{state.id} from {state.phase.value}")
        for line in self.hooks.describe():
            self._say(line)
        self._resumed = True
        self._progress.rows_estimate = state.record.rows_estimate
        self._rows_copied = state.record.checkpoint.rows_copied
        self._deferred_indexes = [str(d) for d in state.record.options.get("deferred_indexes") or []]
        self._fire("startup")
        await self._wait_for_leftovers(control, qualified(spec.database, spec.ghost_table))
        # A cut-over may have been interrupted: triggers and sentry go first.
        cut = CutOver(spec, _EMPTY_PLAN, Applier(_EMPTY_PLAN, spec.database, spec.table, spec.ghost_table), None)
        await cut.drop_triggers(control)
        await cut.drop_sentry(control)
        ghost_exists = await inspector.table_exists(control, spec.database, spec.ghost_table)
        old_exists = await inspector.table_exists(control, spec.database, spec.old_table_name)
        if not ghost_exists and old_exists and state.phase == Phase.CUTTING_OVER:
            self._say("the rename had completed before the interruption; finishing")
            self._fire("after_cut_over", phase=Phase.CUTTING_OVER.value)
            await self._finish(control)
            return Result(Phase.COMPLETE, state.id, seconds=time.monotonic() - self._started, message="completed on resume")
        checkpoint = state.record.checkpoint
        if not ghost_exists or checkpoint.binlog_gtid is None or state.phase == Phase.VALIDATING:
            await self._drop_helpers(control, include_old=False)
            await state.transition(Phase.FAILED, "nothing to resume from (no ghost or checkpoint); start again")
            raise MigrationFailed(f"migration #{state.id} cannot resume: no ghost table or checkpoint; run it again")
        ghost_schema = await inspector.read_table(control, spec.database, spec.ghost_table)
        plan = inspector.plan_migration(spec, original, ghost_schema)
        if state.phase in (Phase.CUTTING_OVER, Phase.POSTPONED):
            await state.transition(Phase.READY, "resumed")
        if state.phase == Phase.READY:
            await state.transition(Phase.VERIFYING, "resumed")
        return await self._migrate(control, original, plan, plan.describe())

    # -- the ghost migration ------------------------------------------------------------

    async def _migrate(self, control: Connection, original: TableSchema, plan: Plan, plan_lines: list[str]) -> Result:
        spec = self.spec
        state = self._state
        assert state is not None
        charset = original.charset if original.charset in ("utf8mb4", "utf8mb3", "utf8", "latin1", "ascii", "binary") else "utf8mb4"
        table_settings = spec.settings.with_charset(charset)
        checkpoint = state.record.checkpoint
        applier = Applier(plan, spec.database, spec.table, spec.ghost_table)
        applier.received_gtid = applier.applied_gtid = checkpoint.binlog_gtid
        self._applier = applier
        checksummer = Checksummer(plan, spec.database, spec.table, spec.ghost_table) if spec.checksum else None
        cut = CutOver(spec, plan, applier, checksummer)
        streamer = BinlogStreamer(
            spec.settings, spec.database, spec.table, spec.changelog_table, plan.key_columns,
            checkpoint.binlog_gtid or "", server_id=random.randrange(1 << 20, 1 << 31), mariadb=control.mariadb,
            ghost_table=spec.ghost_table,
        )
        connections: list[Connection] = []

        async def open_connection(settings: db.ConnectionSettings = table_settings) -> Connection:
            connection = await db.connect(settings)
            connections.append(connection)
            return connection

        try:
            writer = await open_connection()
            # more sessions copy consecutive chunks at once (--copy-sessions)
            self._copy_writers = [writer, *[await open_connection() for _ in range(spec.copy_sessions - 1)]]
            heartbeat_connection = await open_connection(spec.settings)
            throttle_connection = await open_connection(spec.settings)
            replicas = [await open_connection(r.with_database(spec.database)) for r in spec.replicas]
            self._heartbeat = _Heartbeat(heartbeat_connection, qualified(spec.database, spec.changelog_table), spec.heartbeat_interval)
            heartbeat = self._heartbeat
            self._throttle = Throttle(
                throttle_connection,
                max_load=spec.max_load,
                critical_load=spec.critical_load,
                critical_load_hibernate_seconds=spec.critical_load_hibernate_seconds,
                flag_file=spec.throttle_flag_file,
                replicas=replicas,
                changelog=(spec.database, spec.changelog_table),
                max_lag_millis=spec.max_lag_millis,
                binlog_lag=lambda: heartbeat.lag(applier.last_heartbeat),
                interval=spec.flag_poll_interval,
            )
            self._throttle.set_manual(self._manual_throttle)
            send, receive = trio.open_memory_channel[BinlogItem](64)
            result: Result | None = None
            with trio.CancelScope() as scope:
                self._cancel_scope = scope
                if self._cancel_requested:
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    await nursery.start(streamer.run, send)
                    nursery.start_soon(applier.consume, receive)
                    nursery.start_soon(heartbeat.run)
                    nursery.start_soon(self._watch_flags, nursery.cancel_scope)
                    await nursery.start(self._throttle.run)
                    nursery.start_soon(self._report)
                    result = await self._story(control, writer, cut, checksummer, applier, open_connection, plan_lines)
                    nursery.cancel_scope.cancel()
            if scope.cancelled_caught and result is None:
                # Cancelled from outside the nursery (cancel request or panic flag).
                return await self._cancelled(control)
            assert result is not None
            await self._finish(control)
            result.seconds = time.monotonic() - self._started
            return result
        except BaseException as error:
            with trio.CancelScope(shield=True):
                await self._on_error(control, error)
            raise
        finally:
            with trio.CancelScope(shield=True):
                for connection in connections:
                    await connection.close()

    async def _on_error(self, control: Connection, error: BaseException) -> None:
        state = self._state
        if state is None or state.phase.terminal:
            return
        with contextlib.suppress(Exception):
            cut = CutOver(self.spec, _EMPTY_PLAN, Applier(_EMPTY_PLAN, self.spec.database, self.spec.table, self.spec.ghost_table), None)
            await cut.drop_triggers(control)
            await cut.drop_sentry(control)
        if _interrupted(error):
            self._say(f"interrupted in {state.phase.value}; continue with --resume, or abandon with --cancel")
            return
        with contextlib.suppress(Exception):
            await state.transition(Phase.FAILED, f"{type(error).__name__}: {error}"[:2000])

    async def _cancelled(self, control: Connection) -> Result:
        state = self._state
        assert state is not None
        with trio.CancelScope(shield=True):
            await self._drop_helpers(control, include_old=False)
            if not state.phase.terminal:
                await state.transition(Phase.CANCELLED, "cancelled (panic flag or request); ghost dropped")
        self._say("cancelled: ghost table dropped, original untouched")
        return Result(Phase.CANCELLED, state.id, rows_copied=self._rows_copied,
                      seconds=time.monotonic() - self._started, message="cancelled")

    async def _watch_flags(self, scope: trio.CancelScope) -> None:
        flag = self.spec.panic_flag_file
        while True:
            if flag is not None and flag.exists():
                self._say(f"panic flag {flag} found: cancelling")
                self.cancel()
                return
            await trio.sleep(self.spec.flag_poll_interval)

    async def _report(self) -> None:
        while True:
            await trio.sleep(self.spec.status_interval)
            progress = self.progress()
            if self._on_progress is not None:
                self._on_progress(progress)
            else:
                self._say(progress.line())

    async def _story(
        self,
        control: Connection,
        writer: Connection,
        cut: CutOver,
        checksummer: Checksummer | None,
        applier: Applier,
        open_connection: Callable[..., Any],
        plan_lines: list[str],
    ) -> Result:
        spec = self.spec
        state = self._state
        assert state is not None
        behind: _BehindCopy | None = None
        if checksummer is not None and spec.checksum_behind_copy_interval > 0:
            behind = _BehindCopy(self, cut, checksummer, await open_connection(), await open_connection())
            await behind.worker.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        self._behind = behind
        if state.phase == Phase.COPYING:
            await self._copy(writer, applier, cut)
            await state.transition(Phase.VERIFYING)
            self._fire("row_copy_complete")
        async with trio.open_nursery() as background:
            built = trio.Event()
            background.start_soon(self._keep_applying, writer, applier, built)
            # The deferred indexes are built on their own session while the checksum
            # compares what was not verified behind the copy (see _build_deferred_indexes).
            await background.start(self._build_deferred_indexes, open_connection, built)
            if checksummer is not None:
                await self._verify(cut, checksummer, open_connection, built)
            else:
                applier.tracking = None
            await built.wait()
            await state.transition(Phase.READY)
            locker = await open_connection()
            holder = await open_connection()
            renamer = await open_connection()
            observer = await open_connection()
            attempts = 0
            backoff = 0.25
            approved = False  # by the before_cut_over hook, asked before the first attempt only
            while True:
                if self._postponed():
                    if state.phase != Phase.POSTPONED:
                        await state.transition(Phase.POSTPONED, "postpone flag present")
                    self._say("cut-over postponed; remove the flag (or call postpone(False)) to proceed")
                    while self._postponed():
                        with trio.move_on_after(self.spec.flag_poll_interval):
                            await self._postpone_changed.wait()
                    await state.transition(Phase.READY, "postpone lifted")
                if not approved:
                    approved = await self._approve_cut_over(state)
                    if not approved:
                        continue  # the flags and the veto are looked at again
                await self._wait_caught_up(applier)
                held = await self.gate.hold(
                    spec.database, spec.table,
                    drain_timeout=spec.cut_over_lock_timeout_seconds,
                    hold_timeout=spec.cut_over_lock_timeout_seconds * 3,
                )
                if not held:
                    self._say("traffic gate said not now; retrying")
                    await trio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
                    continue
                attempts += 1
                self._progress.cut_over_attempts = attempts
                await state.count_cut_over_attempt()
                await state.transition(Phase.CUTTING_OVER, f"attempt {attempts}")
                try:
                    for connection in (locker, holder):
                        if not connection.connected:
                            await connection.connect()
                    result = await cut.attempt(locker, holder, renamer, observer, applier.tracking)
                finally:
                    with trio.CancelScope(shield=True):
                        await self.gate.release(spec.database, spec.table)
                if result.outcome == Outcome.DONE:
                    self._say(f"cut-over done on attempt {attempts} (table held {result.hold_seconds * 1000:.0f}ms; "
                              f"{cut.delta_keys} changed keys checked under the lock, {cut.delta_resynced} re-synced)")
                    self._fire("after_cut_over", table_held_ms=round(result.hold_seconds * 1000))
                    break
                await state.transition(Phase.READY, f"cut-over attempt {attempts} rolled back: {result.reason}")
                self._say(f"cut-over attempt {attempts} rolled back ({result.reason}); retry in {backoff:.2f}s")
                if attempts >= spec.cut_over_max_attempts:
                    raise MigrationFailed(f"cut-over failed {attempts} times; last: {result.reason}")
                await trio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            background.cancel_scope.cancel()
        return Result(
            Phase.COMPLETE, state.id, rows_copied=self._rows_copied,
            seconds=time.monotonic() - self._started, cut_over_attempts=attempts, plan=plan_lines,
        )

    async def _finish(self, control: Connection) -> None:
        spec = self.spec
        state = self._state
        assert state is not None
        cut = CutOver(spec, _EMPTY_PLAN, Applier(_EMPTY_PLAN, spec.database, spec.table, spec.ghost_table), None)
        await cut.drop_triggers(control)
        await control.execute(f"DROP TABLE IF EXISTS {qualified(spec.database, spec.changelog_table)}")
        if spec.old_table == OldTablePolicy.DROP:
            await control.execute(f"DROP TABLE IF EXISTS {qualified(spec.database, spec.old_table_name)}")
        await self._record_version(control)
        await state.transition(Phase.COMPLETE)
        self._say(f"done: `{spec.database}`.`{spec.table}` migrated" + (
            f"; old table kept as `{spec.old_table_name}`" if spec.old_table == OldTablePolicy.KEEP else ""))

    async def _record_version(self, control: Connection) -> None:
        spec = self.spec
        table = await inspector.read_table(control, spec.database, spec.table)
        await record_schema_version(
            control, spec.state_schema, spec.database, spec.table, table.create_sql, spec.alter,
            self._state.id if self._state else None,
        )

    async def _wait_caught_up(self, applier: Applier) -> None:
        """Before taking the lock: the binlog is near the head and little is pending."""
        with trio.move_on_after(30) as waited:
            while len(applier.pending) > 1000 or (self._heartbeat and self._heartbeat.lag(applier.last_heartbeat) > 0.5):
                await trio.sleep(0.05)
        if waited.cancelled_caught:
            lag = self._heartbeat.lag(applier.last_heartbeat) if self._heartbeat else 0.0
            self._say(f"binlog applier still {lag:.1f}s behind ({len(applier.pending)} keys pending) after 30s: "
                      "the table is written faster than the changes can be applied; trying anyway")

    async def _apply(self, writer: Connection, applier: Applier) -> None:
        """Apply every pending key; a lost lock race or connection is retried."""
        if applier.pending and not applier.paused:
            await db.with_retries(
                lambda: applier.flush(writer), retries=self.spec.default_retries, what="apply binlog changes"
            )

    async def _checkpoint(self, watermark: Any, upper: Any, applier: Applier) -> None:
        """Persist (copy watermark, binlog position fully in the ghost) for --resume."""
        state = self._state
        assert state is not None
        cp = state.record.checkpoint
        gtid = applier.applied_gtid or cp.binlog_gtid
        await state.save_checkpoint(Checkpoint(watermark, upper, gtid, self._rows_copied))

    async def _keep_applying(self, writer: Connection, applier: Applier, built: trio.Event) -> None:
        """After the copy: keep the ghost in sync until the cut-over, checkpoint every second.

        Not while the deferred indexes are built: the server would log those
        writes and apply them to the new index at the end of the build, where
        that stalled the application's statements on the original for
        50-170 ms in the benchmark; the keys wait and are applied after it.
        """
        state = self._state
        assert state is not None
        last_checkpoint = trio.current_time()
        await built.wait()
        while True:
            await self._apply(writer, applier)
            now = trio.current_time()
            if now - last_checkpoint >= self.spec.checkpoint_interval and applier.applied_gtid:
                cp = state.record.checkpoint
                if applier.applied_gtid != cp.binlog_gtid:
                    await self._checkpoint(cp.copy_watermark, cp.copy_upper, applier)
                last_checkpoint = now
            await trio.sleep(0.01)

    async def _build_deferred_indexes(self, open_connection: Callable[..., Any], built: trio.Event, *,
                                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Add the secondary indexes left out of the ghost for the copy (those it lacks); set ``built``.

        Online (``LOCK=NONE``), on a session of its own, while the checksum
        compares what was not verified behind the copy; its snapshots do not
        lock the ghost (they would wait for the build).  The binlog applier
        waits for ``built`` (:meth:`_keep_applying`).  The build needs the
        ghost's exclusive metadata lock at its start and its end, for a
        moment; a transaction that reads the ghost at its start would make it
        wait that transaction's length, and every write to the ghost with it.
        So this reports started once the server is past that point
        ("altering table"), or after 5 s.  A resumed migration adds what an
        interruption left out.
        """
        try:
            if not self._deferred_indexes:
                task_status.started()
                return
            spec = self.spec
            ghost = qualified(spec.database, spec.ghost_table)
            builder: Connection = await open_connection()
            # A migration killed during its build leaves that ALTER running on the server (a
            # statement goes on when its client is gone); a second one would fail at its end.
            await self._wait_for_leftovers(builder, ghost, alter_only=True)
            missing = await self._missing_indexes(builder, ghost)
            if not missing:
                task_status.started()
                return
            observer: Connection = await open_connection()
            started = time.monotonic()
            done = trio.Event()
            self._activity = ("building secondary indexes " + ", ".join(_key_name(d) for d in missing), started)

            async def alter() -> None:
                try:
                    await builder.execute(f"ALTER TABLE {ghost} " + ", ".join(f"ADD {d}" for d in missing) + ", LOCK=NONE")
                except DatabaseError as error:
                    # another ALTER added them meanwhile (one this could not see): fine if all are there
                    if error.code != db.ER_DUP_KEYNAME or await self._missing_indexes(builder, ghost):
                        raise
                finally:
                    done.set()

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(alter)
                    await self._wait_altering(observer, builder, done)
                    task_status.started()
            finally:
                self._activity = None
            self._say(f"secondary indexes built: {', '.join(_key_name(d) for d in missing)} "
                      f"in {time.monotonic() - started:.1f}s")
        finally:
            built.set()

    async def _missing_indexes(self, connection: Connection, ghost: str) -> list[str]:
        create = str((await connection.query(f"SHOW CREATE TABLE {ghost}"))[0][1])
        present = {name for name, _ in inspector.plain_secondary_keys(create)}
        return [d for d in self._deferred_indexes if _key_name(d) not in present]

    async def _wait_for_leftovers(self, connection: Connection, ghost: str, *, alter_only: bool = False) -> None:
        """While another session runs a statement on the ghost (``alter_only``: an ALTER of it), wait.

        A statement goes on when its client is gone: after a kill -9 the old
        migrator's last chunk, binlog batch or index build may still run.  A
        resumed migration that went ahead could have a leftover chunk write
        an older row version over one its applier had just written, or add
        an index a second time (1061 at the end of the build).
        """
        text = ghost.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"ALTER TABLE {text}%" if alter_only else f"%{text}%"
        table, id_, _, info = _sessions(connection)
        sql = f"SELECT {id_}, LEFT({info}, 60) FROM {table} WHERE {id_} <> CONNECTION_ID() AND {info} LIKE %s"
        said = False
        while True:
            try:
                rows = await connection.query(sql, (pattern,))
            except DatabaseError as error:
                log.info("cannot look for statements left running on the ghost (%s)", error)
                return
            if not rows:
                return
            if not said:
                self._say(f"an earlier statement on {ghost} is still running on the server (connection "
                          f"{rows[0][0]}: {rows[0][1]}…; a migrator killed meanwhile leaves it): waiting for it to end")
                said = True
            await trio.sleep(0.5)

    @staticmethod
    async def _wait_altering(observer: Connection, builder: Connection, done: trio.Event) -> None:
        """Until ``builder``'s ALTER is past its first exclusive lock (building), at most 5 s.

        If the state cannot be seen at all, a short wait stands in for it.
        """
        table, id_, state_, _ = _sessions(observer)
        sql = f"SELECT {state_} FROM {table} WHERE {id_} = %s"
        with trio.move_on_after(5):
            while not done.is_set():
                try:
                    rows = await observer.query(sql, (builder.thread_id,))
                except DatabaseError as error:
                    log.info("cannot see the index build's state (%s)", error)
                    with trio.move_on_after(0.2):
                        await done.wait()
                    return
                state = str(rows[0][0] or "").lower() if rows else ""
                if state.startswith(("altering table", "alter table (")):  # MariaDB's; MySQL's stages
                    return
                await trio.sleep(0.005)

    async def _copy(self, writer: Connection, applier: Applier, cut: CutOver) -> None:
        """Keyset chunks toward ``--chunk-time``; pending binlog keys are applied before each chunk.

        The applier runs first so that the ghost is never behind a chunk it
        overlaps; the checkpoint is written at most every ``checkpoint_interval``
        (a resume re-copies at most that much, idempotently).
        """
        spec = self.spec
        state = self._state
        assert state is not None and self._throttle is not None
        checkpoint = state.record.checkpoint
        upper = checkpoint.copy_upper
        watermark = checkpoint.copy_watermark
        self._sizer = ChunkSizer(spec.chunk_size, spec.chunk_time, spec.min_chunk_size, spec.max_chunk_size)
        sizer = self._sizer
        copier = ChunkCopier(cut.plan, spec.database, spec.table, spec.ghost_table)
        self._copy_started = time.monotonic()
        rows_at_start = self._rows_copied
        last_checkpoint = trio.current_time()
        behind = self._behind
        async with trio.open_nursery() as verifying:
            await self._copy_chunks(writer, applier, copier, sizer, upper, watermark, last_checkpoint,
                                    behind, verifying)
        if behind is not None:
            behind.raise_if_broken()
        copied = self._rows_copied - rows_at_start
        seconds = time.monotonic() - self._copy_started
        split = self._copy_split
        self._say(f"copy done: {copied} rows in {self._chunks} chunks, {seconds:.1f}s "
                  f"({copied / seconds if seconds > 0 else 0:.0f} rows/s; chunk statements {split['chunks']:.1f}s, "
                  f"applying binlog keys {split['applying']:.1f}s"
                  + (f", snapshots {behind.stalled:.1f}s" if behind is not None else "")
                  + (f", throttled {split['throttled']:.1f}s" if split["throttled"] else "") + ")"
                  + (f"; {applier.left_to_copy} changed keys left to the copy, which had not reached them"
                     if applier.left_to_copy else "")
                  + (f"; {behind.rows} rows verified behind it" if behind is not None and behind.rows else ""))

    async def _copy_chunks(self, writer: Connection, applier: Applier, copier: ChunkCopier, sizer: ChunkSizer,
                           upper: Any, watermark: Any, last_checkpoint: float, behind: _BehindCopy | None,
                           verifying: trio.Nursery) -> None:
        spec = self.spec
        assert self._throttle is not None
        split = self._copy_split
        # Changes to keys the copy has not reached are left to it (Applier._leave_to_copy) when
        # the key is made of integers, whose order here is the server's.
        integers = _integer_key(applier.plan)
        # With indexes built after the copy, the last rows copied may be verified while they
        # are built (_verify runs then; worth it with cores to spare), not behind the copy.
        behind_until = math.inf
        if self._deferred_indexes:
            behind_until = (1 - spec.checksum_during_index_build) * self._progress.rows_estimate
        while upper is not None and watermark != upper:
            if integers:
                applier.ahead_of_copy = (watermark, upper)
            mark = time.monotonic()
            await self._apply(writer, applier)
            split["applying"] += time.monotonic() - mark
            if self._throttle.reason is not None:
                mark = time.monotonic()
                while self._throttle.reason is not None:
                    with trio.move_on_after(0.05):
                        await self._throttle.wait_until_clear()
                    await self._apply(writer, applier)
                split["throttled"] += time.monotonic() - mark
            size = sizer.size
            low = watermark

            async def chunks(low: Any = low, size: int = size) -> list[ChunkResult]:
                assert upper is not None
                return await copier.copy_chunks(self._copy_writers or [writer], low, upper, size)

            mark = time.monotonic()
            results = await db.with_retries(chunks, retries=spec.default_retries, what="copy chunk")
            split["chunks"] += time.monotonic() - mark
            for result in results:
                sizer.record(result.rows, result.seconds)
                self._rows_copied += result.rows
                self._chunks += 1
            watermark = results[-1].high
            now = trio.current_time()
            if now - last_checkpoint >= spec.checkpoint_interval:
                await self._checkpoint(watermark, upper, applier)
                last_checkpoint = now
            if behind is not None and behind.due(now) and watermark != upper and self._rows_copied < behind_until:
                # Between chunks: the copy waits for the snapshot (a short READ lock), then goes on
                # while the ranges copied since the last one are compared in it.
                mark = time.monotonic()
                await self._apply(writer, applier)
                split["applying"] += time.monotonic() - mark
                if await behind.snapshot(watermark):
                    verifying.start_soon(behind.compare)
        applier.ahead_of_copy = None
        await self._apply(writer, applier)
        await self._checkpoint(watermark, upper, applier)

    async def _snapshot(self, cut: CutOver, locker: Connection, workers: list[Connection], *,
                        reset_tracking: bool, flusher: Connection | None = None) -> set[Any]:
        """Stop writes briefly, catch up, open the same consistent snapshot in every worker.

        While ``LOCK TABLES`` is held nobody writes the table, the sentinel has
        come back through the binlog and every pending key is applied, so each
        ``START TRANSACTION WITH CONSISTENT SNAPSHOT`` sees original and ghost
        at one instant where they must be equal.  Keys applied from here on are
        tracked for the exact check under the cut-over lock.  With
        ``reset_tracking`` the tracked set starts anew here; the one it
        replaces (keys applied up to this snapshot, those flushed under its
        lock included) is returned, to be compared in this snapshot.  With a
        ``flusher`` the ghost is not locked (:meth:`CutOver.lock_and_catch_up`).
        """
        spec = self.spec
        attempt = 0
        while True:
            attempt += 1
            await self._wait_caught_up(cut.applier)
            await cut.applier.pause()
            try:
                await cut.lock_and_catch_up(locker, original_mode="READ", flusher=flusher)
                for worker in workers:
                    await worker.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                replaced = cut.applier.tracking or set()
                if reset_tracking or cut.applier.tracking is None:
                    cut.applier.tracking = set()
                return replaced if reset_tracking else set()
            except (DatabaseError, trio.TooSlowError) as error:
                if isinstance(error, DatabaseError) and error.code not in db.RETRY_CODES:
                    raise
                if isinstance(error, trio.TooSlowError):
                    lag = self._heartbeat.lag(cut.applier.last_heartbeat) if self._heartbeat else 0.0
                    why = (f"the sentinel did not come back through the binlog in {cut.timeout:g}s "
                           f"(binlog lag {lag:.1f}s, {len(cut.applier.pending)} keys pending)")
                else:
                    why = f"lock not granted: {error}"
                if attempt > spec.cut_over_max_attempts:
                    raise MigrationFailed(f"could not stop writes for the checksum snapshot: {why}") from error
                self._say(f"checksum snapshot attempt {attempt}: {why}; retrying")
            finally:
                with trio.CancelScope(shield=True):
                    with contextlib.suppress(DatabaseError):
                        await locker.execute("UNLOCK TABLES")
                    cut.applier.paused = False
                    if cut.locked_at:
                        held = time.monotonic() - cut.locked_at
                        self._snapshot_holds.append(held)
                        cut.locked_at = 0.0
            await trio.sleep(min(5.0, 0.25 * attempt))

    async def _verify(self, cut: CutOver, checksummer: Checksummer, open_connection: Callable[..., Any],
                      built: trio.Event) -> None:
        """Checksum in one consistent snapshot taken while writes were stopped.

        A range that differs is looked at row by row in the same snapshot.  A
        binlog event can arrive before its transaction is visible to the
        applier's read (the server writes the binlog before the engine
        commit), leaving a stale ghost row with no later event to fix it: such
        keys are re-synced from the original and their ranges compared again in
        a fresh snapshot.  Still different after that, or too many keys at
        once (a real defect, not a race): no cut-over, and a report.  This
        runs while the deferred indexes are built: the snapshots apply the
        pending keys through a session of their own and leave the ghost
        unlocked.  The convergence rounds wait for ``built``.
        """
        spec = self.spec
        workers: list[Connection] = []
        for _ in range(max(1, spec.checksum_workers)):
            worker = await open_connection()
            await worker.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            workers.append(worker)
        locker: Connection = await open_connection()
        flusher: Connection = await open_connection()
        behind = self._behind
        start = behind.verified_upto if behind is not None and behind.active else None
        # Keys changed since the first snapshot behind the copy stay tracked: ranges
        # verified then are re-checked through them (the delta convergence below).
        changed = await self._snapshot(cut, locker, workers, reset_tracking=True, flusher=flusher)
        during_build = not built.is_set()  # the snapshot did not wait for the build
        if start is None:
            changed = set()  # the whole table is compared in this snapshot
        elif behind is not None:
            changed |= behind.recheck
        try:
            comparison = await checksummer.compare_table(workers, chunk_time=spec.checksum_chunk_time, start=start)
            mismatches = comparison.mismatches
            keys = await self._differing_keys(checksummer, workers[0], mismatches[:_REPAIRABLE_RANGES])
            # Keys changed since the last snapshot behind the copy, in ranges verified then:
            # compared again here, in this snapshot.
            changed_differing = await checksummer.compare_keys(workers[0], sorted(changed, key=repr))
        finally:
            for worker in workers:
                with contextlib.suppress(DatabaseError):
                    await worker.execute("COMMIT")
        if behind is not None and behind.active:
            self._say(f"checksum behind the copy: {behind.rows} rows in {behind.ranges} ranges in "
                      f"{behind.snapshots} snapshots, {behind.keys_compared} keys changed meanwhile compared again "
                      f"({behind.seconds:.1f}s, while copying; the snapshots held the copy {behind.stalled:.1f}s); "
                      f"{len(behind.recheck)} keys to re-check, {len(changed - behind.recheck)} changed since the "
                      "last snapshot: compared after the copy")
        self._say(
            f"checksum: {comparison.rows} rows in {comparison.ranges} ranges over "
            f"{len(checksummer.plan.compared)} columns in {comparison.seconds:.1f}s "
            f"({len(workers)} worker{'s' if len(workers) > 1 else ''}"
            + ("; in a snapshot taken while the secondary indexes were built)" if during_build else ")")
        )
        rounds = 0
        while mismatches:
            rounds += 1
            report = "; ".join(f"{m.describe()} keys {k[:10]!r}" for m, k in zip(mismatches[:5], keys[:5], strict=False))
            flat = [key for part in keys for key in part]
            if (rounds > spec.checksum_repair_rounds or len(mismatches) > _REPAIRABLE_RANGES
                    or len(flat) > spec.checksum_repair_limit):
                raise ChecksumMismatch(f"checksum: {len(mismatches)} ranges differ ({len(flat)} keys): {report}")
            self._say(f"checksum: {len(mismatches)} ranges differ ({len(flat)} keys); re-syncing them and "
                      f"comparing those ranges again: {report}")
            # The keys that wait for the index build would be flushed under the snapshot's lock.
            await built.wait()
            await db.with_retries(lambda flat=flat: cut.applier.resync(locker, flat),  # type: ignore[misc]
                                  retries=spec.default_retries, what="re-sync differing keys")
            assert cut.applier.tracking is not None
            cut.applier.tracking.update(flat)
            await self._snapshot(cut, locker, workers[:1], reset_tracking=False, flusher=flusher)
            try:
                mismatches = await checksummer.compare_ranges(workers[0], mismatches)
                keys = await self._differing_keys(checksummer, workers[0], mismatches)
            finally:
                with contextlib.suppress(DatabaseError):
                    await workers[0].execute("COMMIT")
        await self._repair_keys(cut, locker, changed_differing, compared=len(changed))
        if changed_differing:
            self._say(f"checksum: {len(changed_differing)} of {len(changed)} changed keys differed; re-synced")
        holds = sorted(self._snapshot_holds)
        self._say(f"checksum ok: {comparison.rows} rows equal" + (f" after re-syncing ({rounds} rounds)" if rounds else "")
                  + (f"; {len(holds)} snapshots held the table's writers {1000 * holds[len(holds) // 2]:.0f}ms "
                     f"(median), {1000 * holds[-1]:.0f}ms at most" if holds else ""))
        await built.wait()
        # The keys that waited for the build are applied (outside any lock) before the
        # convergence rounds, which then compare them in a snapshot, not under the cut-over lock.
        with trio.move_on_after(30):
            while len(cut.applier.pending) > spec.converge_keys or cut.applier.in_flight:
                await trio.sleep(0.005)
        await self._converge(cut, checksummer, locker, workers[0], flusher)

    async def _converge(self, cut: CutOver, checksummer: Checksummer, locker: Connection, snapshot: Connection,
                        flusher: Connection) -> None:
        """Verify the keys changed during the checksum in a fresh snapshot, until few are left.

        The cut-over compares every key changed since the last verified
        snapshot while the table is locked; on a busy table a long checksum
        leaves thousands.  Each round takes a short READ lock (writers wait a
        few ms; readers and the application's transactions are unaffected),
        opens a new snapshot, starts a new tracked set there, and compares the
        previous set in that snapshot.
        """
        spec = self.spec
        applier = cut.applier
        for _ in range(spec.converge_rounds):
            tracked = applier.tracking
            if tracked is None or len(tracked) <= spec.converge_keys:
                return
            # the replaced set: keys flushed under this snapshot's lock are in it too
            previous = sorted(await self._snapshot(cut, locker, [snapshot], reset_tracking=True, flusher=flusher),
                              key=repr)
            try:
                differing = await checksummer.compare_keys(snapshot, previous)
            finally:
                with contextlib.suppress(DatabaseError):
                    await snapshot.execute("COMMIT")
            await self._repair_keys(cut, locker, differing, compared=len(previous))
            self._say(f"delta: {len(previous)} keys changed during the last check equal in a new snapshot"
                      + (f" after re-syncing {len(differing)}" if differing else ""))

    async def _repair_keys(self, cut: CutOver, locker: Connection, differing: list[Any], *, compared: int) -> None:
        """Re-sync changed keys a snapshot found different and track them for the cut-over's check.

        More than ``checksum_repair_limit`` of them is a defect, not a race: no cut-over.
        """
        if len(differing) > self.spec.checksum_repair_limit:
            raise ChecksumMismatch(f"{len(differing)} of {compared} changed keys differ: {differing[:10]!r}")
        if differing:
            await db.with_retries(lambda: cut.applier.resync(locker, differing),
                                  retries=self.spec.default_retries, what="re-sync differing keys")
            assert cut.applier.tracking is not None
            cut.applier.tracking.update(differing)

    @staticmethod
    async def _differing_keys(checksummer: Checksummer, connection: Connection, mismatches: list[Mismatch]) -> list[list[Any]]:
        return [await checksummer.differing_keys(connection, mismatch) for mismatch in mismatches]


def _sessions(connection: Connection) -> tuple[str, str, str, str]:
    """(table, id, state, statement) columns of the server's session list.

    MariaDB's ``information_schema.PROCESSLIST``; on MySQL that view converts
    every statement's text to utf8mb3 and fails (3854) on one holding other
    characters, so there ``performance_schema.threads``.
    """
    if connection.mariadb:
        return "information_schema.PROCESSLIST", "ID", "STATE", "INFO"
    return "performance_schema.threads", "PROCESSLIST_ID", "PROCESSLIST_STATE", "PROCESSLIST_INFO"


_INTEGER_TYPES = frozenset({"tinyint", "smallint", "mediumint", "int", "integer", "bigint"})


def _integer_key(plan: Plan) -> bool:
    """Every migration-key column is an integer: key tuples sort here as on the server."""
    types = {original.name: original.data_type.lower() for original, _ in plan.compared}
    return all(types.get(column) in _INTEGER_TYPES for column in plan.key_columns)


def _key_name(definition: str) -> str:
    """``KEY `a``b` (…)`` → ``a`b``."""
    keys = inspector.plain_secondary_keys(definition)
    return keys[0][0] if keys else definition


class _BehindCopy:
    """Verifies the copied ranges in snapshots taken while the copy runs.

    Every ``checksum_behind_copy_interval`` seconds the copy stops between two
    chunks for a snapshot (the checksum snapshot's READ lock: writers wait a
    few ms, readers not at all), then goes on while a second connection
    compares the ranges copied since the previous snapshot in it.  From the
    first snapshot on, the applier tracks every key the binlog changes, one
    set per interval: the keys changed between two snapshots are compared
    again in the later one (they may lie in ranges verified earlier).  After
    the copy the last ranges and the keys changed since the last snapshot
    (plus any that differed in a snapshot here) are compared in one more
    snapshot; what changes after it is re-checked by the delta convergence
    and, exactly, under the cut-over lock.  So a verified range whose rows
    nobody changed since needs no second read, and the serial work after the
    copy does not grow with the copy's length.  Past
    ``MAX_TRACKED`` tracked keys it gives up (the whole table is compared
    after the copy, as with interval 0).
    """

    MAX_TRACKED = 500_000

    def __init__(self, migration: Migration, cut: CutOver, checksummer: Checksummer,
                 worker: Connection, locker: Connection) -> None:
        self.migration = migration
        self.cut = cut
        self.checksummer = checksummer
        self.worker = worker
        self.locker = locker
        self.interval = migration.spec.checksum_behind_copy_interval
        self.active = False  # a snapshot was taken and tracking runs since
        self.verified_upto: Any = None  # exclusive lower bound of what is left to compare
        self.pending_upto: Any = None  # upper bound of the range the running compare covers
        self.busy = False
        self.last = trio.current_time()
        self.rows = self.ranges = self.snapshots = 0
        self.seconds = 0.0
        self.stalled = 0.0  # the copy's time spent waiting for snapshots
        self.changed: set[Any] = set()  # keys changed between the last two snapshots, to compare in the last
        self.keys_compared = 0
        self.recheck: set[Any] = set()
        self.broken: BaseException | None = None

    def due(self, now: float) -> bool:
        return not self.busy and self.broken is None and now - self.last >= self.interval

    async def snapshot(self, watermark: Any) -> bool:
        """Take the snapshot the ranges up to ``watermark`` are compared in; False: not now."""
        applier = self.cut.applier
        heartbeat = self.migration._heartbeat
        if len(applier.pending) > 1000 or (heartbeat is not None and heartbeat.lag(applier.last_heartbeat) > 0.5):
            return False  # the binlog is behind: the snapshot would stall the copy; try after the next chunk
        tracking = applier.tracking
        if self.active and tracking is not None and len(tracking) > self.MAX_TRACKED:
            self.migration._say(f"checksum behind the copy: over {self.MAX_TRACKED} changed keys tracked; "
                                "the whole table is compared after the copy instead")
            self.active, self.verified_upto, self.recheck, self.broken = False, None, set(), RuntimeError("given up")
            return False
        started = time.monotonic()
        changed = await self.migration._snapshot(self.cut, self.locker, [self.worker], reset_tracking=True)
        self.stalled += time.monotonic() - started
        # Keys changed since the previous snapshot may lie in ranges verified in it: they are
        # compared again in this one, so the tracked set only ever spans one interval.
        self.changed = changed if self.active else set()
        self.active = True
        self.busy = True
        self.pending_upto = watermark
        self.snapshots += 1
        return True

    async def compare(self) -> None:
        spec = self.migration.spec
        started = time.monotonic()
        try:
            comparison = await self.checksummer.compare_table(
                [self.worker], chunk_time=spec.checksum_chunk_time, start=self.verified_upto, stop=self.pending_upto)
            for mismatch in comparison.mismatches[:_REPAIRABLE_RANGES]:
                self.recheck.update(await self.checksummer.differing_keys(self.worker, mismatch))
            if self.changed:
                self.recheck.update(await self.checksummer.compare_keys(self.worker, sorted(self.changed, key=repr)))
                self.keys_compared += len(self.changed)
                self.changed = set()
            if len(comparison.mismatches) > _REPAIRABLE_RANGES or len(self.recheck) > spec.checksum_repair_limit:
                report = "; ".join(m.describe() for m in comparison.mismatches[:5])
                self.broken = ChecksumMismatch(
                    f"checksum behind the copy: {len(comparison.mismatches)} ranges differ "
                    f"({len(self.recheck)} keys): {report}")
            self.rows += comparison.rows
            self.ranges += comparison.ranges
            self.verified_upto = self.pending_upto
        except DatabaseError as error:
            # Not worth failing the copy for: everything is compared after it instead.
            self.migration._say(f"checksum behind the copy stopped ({error}); the whole table is compared "
                                "after the copy instead")
            self.active, self.verified_upto, self.recheck, self.broken = False, None, set(), error
        finally:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(DatabaseError):
                    await self.worker.execute("COMMIT")
            self.seconds += time.monotonic() - started
            self.busy = False
            self.last = trio.current_time()

    def raise_if_broken(self) -> None:
        if isinstance(self.broken, ChecksumMismatch):
            raise self.broken


def _interrupted(error: BaseException) -> bool:
    """Cancelled (a signal, the embedding process) rather than failed: resumable."""
    if isinstance(error, BaseExceptionGroup):
        return all(_interrupted(inner) for inner in error.exceptions)
    return isinstance(error, trio.Cancelled | KeyboardInterrupt)


def _describe(error: BaseException) -> str:
    """The error for a ``failure`` hook: the one failure of a group, as ``Type: message``."""
    if _interrupted(error):
        return "interrupted (SIGINT/SIGTERM or the embedding process); continue with --resume"
    if isinstance(error, BaseExceptionGroup):
        error = _single_failure(error) or error
    if isinstance(error, Refusal):
        return str(error)
    return f"{type(error).__name__}: {error}"[:2000]


def _single_failure(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        elif not isinstance(error, trio.Cancelled):
            leaves.append(error)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


#: More differing ranges than this in one checksum is a defect, not the commit-visibility race.
_REPAIRABLE_RANGES = 10

_EMPTY_PLAN = Plan((), (), (), (), "PRIMARY", (), (), {}, ())


async def cancel_migration(spec: MigrationSpec) -> str:
    """``--cancel``: abandon the latest unfinished migration of the table."""
    async with db.Connection(spec.settings) as control:
        await MigrationState.ensure_schema(control, spec.state_schema)
        state = await MigrationState.latest(control, spec.state_schema, spec.database, spec.table)
        migration = Migration(spec)
        migration._state = state
        await migration._drop_helpers(control, include_old=False)
        if state is not None and not state.phase.terminal:
            await state.transition(Phase.CANCELLED, "cancelled by request")
            return f"migration #{state.id} cancelled; ghost dropped"
        return "no unfinished migration; helper tables dropped"


__all__ = ["SENTRY_COMMENT", "Migration", "MigrationFailed", "Progress", "Result", "cancel_migration"]
