"""The embedded migrator: migrations requested through any sidecar, run by one.

This module is where the sidecar meets ``migrator`` (which never imports
``proxy``).  A request is a row in ``_tidegate.migration_requests``; every
sidecar polls for pending rows and the one that wins ``GET_LOCK`` becomes the
migration's leader and runs ``migrator.runner.Migration`` with a
``FleetGate``, so its cut-over drains and holds the table in **every** live
sidecar before the database-level lock-and-rename (which stays as the safety
net for traffic that bypasses the sidecars).  The lock lives on the leader's
connection: if the leader dies, the lock frees, and another sidecar takes the
migration over with ``--resume`` semantics.  Progress is written back to the
row every second so every sidecar's admin port shows it.

The leader also watches the migration from the proxy side
(``proxy.lifecycle``): events, lifecycle hooks (``proxy.hooks``) and blocker
reports (``proxy.blockers``).  A child leader appends its events to
``_tidegate.migration_events``; the sidecar tails that table, writes them to
its event log with their original timestamps, and deletes what it relayed.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from migrator.cli import migrate_parser, spec_from_args
from migrator.db import ConnectionSettings
from migrator.runner import Migration, Progress
from migrator.spec import MigrationSpec, SpecError
from proxy import blockers
from proxy.backends import BackendError, BackendUnavailable, Credentials, Endpoint
from proxy.blockers import ClientSession
from proxy.control import ControlError
from proxy.events import EventLog
from proxy.fleet import Fleet, FleetGate, ServiceDatabase, identifier, literal
from proxy.hooks import OPTIONS as HOOK_OPTIONS
from proxy.hooks import HookError, HookSettings
from proxy.lifecycle import OPTIONS as LIFECYCLE_OPTIONS
from proxy.lifecycle import Lifecycle, kill_after_option, published_sessions

log = logging.getLogger("tidegate.migrations")

REQUESTS_SQL = (
    "CREATE TABLE IF NOT EXISTS {s}.migration_requests ("
    " id BIGINT AUTO_INCREMENT PRIMARY KEY, schema_name VARCHAR(64) NOT NULL,"
    " table_name VARCHAR(64) NOT NULL, alter_statement TEXT NOT NULL, options TEXT NOT NULL,"
    " state VARCHAR(16) NOT NULL, leader VARCHAR(64) NULL, requested_at DATETIME(6) NOT NULL,"
    " updated_at DATETIME(6) NOT NULL, error TEXT NULL, progress TEXT NULL, control TEXT NULL,"
    " KEY state (state)) ENGINE=InnoDB"
)
ACTIVE = ("pending", "running")
#: options that may change while a migration runs
RUNTIME_OPTIONS = ("chunk_size",)
STATES = ("pending", "validating", "copying", "verifying", "ready", "postponed", "cutting_over",
          "complete", "failed", "cancelled")
#: options the sidecar handles itself (hooks, killing blockers); the rest go to the migrator
PROXY_OPTIONS = (*HOOK_OPTIONS, *LIFECYCLE_OPTIONS)
#: a child leader appends its events here; its sidecar relays and then deletes them
EVENTS_SQL = (
    "CREATE TABLE IF NOT EXISTS {s}.migration_events ("
    " id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, request_id BIGINT NOT NULL,"
    " record MEDIUMTEXT NOT NULL, KEY request_id (request_id, id)) ENGINE=InnoDB"
)
#: how often a child leader ships its new events, and at most how many a sidecar relays per read
EVENTS_SHIP_INTERVAL = 0.2
EVENTS_READ_BATCH = 500
#: environment variable a child leader gets the sidecar's hook settings in
LEAD_OPTIONS_ENV = "TIDEGATE_LEAD_OPTIONS"


def parse_options(text: str) -> dict[str, str]:
    """``chunk_size=2000, postpone=1`` → dict; values may be quoted."""
    options: dict[str, str] = {}
    for part in shlex.split(text.replace(",", " ")) if text.strip() else []:
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ControlError(f"option {part!r} is not name=value")
        options[name.strip().lower().replace("-", "_")] = value.strip()
    return options


def proxy_options(options: dict[str, str]) -> dict[str, str]:
    """The options the sidecar handles itself (see ``PROXY_OPTIONS``)."""
    return {name: value for name, value in options.items() if name in PROXY_OPTIONS}


def check_proxy_options(options: dict[str, str], hooks: HookSettings | None = None) -> HookSettings:
    """The migration's hook settings; ``ControlError`` naming a bad option."""
    try:
        kill_after_option(options)
        return (hooks or HookSettings()).with_options(options)
    except HookError as error:
        raise ControlError(f"invalid migration options: {error}") from None


def build_spec(settings: ConnectionSettings, schema: str, table: str, alter: str,
               options: dict[str, str], *, resume: bool) -> tuple[MigrationSpec, bool]:
    """The same flags as ``tidegate migrate``; returns (spec, postpone)."""
    options = {name: value for name, value in options.items() if name not in PROXY_OPTIONS}
    postpone = options.pop("postpone", "0").lower() in ("1", "true", "on", "yes")
    argv = [
        "--host", settings.host, "--port", str(settings.port), "--user", settings.user,
        "--password", settings.password, "--database", schema, "--table", table,
        "--alter", alter, "--execute", "--quiet",
    ]
    if resume:
        argv.append("--resume")
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value == "" else [flag, value]
    parser = migrate_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv)
        return spec_from_args(args), postpone
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        raise ControlError("invalid migration options: " + (message[-1] if message else "see docs/migrator.md")) from None
    except (SpecError, ValueError) as error:
        raise ControlError(f"invalid migration: {error}") from None


