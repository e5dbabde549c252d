"""Routing at run time: live and staged rules, replica health, backpressure, mirroring.

The relay asks ``Proxy.routing`` (this object, or None while there is nothing
to decide: no rules, no read/write split, no backpressure) what to do with a
statement; the pure part of that answer comes from ``proxy.routing``.  This
module owns what changes over time:

* the **rules**: a live ``RuleSet`` and a staged copy that the admin port
  edits; ``apply()`` checks every staged rule and swaps the live set in one
  step, or refuses and leaves the live set as it was.  It also knows where
  the live set came from: the configuration file, a fleet-wide version
  (``proxy.fleet.FleetRules`` loads it with ``apply_fleet``) or a local
  ``APPLY RULES``, and so whether this sidecar runs the fleet's newest set;
* **replica health**: a probe loop reads each replica's applied GTID position
  and the primary's binlog position with the service account and estimates
  the lag from when the primary reached a position the replica has not
  applied yet (``LagEstimator``; no heartbeat writes), taking
  ``Seconds_Behind_Master`` into account when larger.  A replica over
  ``max_replica_lag``, stopped or unreachable gets no reads until it recovers;
* **backpressure**: while replica lag (or a running migration's binlog lag)
  is over its limit, writes wait up to ``max_wait`` for it to recover and are
  then refused with error 1637 and a retry-after hint;
* **mirroring**: fire-and-forget copies of statements to another backend,
  from a bounded queue that drops (and counts) when full.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from proxy.backends import (
    BackendConnection,
    BackendError,
    BackendUnavailable,
    Credentials,
    Endpoint,
    connect,
)
from proxy.classify import Classifier, Facts
from proxy.netio import ConnectionClosed
from proxy.protocol.wire import ProtocolError
from proxy.routing import (
    RuleError,
    RuleSet,
    RuleSpec,
    compile_rules,
    make_spec,
    session_effect,
    spec_row,
    spec_values,
)

if TYPE_CHECKING:
    from proxy.config import BackpressureConfig, RoutingConfig

log = logging.getLogger("tidegate.router")

#: errors that mean "this connection is gone or useless"
CONNECTION_ERRORS = (BackendUnavailable, ConnectionClosed, ProtocolError, OSError, trio.TooSlowError)


# --------------------------------------------------------------------------- GTID lag


def parse_gtid(text: str) -> dict[int, int]:
    """MariaDB ``domain-server-seqno[,…]`` → {domain: seqno}; raises ValueError."""
    positions: dict[int, int] = {}
    for item in text.replace("\n", "").split(","):
        item = item.strip()
        if not item:
            continue
        domain, server, seqno = item.split("-")
        int(server)
        positions[int(domain)] = int(seqno)
    return positions


def gtid_contains(applied: Mapping[int, int], wanted: Mapping[int, int]) -> bool:
    return all(applied.get(domain, -1) >= seqno for domain, seqno in wanted.items())


class LagEstimator:
    """Lag = how long ago the primary reached the oldest position the replica lacks.

    ``observe`` takes the primary's position first, then the replica's, both
    just read.  Accurate to the probe interval; needs no writes.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._pending: deque[tuple[float, dict[int, int]]] = deque(maxlen=limit)

    def observe(self, now: float, primary: Mapping[int, int], replica: Mapping[int, int]) -> float:
        pending = self._pending
        if not pending or pending[-1][1] != primary:
            pending.append((now, dict(primary)))
        while pending and gtid_contains(replica, pending[0][1]):
            pending.popleft()
        return now - pending[0][0] if pending else 0.0

    def reset(self) -> None:
        self._pending.clear()


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class ReplicaStatus:
    io_running: bool
    sql_running: bool
    seconds_behind: float | None
    gtid_position: str | None
    last_error: str | None = None


class Prober(Protocol):
    """How the monitor reads positions (SQL in production, scripted in tests)."""

    async def primary_position(self) -> str | None: ...

    async def replica_status(self, endpoint: Endpoint) -> ReplicaStatus: ...

    async def aclose(self) -> None: ...


