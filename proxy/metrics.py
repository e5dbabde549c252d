"""Prometheus metrics of the proxy: one registry per :class:`Metrics`, cheap on the hot path.

Two kinds of state live here:

* Per-query state (queries by command and result, the latency histogram, bytes
  relayed) and client connection counts are plain Python ints and floats,
  turned into metric families only when ``/metrics`` is scraped.  The proxy
  runs its relay in one trio thread, so nothing needs a lock.  Measured on
  the 2-core dev machine (CPython 3.11): ``observe_query`` costs about
  0.25 µs and ``count_bytes`` about 0.1 µs, against about 3 µs for the same
  work through ``prometheus_client`` children (a ``Counter.inc`` takes a lock,
  ~0.8 µs; ``Histogram.observe`` takes three, ~2 µs).  The relay's budget is
  20 µs of CPU per query.  ``tests/proxy/test_metrics.py`` prints the cost.
* Rare events labelled by free text (rejections, backend connections, auth
  and protocol errors) use ``prometheus_client`` metrics with their labelled
  children cached in a dict, so a call is one dict lookup and one ``inc``.

``render()`` produces the Prometheus text format (0.0.4).  Only the trio
thread may call the methods or ``render()``.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

__all__ = ["COMMAND_NAMES", "DURATION_BUCKETS", "Metrics", "command_name"]

# Names of the MySQL command bytes 0x00..0x1f, as in the protocol's COM_* constants.
COMMAND_NAMES: tuple[str, ...] = (
    "sleep",  # 0x00
    "quit",  # 0x01
    "init_db",  # 0x02
    "query",  # 0x03
    "field_list",  # 0x04
    "create_db",  # 0x05
    "drop_db",  # 0x06
    "refresh",  # 0x07
    "shutdown",  # 0x08
    "statistics",  # 0x09
    "process_info",  # 0x0a
    "connect",  # 0x0b
    "process_kill",  # 0x0c
    "debug",  # 0x0d
    "ping",  # 0x0e
    "time",  # 0x0f
    "delayed_insert",  # 0x10
    "change_user",  # 0x11
    "binlog_dump",  # 0x12
    "table_dump",  # 0x13
    "connect_out",  # 0x14
    "register_slave",  # 0x15
    "stmt_prepare",  # 0x16
    "stmt_execute",  # 0x17
    "stmt_send_long_data",  # 0x18
    "stmt_close",  # 0x19
    "stmt_reset",  # 0x1a
    "set_option",  # 0x1b
    "stmt_fetch",  # 0x1c
    "daemon",  # 0x1d
    "binlog_dump_gtid",  # 0x1e
    "reset_connection",  # 0x1f
)
_EXTRA_COMMANDS = {0xFA: "stmt_bulk_execute"}  # MariaDB
_NAME_BY_BYTE: tuple[str, ...] = tuple(
    COMMAND_NAMES[byte] if byte < len(COMMAND_NAMES) else _EXTRA_COMMANDS.get(byte, "unknown")
    for byte in range(256)
)

# Upper bounds in seconds: a proxied point select is ~100 µs, a slow report 10 s.
DURATION_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_BUCKET_LABELS: tuple[str, ...] = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*DURATION_BUCKETS, float("inf"))
)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def command_name(command: int) -> str:
    """Label value for a command byte; bytes we do not know are "unknown"."""
    return _NAME_BY_BYTE[command & 0xFF]


_Child = TypeVar("_Child")


class _Children(dict[str, _Child], Generic[_Child]):
    """Labelled children created once, on first use; afterwards one dict lookup."""

    def __init__(self, make: Callable[[str], _Child], known: Iterable[str] = ()) -> None:
        super().__init__()
        self._make = make
        for value in known:
            self[value] = make(value)

    def __missing__(self, value: str) -> _Child:
        child = self[value] = self._make(value)
        return child


def _version() -> str:
    try:
        return metadata.version("tidegate")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every metric of one proxy process, in a registry of its own (tests make fresh ones)."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)

        # Hot-path state, exported by _LiveCollector at scrape time.
        self._queries = [0] * 512  # index: command byte * 2 + ok
        self._duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)  # last one: +Inf
        self._duration_sum = 0.0
        self.bytes_client_to_backend = 0
        self.bytes_backend_to_client = 0
        self.client_connections = 0
        self.client_connections_total = 0
        self.registry.register(_LiveCollector(self))

        registry = self.registry
        self._rejected = _Children(
            Counter(
                "tidegate_client_connections_rejected",
                "Client connections refused before or during the handshake, by reason.",
                ["reason"],
                registry=registry,
            ).labels,
            ("max_client_connections", "handshake_timeout", "tls_required", "shutting_down"),
        )
        backend_connections = Gauge(
            "tidegate_backend_connections",
            "Open connections from the proxy to each backend.",
            ["backend"],
            registry=registry,
        )
        self._backend_connections = _Children(backend_connections.labels)
        connect_errors = Counter(
            "tidegate_backend_connect_errors",
            "Failed attempts to connect or log in to a backend.",
            ["backend"],
            registry=registry,
        )
        self._backend_connect_errors = _Children(connect_errors.labels)
        self.backend_queue_waiting = Gauge(
            "tidegate_backend_queue_waiting",
            "Clients waiting for a backend connection slot.",
            registry=registry,
        )
        self._auth_failures = _Children(
            Counter(
                "tidegate_auth_failures",
                "Client logins the proxy refused, by reason.",
                ["reason"],
                registry=registry,
            ).labels,
            ("unknown_user", "bad_password", "unsupported_plugin"),
        )
        self._protocol_errors = _Children(
            Counter(
                "tidegate_protocol_errors",
                "Malformed or unexpected MySQL packets, by the side that sent them.",
                ["side"],
                registry=registry,
            ).labels,
            ("client", "backend"),
        )
        # Cut-over gate and migrations (rare events: prometheus_client objects).
        self.gate_held_statements = Gauge(
            "tidegate_gate_held_statements",
            "Statements waiting at the gate for a cut-over hold to end.",
            registry=registry,
        )
        self.gate_hold_seconds = Histogram(
            "tidegate_gate_hold_seconds",
            "How long each hold lasted (from drained to released; 0 for abandoned drains).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self._holds = _Children(
            Counter(
                "tidegate_gate_holds",
                "Holds by how they ended: released, expired (fail open) or abandoned (drain timeout).",
                ["result"],
                registry=registry,
            ).labels,
            ("released", "expired", "abandoned"),
        )
        self._cutover_attempts = _Children(
            Counter(
                "tidegate_cutover_attempts",
                "Cut-over attempts by result.",
                ["result"],
                registry=registry,
            ).labels,
            ("success", "drain_timeout", "lock_timeout", "error"),
        )
        self.migration_state = Gauge(
            "tidegate_migration_state",
            "1 for the current state of each migration this sidecar knows.",
            ["migration", "state"],
            registry=registry,
        )
        self.migration_progress = Gauge(
            "tidegate_migration_progress_ratio",
            "Rows copied / rows estimated, 0..1.",
            ["migration"],
            registry=registry,
        )
        self.migration_rows_copied = Gauge(
            "tidegate_migration_rows_copied",
            "Rows copied into the ghost table so far.",
            ["migration"],
            registry=registry,
        )
        self.migration_lag = Gauge(
            "tidegate_migration_lag_seconds",
            "How far the ghost table's binlog applier is behind.",
            ["migration"],
            registry=registry,
        )
        self.replica_lag = Gauge(
            "tidegate_replica_lag_seconds",
            "Replication lag of each replica backend as last probed.",
            ["backend"],
            registry=registry,
        )
        self._traced = _Children(
            Counter(
                "tidegate_traced_statements",
                "Statements carrying a trace context (events.trace_tags): seen, held by a cut-over, rejected.",
                ["outcome"],
                registry=registry,
            ).labels,
            ("seen", "held", "rejected"),
        )
        self._rejections = Counter(
            "tidegate_rejections",
            "Statements answered with the lag backpressure error, by reason and tag.",
            ["reason", "tag"],
            registry=registry,
        )
        Gauge("tidegate_up", "1 while the proxy process runs.", registry=registry).set(1)
        Gauge(
            "tidegate_start_time_seconds",
            "Start time of the proxy since the Unix epoch.",
            registry=registry,
        ).set(time.time())
        Info("tidegate_build", "Version of tidegate and Python.", registry=registry).info(
            {"version": _version(), "python": platform.python_version()}
        )
        if process_metrics:
            ProcessCollector(registry=registry)

    # ---------------------------------------------------------------- per query (hot)

    def observe_query(self, command: int, ok: bool, seconds: float) -> None:
        """One command finished.  ``command`` is the command byte (0..255)."""
        self._queries[command + command + ok] += 1
        self._duration_buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self._duration_sum += seconds

    def total_queries(self, ok: bool | None = None) -> int:
        """Commands seen so far: all, or only succeeded (True) / failed (False) ones."""
        queries = self._queries
        if ok is None:
            return sum(queries)
        return sum(queries[int(ok) :: 2])

    def count_bytes(self, client_to_backend: int, backend_to_client: int) -> None:
        self.bytes_client_to_backend += client_to_backend
        self.bytes_backend_to_client += backend_to_client

    # ---------------------------------------------------------------- per connection

    def client_connected(self) -> None:
        self.client_connections += 1
        self.client_connections_total += 1

    def client_disconnected(self) -> None:
        self.client_connections -= 1

    def connection_rejected(self, reason: str) -> None:
        """Reasons: max_client_connections, handshake_timeout, tls_required, shutting_down."""
        self._rejected[reason].inc()

    def declare_backends(self, names: Iterable[str]) -> None:
        """Make each backend's series exist (at 0) before its first connection."""
        for name in names:
            _ = self._backend_connections[name], self._backend_connect_errors[name]

    def backend_connected(self, backend: str) -> None:
        self._backend_connections[backend].inc()

    def backend_disconnected(self, backend: str) -> None:
        self._backend_connections[backend].dec()

    def backend_connect_error(self, backend: str) -> None:
        self._backend_connect_errors[backend].inc()

    def queue_waiting(self, delta: int) -> None:
        """``delta`` clients started (+) or stopped (-) waiting for a backend slot."""
        self.backend_queue_waiting.inc(delta)

    @contextmanager
    def waiting_for_backend(self) -> Iterator[None]:
        """Counts a client in ``tidegate_backend_queue_waiting`` while the block runs."""
        self.backend_queue_waiting.inc()
        try:
            yield
        finally:
            self.backend_queue_waiting.dec()

    def auth_failure(self, reason: str) -> None:
        """Reasons: unknown_user, bad_password, unsupported_plugin; keep the set small."""
        self._auth_failures[reason].inc()

    def protocol_error(self, side: str) -> None:
        """``side`` is "client" or "backend": who sent the bad packet."""
        self._protocol_errors[side].inc()

    # ---------------------------------------------------------------- gate and migrations

    def gate_held(self, delta: int) -> None:
        self.gate_held_statements.inc(delta)

    def gate_hold_finished(self, result: str, seconds: float) -> None:
        self._holds[result].inc()
        if result != "abandoned":
            self.gate_hold_seconds.observe(seconds)

    def cutover_attempt(self, result: str) -> None:
        """Results: success, drain_timeout, lock_timeout, error."""
        self._cutover_attempts[result].inc()

    def migration_update(self, migration: str, state: str, progress: float, rows: int, lag: float,
                         states: Iterable[str] = ()) -> None:
        for other in states:
            self.migration_state.labels(migration, other).set(1 if other == state else 0)
        self.migration_state.labels(migration, state).set(1)
        self.migration_progress.labels(migration).set(progress)
        self.migration_rows_copied.labels(migration).set(rows)
        self.migration_lag.labels(migration).set(lag)

    def traced_statement(self, outcome: str) -> None:
        """A statement with a trace id: ``seen`` (relayed), ``held`` or ``rejected``."""
        self._traced[outcome].inc()

    def rejection(self, reason: str, tag: str) -> None:
        self._rejections.labels(reason, tag).inc()

    def replica_lag_seconds(self, backend: str, seconds: float) -> None:
        """Last probed lag of a replica (NaN while it cannot be known)."""
        self.replica_lag.labels(backend).set(seconds)

    def watch_routing(self, router: RoutingCounters) -> None:
        """Export the router's plain counters at scrape time (the relay bumps ints only)."""
        self.registry.register(_RoutingCollector(router))

    # ---------------------------------------------------------------- exposition

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE


