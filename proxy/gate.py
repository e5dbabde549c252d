"""Per-table traffic gate: drain, hold and release statements for a cut-over.

The gate implements the migrator's ``TrafficGate`` protocol for the tables
behind this sidecar:

* ``hold(schema, table)`` starts **draining**: from now on a statement that
  touches the table waits, unless its session's open transaction already
  touched the table (that transaction holds the table's metadata lock and
  must finish, not wait).  The drain completes when no statement on the
  table is in flight and no open transaction has touched it.  If that does
  not happen within ``drain_timeout`` everything is released at once and
  ``hold`` answers ``False`` ("not now"): nobody gets an error.
* Once drained the table is **held** until ``release`` or until
  ``hold_timeout`` passes; then held statements run in arrival order.  A hold
  always ends by itself, so a dead migrator never wedges an application.

Which tables a session touches is computed only while a hold exists, from
the statement text (``proxy.classify``): the relay's hot path merely keeps
the statements of the current transaction.  A statement whose tables cannot
be determined counts as touching every held table.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import trio

from proxy.classify import Classifier
from proxy.events import NULL_EVENTS, EventSink

log = logging.getLogger("tidegate.gate")


class GateSession(Protocol):
    """What the gate reads from a relay's session."""

    connection_id: int
    schema: str | None

    @property
    def in_transaction(self) -> bool: ...

    def inflight_sql(self) -> bytes | None: ...

    def transaction_sql(self) -> Iterable[bytes]: ...

    @property
    def held(self) -> bool: ...


class GateMetrics(Protocol):
    def gate_held(self, delta: int) -> None: ...
    def gate_hold_finished(self, result: str, seconds: float) -> None: ...


class HoldPhase(Enum):
    DRAINING = "draining"
    HOLDING = "holding"


@dataclass(eq=False)
class Waiter:
    session_id: int
    arrived: float
    released: trio.Event = field(default_factory=trio.Event)
    #: set by the relay once the held statement is on its way to the backend
    sent: trio.Event = field(default_factory=trio.Event)
    predecessor: trio.Event | None = None


@dataclass(eq=False)
class Hold:
    table: str
    aliases: frozenset[str]
    phase: HoldPhase
    started: float
    hold_timeout: float
    waiters: deque[Waiter] = field(default_factory=deque)
    held_at: float | None = None
    expiry: trio.CancelScope | None = None
    result: str | None = None
    blockers: list[str] = field(default_factory=list)
    #: connection ids of the sessions the drain waits for (see ``blockers``)
    blocking_sessions: list[int] = field(default_factory=list)


Dependents = Callable[[str, str], Awaitable[set[str]]]


def table_key(schema: str, table: str) -> str:
    return f"{schema}.{table}".lower()