class SqlProber:
    """Reads positions with the proxy's own client; one connection per server, kept open."""

    def __init__(self, primary: Endpoint, credentials: Mapping[str, Credentials], timeout: float) -> None:
        self._primary = primary
        self._credentials = credentials
        self._timeout = timeout
        self._connections: dict[str, BackendConnection] = {}

    async def _connection(self, endpoint: Endpoint) -> BackendConnection:
        connection = self._connections.get(endpoint.name)
        if connection is not None and not connection.closed:
            return connection
        credentials = self._credentials.get(endpoint.name)
        if credentials is None:
            raise BackendUnavailable(f"no account to probe {endpoint.name} with")
        connection = await connect(endpoint, credentials, timeout=self._timeout,
                                   attributes={"program_name": "tidegate-probe"})
        self._connections[endpoint.name] = connection
        return connection

    async def _query(self, endpoint: Endpoint, sql: str) -> list[dict[str, str | None]]:
        connection = await self._connection(endpoint)
        try:
            with trio.fail_after(self._timeout):
                return (await connection.query(sql)).dicts()
        except BaseException:
            self._connections.pop(endpoint.name, None)
            with trio.CancelScope(shield=True):
                await connection.aclose(polite=False)
            raise

    async def primary_position(self) -> str | None:
        try:
            rows = await self._query(self._primary, "SELECT @@gtid_binlog_pos AS position")
        except BackendError:
            return None  # not MariaDB: Seconds_Behind_Master only
        return rows[0]["position"] if rows else None

    async def replica_status(self, endpoint: Endpoint) -> ReplicaStatus:
        rows = await self._query(endpoint, "SHOW SLAVE STATUS")
        if not rows:
            return ReplicaStatus(False, False, None, None, "not replicating (SHOW SLAVE STATUS is empty)")
        row = rows[0]
        position = row.get("Gtid_Slave_Pos")  # SHOW ALL SLAVES STATUS has it; 10.x SHOW SLAVE STATUS not
        if position is None:
            try:
                position = (await self._query(endpoint, "SELECT @@gtid_slave_pos AS position"))[0]["position"]
            except BackendError:
                position = None  # not MariaDB: Seconds_Behind_Master only
        behind = row.get("Seconds_Behind_Master")
        error = row.get("Last_SQL_Error") or row.get("Last_IO_Error") or None
        return ReplicaStatus(
            io_running=row.get("Slave_IO_Running") == "Yes",
            sql_running=row.get("Slave_SQL_Running") == "Yes",
            seconds_behind=float(behind) if behind not in (None, "") else None,
            gtid_position=position,
            last_error=error,
        )

    async def aclose(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await connection.aclose()


@dataclass
class ReplicaHealth:
    endpoint: Endpoint
    #: unknown (not probed yet), up, lagging, stopped or down
    state: str = "unknown"
    lag: float | None = None
    error: str | None = None
    probed_at: float | None = None
    io_running: bool | None = None
    sql_running: bool | None = None
    estimator: LagEstimator = field(default_factory=LagEstimator)

    @property
    def healthy(self) -> bool:
        return self.state == "up"


# --------------------------------------------------------------------------- backpressure


@dataclass(frozen=True)
class Rejection:
    reason: str  # replica_lag or migration_lag
    lag: float
    limit: float
    retry_after: float
    subject: str = ""  # the replica or the migrating table

    def message(self) -> str:
        what = "replica lag" if self.reason == "replica_lag" else f"migration lag on {self.subject}"
        return (
            f"tidegate: too many requests: {what} {self.lag:.1f} s > {self.limit:.1f} s; "
            f"retry after {round(self.retry_after * 1000)} ms"
        )


MigrationLags = Callable[[], Iterable[tuple[str, float]]]


class RouterMetrics(Protocol):
    def rejection(self, reason: str, tag: str) -> None: ...
    def replica_lag_seconds(self, backend: str, seconds: float) -> None: ...


# --------------------------------------------------------------------------- mirroring


@dataclass(frozen=True)
class MirrorItem:
    backend: str
    credentials: Credentials
    schema: str | None
    sql: str


class Mirror:
    """Fire-and-forget copies of statements; never blocks or fails a client."""

    def __init__(self, endpoints: Mapping[str, Endpoint], queue_size: int, timeout: float, workers: int = 2) -> None:
        self._endpoints = endpoints
        self._send, self._receive = trio.open_memory_channel[MirrorItem](queue_size)
        self._timeout = timeout
        self._workers = workers
        self.sent = 0
        self.dropped = 0
        self.errors = 0

    def submit(self, item: MirrorItem) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        connections: dict[tuple[str, str], tuple[BackendConnection, list[str | None]]] = {}
        try:
            async for item in self._receive:
                key = (item.backend, item.credentials.user)
                try:
                    with trio.fail_after(self._timeout):
                        entry = connections.get(key)
                        if entry is None or entry[0].closed:
                            connection = await connect(
                                self._endpoints[item.backend], item.credentials, database=item.schema,
                                timeout=self._timeout, attributes={"program_name": "tidegate-mirror"},
                            )
                            entry = connections[key] = (connection, [item.schema])
                        connection, schema = entry
                        if item.schema is not None and schema[0] != item.schema:
                            await connection.query(f"USE `{item.schema.replace('`', '``')}`")
                            schema[0] = item.schema
                        await connection.query(item.sql)
                    self.sent += 1
                except BackendError as error:
                    self.errors += 1
                    log.debug("mirror to %s: %s", item.backend, error)
                except CONNECTION_ERRORS as error:
                    self.errors += 1
                    log.info("mirror to %s: %s", item.backend, error)
                    broken = connections.pop(key, None)
                    if broken is not None:
                        with trio.CancelScope(shield=True):
                            await broken[0].aclose(polite=False)
        finally:
            with trio.CancelScope(shield=True):
                for connection, _ in connections.values():
                    await connection.aclose(polite=False)


# --------------------------------------------------------------------------- fleet rule state

#: where a sidecar's live rules stand against the fleet's newest published set
FLEET_STATES = ("off", "ignoring", "none", "converged", "behind", "refused", "diverged")


def fleet_rules_state(
    *, following: bool | None, source: str, live_version: int | None, latest: int | None, refused: int | None,
) -> str:
    """One word for admin tables, ``/status`` and metrics (see ``FLEET_STATES``).

    off: no state schema to read (no service account, migrations disabled);
    ignoring: ``routing.fleet_rules = false``; none: nothing published yet;
    converged: the newest version is live; refused: this sidecar cannot load
    the newest version and keeps its rules; diverged: a local APPLY RULES
    replaced the fleet's rules; behind: not loaded yet (the next poll does).
    """
    if following is None:
        return "off"
    if not following:
        return "ignoring"
    if latest is None:
        return "none"
    if source == "fleet" and live_version == latest:
        return "converged"
    if refused == latest:
        return "refused"
    if source == "local":
        return "diverged"
    return "behind"


def fleet_version_changed(latest: int | None, handled: int | None) -> bool:
    """Whether the newest published version is one this sidecar has not loaded or refused yet.

    "Differs", not "is greater": a state schema that was dropped and created
    again numbers its versions from 1, and its newest set must still win.
    Nothing published (None) changes nothing: the live rules stay.
    """
    return latest is not None and latest != handled


# --------------------------------------------------------------------------- the router


class Router:
    """Everything routing needs at run time; see the module docstring."""

    def __init__(
        self,
        routing: RoutingConfig,
        backpressure: BackpressureConfig,
        endpoints: Iterable[Endpoint],
        rules: Iterable[RuleSpec] = (),
        *,
        prober: Prober | None = None,
        classifier: Classifier | None = None,
        metrics: RouterMetrics | None = None,
        migration_lags: MigrationLags | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.settings = routing
        self.backpressure = backpressure
        self.endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self.roles = {name: endpoint.role for name, endpoint in self.endpoints.items()}
        self.primary_name = next(name for name, role in self.roles.items() if role == "primary")
        self.replicas = {
            name: ReplicaHealth(endpoint) for name, endpoint in self.endpoints.items() if endpoint.role == "replica"
        }
        self.rules: RuleSet = compile_rules(rules, self.roles)
        self.staged: dict[int, RuleSpec] = {spec.id: spec for spec in self.rules.specs}
        #: where the live rules came from: config (the file), fleet (a published version) or local
        self.rules_source = "config"
        #: the fleet version that is live (source fleet), or that a local APPLY RULES replaced
        self.fleet_version: int | None = None
        #: None: fleet rules are not read here (no state schema); False: ignored by configuration
        self.fleet_following: bool | None = None
        #: newest version seen in the state schema; the last one loaded or refused; a refusal
        self.fleet_latest: int | None = None
        self.fleet_handled: int | None = None
        self.fleet_refused: tuple[int, str] | None = None
        self.classifier = classifier or Classifier()
        self.split = routing.read_write_split and bool(self.replicas)
        self.read_your_writes = routing.read_your_writes
        self._prober = prober
        self._metrics = metrics
        self._migration_lags = migration_lags
        self._healthy: list[str] = []
        self._round_robin = 0
        self._changed = trio.Event()
        self._proxy: Any = None
        #: statements sent, by backend name (hot path: plain ints)
        self.routed: dict[str, int] = dict.fromkeys(self.endpoints, 0)
        self.rejected: dict[tuple[str, str], int] = {}
        self.replica_lag: float | None = None
        self.migration_lag: list[tuple[str, float]] = []
        self.backpressure_on = backpressure.max_replica_lag is not None or backpressure.max_migration_lag is not None
        #: some lag is over the lowest limit of some priority class (writes must check)
        self.pressure_possible = False
        self._effects: dict[bytes, str | None] = {}
        self._protected = frozenset(name.lower() for name in backpressure.tables)
        self._factors = dict(backpressure.priorities)
        self.mirror = Mirror(
            {name: e for name, e in self.endpoints.items() if e.role != "primary"},
            routing.mirror_queue, connect_timeout,
        )

    # -- wiring --------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the relay must consult the router at all."""
        return self.split or self.backpressure_on or not self.rules.empty

    def attach(self, proxy: Any) -> None:
        """``proxy.routing`` is this router while it is active, else None (one attribute check)."""
        self._proxy = proxy
        self._publish()

    def _publish(self) -> None:
        if self._proxy is not None:
            self._proxy.routing = self if self.active else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.mirror.run)
            if self.replicas or self._migration_lags is not None:
                await nursery.start(self._monitor)
            task_status.started()

    # -- replica health --------------------------------------------------------------

    async def _monitor(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        interval = self.settings.lag_probe_interval
        started = False
        try:
            while True:
                await self.probe_once()
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(interval)
        finally:
            if self._prober is not None:
                with trio.CancelScope(shield=True):
                    await self._prober.aclose()

    async def probe_once(self) -> None:
        """One round: every replica's state and lag, the migrations' lag; wakes waiters."""
        prober = self._prober
        if prober is not None and self.replicas:
            primary_position: str | None = None
            primary_error: str | None = None
            try:
                primary_position = await prober.primary_position()
            except (BackendError, *CONNECTION_ERRORS) as error:
                primary_error = f"cannot read the primary's position: {error}"
            now = trio.current_time()

            async def probe(health: ReplicaHealth) -> None:
                try:
                    status = await prober.replica_status(health.endpoint)
                except (BackendError, *CONNECTION_ERRORS) as error:
                    self._mark(health, "down", None, str(error), now)
                    return
                self._update(health, status, primary_position, primary_error, now)

            async with trio.open_nursery() as nursery:
                for health in self.replicas.values():
                    nursery.start_soon(probe, health)
        lags = [h.lag for h in self.replicas.values() if h.lag is not None and h.state != "down"]
        self.replica_lag = max(lags) if lags else None
        if self._migration_lags is not None:
            try:
                self.migration_lag = [(table.lower(), lag) for table, lag in self._migration_lags()]
            except Exception as error:  # a report from another component; never fatal here
                log.warning("cannot read migration lag: %s", error)
        self._healthy = [name for name, health in self.replicas.items() if health.healthy]
        self.pressure_possible = self._pressure_possible()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _update(
        self, health: ReplicaHealth, status: ReplicaStatus, primary: str | None, primary_error: str | None,
        now: float,
    ) -> None:
        health.io_running, health.sql_running = status.io_running, status.sql_running
        lag: float | None = status.seconds_behind
        if primary is not None and status.gtid_position is not None:
            try:
                estimate = health.estimator.observe(now, parse_gtid(primary), parse_gtid(status.gtid_position))
                lag = max(estimate, lag or 0.0)
            except ValueError:
                pass
        elif primary_error is not None and lag is None:
            self._mark(health, "down", None, primary_error, now)
            return
        maximum = self.settings.max_replica_lag
        if not (status.io_running and status.sql_running):
            # Not applying (or not hearing from the primary): no reads, whatever the
            # lag says; a known lag still counts for backpressure.
            thread = "SQL" if not status.sql_running else "I/O"
            self._mark(health, "stopped", lag, status.last_error or f"replication {thread} thread stopped", now)
            return
        if lag is None:
            self._mark(health, "lagging", None, "lag unknown (Seconds_Behind_Master is NULL)", now)
            return
        state = "up" if lag <= maximum else "lagging"
        error = None if state == "up" else f"lag {lag:.1f} s > max_replica_lag {maximum:g} s"
        self._mark(health, state, lag, error, now)

    def _mark(self, health: ReplicaHealth, state: str, lag: float | None, error: str | None, now: float) -> None:
        if state != health.state:
            level = logging.INFO if state == "up" or health.state == "unknown" else logging.WARNING
            log.log(level, "replica %s: %s -> %s%s", health.endpoint.name, health.state, state,
                    f" ({error})" if error else "")
        if state == "down":
            health.estimator.reset()
        health.state, health.lag, health.error, health.probed_at = state, lag, error, now
        if self._metrics is not None:
            self._metrics.replica_lag_seconds(health.endpoint.name, math.nan if lag is None else lag)

    def replica_for(self, route: str | None, current: str | None) -> str | None:
        """A healthy replica for ``route`` (None/"replica": any; else a name); sticks to ``current``."""
        healthy = self._healthy
        if not healthy:
            return None
        if route is not None and route != "replica":
            return route if route in healthy else None
        if current is not None and current in healthy:
            return current
        self._round_robin += 1
        return healthy[self._round_robin % len(healthy)]

    # -- session state and mirroring (for the relay) ------------------------------------

    def session_effect(self, sql: bytes, facts: Facts) -> str | None:
        """Why this statement pins its session to the primary, if it does (cached)."""
        effects = self._effects
        try:
            return effects[sql]
        except KeyError:
            pass
        reason = session_effect(sql.decode("utf-8", "replace"), facts)
        if len(effects) >= 20_000:
            effects.clear()
        effects[sql] = reason
        return reason

    def mirror_statement(self, backend: str, credentials: Credentials, schema: str | None, sql: bytes) -> None:
        self.mirror.submit(MirrorItem(backend, credentials, schema, sql.decode("utf-8", "surrogateescape")))

    # -- backpressure ----------------------------------------------------------------

    def _pressure_possible(self) -> bool:
        settings = self.backpressure
        lowest = min([1.0, *self._factors.values()])
        if settings.max_replica_lag is not None and self.replica_lag is not None:
            if self.replica_lag > settings.max_replica_lag * lowest:
                return True
        if settings.max_migration_lag is not None:
            return any(lag > settings.max_migration_lag * lowest for _, lag in self.migration_lag)
        return False

    def priority_of(self, facts: Facts, attributes: Mapping[str, str]) -> str:
        tag = self.backpressure.priority_tag
        value = facts.tags.get(tag) or attributes.get(tag)
        return value if value in self._factors else "default"

    def pressure(self, tables: frozenset[str] | None, priority: str) -> Rejection | None:
        """The limit a write to ``tables`` would break now, if any."""
        settings = self.backpressure
        factor = self._factors.get(priority, 1.0)
        limit = settings.max_replica_lag
        lag = self.replica_lag
        if limit is not None and lag is not None and lag > limit * factor:
            if not self._protected or tables is None or not tables.isdisjoint(self._protected):
                return Rejection("replica_lag", lag, limit * factor, settings.retry_after)
        limit = settings.max_migration_lag
        if limit is not None:
            for table, migration_lag in self.migration_lag:
                if migration_lag > limit * factor and (
                    settings.migration_scope == "all" or tables is None or table in tables
                ):
                    return Rejection("migration_lag", migration_lag, limit * factor, settings.retry_after, table)
        return None

    async def admit_write(self, tables: frozenset[str] | None, priority: str) -> Rejection | None:
        """Wait (bounded) while a lag limit is exceeded; the rejection if it still is."""
        rejection = self.pressure(tables, priority)
        if rejection is None:
            return None
        with trio.move_on_after(self.backpressure.max_wait):
            while rejection is not None:
                await self._changed.wait()
                rejection = self.pressure(tables, priority)
        if rejection is not None:
            key = (rejection.reason, priority)
            self.rejected[key] = self.rejected.get(key, 0) + 1
            if self._metrics is not None:
                self._metrics.rejection(rejection.reason, priority)
        return rejection

    def summary(self) -> dict[str, object]:
        """For /status: what routing does now."""
        return {
            "active": self.active,
            "read_write_split": self.split,
            "rules_live": len(self.rules.specs),
            "rules_pending": self.pending,
            "rules_source": self.rules_source,
            "fleet_rules": self.fleet_summary(),
            "replicas": {
                name: {"state": health.state, "lag_seconds": health.lag, "error": health.error}
                for name, health in self.replicas.items()
            },
            "replica_lag_seconds": self.replica_lag,
            "backpressure_possible": self.pressure_possible,
        }

    # -- exported counters (proxy.metrics reads these at scrape time) --------------------

    @property
    def rule_hits(self) -> dict[int, int]:
        return dict(self.rules.hits)

    @property
    def mirror_counts(self) -> dict[str, int]:
        mirror = self.mirror
        return {"sent": mirror.sent, "dropped": mirror.dropped, "error": mirror.errors}

    @property
    def replica_states(self) -> dict[str, str]:
        return {name: health.state for name, health in self.replicas.items()}

    # -- rules: staged and live ---------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Staged rules differ from the live ones."""
        return self.staged != {spec.id: spec for spec in self.rules.specs}

    def stage_insert(self, values: Mapping[str, object]) -> RuleSpec:
        spec = make_spec(values)
        if spec.id in self.staged:
            raise RuleError(spec.id, "id", "a staged rule has this id already (UPDATE it or DELETE it first)")
        compile_rules([spec], self.roles)
        self.staged[spec.id] = spec
        return spec

    def stage_update(self, rule_id: int, changes: Mapping[str, object]) -> RuleSpec:
        old = self.staged.get(rule_id)
        if old is None:
            raise RuleError(rule_id, "id", f"no staged rule {rule_id}")
        values = spec_values(old)
        values.update(changes)
        spec = make_spec(values)
        compile_rules([spec], self.roles)
        if spec.id != rule_id:
            if spec.id in self.staged:
                raise RuleError(spec.id, "id", "a staged rule has this id already")
            del self.staged[rule_id]
        self.staged[spec.id] = spec
        return spec

    def stage_delete(self, rule_id: int) -> None:
        if self.staged.pop(rule_id, None) is None:
            raise RuleError(rule_id, "id", f"no staged rule {rule_id}")

    def check_staged(self) -> RuleSet:
        """The staged rules compiled, as APPLY RULES would make them live; raises ``RuleError``."""
        return compile_rules(self.staged.values(), self.roles)

    def apply(self) -> RuleSet:
        """Make the staged rules live in one step, or raise ``RuleError`` and change nothing.

        Local only: a sidecar that ran a fleet version now diverges from it
        (until the next published version, or LOAD RULES FROM FLEET).
        """
        rules = self.check_staged()
        self._install(rules)
        if self.rules_source == "fleet":
            log.warning("rules applied locally: %d live (%d active); this sidecar now diverges from fleet "
                        "rule version %s", len(rules.specs), len(rules), self.fleet_version)
        else:
            log.info("rules applied: %d live (%d active)", len(rules.specs), len(rules))
        self.rules_source = "local"
        return rules

    def apply_fleet(self, specs: Iterable[RuleSpec], version: int, *, rules: RuleSet | None = None) -> RuleSet:
        """Make a published version live (``rules``: already compiled from ``specs``).

        Raises ``RuleError`` and changes nothing when this sidecar cannot load
        it; the caller records that with ``refuse_fleet``.  Staged edits in
        progress are kept, on top of the new live set.
        """
        if rules is None:
            rules = compile_rules(specs, self.roles)
        previous = {spec.id: spec for spec in self.rules.specs}
        edits = {rule_id: spec for rule_id, spec in self.staged.items() if previous.get(rule_id) != spec}
        deleted = set(previous) - set(self.staged)
        self._install(rules)
        staged = {spec.id: spec for spec in rules.specs}
        staged.update(edits)
        for rule_id in deleted:
            staged.pop(rule_id, None)
        self.staged = staged
        if staged != {spec.id: spec for spec in rules.specs}:
            log.warning("fleet rule version %d: staged edits not applied yet are kept on top of it", version)
        self.rules_source, self.fleet_version = "fleet", version
        self.fleet_handled, self.fleet_refused = version, None
        self.fleet_latest = version if self.fleet_latest is None else max(self.fleet_latest, version)
        log.info("fleet rule version %d live: %d rules (%d active)", version, len(rules.specs), len(rules))
        return rules

    def refuse_fleet(self, version: int, reason: str) -> None:
        """This sidecar cannot load ``version``: it keeps its live rules and says why."""
        self.fleet_handled, self.fleet_refused = version, (version, reason)
        log.error("fleet rule version %d refused, keeping the live rules (%s, fleet version %s): %s",
                  version, self.rules_source, self.fleet_version, reason)

    def _install(self, rules: RuleSet) -> None:
        rules.carry_hits(self.rules)
        self.rules = rules
        self._publish()

    @property
    def fleet_state(self) -> str:
        return fleet_rules_state(
            following=self.fleet_following, source=self.rules_source,
            live_version=self.fleet_version if self.rules_source == "fleet" else None,
            latest=self.fleet_latest, refused=self.fleet_refused[0] if self.fleet_refused else None,
        )

    @property
    def fleet_rules_version(self) -> int:
        """The fleet version live here; 0 for rules from the configuration file or a local APPLY RULES."""
        return (self.fleet_version or 0) if self.rules_source == "fleet" else 0

    def fleet_summary(self) -> dict[str, object]:
        return {
            "state": self.fleet_state,
            "live_version": self.fleet_version if self.rules_source == "fleet" else None,
            "diverged_from": self.fleet_version if self.rules_source == "local" else None,
            "latest_version": self.fleet_latest,
            "refused_version": self.fleet_refused[0] if self.fleet_refused else None,
            "refused_because": self.fleet_refused[1] if self.fleet_refused else None,
        }

    def discard(self) -> None:
        self.staged = {spec.id: spec for spec in self.rules.specs}

    def rule_rows(self) -> list[dict[str, object]]:
        """Live rules (state "live", with hits), then staged changes not applied yet."""
        live = {spec.id: spec for spec in self.rules.specs}
        rows: list[dict[str, object]] = []
        for spec in self.rules.specs:
            staged = self.staged.get(spec.id)
            change = "" if staged == spec else (" (deleted in staging)" if staged is None else " (changed in staging)")
            rows.append({"state": "live", **spec_row(spec), "hits": self.rules.hits.get(spec.id, 0),
                         "pending": change.strip(" ()") or None})
        for rule_id, spec in sorted(self.staged.items()):
            if live.get(rule_id) != spec:
                rows.append({"state": "staged", **spec_row(spec), "hits": None,
                             "pending": "new, not applied" if rule_id not in live else "changed, not applied"})
        for rule_id in sorted(set(live) - set(self.staged)):
            rows.append({"state": "staged", **spec_row(live[rule_id]), "hits": None,
                         "pending": "deleted, not applied"})
        return rows