class RoutingCounters(Protocol):
    """What ``proxy.router.Router`` exposes to the exporter."""

    routed: dict[str, int]

    @property
    def rule_hits(self) -> dict[int, int]: ...

    @property
    def mirror_counts(self) -> dict[str, int]: ...

    @property
    def replica_states(self) -> dict[str, str]: ...

    fleet_latest: int | None

    @property
    def fleet_rules_version(self) -> int: ...

    @property
    def fleet_state(self) -> str: ...


#: the states ``tidegate_fleet_rules_state`` reports (proxy.router.FLEET_STATES)
FLEET_RULE_STATES = ("off", "ignoring", "none", "converged", "behind", "refused", "diverged")


class _RoutingCollector:
    def __init__(self, router: RoutingCounters) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        router = self._router
        routed = CounterMetricFamily(
            "tidegate_routed_statements",
            "Statements routed by the router (rules, read/write split), by the backend they went to.",
            labels=["backend"],
        )
        for backend, count in sorted(router.routed.items()):
            routed.add_metric([backend], count)
        yield routed
        hits = CounterMetricFamily(
            "tidegate_rule_hits", "Statements each live routing rule matched, by rule id.", labels=["rule"]
        )
        for rule, count in sorted(router.rule_hits.items()):
            hits.add_metric([str(rule)], count)
        yield hits
        mirrored = CounterMetricFamily(
            "tidegate_mirrored_statements",
            "Statements copied to a mirror backend, by result (sent, dropped: queue full, error).",
            labels=["result"],
        )
        for result, count in router.mirror_counts.items():
            mirrored.add_metric([result], count)
        yield mirrored
        up = GaugeMetricFamily(
            "tidegate_replica_up", "1 while a replica receives reads (probed, running, within max lag).",
            labels=["backend", "state"],
        )
        for backend, state in sorted(router.replica_states.items()):
            up.add_metric([backend, state], 1.0 if state == "up" else 0.0)
        yield up
        yield GaugeMetricFamily(
            "tidegate_fleet_rules_version",
            "Fleet routing rule version live on this sidecar (0: rules from the configuration file or a "
            "local APPLY RULES).",
            value=router.fleet_rules_version,
        )
        yield GaugeMetricFamily(
            "tidegate_fleet_rules_latest_version",
            "Newest fleet routing rule version this sidecar has seen published (0: none, or not read).",
            value=router.fleet_latest or 0,
        )
        states = GaugeMetricFamily(
            "tidegate_fleet_rules_state",
            "1 for this sidecar's state against the fleet's rules: converged, behind, refused (cannot load the "
            "newest version, keeps its rules), diverged (local APPLY RULES), none, ignoring or off.",
            labels=["state"],
        )
        current = router.fleet_state
        for name in FLEET_RULE_STATES:
            states.add_metric([name], 1.0 if name == current else 0.0)
        yield states


