"""Many sidecars, one cut-over: coordination through the database.

Every sidecar registers in ``_tidegate.sidecars`` and heartbeats there.  A
migration leader that wants to cut over writes a row in
``_tidegate.cutovers`` (phase ``announce`` → ``hold`` with a new epoch →
``release``); every sidecar polls that table (every second normally, every
few milliseconds while a cut-over is announced), drains and holds the table
through its local gate, and writes its answer to ``_tidegate.hold_acks``.
The leader proceeds only when every live sidecar acknowledged the hold
within the deadline; otherwise it releases and retries later.  Every local
hold has its own timeout, so a dead leader never wedges an application.

While a cut-over is announced, each sidecar also publishes a compact list of
its sessions that are in a transaction (``_tidegate.sessions``: at most 200,
oldest first, with the client behind each backend connection), so the
leader's blocker report (``proxy.blockers``) can name the client behind a
database session that came through any sidecar.

Routing rules can be fleet-wide too (``FleetRules``): ``APPLY RULES TO FLEET``
on any admin port stores the whole validated rule set as one JSON document
with a new version in ``_tidegate.routing_rules``; every sidecar reads the
newest version number once a heartbeat interval and, when it changed, loads
that document as its live rules, or refuses it (keeping its rules) when it
cannot, and reports what it runs in ``_tidegate.sidecar_rules``.

No extra infrastructure: the primary is the coordination point.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from proxy.backends import (
    BackendConnection,
    BackendError,
    BackendUnavailable,
    Credentials,
    Endpoint,
    QueryResult,
    connect,
)
from proxy.events import NULL_EVENTS, EventSink
from proxy.gate import Gate
from proxy.netio import ConnectionClosed
from proxy.router import Router, fleet_version_changed
from proxy.routing import (
    RuleError,
    RuleSet,
    RuleSpec,
    compile_rules,
    decode_rules,
    encode_rules,
    spec_row,
)

if TYPE_CHECKING:
    from proxy.blockers import ClientSession

#: this sidecar's sessions, with which of the given tables their transaction touched
SessionSource = Callable[[Iterable[str]], "list[ClientSession]"]

log = logging.getLogger("tidegate.fleet")

LIVE_SECONDS = 3.0
SCHEMA_SQL = (
    "CREATE TABLE IF NOT EXISTS {s}.sidecars ("
    " id VARCHAR(64) PRIMARY KEY, host VARCHAR(255) NOT NULL, pid INT NOT NULL,"
    " listen VARCHAR(255) NOT NULL, started_at DATETIME(6) NOT NULL,"
    " heartbeat_at DATETIME(6) NOT NULL, holding VARCHAR(255) NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS {s}.cutovers ("
    " table_key VARCHAR(130) PRIMARY KEY, epoch BIGINT NOT NULL, phase VARCHAR(16) NOT NULL,"
    " drain_timeout DOUBLE NOT NULL, hold_timeout DOUBLE NOT NULL, leader VARCHAR(64) NOT NULL,"
    " updated_at DATETIME(6) NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS {s}.hold_acks ("
    " table_key VARCHAR(130) NOT NULL, epoch BIGINT NOT NULL, sidecar VARCHAR(64) NOT NULL,"
    " result VARCHAR(16) NOT NULL, detail TEXT NULL, at DATETIME(6) NOT NULL,"
    " PRIMARY KEY (table_key, epoch, sidecar)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS {s}.sessions ("
    " sidecar VARCHAR(64) NOT NULL, session_id BIGINT NOT NULL, backend_id BIGINT NULL,"
    " `user` VARCHAR(255) NOT NULL, client VARCHAR(255) NOT NULL, db VARCHAR(64) NULL,"
    " transaction_seconds DOUBLE NULL, statement TEXT NULL, tags TEXT NULL, touched TEXT NULL,"
    " snapshot BIGINT NOT NULL, at DATETIME(6) NOT NULL,"
    " PRIMARY KEY (sidecar, session_id), KEY backend (backend_id)) ENGINE=InnoDB",
    # One row per published rule set: the whole set in one document, so a
    # version is written (and read) in one statement, never half of it.
    "CREATE TABLE IF NOT EXISTS {s}.routing_rules ("
    " version BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, published_by VARCHAR(64) NOT NULL,"
    " published_at DATETIME(6) NOT NULL, note VARCHAR(255) NULL, rule_count INT NOT NULL,"
    " document MEDIUMTEXT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS {s}.sidecar_rules ("
    " sidecar VARCHAR(64) PRIMARY KEY, version BIGINT NULL, source VARCHAR(16) NOT NULL,"
    " state VARCHAR(16) NOT NULL, latest BIGINT NULL, detail TEXT NULL, backends TEXT NULL,"
    " updated_at DATETIME(6) NOT NULL) ENGINE=InnoDB",
)


def literal(value: Any) -> str:
    """An SQL literal that is safe whatever the sql_mode (hex for strings)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, bytes):
        return f"X'{value.hex()}'" if value else "''"
    text = str(value)
    return f"_utf8mb4 X'{text.encode('utf-8').hex()}'" if text else "''"