class Gate:
    def __init__(
        self,
        sessions: Callable[[], Iterable[GateSession]],
        classifier: Classifier | None = None,
        metrics: GateMetrics | None = None,
        dependents: Dependents | None = None,
        release_spacing: float = 0.05,
    ) -> None:
        self._sessions = sessions
        self.classifier = classifier or Classifier()
        self._metrics = metrics
        self._dependents = dependents
        #: alias name -> hold covering it; empty on the hot path
        self.holds: dict[str, Hold] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._release_spacing = release_spacing
        self.history: deque[dict[str, object]] = deque(maxlen=100)
        #: where drain/hold events go (``proxy.events``); set by the app
        self.events: EventSink = NULL_EVENTS

    def set_dependents(self, dependents: Dependents) -> None:
        """How to find views and triggers that reach a table (they count as it)."""
        self._dependents = dependents

    # -- service ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the expiry timers of holds."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- relay side --------------------------------------------------------

    def notify(self) -> None:
        """A statement finished or a transaction ended: re-check drains."""
        self._changed.set()

    def _covering(self, tables: frozenset[str] | None) -> list[Hold]:
        holds = self.holds
        if tables is None:
            return list({id(h): h for h in holds.values()}.values())
        return list({id(holds[t]): holds[t] for t in tables if t in holds}.values())

    def _touched_by_transaction(self, session: GateSession, hold: Hold) -> bool:
        if not session.in_transaction:
            return False
        for sql in session.transaction_sql():
            tables = self.classifier.classify(sql).reach(session.schema)
            if tables is None or not tables.isdisjoint(hold.aliases):
                return True
        return False

    async def admit(self, session: GateSession, tables: frozenset[str] | None, max_wait: float) -> Waiter | None:
        """Wait while a hold covers ``tables``; returns the waiter if it waited.

        ``max_wait`` bounds the wait whatever happens to the hold (fail open).
        """
        waiter: Waiter | None = None
        deadline = trio.current_time() + max_wait
        while True:
            blocking = [
                hold for hold in self._covering(tables) if not self._touched_by_transaction(session, hold)
            ]
            if not blocking:
                return waiter
            hold = blocking[0]
            if waiter is None or waiter.released.is_set():
                waiter = Waiter(session.connection_id, trio.current_time())
            hold.waiters.append(waiter)
            if self._metrics:
                self._metrics.gate_held(1)
            try:
                with trio.move_on_at(deadline):
                    await waiter.released.wait()
                    if waiter.predecessor is not None:
                        # Arrival order: let the one before us reach the backend first.
                        with trio.move_on_after(self._release_spacing):
                            await waiter.predecessor.wait()
            finally:
                if self._metrics:
                    self._metrics.gate_held(-1)
                if not waiter.released.is_set():
                    try:
                        hold.waiters.remove(waiter)
                    except ValueError:
                        pass
            if trio.current_time() >= deadline:
                log.warning("session %d: held longer than %.1fs; letting it through", session.connection_id, max_wait)
                return waiter

    # -- migrator side (TrafficGate) ------------------------------------------

    def _blockers(self, hold: Hold) -> list[str]:
        """Sessions the drain waits for, as human-readable reasons."""
        return [f"session {session_id}: {reason}" for session_id, reason in self._blocking(hold)]

    def _blocking(self, hold: Hold) -> list[tuple[int, str]]:
        """(connection id, reason) of each session the drain waits for."""
        reasons = []
        for session in self._sessions():
            if session.held:
                continue
            inflight = session.inflight_sql()
            if inflight is not None:
                tables = self.classifier.classify(inflight).reach(session.schema)
                if tables is None or not tables.isdisjoint(hold.aliases):
                    text = inflight[:120].decode("utf-8", "replace")
                    reasons.append((session.connection_id, f"running {text!r}"))
                    continue
            if self._touched_by_transaction(session, hold):
                reasons.append((session.connection_id, f"open transaction touched {hold.table}"))
        return reasons

    async def hold(self, schema: str, table: str, *, drain_timeout: float, hold_timeout: float) -> bool:
        key = table_key(schema, table)
        if key in self.holds:
            raise RuntimeError(f"{key} is already held")
        aliases = {key}
        if self._dependents is not None:
            try:
                aliases |= {name.lower() for name in await self._dependents(schema, table)}
            except Exception as error:  # the lookup is best effort; the table itself is held
                log.warning("could not look up views/routines of %s: %s", key, error)
        hold = Hold(key, frozenset(aliases), HoldPhase.DRAINING, trio.current_time(), hold_timeout)
        for alias in hold.aliases:
            if alias in self.holds:
                raise RuntimeError(f"{alias} is already held")
        for alias in hold.aliases:
            self.holds[alias] = hold
        log.info("draining %s (aliases: %s)", key, ", ".join(sorted(hold.aliases - {key})) or "none")
        self.events.emit("drain.start", table=key, aliases=sorted(hold.aliases - {key}) or None,
                         drain_timeout=drain_timeout, hold_timeout=hold_timeout)
        drained = False
        try:
            with trio.move_on_after(drain_timeout):
                while True:
                    self._changed = trio.Event()
                    blocking = self._blocking(hold)
                    hold.blockers = [f"session {session_id}: {reason}" for session_id, reason in blocking]
                    hold.blocking_sessions = [session_id for session_id, _ in blocking]
                    if not blocking:
                        drained = True
                        break
                    # Re-check on every statement end / transaction end, and at
                    # least every 50 ms (a session may vanish without notifying).
                    with trio.move_on_after(0.05):
                        await self._changed.wait()
        except BaseException:
            # Cancelled mid-drain (the leader gave up, shutdown): never leave
            # the table held behind us.
            self._finish(hold, "abandoned")
            raise
        if not drained:
            log.info("drain of %s did not finish in %.2fs: %s", key, drain_timeout, "; ".join(hold.blockers[:5]))
            self.events.emit("drain.end", table=key, result="timed_out", seconds=round(drain_timeout, 6),
                             blockers=hold.blockers[:10])
            self._finish(hold, "abandoned")
            return False
        hold.phase = HoldPhase.HOLDING
        hold.held_at = trio.current_time()
        log.info("holding %s (drained in %.1f ms)", key, (hold.held_at - hold.started) * 1000)
        drained_in = round(hold.held_at - hold.started, 6)
        self.events.emit("drain.end", table=key, result="drained", seconds=drained_in)
        self.events.emit("hold.start", table=key, drain_seconds=drained_in, hold_timeout=hold.hold_timeout)
        if self._nursery is not None:
            self._nursery.start_soon(self._expire, hold)
        return True

    async def _expire(self, hold: Hold) -> None:
        with trio.CancelScope() as scope:
            hold.expiry = scope
            await trio.sleep(hold.hold_timeout)
            if hold.result is None:
                log.warning("hold on %s expired after %.1fs; releasing (fail open)", hold.table, hold.hold_timeout)
                self._finish(hold, "expired")

    async def release(self, schema: str, table: str) -> None:
        key = table_key(schema, table)
        hold = self.holds.get(key)
        if hold is None or hold.table != key:
            await trio.lowlevel.checkpoint()
            return
        self._finish(hold, "released")
        await trio.lowlevel.checkpoint()

    def _finish(self, hold: Hold, result: str) -> None:
        if hold.result is not None:
            return
        hold.result = result
        for alias in hold.aliases:
            if self.holds.get(alias) is hold:
                del self.holds[alias]
        if hold.expiry is not None:
            hold.expiry.cancel()
        previous: trio.Event | None = None
        waiters = list(hold.waiters)
        hold.waiters.clear()
        for waiter in waiters:  # arrival order
            waiter.predecessor = previous
            waiter.released.set()
            previous = waiter.sent
        now = trio.current_time()
        seconds = now - (hold.held_at if hold.held_at is not None else hold.started)
        if self._metrics:
            self._metrics.gate_hold_finished(result, seconds)
        drain_seconds = (hold.held_at or now) - hold.started
        hold_seconds = seconds if hold.held_at is not None else 0.0
        entry: dict[str, object] = {
            "table": hold.table,
            "result": result,
            "drain_seconds": drain_seconds,
            "hold_seconds": hold_seconds,
            "held_statements": len(waiters),
            "blockers": list(hold.blockers[:10]),
            "blocking_sessions": list(hold.blocking_sessions[:10]),
        }
        self.history.append(entry)
        self.events.emit(
            {"released": "hold.release", "expired": "hold.expire"}.get(result, "hold.abandon"),
            table=hold.table, result=result, drain_seconds=round(drain_seconds, 6),
            hold_seconds=round(hold_seconds, 6), held_statements=len(waiters),
            blockers=list(hold.blockers[:10]) if result == "abandoned" else None,
            blocking_sessions=entry["blocking_sessions"] if result == "abandoned" else None,
        )
        log.info("%s %s: %d held statements released", result, hold.table, len(waiters))

    # -- introspection -------------------------------------------------------

    def snapshot(self) -> list[dict[str, object]]:
        now = trio.current_time()
        seen: dict[int, Hold] = {id(h): h for h in self.holds.values()}
        return [
            {
                "table": hold.table,
                "phase": hold.phase.value,
                "aliases": sorted(hold.aliases),
                "seconds": now - hold.started,
                "held_statements": len(hold.waiters),
                "blockers": list(hold.blockers[:10]),
            }
            for hold in seen.values()
        ]

    @property
    def held_statements(self) -> int:
        return sum(len(h.waiters) for h in {id(h): h for h in self.holds.values()}.values())


class NullGate:
    """For a proxy that runs no migrations: nothing is ever held."""

    holds: dict[str, Hold] = {}

    def notify(self) -> None:
        pass


INFINITE = math.inf