class _LiveCollector:
    """Turns the plain counters of a :class:`Metrics` into metric families on scrape.

    It has no ``describe()``: the registry would otherwise refuse the
    ``tidegate_client_connections`` gauge next to the
    ``tidegate_client_connections_total`` counter, which the text format
    allows (they are separate families there).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield GaugeMetricFamily(
            "tidegate_client_connections",
            "Client connections open now.",
            value=metrics.client_connections,
        )
        yield CounterMetricFamily(
            "tidegate_client_connections",
            "Client connections accepted since start.",
            value=metrics.client_connections_total,
        )

        queries = CounterMetricFamily(
            "tidegate_queries",
            "Commands relayed, by command and result (error: the reply was an ERR packet).",
            labels=["command", "result"],
        )
        totals: dict[tuple[str, str], int] = {}
        counts = metrics._queries
        for byte in range(256):
            failed, succeeded = counts[2 * byte], counts[2 * byte + 1]
            if failed or succeeded:
                name = _NAME_BY_BYTE[byte]
                totals[name, "ok"] = totals.get((name, "ok"), 0) + succeeded
                totals[name, "error"] = totals.get((name, "error"), 0) + failed
        for labels, value in totals.items():
            queries.add_metric(list(labels), value)
        yield queries

        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for label, count in zip(_BUCKET_LABELS, metrics._duration_buckets, strict=True):
            cumulative += count
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(
            "tidegate_query_duration_seconds",
            "Time from a command's first byte from the client to the last byte of its reply.",
            buckets=buckets,
            sum_value=metrics._duration_sum,
        )

        relayed = CounterMetricFamily(
            "tidegate_bytes", "Bytes relayed, by direction.", labels=["direction"]
        )
        relayed.add_metric(["client_to_backend"], metrics.bytes_client_to_backend)
        relayed.add_metric(["backend_to_client"], metrics.bytes_backend_to_client)
        yield relayed