def identifier(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class ServiceDatabase:
    """One service-account connection with reconnect; the proxy's own async client."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.credentials = credentials
        self.timeout = timeout
        self._connection: BackendConnection | None = None
        self._lock = trio.Lock()

    async def _connect(self) -> BackendConnection:
        if self._connection is None or self._connection.closed:
            self._connection = await connect(self.endpoint, self.credentials, timeout=self.timeout)
        return self._connection

    async def query(self, sql: str) -> QueryResult:
        async with self._lock:
            for attempt in (1, 2):
                connection = await self._connect()
                try:
                    with trio.fail_after(self.timeout * 2):
                        return await connection.query(sql)
                except (BackendUnavailable, ConnectionClosed, trio.TooSlowError, OSError):
                    await connection.aclose(polite=False)
                    self._connection = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.aclose()
            self._connection = None


@dataclass
class LocalHold:
    table_key: str
    epoch: int
    cancel: trio.CancelScope
    done: trio.Event


class Fleet:
    """This sidecar's membership: heartbeat, and answering cut-over holds."""

    def __init__(
        self,
        db: ServiceDatabase,
        gate: Gate,
        *,
        schema: str = "_tidegate",
        sidecar_id: str | None = None,
        listen: str = "",
        heartbeat_interval: float = 1.0,
        slow_poll: float = 0.5,
        fast_poll: float = 0.005,
        sessions: SessionSource | None = None,
        publish_interval: float = 2.0,
    ) -> None:
        self.db = db
        self.gate = gate
        self.schema = identifier(schema)
        self.id = sidecar_id or f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.listen = listen
        self.heartbeat_interval = heartbeat_interval
        self.slow_poll = slow_poll
        self.fast_poll = fast_poll
        self._handled: dict[str, int] = {}
        self._holds: dict[str, LocalHold] = {}
        self._nursery: trio.Nursery | None = None
        self.ready = trio.Event()
        self.last_error: str | None = None
        #: this sidecar's sessions for blocker reports (None: publish nothing)
        self.sessions = sessions
        self.publish_interval = publish_interval
        self.events: EventSink = NULL_EVENTS
        #: tables with a cut-over row now (announced, holding or between attempts)
        self._cutovers: set[str] = set()
        self._publish_wanted = trio.Event()
        self._publish_lock = trio.Lock()
        self._published = False
        #: fleet-wide routing rules (None: this sidecar neither follows nor publishes them)
        self.rules: FleetRules | None = None

    async def ensure_schema(self) -> None:
        await self.db.query(f"CREATE DATABASE IF NOT EXISTS {self.schema}")
        for statement in SCHEMA_SQL:
            await self.db.query(statement.format(s=self.schema))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                try:
                    await self.ensure_schema()
                    await self._register()
                    break
                except (BackendError, BackendUnavailable, ConnectionClosed, OSError, trio.TooSlowError) as error:
                    self.last_error = str(error)
                    log.warning("fleet: cannot register in %s yet: %s", self.schema, error)
                    await trio.sleep(2)
            self.ready.set()
            nursery.start_soon(self._heartbeat)
            if self.rules is not None:
                nursery.start_soon(self.rules.run)
            if self.sessions is not None:
                nursery.start_soon(self._publisher)
            await self._poll_cutovers()

    async def _register(self) -> None:
        await self.db.query(
            f"REPLACE INTO {self.schema}.sidecars (id, host, pid, listen, started_at, heartbeat_at) VALUES "
            f"({literal(self.id)}, {literal(socket.gethostname())}, {os.getpid()}, {literal(self.listen)}, "
            "NOW(6), NOW(6))"
        )

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            holding = ",".join(sorted(self._holds)) or None
            try:
                result = await self.db.query(
                    f"UPDATE {self.schema}.sidecars SET heartbeat_at = NOW(6), holding = {literal(holding)} "
                    f"WHERE id = {literal(self.id)}"
                )
                if result.ok is not None and result.ok.affected_rows == 0:
                    await self._register()  # someone cleaned us up: come back
                self.last_error = None
            except Exception as error:  # keep heartbeating through outages
                self.last_error = str(error)
                log.warning("fleet heartbeat failed: %s", error)

    async def deregister(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.db.query(f"DELETE FROM {self.schema}.sidecars WHERE id = {literal(self.id)}")
                if self.rules is not None:
                    await self.db.query(f"DELETE FROM {self.schema}.sidecar_rules WHERE sidecar = {literal(self.id)}")
                if self._published:
                    await self.db.query(f"DELETE FROM {self.schema}.sessions WHERE sidecar = {literal(self.id)}")
            except Exception as error:
                log.info("fleet: could not deregister: %s", error)

    # -- sessions snapshot (for blocker reports) ------------------------------

    async def _publisher(self) -> None:
        """Publish while a cut-over row exists: at once when one appears, then every few seconds."""
        while True:
            with trio.move_on_after(self.publish_interval if self._cutovers else math.inf):
                await self._publish_wanted.wait()
            self._publish_wanted = trio.Event()
            try:
                if self._cutovers:
                    await self.publish_sessions(sorted(self._cutovers))
                elif self._published:
                    async with self._publish_lock:
                        await self.db.query(f"DELETE FROM {self.schema}.sessions WHERE sidecar = {literal(self.id)}")
                        self._published = False
            except Exception as error:  # best effort: a report without our clients is still a report
                log.warning("fleet: could not publish sessions: %s", error)

    async def publish_sessions(self, tables: Iterable[str]) -> list[ClientSession]:
        """Replace this sidecar's rows in ``sessions`` with its sessions now."""
        if self.sessions is None:
            return []
        async with self._publish_lock:
            sessions = self.sessions(tables)
            snapshot = time.time_ns()
            if sessions:
                values = ", ".join(
                    f"({literal(self.id)}, {s.session_id}, {literal(s.backend_id)}, {literal(s.user[:255])}, "
                    f"{literal(s.client[:255])}, {literal((s.schema or '')[:64] or None)}, "
                    f"{literal(s.transaction_seconds)}, {literal((s.statement or '')[:500] or None)}, "
                    f"{literal(s.tags or None)}, {literal(','.join(s.touched) or None)}, {snapshot}, NOW(6))"
                    for s in sessions
                )
                await self.db.query(
                    f"REPLACE INTO {self.schema}.sessions (sidecar, session_id, backend_id, `user`, client, db, "
                    f"transaction_seconds, statement, tags, touched, snapshot, at) VALUES {values}"
                )
            await self.db.query(
                f"DELETE FROM {self.schema}.sessions WHERE sidecar = {literal(self.id)} AND snapshot <> {snapshot}"
            )
            self._published = True
            return sessions

    async def _poll_cutovers(self) -> None:
        while True:
            fast = False
            try:
                result = await self.db.query(
                    f"SELECT table_key, epoch, phase, drain_timeout, hold_timeout FROM {self.schema}.cutovers"
                )
                rows = result.text_rows()
                seen = set()
                for key, epoch_text, phase, drain, hold in rows:
                    assert key is not None and epoch_text is not None
                    epoch = int(epoch_text)
                    seen.add(key)
                    if key not in self._cutovers:
                        self._cutovers.add(key)
                        self._publish_wanted.set()  # a cut-over is announced: say who is in a transaction
                    if phase in ("announce", "hold"):
                        fast = True
                    if phase == "hold" and self._handled.get(key, -1) < epoch:
                        self._handled[key] = epoch
                        self._start_hold(key, epoch, float(drain or 1), float(hold or 3))
                    elif phase != "hold":
                        self._end_hold(key)
                for key in list(self._holds):
                    if key not in seen:
                        self._end_hold(key)
                if self._cutovers - seen:
                    self._cutovers &= seen
                    self._publish_wanted.set()
                self.last_error = None
            except Exception as error:
                self.last_error = str(error)
                log.warning("fleet: polling cut-overs failed: %s", error)
                await trio.sleep(self.slow_poll)
                continue
            await trio.sleep(self.fast_poll if fast or self._holds else self.slow_poll)

    def _start_hold(self, key: str, epoch: int, drain: float, hold_timeout: float) -> None:
        previous = self._holds.get(key)
        self._end_hold(key)
        assert self._nursery is not None
        scope = trio.CancelScope()
        hold = LocalHold(key, epoch, scope, trio.Event())
        self._holds[key] = hold
        self._nursery.start_soon(
            self._hold, hold, drain, hold_timeout, previous.done if previous else None
        )

    def _end_hold(self, key: str) -> None:
        hold = self._holds.pop(key, None)
        if hold is not None:
            hold.cancel.cancel()

    async def _hold(self, hold: LocalHold, drain: float, hold_timeout: float, previous: trio.Event | None) -> None:
        key, epoch, scope = hold.table_key, hold.epoch, hold.cancel
        schema, _, table = key.partition(".")
        held = False
        try:
            with scope:
                if previous is not None:
                    await previous.wait()  # the earlier epoch's hold must be gone first
                try:
                    held = await self.gate.hold(schema, table, drain_timeout=drain, hold_timeout=hold_timeout)
                    detail = "" if held else await self._refusal_detail(key)
                except RuntimeError as error:  # e.g. already held: answer, never crash
                    detail = str(error)
                await self._ack(key, epoch, "held" if held else "refused", detail)
                self.events.emit("cutover.ack", table=key, epoch=epoch, result="held" if held else "refused",
                                 detail=detail or None)
                if held:
                    await trio.sleep_forever()  # until release (cancel) or the gate's own expiry
        finally:
            with trio.CancelScope(shield=True):
                if held:
                    await self.gate.release(schema, table)
                hold.done.set()
            if self._holds.get(key) is hold:
                del self._holds[key]

    async def _refusal_detail(self, key: str) -> str:
        """Why the drain gave up, naming the client behind each blocking session.

        Publishes the sessions snapshot first (with what each transaction
        touched), so the leader's report finds the blockers' backend ids.
        """
        if not self.gate.history:
            return ""
        last = self.gate.history[-1]
        reasons = [str(reason) for reason in last.get("blockers", []) or []]  # type: ignore[attr-defined]
        blocking = [int(i) for i in last.get("blocking_sessions", []) or []]  # type: ignore[attr-defined]
        if self.sessions is None or not blocking:
            return "; ".join(reasons)
        try:
            # bounded well inside the leader's ack margin (0.5 s after the drain timeout)
            with trio.move_on_after(0.25):
                sessions = {s.session_id: s for s in await self.publish_sessions(sorted(self._cutovers | {key}))}
                from proxy.blockers import describe_client

                described = []
                for session_id, reason in zip(blocking, reasons, strict=False):
                    session = sessions.get(session_id)
                    why = reason.split(": ", 1)[-1]
                    described.append(f"{describe_client(session)}: {why}" if session else reason)
                return "; ".join(described)
        except Exception as error:
            log.warning("fleet: could not describe the drain's blockers: %s", error)
        return "; ".join(reasons)

    async def _ack(self, key: str, epoch: int, result: str, detail: str) -> None:
        try:
            await self.db.query(
                f"REPLACE INTO {self.schema}.hold_acks (table_key, epoch, sidecar, result, detail, at) VALUES "
                f"({literal(key)}, {epoch}, {literal(self.id)}, {literal(result)}, "
                f"{literal(detail[:2000] or None)}, NOW(6))"
            )
        except Exception as error:  # no ack: the leader gives up on this epoch
            log.warning("fleet: could not acknowledge %s #%d: %s", key, epoch, error)


class FleetGate:
    """The leader's ``TrafficGate``: a hold is acknowledged by every live sidecar."""

    def __init__(self, db: ServiceDatabase, *, schema: str = "_tidegate", leader: str = "",
                 poll: float = 0.003, ack_margin: float = 0.5) -> None:
        self.db = db
        self.schema = identifier(schema)
        self.leader = leader
        self.poll = poll
        self.ack_margin = ack_margin
        self.epoch = 0
        self.last_refusal: str | None = None
        self.held_since: float | None = None

    async def live_sidecars(self) -> list[str]:
        result = await self.db.query(
            f"SELECT id FROM {self.schema}.sidecars "
            f"WHERE heartbeat_at > NOW(6) - INTERVAL {int(LIVE_SECONDS * 1000)} * 1000 MICROSECOND"
        )
        return [row[0] for row in result.text_rows() if row[0] is not None]

    async def announce(self, schema: str, table: str) -> None:
        key = f"{schema}.{table}".lower()
        await self.db.query(
            f"INSERT INTO {self.schema}.cutovers (table_key, epoch, phase, drain_timeout, hold_timeout, leader, updated_at) "
            f"VALUES ({literal(key)}, 0, 'announce', 0, 0, {literal(self.leader)}, NOW(6)) "
            "ON DUPLICATE KEY UPDATE phase = 'announce', updated_at = NOW(6)"
        )

    async def hold(self, schema: str, table: str, *, drain_timeout: float, hold_timeout: float) -> bool:
        key = f"{schema}.{table}".lower()
        expected = set(await self.live_sidecars())
        await self.db.query(
            f"INSERT INTO {self.schema}.cutovers (table_key, epoch, phase, drain_timeout, hold_timeout, leader, updated_at) "
            f"VALUES ({literal(key)}, 1, 'hold', {drain_timeout!r}, {hold_timeout!r}, {literal(self.leader)}, NOW(6)) "
            f"ON DUPLICATE KEY UPDATE epoch = epoch + 1, phase = 'hold', drain_timeout = {drain_timeout!r}, "
            f"hold_timeout = {hold_timeout!r}, leader = {literal(self.leader)}, updated_at = NOW(6)"
        )
        rows = (await self.db.query(
            f"SELECT epoch FROM {self.schema}.cutovers WHERE table_key = {literal(key)}"
        )).text_rows()
        self.epoch = int(rows[0][0] or 0)
        if not expected:
            self.held_since = trio.current_time()
            return True  # no sidecar in front of this table: the database lock does the work
        deadline = trio.current_time() + drain_timeout + self.ack_margin
        held: set[str] = set()
        while True:
            acks = (await self.db.query(
                f"SELECT sidecar, result, detail FROM {self.schema}.hold_acks "
                f"WHERE table_key = {literal(key)} AND epoch = {self.epoch}"
            )).text_rows()
            refused = [f"{sidecar}: {detail or 'drain timed out'}" for sidecar, result, detail in acks if result != "held"]
            if refused:
                self.last_refusal = "; ".join(refused)
                break
            held = {str(sidecar) for sidecar, result, _ in acks if result == "held"}
            if expected <= held:
                self.held_since = trio.current_time()
                return True
            if trio.current_time() >= deadline:
                # A sidecar that stopped heartbeating meanwhile no longer counts.
                missing = (expected & set(await self.live_sidecars())) - held
                if not missing:
                    self.held_since = trio.current_time()
                    return True
                self.last_refusal = "no acknowledgement from " + ", ".join(sorted(missing))
                break
            await trio.sleep(self.poll)
        await self._set_phase(key, "release")
        return False

    async def _set_phase(self, key: str, phase: str) -> None:
        with trio.CancelScope(shield=True):
            await self.db.query(
                f"UPDATE {self.schema}.cutovers SET phase = {literal(phase)}, updated_at = NOW(6) "
                f"WHERE table_key = {literal(key)}"
            )

    async def release(self, schema: str, table: str) -> None:
        await self._set_phase(f"{schema}.{table}".lower(), "release")
        self.held_since = None

    async def finish(self, schema: str, table: str) -> None:
        key = f"{schema}.{table}".lower()
        with trio.CancelScope(shield=True):
            await self.db.query(f"DELETE FROM {self.schema}.cutovers WHERE table_key = {literal(key)}")
            await self.db.query(f"DELETE FROM {self.schema}.hold_acks WHERE table_key = {literal(key)}")


# --------------------------------------------------------------------------- fleet-wide routing rules

#: published versions kept in routing_rules (older ones are pruned at publish)
KEEP_VERSIONS = 100
#: a sidecar rewrites its sidecar_rules row at least this often, even unchanged
REPORT_EVERY = 30.0


class FleetRules:
    """Publish a rule set to every sidecar, and follow the newest published one.

    ``Router`` owns the live rules and knows where they came from; this
    object does the state-schema I/O: the newest version number once every
    ``interval`` (one indexed row), the document only when that number
    changed, and this sidecar's report in ``sidecar_rules`` when it changed.
    One lock orders publishing and loading, so a slow poll never puts an
    older version back over one just published here.
    """

    def __init__(self, fleet: Fleet, router: Router, *, follow: bool = True, interval: float = 1.0) -> None:
        self.fleet = fleet
        self.db = fleet.db
        self.schema = fleet.schema
        self.router = router
        self.follow = follow
        self.interval = interval
        self.last_error: str | None = None
        self._lock = trio.Lock()
        self._reported: tuple[object, ...] | None = None
        self._reported_at = -math.inf
        router.fleet_following = follow
        self.backends = ",".join(f"{name}:{role}" for name, role in router.roles.items())

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
                self.last_error = None
            except Exception as error:  # keep polling through outages; the live rules stay as they are
                if str(error) != self.last_error:
                    log.warning("fleet rules: cannot read the published rules: %s", error)
                self.last_error = str(error)
            await trio.sleep(self.interval)

    async def poll_once(self) -> None:
        """Read the newest version; load it if it is new here (and followed); report."""
        async with self._lock:
            latest = await self._latest()
            self.router.fleet_latest = latest
            if self.follow and latest is not None and fleet_version_changed(latest, self.router.fleet_handled):
                try:
                    await self._load(latest)
                except RuleError:
                    pass  # refused: recorded on the router, reported below
        await self.report()

    async def _latest(self) -> int | None:
        rows = (await self.db.query(
            f"SELECT version FROM {self.schema}.routing_rules ORDER BY version DESC LIMIT 1"
        )).text_rows()
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def _document(self, version: int) -> dict[str, str | None] | None:
        rows = (await self.db.query(
            f"SELECT version, published_by, published_at, note, document FROM {self.schema}.routing_rules "
            f"WHERE version = {int(version)}"
        )).dicts()
        return rows[0] if rows else None

    async def _load(self, version: int) -> RuleSet | None:
        """Make ``version`` live, or refuse it (raises ``RuleError``; the live rules stay)."""
        row = await self._document(version)
        if row is None:
            return None  # pruned or the schema was reset meanwhile: the next poll sees what is there
        try:
            rules = self.router.apply_fleet(decode_rules(row["document"] or ""), version)
        except RuleError as error:
            reason = f"cannot load fleet rule version {version} (published by {row['published_by']}): {error}"
            self.router.refuse_fleet(version, reason)
            self.fleet.events.emit("rules.fleet_refused", version=version, detail=reason)
            raise RuleError(error.rule_id, error.field, f"{error.problem} (fleet rule version {version}; "
                            "this sidecar keeps its live rules)") from None
        self.fleet.events.emit("rules.fleet_applied", version=version, rules=len(rules.specs))
        return rules

    async def report(self, *, force: bool = False) -> None:
        """This sidecar's line in ``sidecar_rules`` (written when it changed, or every REPORT_EVERY)."""
        router = self.router
        summary = router.fleet_summary()
        detail: str | None = None
        if router.fleet_refused is not None:
            detail = router.fleet_refused[1]
        elif router.rules_source == "local" and router.fleet_latest is not None:
            detail = (f"a local APPLY RULES replaced fleet version {router.fleet_version}"
                      if router.fleet_version is not None else "rules applied locally, not from the fleet")
        elif not self.follow:
            detail = "routing.fleet_rules = false: this sidecar ignores the fleet's rules"
        status = (summary["live_version"], router.rules_source, summary["state"], router.fleet_latest, detail)
        now = trio.current_time()
        if not force and status == self._reported and now - self._reported_at < REPORT_EVERY:
            return
        live_version, source, state, latest, _ = status
        await self.db.query(
            f"REPLACE INTO {self.schema}.sidecar_rules (sidecar, version, source, state, latest, detail, backends, "
            f"updated_at) VALUES ({literal(self.fleet.id)}, {literal(live_version)}, {literal(source)}, "
            f"{literal(state)}, {literal(latest)}, {literal(detail[:2000] if detail else None)}, "
            f"{literal(self.backends)}, NOW(6))"
        )
        self._reported, self._reported_at = status, now

    # -- operator commands ------------------------------------------------------------------

    async def publish(self, note: str | None = None) -> tuple[int, RuleSet, list[str]]:
        """APPLY RULES TO FLEET: check the staged rules like APPLY RULES, store them as a new
        version, make them live here.  (version, live rules, warnings about sidecars that
        cannot load them).  Raises ``RuleError`` (bad rule) or ``ControlError`` (state schema
        unreachable); either way nothing changed, here or in the fleet.
        """
        from proxy.control import ControlError

        router = self.router
        async with self._lock:
            rules = router.check_staged()
            document = encode_rules(rules.specs)
            try:
                result = await self.db.query(
                    f"INSERT INTO {self.schema}.routing_rules (published_by, published_at, note, rule_count, "
                    f"document) VALUES ({literal(self.fleet.id)}, NOW(6), {literal(note[:255] if note else None)}, "
                    f"{len(rules.specs)}, {literal(document)})"
                )
            except (BackendError, BackendUnavailable, ConnectionClosed, OSError, trio.TooSlowError) as error:
                raise ControlError(f"rules not published, nothing changed: cannot write "
                                   f"{self.schema}.routing_rules: {error}") from None
            version = result.ok.last_insert_id if result.ok is not None else 0
            router.apply_fleet(rules.specs, version, rules=rules)
            router.fleet_latest = version
            log.info("fleet rule version %d published from this sidecar: %d rules", version, len(rules.specs))
            self.fleet.events.emit("rules.fleet_published", version=version, rules=len(rules.specs), note=note)
        warnings: list[str] = []
        try:
            await self.db.query(
                f"DELETE FROM {self.schema}.routing_rules WHERE version <= {version - KEEP_VERSIONS}"
            )
            warnings = await self._who_cannot_load(rules.specs, version)
            await self.report(force=True)
        except Exception as error:  # published and live already; the rest is a courtesy
            log.warning("fleet rules: after publishing version %d: %s", version, error)
        return version, rules, warnings

    async def _who_cannot_load(self, specs: tuple[RuleSpec, ...], version: int) -> list[str]:
        """Live sidecars whose backends (as they reported them) cannot take these rules."""
        rows = (await self.db.query(
            f"SELECT r.sidecar, r.backends FROM {self.schema}.sidecar_rules r "
            f"JOIN {self.schema}.sidecars s ON s.id = r.sidecar "
            f"WHERE s.heartbeat_at > NOW(6) - INTERVAL {int(LIVE_SECONDS * 1000)} * 1000 MICROSECOND "
            f"AND r.sidecar <> {literal(self.fleet.id)} ORDER BY r.sidecar"
        )).text_rows()
        warnings = []
        for sidecar, backends in rows:
            roles = dict(item.split(":", 1) for item in (backends or "").split(",") if ":" in item)
            if not roles:
                continue
            try:
                compile_rules(specs, roles)
            except RuleError as error:
                warnings.append(f"sidecar {sidecar} cannot load fleet rule version {version} and will keep "
                                f"its rules: {error}")
        return warnings

    async def load_latest(self) -> tuple[int, RuleSet]:
        """LOAD RULES FROM FLEET: the newest version live here now, even after a local
        APPLY RULES or a refusal.  Raises ``RuleError`` (cannot load: rules unchanged)."""
        from proxy.control import ControlError

        async with self._lock:
            latest = await self._latest()
            self.router.fleet_latest = latest
            if latest is None:
                raise ControlError("no rules were published to the fleet yet (APPLY RULES TO FLEET publishes)")
            rules = await self._load(latest)
            if rules is None:
                raise ControlError(f"fleet rule version {latest} disappeared while loading it; try again")
        await self.report(force=True)
        return latest, rules

    # -- admin tables ------------------------------------------------------------------------

    async def versions(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (await self.db.query(
            f"SELECT version, published_by, published_at, note, rule_count AS rules "
            f"FROM {self.schema}.routing_rules ORDER BY version DESC"
        )).dicts()
        router = self.router
        newest = int(rows[0]["version"]) if rows else None
        for row in rows:
            version = int(row["version"])
            row["version"] = version
            row["rules"] = int(row["rules"])
            row["latest"] = version == newest
            row["live_here"] = router.rules_source == "fleet" and router.fleet_version == version
        return rows

    async def published_rules(self) -> list[dict[str, Any]]:
        """The rules of the newest version, one row each."""
        from proxy.control import ControlError

        latest = await self._latest()
        row = None if latest is None else await self._document(latest)
        if row is None:
            return []
        try:
            specs = decode_rules(row["document"] or "")
        except RuleError as error:
            raise ControlError(f"fleet rule version {latest} cannot be read by this sidecar: {error}") from None
        head = {"version": latest, "published_by": row["published_by"], "published_at": row["published_at"],
                "note": row["note"]}
        return [{**head, **{k: v for k, v in spec_row(spec).items() if k != "note"}, "rule_note": spec.note or None}
                for spec in specs]

    async def sidecar_rows(self) -> list[dict[str, Any]]:
        """Every registered sidecar and the fleet rule version it runs."""
        latest = await self._latest()
        rows: list[dict[str, Any]] = (await self.db.query(
            f"SELECT s.id AS sidecar, s.listen, "
            f"TIMESTAMPDIFF(MICROSECOND, s.heartbeat_at, NOW(6)) / 1e6 AS heartbeat_age, "
            f"r.version, r.source, r.state, r.latest AS seen_version, r.detail, r.updated_at "
            f"FROM {self.schema}.sidecars s LEFT JOIN {self.schema}.sidecar_rules r ON r.sidecar = s.id "
            f"ORDER BY s.id"
        )).dicts()
        for row in rows:
            row["version"] = int(row["version"]) if row["version"] is not None else None
            row["seen_version"] = int(row["seen_version"]) if row["seen_version"] is not None else None
            row["fleet_version"] = latest
            row["converged"] = latest is not None and row["version"] == latest
            row["live"] = float(row["heartbeat_age"] or 1e9) < LIVE_SECONDS
            row["this_sidecar"] = row["sidecar"] == self.fleet.id
            del row["heartbeat_age"]
        return rows