@dataclass
class ChildRunning:
    """A migration this sidecar leads in a child process (see ``lead_main``)."""

    request_id: int
    process: trio.Process
    lock_db: ServiceDatabase
    progress: dict[str, Any] = field(default_factory=dict)
    #: id of the last row of ``migration_events`` relayed to this sidecar's event log
    events_mark: int = 0
    #: one relay at a time (the poll and the child's exit may both relay)
    events_lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class Running:
    request_id: int
    migration: Migration
    gate: FleetGate
    scope: trio.CancelScope
    lock_db: ServiceDatabase | None
    last_line: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    drain_timeouts: Any = None
    lifecycle: Lifecycle | None = None


class MigrationService:
    def __init__(
        self,
        endpoint: Endpoint,
        service: tuple[str, str],
        fleet: Fleet,
        *,
        schema: str = "_tidegate",
        poll_interval: float = 1.0,
        on_progress: Callable[[int, Progress], None] | None = None,
        on_cutover: Callable[[str], None] | None = None,
        isolate: bool = True,
        events: EventLog | None = None,
        hooks: HookSettings | None = None,
        local_sessions: Callable[[list[str]], list[ClientSession]] | None = None,
    ) -> None:
        #: run each led migration in a child process, so its copy, checksum and
        #: binlog decoding never compete with the relay for this process's GIL
        self.isolate = isolate
        self.endpoint = endpoint
        self.service = service
        self.credentials = Credentials.from_password(*service)
        self.db = ServiceDatabase(endpoint, self.credentials)
        self.fleet = fleet
        self.schema_name = schema
        self.schema = identifier(schema)
        self.poll_interval = poll_interval
        self.running: dict[int, Running | ChildRunning] = {}
        self._restarts: dict[int, int] = {}
        self._drain_timeouts_seen: dict[int, int] = {}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._on_progress = on_progress
        self._on_cutover = on_cutover
        self._schema_ready = False
        self._orphaned = False
        #: migration events (a child leader keeps them in memory for its progress row)
        self.events = events or EventLog(source=fleet.id)
        #: hooks configured for every migration (``[hooks]``); options add to them
        self.hooks = hooks or HookSettings()
        #: this sidecar's sessions for blocker reports (None in a child leader)
        self.local_sessions = local_sessions
        #: the active migrations seen at the last poll: id -> summary (for /status)
        self.active: dict[int, dict[str, Any]] = {}
        self._in_child = False

    @property
    def settings(self) -> ConnectionSettings:
        return ConnectionSettings(host=self.endpoint.host, port=self.endpoint.port,
                                  user=self.service[0], password=self.service[1])

    async def ensure_schema(self) -> None:
        if self._schema_ready:
            return
        await self.db.query(f"CREATE DATABASE IF NOT EXISTS {self.schema}")
        await self.db.query(REQUESTS_SQL.format(s=self.schema))
        await self.db.query(EVENTS_SQL.format(s=self.schema))
        await self.fleet.ensure_schema()
        self._schema_ready = True

    # -- service loop ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.fleet.ready.wait()
            while True:
                try:
                    await self.ensure_schema()
                    break
                except (BackendError, BackendUnavailable, OSError) as error:
                    log.warning("migrations: cannot prepare %s: %s", self.schema, error)
                    await trio.sleep(2)
            while True:
                try:
                    await self._claim()
                except Exception as error:
                    log.warning("migrations: polling requests failed: %s", error)
                with trio.move_on_after(self.poll_interval):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _claim(self) -> None:
        rows = (await self.db.query(
            f"SELECT id, schema_name, table_name, alter_statement, options, state, control, progress, "
            f"TIMESTAMPDIFF(MICROSECOND, updated_at, NOW(6)) / 1e6 "
            f"FROM {self.schema}.migration_requests WHERE state IN ('pending', 'running') ORDER BY id"
        )).text_rows()
        self.active = {int(row[0] or 0): summary(row) for row in rows}
        for full_row in rows:
            row, progress_text = full_row[:7], full_row[7]
            request_id = int(row[0] or 0)
            if request_id in self.running:
                current = self.running[request_id]
                if isinstance(current, Running):
                    await self._apply_remote_commands(request_id, row[6])
                else:
                    if progress_text:
                        self._child_progress(current, json.loads(progress_text))
                    await self._relay_child_events(current)
                continue
            lock_db = ServiceDatabase(self.endpoint, self.credentials)
            try:
                got = (await lock_db.query(f"SELECT GET_LOCK({literal(self._lock_name(request_id))}, 0)")).text_rows()
            except Exception:
                await lock_db.aclose()
                raise
            if not got or got[0][0] != "1":
                await lock_db.aclose()
                continue
            resume = row[5] == "running"  # its leader died: take over where it stopped
            assert self._nursery is not None
            if self.isolate:
                await self._nursery.start(self._lead_child, request_id, lock_db, resume)
            else:
                await self._nursery.start(self._lead, request_id, row, lock_db, resume)

    def _lock_name(self, request_id: int) -> str:
        return f"tidegate:{self.schema_name}:migration:{request_id}"

    async def _lead(self, request_id: int, row: tuple[str | None, ...], lock_db: ServiceDatabase | None, resume: bool,
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        _, schema, table, alter, options_text, _, _ = row
        assert schema is not None and table is not None and alter is not None
        try:
            options = json.loads(options_text or "{}")
            spec, postpone = build_spec(self.settings, schema, table, alter, options, resume=resume)
            hooks = check_proxy_options(proxy_options(options), self.hooks)
            kill_after = kill_after_option(options)
        except (ControlError, ValueError) as error:
            await self._finish_request(request_id, "failed", str(error))
            if lock_db is not None:
                await lock_db.aclose()
            task_status.started()
            return
        gate = FleetGate(self.db, schema=self.schema_name, leader=self.fleet.id)
        lifecycle = Lifecycle(
            request_id=request_id, schema=schema, table=table, alter=alter, leader=self.fleet.id, db=self.db,
            state_schema=self.schema_name, service_user=self.service[0], events=self.events, hooks=hooks,
            kill_blockers_after=kill_after, resumed=resume, local_sessions=self.local_sessions,
        )
        gate_adapter = _AnnouncingGate(gate, self._on_cutover, lifecycle=lifecycle)
        lines: list[str] = []

        def output(line: str) -> None:
            lines.append(line)
            del lines[:-20]
            log.info("migration %d: %s", request_id, line)
            try:
                lifecycle.on_line(line)
            except Exception as error:  # an observer never breaks a migration
                log.warning("migration %d: status line not understood: %s", request_id, error)

        migration = Migration(spec, gate=gate_adapter, output=output)
        if postpone:
            migration.postpone(True)
        scope = trio.CancelScope()
        running = Running(request_id, migration, gate, scope, lock_db)
        running.drain_timeouts = gate_adapter
        running.lifecycle = lifecycle
        self.running[request_id] = running
        await self.db.query(
            f"UPDATE {self.schema}.migration_requests SET state = 'running', leader = {literal(self.fleet.id)}, "
            f"updated_at = NOW(6), error = NULL WHERE id = {request_id}"
        )
        log.info("migration %d: leading %s.%s (%s)%s", request_id, schema, table, alter, " resuming" if resume else "")
        task_status.started()
        state, failure_text = "failed", None
        async with trio.open_nursery() as observers:
            await observers.start(lifecycle.run, migration.progress)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._report, running, lines)
                    with scope:
                        result = await migration.run()
                        state = "complete" if str(result.phase.value) == "complete" else str(result.phase.value)
                    nursery.cancel_scope.cancel()
                if scope.cancelled_caught:
                    state = "running" if self._orphaned else "cancelled"
            except Exception as failure:
                failure_text = describe_failure(failure)
                log.error("migration %d failed: %s", request_id, failure_text)
            finally:
                with trio.CancelScope(shield=True):
                    self.running.pop(request_id, None)
                    try:
                        await gate.finish(schema, table)
                    except Exception as cleanup:
                        log.warning("migration %d: cut-over rows not cleaned: %s", request_id, cleanup)
                    progress = self._progress_row(running, lines)
                    if state != "running":  # an orphaned leader leaves it resumable
                        error_text = failure_text or (lines[-1] if state != "complete" and lines else None)
                        report = lifecycle.last_report
                        if state == "failed" and report is not None and report.rows and error_text:
                            error_text += f"; last blocker report: {report.text()}"
                        await self._finish_request(request_id, state, error_text, progress)
                        # success/failure hooks, then their events into the row for the sidecar
                        with trio.move_on_after(hooks.timeout + 1):
                            await lifecycle.finish(state, error_text)
                        await self._save_progress(request_id, self._progress_row(running, lines))
                    if lock_db is not None:
                        await lock_db.aclose()
                observers.cancel_scope.cancel()

    async def _lead_child(self, request_id: int, lock_db: ServiceDatabase, resume: bool,
                          *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lead a migration in a child process; this sidecar keeps the leader lock."""
        user, password = self.service
        dsn = (f"mysql://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
               f"@{self.endpoint.host}:{self.endpoint.port}")
        command = [sys.executable, "-m", "proxy.cli", "lead-migration", "--backend", dsn,
                   "--state-schema", self.schema_name, "--request-id", str(request_id),
                   "--leader-id", self.fleet.id,
                   "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()]
        if resume:
            command.append("--resume")
        await self.db.query(
            f"UPDATE {self.schema}.migration_requests SET state = 'running', leader = {literal(self.fleet.id)}, "
            f"updated_at = NOW(6), error = NULL WHERE id = {request_id}"
        )
        # The child exits when its stdin closes: a dead sidecar takes its child along.
        env = dict(os.environ)
        env[LEAD_OPTIONS_ENV] = json.dumps({"hooks": self.hooks.to_json()})
        process = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, env=env)
        self.running[request_id] = ChildRunning(request_id, process, lock_db)
        log.info("migration %d: leading it in child process %d%s", request_id, process.pid,
                 " (resuming)" if resume else "")
        task_status.started()
        try:
            await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with trio.move_on_after(10):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                child = self.running.pop(request_id, None)
                if isinstance(child, ChildRunning):
                    try:
                        await self._relay_child_events(child)
                    except Exception as error:
                        log.warning("migration %d: events of the leader process not relayed: %s", request_id, error)
                rows = (await self.db.query(
                    f"SELECT state, progress FROM {self.schema}.migration_requests WHERE id = {request_id}"
                )).text_rows()
                if rows and rows[0][1] and isinstance(child, ChildRunning):
                    final = json.loads(rows[0][1])
                    if rows[0][0] == "complete":
                        final["phase"] = "complete"
                    self._child_progress(child, final)
                if rows and rows[0][0] == "running":
                    restarts = self._restarts.get(request_id, 0) + 1
                    self._restarts[request_id] = restarts
                    if restarts >= 3:
                        await self._finish_request(
                            request_id, "failed",
                            f"leader process exited with code {process.returncode} {restarts} times",
                        )
                    else:
                        log.warning("migration %d: leader process exited with code %s; it will resume",
                                    request_id, process.returncode)
                await lock_db.aclose()  # frees the leader lock: any sidecar may resume it
                self._wake.set()

    def _child_progress(self, child: ChildRunning, progress: dict[str, Any]) -> None:
        """Metrics and events for a migration led by our child process, from its progress row."""
        child.progress = progress
        if self._on_progress is not None:
            snapshot = Progress()
            for name in ("phase", "rows_copied", "rows_estimate", "binlog_lag_seconds", "cut_over_attempts"):
                if progress.get(name) is not None:
                    setattr(snapshot, name, progress[name])
            self._on_progress(child.request_id, snapshot)
        if self._on_cutover is not None:
            seen = self._drain_timeouts_seen.get(child.request_id, 0)
            now = int(progress.get("drain_timeouts") or 0)
            for _ in range(seen, now):
                self._on_cutover("drain_timeout")
            self._drain_timeouts_seen[child.request_id] = now

    async def _relay_child_events(self, child: ChildRunning) -> None:
        """Events our child leader appended to ``migration_events``: into our log, in order, then deleted."""
        async with child.events_lock:
            await self._relay_child_events_locked(child)

    async def _relay_child_events_locked(self, child: ChildRunning) -> None:
        while True:
            rows = (await self.db.query(
                f"SELECT id, record FROM {self.schema}.migration_events WHERE request_id = {int(child.request_id)} "
                f"AND id > {int(child.events_mark)} ORDER BY id LIMIT {EVENTS_READ_BATCH}"
            )).text_rows()
            for row_id, text in rows:
                try:
                    record = json.loads(text or "")
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    self.events.relay(record)
                child.events_mark = int(row_id or 0)
            if rows:
                await self.db.query(
                    f"DELETE FROM {self.schema}.migration_events WHERE request_id = {int(child.request_id)} "
                    f"AND id <= {int(child.events_mark)}"
                )
            if len(rows) < EVENTS_READ_BATCH:
                return

    async def _ship_events(self, request_id: int, pending: builtins.list[dict[str, Any]]) -> None:
        """In a child leader: append the events recorded since the last call to ``migration_events``."""
        if not pending:
            return
        batch = pending[:]
        values = ", ".join(f"({int(request_id)}, {literal(json.dumps(record, default=str))})" for record in batch)
        await self.db.query(f"INSERT INTO {self.schema}.migration_events (request_id, record) VALUES {values}")
        del pending[:len(batch)]

    async def run_request(self, request_id: int, resume: bool) -> int:
        """Body of a child leader: run one requested migration; returns an exit code."""
        rows = (await self.db.query(
            f"SELECT id, schema_name, table_name, alter_statement, options, state, control "
            f"FROM {self.schema}.migration_requests WHERE id = {int(request_id)}"
        )).text_rows()
        if not rows:
            log.error("no migration request %d", request_id)
            return 2
        self._in_child = True
        await self.db.query(EVENTS_SQL.format(s=self.schema))  # a sidecar older than this table
        pending: builtins.list[dict[str, Any]] = []
        self.events.listeners.append(pending.append)

        async def ship() -> None:
            while True:
                await trio.sleep(EVENTS_SHIP_INTERVAL)
                try:
                    await self._ship_events(request_id, pending)
                except Exception as error:  # kept in ``pending``: the next round tries again
                    log.warning("migration %d: events not shipped yet: %s", request_id, error)

        try:
            await self._run_child(request_id, rows[0], resume, ship)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                try:
                    await self._ship_events(request_id, pending)
                except Exception as error:
                    log.error("migration %d: %d events lost: %s", request_id, len(pending), error)
        return 0

    async def _run_child(self, request_id: int, row: tuple[str | None, ...], resume: bool,
                         ship: Callable[[], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            done = trio.Event()

            async def lead() -> None:
                await self._lead(request_id, row, None, resume)
                done.set()

            async def watch_parent() -> None:
                # The sidecar closes our stdin when it dies or stops: stop, resumably.
                await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
                log.warning("migration %d: the sidecar went away; stopping (resumable)", request_id)
                self._orphaned = True
                running = self.running.get(request_id)
                if isinstance(running, Running):
                    running.scope.cancel()

            async def commands() -> None:
                while True:
                    await trio.sleep(0.25)
                    control = (await self.db.query(
                        f"SELECT control FROM {self.schema}.migration_requests WHERE id = {int(request_id)}"
                    )).text_rows()
                    if control:
                        await self._apply_remote_commands(request_id, control[0][0])

            nursery.start_soon(lead)
            nursery.start_soon(watch_parent)
            nursery.start_soon(commands)
            nursery.start_soon(ship)
            await done.wait()
            nursery.cancel_scope.cancel()

    async def _finish_request(self, request_id: int, state: str, error: str | None,
                              progress: dict[str, Any] | None = None) -> None:
        with trio.CancelScope(shield=True):
            await self.db.query(
                f"UPDATE {self.schema}.migration_requests SET state = {literal(state)}, error = {literal(error)}, "
                f"progress = COALESCE({literal(json.dumps(progress) if progress else None)}, progress), "
                f"updated_at = NOW(6) WHERE id = {request_id}"
            )

    def _progress_row(self, running: Running, lines: list[str]) -> dict[str, Any]:
        progress = running.migration.progress()
        row = {
            "phase": progress.phase,
            "migration_id": progress.migration_id,
            "rows_copied": progress.rows_copied,
            "rows_estimate": progress.rows_estimate,
            "rows_per_second": round(progress.rows_per_second, 1),
            "eta_seconds": None if progress.eta_seconds is None else round(progress.eta_seconds, 1),
            "binlog_lag_seconds": round(getattr(progress, "binlog_lag_seconds", 0.0) or 0.0, 3),
            "throttle_reason": progress.throttle_reason,
            "postponed": progress.postponed,
            "cut_over_attempts": getattr(progress, "cut_over_attempts", 0),
            "chunk_size": getattr(progress, "chunk_size", 0),
            "last_refusal": running.gate.last_refusal,
            "drain_timeouts": getattr(running.drain_timeouts, "refusals", 0),
            # a long step (the index build after the copy) says so while it runs
            "last_line": getattr(progress, "activity", None) or (lines[-1] if lines else ""),
        }
        lifecycle = running.lifecycle
        if lifecycle is not None:
            if lifecycle.vetoed and progress.phase in ("ready", "postponed"):
                row["phase"], row["postponed"] = "postponed", True
            row["postponed_by"] = lifecycle.vetoed
            row["blocked_by"] = lifecycle.blocked_by
            row["last_refusal"] = lifecycle.last_failure or running.gate.last_refusal
        running.progress = row
        if self._on_progress is not None:
            self._on_progress(running.request_id, progress)
        return row

    async def _report(self, running: Running, lines: list[str]) -> None:
        while True:
            await trio.sleep(0.5)
            await self._save_progress(running.request_id, self._progress_row(running, lines))

    async def _save_progress(self, request_id: int, row: dict[str, Any]) -> None:
        try:
            await self.db.query(
                f"UPDATE {self.schema}.migration_requests SET progress = {literal(json.dumps(row, default=str))}, "
                f"updated_at = NOW(6) WHERE id = {request_id}"
            )
        except Exception as error:
            log.warning("migration %d: progress not saved: %s", request_id, error)

    async def dependents(self, schema: str, table: str) -> set[str]:
        """Views, tables whose triggers reach ``schema.table``, and stored functions
        whose body names it: statements on (or calling) them touch the table too.

        Procedures need nothing here: ``CALL`` is already "may touch anything".
        Matching is by name in the definition text, erring on the side of
        holding a statement that did not need it for a few milliseconds.
        """
        functions = (await self.db.query(
            "SELECT ROUTINE_SCHEMA, ROUTINE_NAME, ROUTINE_DEFINITION FROM information_schema.ROUTINES "
            f"WHERE ROUTINE_TYPE = 'FUNCTION' AND ROUTINE_DEFINITION LIKE {literal('%' + table + '%')}"
        )).text_rows()
        word = re.compile(rf"(?<![\w$]){re.escape(table)}(?![\w$])", re.IGNORECASE)
        called = {f"{s}.{name}" for s, name, body in functions if s and name and body and word.search(body)}
        needle = literal(f"%`{table}`%")
        # The system schemas are skipped by name before their objects are opened
        # (opening sys's 100 views on every hold is slow, and is the kind of
        # information_schema scan MariaDB 10.11.19 crashed in during our tests).
        system = "('mysql', 'sys', 'performance_schema', 'information_schema')"
        views = (await self.db.query(
            "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.VIEWS "
            f"WHERE TABLE_SCHEMA NOT IN {system} AND VIEW_DEFINITION LIKE {needle}"
        )).text_rows()
        triggers = (await self.db.query(
            "SELECT EVENT_OBJECT_SCHEMA, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS "
            f"WHERE EVENT_OBJECT_SCHEMA NOT IN {system} AND ACTION_STATEMENT LIKE {literal('%' + table + '%')} "
            f"AND NOT (EVENT_OBJECT_SCHEMA = {literal(schema)} AND EVENT_OBJECT_TABLE = {literal(table)})"
        )).text_rows()
        # Our own cut-over triggers live on the original and write the ghost; skip ghost names.
        return {f"{s}.{t}" for s, t in views + triggers if s and t and not t.startswith("_")} | called

    # -- operator API (through Control) -------------------------------------------

    async def request(self, schema: str, table: str, alter: str, options: dict[str, str]) -> int:
        await self.ensure_schema()
        if not schema or not table or not alter.strip():
            raise ControlError("schema_name, table_name and alter_statement are required")
        build_spec(self.settings, schema, table, alter, options, resume=False)  # validate now, answer now
        check_proxy_options(proxy_options(options), self.hooks)
        active = (await self.db.query(
            f"SELECT id FROM {self.schema}.migration_requests WHERE state IN ('pending', 'running') "
            f"AND schema_name = {literal(schema)} AND table_name = {literal(table)}"
        )).text_rows()
        if active:
            raise ControlError(f"{schema}.{table} already has an active migration (id {active[0][0]})")
        result = await self.db.query(
            f"INSERT INTO {self.schema}.migration_requests (schema_name, table_name, alter_statement, options, "
            f"state, requested_at, updated_at) VALUES ({literal(schema)}, {literal(table)}, {literal(alter)}, "
            f"{literal(json.dumps(options))}, 'pending', NOW(6), NOW(6))"
        )
        assert result.ok is not None
        self._wake.set()
        return result.ok.last_insert_id

    async def list(self) -> builtins.list[dict[str, Any]]:
        await self.ensure_schema()
        rows = (await self.db.query(
            f"SELECT id, schema_name, table_name, alter_statement, options, state, leader, requested_at, "
            f"updated_at, error, progress FROM {self.schema}.migration_requests ORDER BY id"
        )).dicts()
        out = []
        for row in rows:
            request_id = int(row["id"] or 0)
            running = self.running.get(request_id)
            progress = (running.progress if isinstance(running, Running) and running.progress
                        else json.loads(row["progress"] or "{}"))
            out.append({
                "id": request_id,
                "schema_name": row["schema_name"],
                "table_name": row["table_name"],
                "alter_statement": row["alter_statement"],
                "options": row["options"],
                "state": row["state"] if row["state"] != "running" else _running_state(progress),
                "leader": row["leader"],
                "requested_at": row["requested_at"],
                "updated_at": row["updated_at"],
                "rows_copied": progress.get("rows_copied"),
                **copy_share(progress.get("rows_copied"), progress.get("rows_estimate")),
                "rows_per_second": progress.get("rows_per_second"),
                "eta_seconds": progress.get("eta_seconds"),
                "binlog_lag_seconds": progress.get("binlog_lag_seconds"),
                "throttle_reason": progress.get("throttle_reason"),
                "postponed": progress.get("postponed"),
                "cut_over_attempts": progress.get("cut_over_attempts"),
                "last_cut_over_failure": progress.get("last_refusal"),
                "error": row["error"],
                "message": progress.get("last_line"),
                "postponed_by": progress.get("postponed_by"),
                "blocked_by": progress.get("blocked_by"),
            })
        return out

    def status(self) -> builtins.list[dict[str, Any]]:
        """Active migrations as of the last poll (``/status``): a pipeline waits for ``ready_to_cut_over``."""
        out = []
        for request_id, entry in sorted(self.active.items()):
            running = self.running.get(request_id)
            if running is not None and running.progress:
                entry = dict(entry, **_progress_summary(running.progress))
            out.append(entry)
        return out

    async def blockers(self) -> builtins.list[dict[str, Any]]:
        """Who holds or waits for the lock of each table being migrated, now (admin ``blockers``)."""
        await self.ensure_schema()
        rows = (await self.db.query(
            f"SELECT id, schema_name, table_name FROM {self.schema}.migration_requests "
            "WHERE state IN ('pending', 'running') ORDER BY id"
        )).text_rows()
        targets = {f"{s}.{t}".lower(): (int(i or 0), str(s), str(t)) for i, s, t in rows if s and t}
        for (key,) in (await self.db.query(f"SELECT table_key FROM {self.schema}.cutovers")).text_rows():
            if key and key not in targets and "." in key:
                schema, _, table = key.partition(".")
                targets[key] = (0, schema, table)
        if not targets:
            return []
        sessions: builtins.list[ClientSession] = []
        if self.local_sessions is not None:
            sessions += self.local_sessions(sorted(targets))
        sessions += await published_sessions(self.db, self.schema_name, exclude=self.fleet.id)
        out = []
        for request_id, schema, table in targets.values():
            report = await blockers.collect(self.db, schema, table, service_user=self.service[0],
                                            sessions=sessions)
            note = "; ".join(report.notes)
            for row in report.rows:
                out.append(dict(row, migration=request_id or None, notes=note))
            if not report.rows:
                out.append({"table": report.key, "migration": request_id or None, "role": "none",
                            "notes": note})
        return out

    async def sidecars(self) -> builtins.list[dict[str, Any]]:
        await self.ensure_schema()
        rows: builtins.list[dict[str, Any]] = (await self.db.query(
            f"SELECT s.id, s.host, s.pid, s.listen, s.started_at, s.heartbeat_at, s.holding, "
            f"TIMESTAMPDIFF(MICROSECOND, s.heartbeat_at, NOW(6)) / 1e6 AS heartbeat_age, "
            f"(SELECT CONCAT(a.table_key, '#', a.epoch, ' ', a.result) FROM {self.schema}.hold_acks a "
            f" WHERE a.sidecar = s.id ORDER BY a.at DESC LIMIT 1) AS last_ack "
            f"FROM {self.schema}.sidecars s ORDER BY s.id"
        )).dicts()
        for row in rows:
            row["live"] = float(row["heartbeat_age"] or 1e9) < 3.0
            row["this_sidecar"] = row["id"] == self.fleet.id
        return rows

    async def command(self, request_id: int, name: str, value: str | None) -> None:
        await self.ensure_schema()
        rows = (await self.db.query(
            f"SELECT state, control FROM {self.schema}.migration_requests WHERE id = {int(request_id)}"
        )).text_rows()
        if not rows:
            raise ControlError(f"no migration with id {request_id}")
        state = rows[0][0]
        if state not in ACTIVE:
            raise ControlError(f"migration {request_id} is {state}; only pending or running migrations take commands")
        self._check_command(name, value)
        running = self.running.get(request_id)
        if isinstance(running, Running):
            self._apply(running, name, value)
            return
        if state == "pending" and name == "cancel":
            await self._finish_request(request_id, "cancelled", "cancelled before it started")
            return
        # Another sidecar leads it: leave the command on the row for the leader.
        pending = json.loads(rows[0][1] or "[]")
        pending.append([name, value])
        await self.db.query(
            f"UPDATE {self.schema}.migration_requests SET control = {literal(json.dumps(pending))} "
            f"WHERE id = {int(request_id)}"
        )

    def _check_command(self, name: str, value: str | None) -> None:
        if name in ("throttle", "cancel"):
            return
        if name == "postpone":
            if value not in ("0", "1"):
                raise ControlError("postponed must be 0 or 1")
            return
        if name.startswith("set:"):
            option = name[4:]
            if option not in RUNTIME_OPTIONS:
                raise ControlError(
                    f"{option} cannot change while a migration runs (runtime options: {', '.join(RUNTIME_OPTIONS)}); "
                    "set it when starting the migration"
                )
            if option == "chunk_size" and not (value or "").isdigit():
                raise ControlError("chunk_size must be a positive integer")
            return
        raise ControlError(f"unknown command {name!r}")

    def _apply(self, running: Running, name: str, value: str | None) -> None:
        migration = running.migration
        if name == "throttle":
            migration.throttle(value)
        elif name == "postpone":
            migration.postpone(value == "1")
        elif name == "cancel":
            migration.cancel()
        elif name == "set:chunk_size" and value:
            sizer = getattr(migration, "_sizer", None)
            if sizer is not None:
                sizer.size = max(1, int(value))
        log.info("migration %d: %s %s", running.request_id, name, value)

    async def _apply_remote_commands(self, request_id: int, control: str | None) -> None:
        if not control:
            return
        running = self.running.get(request_id)
        if not isinstance(running, Running):
            return
        await self.db.query(
            f"UPDATE {self.schema}.migration_requests SET control = NULL WHERE id = {request_id}"
        )
        for name, value in json.loads(control):
            self._apply(running, str(name), value)


def describe_failure(error: BaseException) -> str:
    """``MigrationFailed: …`` rather than ``ExceptionGroup: Exceptions from Trio nursery``."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(describe_failure(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"


def copy_share(copied: int | None, estimate: int | None) -> dict[str, Any]:
    """``rows_estimate`` and ``progress_percent`` as the CLI's status line shows them.

    The estimate is the server's statistics; rows inserted during the copy
    can take the count past it (the demo showed 24781/24300, 102.0 %).  Then
    the estimate is raised to what was copied, so the share never passes 100 %.
    """
    if not estimate:
        return {"rows_estimate": estimate, "progress_percent": None}
    estimate = max(int(estimate), int(copied or 0))
    return {"rows_estimate": estimate, "progress_percent": round(100 * int(copied or 0) / estimate, 1)}


def _running_state(progress: dict[str, Any]) -> str:
    """A led migration's state for the admin table: the migrator's phase, as documented.

    Before the leader's first report, and while the migrator's own record is
    still ``pending`` (it is being set up), it is ``validating``: never the
    request's internal ``running`` nor a ``pending`` that would read as
    "nobody took it yet".
    """
    phase = progress.get("phase")
    return "validating" if phase in (None, "", "pending") else str(phase)


def summary(row: tuple[str | None, ...]) -> dict[str, Any]:
    """One active request row (id, schema, table, alter, options, state, control, progress[, age]) for /status.

    ``binlog_lag_seconds`` is the leader's last report, whichever sidecar leads:
    every sidecar's backpressure reads it (``migration_lags``).  ``age`` is how
    many seconds ago the row was last written.
    """
    entry: dict[str, Any] = {"id": int(row[0] or 0), "table": f"{row[1]}.{row[2]}", "state": row[5]}
    try:
        progress = json.loads(row[7] or "{}")
    except ValueError:
        progress = {}
    entry.update(_progress_summary(progress))
    lag = progress.get("binlog_lag_seconds")
    entry["binlog_lag_seconds"] = float(lag) if isinstance(lag, int | float) else None
    entry["age_seconds"] = float(row[8]) if len(row) > 8 and row[8] is not None else None
    return entry


#: a leader's lag report older than this is not trusted for backpressure (the leader
#: died; the next one reports within a second of taking over)
LAG_REPORT_MAX_AGE = 10.0


def migration_lags(active: dict[int, dict[str, Any]]) -> builtins.list[tuple[str, float]]:
    """(schema.table, binlog lag) of the active migrations with a fresh lag report."""
    lags = []
    for entry in active.values():
        lag, age = entry.get("binlog_lag_seconds"), entry.get("age_seconds")
        if lag is None:  # pending, or no report yet
            continue
        if age is not None and age > LAG_REPORT_MAX_AGE:
            continue
        lags.append((str(entry["table"]), float(lag)))
    return lags


def _progress_summary(progress: dict[str, Any]) -> dict[str, Any]:
    phase = progress.get("phase")
    out: dict[str, Any] = {
        "postponed": bool(progress.get("postponed")),
        "postponed_by": progress.get("postponed_by"),
        "cut_over_attempts": progress.get("cut_over_attempts"),
        "last_cut_over_failure": progress.get("last_refusal"),
        # copied and verified: a deployment pipeline may roll its code now
        "ready_to_cut_over": phase in ("ready", "postponed", "cutting_over"),
    }
    if phase:
        out["state"] = phase
    return out


class _AnnouncingGate:
    """FleetGate plus bookkeeping the runner does not know about."""

    def __init__(self, gate: FleetGate, on_cutover: Callable[[str], None] | None, announce_wait: float = 0.6,
                 *, lifecycle: Lifecycle | None = None) -> None:
        self.gate = gate
        self.announce_wait = announce_wait
        self.refusals = 0
        self._on_cutover = on_cutover
        self._announced = False
        self.lifecycle = lifecycle

    async def hold(self, schema: str, table: str, *, drain_timeout: float, hold_timeout: float) -> bool:
        lifecycle = self.lifecycle
        if lifecycle is not None and not await lifecycle.before_cut_over():
            return False  # it vetoed for a while: let the migrator re-check postponement and lag first
        if not self._announced:
            # Sidecars poll slowly until a cut-over is announced; give every one
            # a full slow-poll period to switch to fast polling first.
            await self.gate.announce(schema, table)
            self._announced = True
            await trio.sleep(self.announce_wait)
        if lifecycle is not None:
            lifecycle.hold_requested(drain_timeout)
        held = await self.gate.hold(schema, table, drain_timeout=drain_timeout, hold_timeout=hold_timeout)
        if not held:
            self.refusals += 1
            log.info("cut-over of %s.%s not now: %s", schema, table, self.gate.last_refusal)
            if self._on_cutover is not None:
                self._on_cutover("drain_timeout")
            if lifecycle is not None:
                try:
                    await lifecycle.hold_refused(self.gate.last_refusal)
                except Exception as error:  # a report never breaks a cut-over
                    log.warning("cut-over of %s.%s: blocker report failed: %s", schema, table, error)
        elif lifecycle is not None:
            lifecycle.hold_acquired()
        return held

    async def release(self, schema: str, table: str) -> None:
        await self.gate.release(schema, table)
        if self.lifecycle is not None:
            self.lifecycle.released()



def lead_main(argv: builtins.list[str]) -> int:
    """``tidegate lead-migration``: the child process a sidecar leads a migration in."""
    import argparse

    parser = argparse.ArgumentParser(prog="tidegate lead-migration")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--state-schema", default="_tidegate")
    parser.add_argument("--request-id", type=int, required=True)
    parser.add_argument("--leader-id", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parsed = urllib.parse.urlsplit(args.backend)
    endpoint = Endpoint("primary", parsed.hostname or "127.0.0.1", parsed.port or 3306)
    service = (urllib.parse.unquote(parsed.username or ""), urllib.parse.unquote(parsed.password or ""))

    class _Leader:
        id = args.leader_id
        ready = trio.Event()

        async def ensure_schema(self) -> None:
            await trio.lowlevel.checkpoint()

    try:
        hooks = HookSettings.from_json(json.loads(os.environ.get(LEAD_OPTIONS_ENV) or "{}").get("hooks"))
    except (ValueError, TypeError) as error:
        log.error("ignoring %s: %s", LEAD_OPTIONS_ENV, error)
        hooks = HookSettings()

    async def main() -> int:
        service_ = MigrationService(endpoint, service, _Leader(), schema=args.state_schema,  # type: ignore[arg-type]
                                    events=EventLog(source=args.leader_id), hooks=hooks)
        return await service_.run_request(args.request_id, args.resume)

    code = trio.run(main)
    # A worker thread may still block reading stdin (the parent-death watch);
    # skip interpreter finalization, which would abort on its lock.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
