"""What a led migration tells the outside world: events, hooks and blocker reports.

The migrator (``migrator/``) tells its story through ``Migration.progress()``,
its status lines and the ``TrafficGate`` it is given.  The leader watches
those from the proxy side:

* ``watch`` compares ``progress()`` every 0.1 s: phase changes, throttle
  on/off (with its reason), postponement and cut-over attempt counts become
  events; the copy's end fires the ``row_copy_complete`` hook;
* the gate adapter (``proxy.migrations``) brackets each attempt: the first
  one runs the ``before_cut_over`` hook (a veto keeps the migration
  postponed); a refused hold (a drain that did not finish) gets a blocker
  report (``proxy.blockers``) that goes to the log, the events and the
  migration's ``last_cut_over_failure``;
* while the migration takes table locks (the ``INSTANT`` attempt, the
  checksum snapshot, each cut-over attempt) ``_watch_locks`` looks for the
  service account's statements on the table that wait for its metadata lock;
  one that waits gets a blocker report too (``blocked_by`` in the progress
  row, ``cutover.blocked``/``migration.blocked`` events, the failure reason
  of the attempt it delays);
* with ``kill_blockers_after`` (a per-migration option, off by default) a
  session that keeps blocking the cut-over that long is ended with ``KILL
  CONNECTION`` (its transaction rolls back; its client gets an error).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import trio

from proxy import blockers
from proxy.blockers import ClientSession, Report
from proxy.events import EventLog
from proxy.fleet import LIVE_SECONDS, ServiceDatabase, identifier, literal
from proxy.hooks import Hooks, HookSettings, check_seconds

log = logging.getLogger("tidegate.lifecycle")

#: per-migration options owned here (besides ``proxy.hooks.OPTIONS``)
OPTIONS = ("kill_blockers_after",)
#: a cut-over statement waiting this long on a metadata lock gets a blocker report
REPORT_AFTER = 0.3
WATCH_INTERVAL = 0.1
#: phases in which the migrator takes locks on the table (copying only reads it)
LOCKING_PHASES = ("validating", "verifying", "ready", "cutting_over")
_DONE = re.compile(r"cut-over done on attempt (\d+) \(table held (\d+)ms")
_ROLLED_BACK = re.compile(r"cut-over attempt (\d+) rolled back \((.*)\); retry in")
_FINAL = ("complete", "failed", "cancelled")


def kill_after_option(options: dict[str, str]) -> float | None:
    value = options.get("kill_blockers_after")
    if value in (None, "", "0", "off"):
        return None
    return check_seconds("kill_blockers_after", value)


async def published_sessions(db: ServiceDatabase, schema: str, *, exclude: str | None = None,
                             max_age: float = 30.0) -> list[ClientSession]:
    """Sessions other live sidecars published (``proxy.fleet``), aged to now."""
    state = identifier(schema)
    rows = (await db.query(
        "SELECT s.sidecar, s.session_id, s.backend_id, s.`user`, s.client, s.db, s.transaction_seconds, "
        "s.statement, s.tags, s.touched, TIMESTAMPDIFF(MICROSECOND, s.at, NOW(6)) / 1e6 AS age "
        f"FROM {state}.sessions s JOIN {state}.sidecars c ON c.id = s.sidecar "
        f"WHERE s.at > NOW(6) - INTERVAL {int(max_age * 1000)} * 1000 MICROSECOND "
        f"AND c.heartbeat_at > NOW(6) - INTERVAL {int(LIVE_SECONDS * 1000)} * 1000 MICROSECOND"
        + (f" AND s.sidecar <> {literal(exclude)}" if exclude else "")
    )).dicts()
    out = []
    for row in rows:
        age = float(row["age"] or 0)
        seconds = row["transaction_seconds"]
        out.append(ClientSession(
            sidecar=str(row["sidecar"]), session_id=int(row["session_id"] or 0),
            backend_id=int(row["backend_id"]) if row["backend_id"] else None,
            user=str(row["user"] or ""), client=str(row["client"] or ""), schema=row["db"],
            transaction_seconds=round(float(seconds) + age, 3) if seconds is not None else None,
            statement=row["statement"], tags=row["tags"] or "",
            touched=[t for t in (row["touched"] or "").split(",") if t],
        ))
    return out


class Lifecycle:
    """One led migration's observers: events, hooks, blocker reports."""

    def __init__(
        self,
        *,
        request_id: int,
        schema: str,
        table: str,
        alter: str,
        leader: str,
        db: ServiceDatabase,
        state_schema: str,
        service_user: str,
        events: EventLog,
        hooks: HookSettings,
        kill_blockers_after: float | None = None,
        resumed: bool = False,
        local_sessions: Callable[[list[str]], list[ClientSession]] | None = None,
    ) -> None:
        self.request_id = request_id
        self.schema = schema
        self.table = table
        self.alter = alter
        self.leader = leader
        self.db = db
        self.state_schema = state_schema
        self.service_user = service_user
        self.events = events
        self.hooks = Hooks(hooks, events, migration_id=request_id)
        self.kill_blockers_after = kill_blockers_after
        self.resumed = resumed
        self.local_sessions = local_sessions
        self.progress: Any = None
        self._progress_source: Callable[[], Any] | None = None
        self.started = time.monotonic()
        #: why the before_cut_over hook holds the cut-over back (None: it does not)
        self.vetoed: str | None = None
        self._approved = False
        #: why the last cut-over attempt failed, with its blocker chain
        self.last_failure: str | None = None
        self.last_report: Report | None = None
        self._attempt_report: Report | None = None
        self._attempt_started: float | None = None
        self._blocked_since: dict[int, float] = {}
        self._holding = False
        #: the blocker chain while one of our lock requests on the table waits (None otherwise)
        self.blocked_by: str | None = None
        self._blocked_report: Report | None = None
        self._after_cut_over_fired = False

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.table}".lower()

    def facts(self, **extra: Any) -> dict[str, Any]:
        """The migration's facts for hooks and events (``TIDEGATE_MIGRATION_<KEY>``)."""
        progress = self.progress
        facts: dict[str, Any] = {
            "id": self.request_id,
            "schema": self.schema,
            "table": self.table,
            "alter": self.alter,
            "leader": self.leader,
            "state_schema": self.state_schema,
            "resumed": self.resumed,
            "elapsed_seconds": round(time.monotonic() - self.started, 3),
        }
        if progress is not None:
            facts.update(
                phase=progress.phase, rows_copied=progress.rows_copied, rows_estimate=progress.rows_estimate,
                cut_over_attempts=getattr(progress, "cut_over_attempts", 0),
                binlog_lag_seconds=round(float(getattr(progress, "binlog_lag_seconds", 0.0) or 0.0), 3),
            )
        if self.last_failure:
            facts["last_cut_over_failure"] = self.last_failure
        facts.update(extra)
        return facts

    def emit(self, event: str, **fields: Any) -> None:
        self.events.emit(event, migration=self.request_id, table=self.key, **fields)

    # -- the migration's life ----------------------------------------------------

    async def run(self, progress: Callable[[], Any], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hooks runner and progress watcher, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hooks.run)
            self.progress = copy.copy(progress())
            self.emit("migration.start", alter=self.alter, resumed=self.resumed or None, leader=self.leader)
            self.hooks.fire("startup", self.facts(phase=self.progress.phase))
            nursery.start_soon(self._watch_locks)
            task_status.started()
            await self._watch(progress)

    async def _watch(self, progress: Callable[[], Any]) -> None:
        self._progress_source = progress
        while True:
            await trio.sleep(WATCH_INTERVAL)
            self._look()

    def _look(self) -> None:
        """Compare the migration's progress now with the last look (events, hooks)."""
        if self._progress_source is None:
            return
        try:
            # progress() updates one object in place: compare copies
            current = copy.copy(self._progress_source())
            previous, self.progress = self.progress, current
            self._compare(previous, current)
        except Exception as error:  # an observer never breaks the migration it watches
            log.warning("migration %d: progress watch: %s", self.request_id, error)

    def _compare(self, before: Any, after: Any) -> None:
        seen: tuple[str, ...] = tuple(getattr(before, "phases", ()) or ())
        entered: tuple[str, ...] = tuple(getattr(after, "phases", ()) or ())
        if len(entered) > len(seen) and entered[: len(seen)] == seen:
            # Every phase entered since the last look, a copy of 20 ms included.
            steps = entered[len(seen):]
        else:
            steps = (after.phase,) if after.phase != before.phase else ()
        previous = before.phase
        for phase in steps:
            if phase == previous:
                continue
            self.emit("migration.phase", previous=previous, phase=phase,
                      rows_copied=after.rows_copied, rows_estimate=after.rows_estimate)
            if previous == "copying":
                self.hooks.fire("row_copy_complete", self.facts())
            previous = phase
        if after.throttle_reason != before.throttle_reason:
            self.emit("migration.throttle", throttled=after.throttle_reason is not None,
                      reason=after.throttle_reason or before.throttle_reason)
        if after.postponed != before.postponed:
            self.emit("migration.postponed", postponed=bool(after.postponed))

    def on_line(self, line: str) -> None:
        """A status line of the migrator: the exact moment an attempt ended."""
        done = _DONE.search(line)
        if done:
            self.last_failure = None
            self.emit("cutover.done", attempt=int(done.group(1)), table_held_ms=int(done.group(2)),
                      seconds=self._attempt_seconds())
            self._fire_after_cut_over(int(done.group(1)), int(done.group(2)))
            return
        rolled = _ROLLED_BACK.search(line)
        if rolled:
            reason = rolled.group(2)
            report = self._attempt_report
            self.last_failure = f"attempt {rolled.group(1)}: {reason}" + (
                f"; {report.text()}" if report is not None and report.rows else "")
            self.emit("cutover.rolled_back", attempt=int(rolled.group(1)), reason=reason,
                      seconds=self._attempt_seconds(), blockers=report.text() if report is not None else None)

    def _attempt_seconds(self) -> float | None:
        if self._attempt_started is None:
            return None
        return round(trio.current_time() - self._attempt_started, 6)

    def _fire_after_cut_over(self, attempt: int | None = None, held_ms: int | None = None) -> None:
        if not self._after_cut_over_fired:
            self._after_cut_over_fired = True
            self.hooks.fire("after_cut_over", self.facts(phase="cutting_over", table_held_ms=held_ms,
                                                         cut_over_attempts=attempt))

    async def finish(self, state: str, error: str | None) -> None:
        """The end: events, and the success/failure hook (awaited, bounded by its timeout)."""
        if state == "complete":
            self._fire_after_cut_over()
        self.emit("migration.end", state=state, error=error,
                  seconds=round(time.monotonic() - self.started, 3))
        if state in _FINAL:
            self.hooks.fire("success" if state == "complete" else "failure",
                            self.facts(phase=state, state=state, error=error))
        await self.hooks.wait_idle()

    # -- cut-over attempts (called by the gate adapter) ---------------------------------

    async def before_cut_over(self) -> bool:
        """Run the veto hook until it agrees.  False: it vetoed at least once (re-check, then retry)."""
        if self._approved or not self.hooks.configured("before_cut_over"):
            return True
        vetoed = False
        while True:
            # Up to date first: a copy shorter than the watch interval has ended unseen
            # (its row_copy_complete is queued now, and runs before this hook).
            self._look()
            result = await self.hooks.run_now("before_cut_over", self.facts(phase="ready"))
            if result.ok:
                break
            if not vetoed:
                log.warning("migration %d: hook before_cut_over vetoed the cut-over (%s); retrying every %gs",
                            self.request_id, result.detail, self.hooks.settings.retry_interval)
            vetoed = True
            self.vetoed = f"hook before_cut_over: {result.detail}"
            self.emit("hook.veto", hook="before_cut_over", detail=result.detail,
                      retry_in=self.hooks.settings.retry_interval)
            await trio.sleep(self.hooks.settings.retry_interval)
        self._approved = True
        if vetoed:
            self.vetoed = None
            self.emit("migration.postponed", postponed=False, reason="hook before_cut_over succeeded")
        return not vetoed

    def hold_requested(self, drain_timeout: float) -> None:
        self._attempt_started = trio.current_time()
        self._attempt_report = None
        self.emit("cutover.hold", drain_timeout=drain_timeout)

    async def hold_refused(self, refusal: str | None) -> None:
        """A sidecar's drain did not finish: report who, then (maybe) end them."""
        report = await self._report()
        chain = report.text() if report is not None and report.holders() else None
        self.last_failure = "drain did not finish: " + (refusal or "no acknowledgement") + (
            f" [{chain}]" if chain else "")
        log.warning("migration %d: cut-over not now: %s", self.request_id, self.last_failure)
        self.emit("cutover.refused", reason=refusal, seconds=self._attempt_seconds(), blockers=chain)
        if report is not None:
            await self._maybe_kill(report)

    def hold_acquired(self) -> None:
        self._holding = True
        self.emit("cutover.held", seconds=self._attempt_seconds())

    def released(self) -> None:
        self._holding = False
        self.emit("cutover.released", seconds=self._attempt_seconds())

    async def _watch_locks(self) -> None:
        """Does one of our lock requests on the table wait for its metadata lock?  Who holds it?"""
        while True:
            phase = getattr(self.progress, "phase", None)
            if not self._holding and phase not in LOCKING_PHASES:
                self.blocked_by = self._blocked_report = None
                await trio.sleep(0.25)
                continue
            await trio.sleep(WATCH_INTERVAL if self._holding else 0.25)
            try:
                await self._check_locks(str(phase))
            except Exception as error:  # an observer never breaks the migration it watches
                log.info("migration %d: cannot watch the table's locks: %s", self.request_id, error)
                await trio.sleep(1)

    async def _check_locks(self, phase: str) -> None:
        waits = await blockers.migrator_waits(self.db, self.service_user, self.table, REPORT_AFTER)
        if not waits:
            self.blocked_by = self._blocked_report = None
            return
        report = await self._report()
        if report is None:
            return
        if self._blocked_report is None or _who(self._blocked_report) != _who(report):
            during = "cutover" if self._holding else "migration"
            log.warning("migration %d: %s blocked: %s", self.request_id, during, report.text())
            self.emit(f"{during}.blocked", phase=phase, statement=str(waits[0].get("INFO") or "")[:200],
                      blockers=report.text(), sessions=[_compact(row) for row in report.rows[:10]])
        self._blocked_report = report
        self.blocked_by = report.text()
        if self._holding:
            self._attempt_report = report
        await self._maybe_kill(report)

    async def _report(self) -> Report | None:
        try:
            sessions: list[ClientSession] = []
            if self.local_sessions is not None:
                sessions += self.local_sessions([self.key])
            sessions += await published_sessions(self.db, self.state_schema, exclude=self.leader
                                                 if self.local_sessions is not None else None)
            report = await blockers.collect(self.db, self.schema, self.table, service_user=self.service_user,
                                            sessions=sessions)
        except Exception as error:
            log.warning("migration %d: blocker report failed: %s", self.request_id, error)
            return None
        self.last_report = report
        return report

    async def _maybe_kill(self, report: Report) -> None:
        if self.kill_blockers_after is None:
            return
        now = trio.current_time()
        # Never the service account's own connections; never a guess (may_hold).
        certain = [row for row in report.rows if row["role"] == "holding" and not row["migrator"]
                   and row.get("processlist_id") is not None and row.get("server_user") != self.service_user]
        current = {int(row["processlist_id"]) for row in certain}
        for process_id in list(self._blocked_since):
            if process_id not in current:
                del self._blocked_since[process_id]
        for row in certain:
            process_id = int(row["processlist_id"])
            since = self._blocked_since.setdefault(process_id, now)
            age = row.get("transaction_seconds") if row.get("transaction_seconds") is not None else (
                row.get("seconds") if row.get("command") not in (None, "Sleep") else None)
            if age is not None:  # a newer transaction on the same connection starts the clock again
                since = self._blocked_since[process_id] = max(since, now - float(age))
            if now - since < self.kill_blockers_after:
                continue
            error = await blockers.kill_connection(self.db, process_id)
            del self._blocked_since[process_id]
            log.warning("migration %d: killed connection %d that blocked the cut-over for %.1fs%s",
                        self.request_id, process_id, now - since, f" (failed: {error})" if error else "")
            self.emit("cutover.blocker_killed", processlist_id=process_id, blocked_seconds=round(now - since, 3),
                      error=error, session=_compact(row))


def _who(report: Report) -> set[tuple[str, Any]]:
    return {(row["role"], row.get("processlist_id")) for row in report.rows}


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if value is not None and key != "table"}
