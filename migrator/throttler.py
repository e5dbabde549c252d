"""Whether the copy should wait, and why.  Decides; never copies.

``Throttler`` is the small seam the copier sees.  :class:`Throttle` watches
every signal (flag file, ``--max-load``, ``--critical-load``, replica lag via
our own heartbeat, binlog lag, a manual throttle from the embedding process)
in one task and publishes a reason; the copier awaits
:meth:`Throttle.wait_until_clear` before each chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import trio

from migrator.db import Connection, DatabaseError, qualified
from migrator.spec import LoadThreshold

log = logging.getLogger("tidegate.migrator.throttler")


class CriticalLoad(RuntimeError):
    """A ``--critical-load`` threshold was crossed."""


class Throttler(Protocol):
    @property
    def reason(self) -> str | None: ...

    async def wait_until_clear(self) -> None: ...


class NoThrottle:
    reason: str | None = None

    async def wait_until_clear(self) -> None:
        await trio.lowlevel.checkpoint()


def exceeded(status: dict[str, float], thresholds: Sequence[LoadThreshold]) -> str | None:
    for threshold in thresholds:
        value = status.get(threshold.variable.lower())
        if value is not None and value >= threshold.limit:
            return f"{threshold.variable}={value:g} >= {threshold.limit:g}"
    return None


class Throttle:
    def __init__(
        self,
        primary: Connection | None,
        *,
        max_load: Sequence[LoadThreshold] = (),
        critical_load: Sequence[LoadThreshold] = (),
        critical_load_hibernate_seconds: float = 0.0,
        flag_file: Path | None = None,
        replicas: Sequence[Connection] = (),
        changelog: tuple[str, str] | None = None,
        max_lag_millis: int = 1500,
        binlog_lag: Callable[[], float] | None = None,
        interval: float = 0.25,
    ) -> None:
        self._primary = primary
        self._max_load = tuple(max_load)
        self._critical = tuple(critical_load)
        self._hibernate = critical_load_hibernate_seconds
        self._flag = flag_file
        self._replicas = tuple(replicas)
        self._changelog = changelog
        self._max_lag = max_lag_millis / 1000.0
        self._binlog_lag = binlog_lag
        self._interval = interval
        self._reason: str | None = None
        self._manual: str | None = None
        self._clear = trio.Event()
        self._clear.set()
        self.replica_lag: float | None = None

    @property
    def reason(self) -> str | None:
        return self._manual or self._reason

    def set_manual(self, reason: str | None) -> None:
        """Throttle (or stop throttling) from the embedding process."""
        self._manual = reason
        self._publish()

    def _publish(self) -> None:
        if self.reason is None:
            self._clear.set()
        elif self._clear.is_set():
            self._clear = trio.Event()

    async def wait_until_clear(self) -> None:
        await trio.lowlevel.checkpoint()
        while self.reason is not None:
            await self._clear.wait()

    async def check_once(self) -> str | None:
        reason: str | None = None
        if self._flag is not None and self._flag.exists():
            reason = f"flag file {self._flag}"
        if (self._max_load or self._critical) and self._primary is not None:
            names = sorted({t.variable for t in (*self._max_load, *self._critical)})
            placeholders = ", ".join(["%s"] * len(names))
            rows = await self._primary.query(
                # SHOW, not information_schema.GLOBAL_STATUS: MySQL 8 has no such table
                f"SHOW GLOBAL STATUS WHERE Variable_name IN ({placeholders})", names
            )
            status: dict[str, float] = {}
            for name, value in rows:
                try:
                    status[str(name).lower()] = float(value)
                except (TypeError, ValueError):
                    continue
            critical = exceeded(status, self._critical)
            if critical:
                if self._hibernate <= 0:
                    raise CriticalLoad(f"critical load: {critical}")
                log.warning("critical load (%s): hibernating %.1fs", critical, self._hibernate)
                self._reason = f"critical load {critical}, hibernating"
                self._publish()
                await trio.sleep(self._hibernate)
            reason = reason or (f"max load {m}" if (m := exceeded(status, self._max_load)) else None)
        if self._replicas and self._changelog is not None:
            worst = 0.0
            for replica in self._replicas:
                try:
                    rows = await replica.query(
                        # value is "<seq> <UTC timestamp>"; the timestamp itself holds a space
                        "SELECT TIMESTAMPDIFF(MICROSECOND, SUBSTRING(value, LOCATE(' ', value) + 1), UTC_TIMESTAMP(6)) "
                        f"FROM {qualified(*self._changelog)} WHERE hint = 'heartbeat'"
                    )
                    lag = float(rows[0][0]) / 1e6 if rows and rows[0][0] is not None else float("inf")
                except DatabaseError as error:
                    log.warning("replica lag check failed: %s", error)
                    lag = float("inf")
                worst = max(worst, lag)
            self.replica_lag = worst
            if worst > self._max_lag and reason is None:
                reason = f"replica lag {worst * 1000:.0f}ms > {self._max_lag * 1000:.0f}ms"
        if self._binlog_lag is not None and reason is None:
            lag = self._binlog_lag()
            if lag > max(self._max_lag, 1.0):
                reason = f"binlog lag {lag * 1000:.0f}ms"
        self._reason = reason
        self._publish()
        return self.reason

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.check_once()
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            await self.check_once()
