"""The event log: what migrations, holds and held statements did, as JSON lines.

One JSON object per line, each with a microsecond UTC timestamp (``ts``), an
event name (``event``) and the facts of that event, written to a file,
stderr or nowhere (``events.file``), and the last ``events.keep`` of them
kept in memory for the admin port's ``events`` table.  Events are rare
(migration phases, throttles, cut-over attempts, holds, statements that were
held): a plain synchronous line write per event, like a log record.

Event names (docs/operations.md lists their fields):

* ``migration.*``: ``start``, ``phase``, ``throttle``, ``postponed``, ``end``
* ``cutover.*``: ``announce``, ``hold``, ``refused``, ``held``, ``blocked``,
  ``released``, ``done``, ``rolled_back``, ``blocker_killed``
* ``drain.*`` / ``hold.*`` (each sidecar's gate): ``drain.start``,
  ``drain.end``, ``hold.start``, ``hold.release``, ``hold.expire``,
  ``hold.abandon``
* ``hook.*``: ``ok``, ``failed``, ``veto``
* ``statement.*``: ``held``, ``rejected`` (statements carrying a trace id)

A migration led in a child process records its events there; each one is
appended to ``_tidegate.migration_events`` (``listeners``), and the sidecar
tails that table and writes them here with their original timestamps
(``relay``): append-only, so none is lost however many arrive at once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

from migrator.hooks import NULL_EVENTS, EventSink, NullEvents

log = logging.getLogger("tidegate.events")

#: strings longer than this are cut in events (a blocker chain, a statement)
MAX_TEXT = 1500
#: ``statement.*`` events (one per held or rejected statement) kept per second; a busy
#: hold could otherwise write thousands.  The next one kept says how many were left out.
STATEMENT_EVENTS_PER_SECOND = 100


def timestamp() -> str:
    """Now, UTC, to the microsecond: ``2025-01-31T12:00:00.123456Z`` (sorts as text)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + "…"
    if isinstance(value, list | tuple):
        return [_bounded(item) for item in value[:20]]
    if isinstance(value, Mapping):
        return {str(key): _bounded(item) for key, item in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# The sink protocol lives with the hook runner (the migrator records hook
# results through it without importing the proxy); the proxy shares it.
__all__ = ["NULL_EVENTS", "EventLog", "EventSink", "NullEvents", "admin_rows", "timestamp", "trace_id_of"]


class EventLog:
    """Writes events as JSON lines and keeps the last ``keep`` for the admin port."""

    def __init__(self, path: str | None = None, *, keep: int = 1000, source: str | None = None) -> None:
        #: ``None`` or ``""``: memory only; ``"-"``: stderr; else a file appended to
        self.path = path or None
        self.keep = keep
        #: added to every event as ``sidecar`` (who recorded it)
        self.source = source
        self.recent: deque[dict[str, Any]] = deque(maxlen=max(1, keep))
        self.sequence = 0
        self._stream: IO[str] | None = None
        self._failed = False
        self._window = 0
        self._in_window = 0
        self._suppressed = 0
        #: called with every record kept (a child leader ships them to its sidecar)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def _open(self) -> IO[str] | None:
        if self._stream is None and self.path is not None and not self._failed:
            if self.path == "-":
                self._stream = sys.stderr
            else:
                try:
                    self._stream = open(self.path, "a", encoding="utf-8", buffering=1)
                except OSError as error:
                    self._failed = True
                    log.error("event log %s cannot be opened: %s; events stay in memory only", self.path, error)
        return self._stream

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        if event.startswith("statement."):
            second = int(time.monotonic())
            if second != self._window:
                self._window, self._in_window = second, 0
            self._in_window += 1
            if self._in_window > STATEMENT_EVENTS_PER_SECOND:
                self._suppressed += 1
                return {}
            if self._suppressed:
                fields["suppressed_before"], self._suppressed = self._suppressed, 0
        record: dict[str, Any] = {"ts": timestamp(), "event": event}
        if self.source is not None:
            record["sidecar"] = self.source
        for key, value in fields.items():
            if value is not None:
                record[key] = _bounded(value)
        self._record(record)
        return record

    def relay(self, record: Mapping[str, Any]) -> None:
        """An event recorded elsewhere (a child process): keep its own timestamp."""
        copy = {str(key): _bounded(value) for key, value in record.items() if key != "seq"}
        if "ts" not in copy or "event" not in copy:
            return
        if self.source is not None:
            copy.setdefault("sidecar", self.source)
        self._record(copy)

    def _record(self, record: dict[str, Any]) -> None:
        self.sequence += 1
        record["seq"] = self.sequence
        self.recent.append(record)
        for listener in self.listeners:
            listener(record)
        stream = self._open()
        if stream is None:
            return
        try:
            stream.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
            stream.flush()
        except (OSError, ValueError) as error:
            if not self._failed:
                log.error("event log %s: write failed: %s; events stay in memory only", self.path, error)
            self._failed = True
            self._stream = None

    def tail(self, limit: int | None = None) -> list[dict[str, Any]]:
        items = list(self.recent)
        return items if limit is None else items[-limit:]

    def since(self, sequence: int) -> list[dict[str, Any]]:
        return [record for record in self.recent if record["seq"] > sequence]

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stderr:
            self._stream.close()
        self._stream = None


def admin_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Events as rows of the admin port's ``events`` table (newest last)."""
    fixed = ("seq", "ts", "event", "sidecar", "migration", "table", "trace_id")
    rows = []
    for record in records:
        row = {name: record.get(name) for name in fixed}
        row["data"] = json.dumps({k: v for k, v in record.items() if k not in fixed}, default=str,
                                 sort_keys=True)
        rows.append(row)
    return rows


def trace_id_of(tags: Mapping[str, str], names: Iterable[str]) -> str | None:
    """The trace id a statement's comment tags carry (W3C ``traceparent`` or a plain tag)."""
    for name in names:
        value = tags.get(name)
        if not value:
            continue
        if name == "traceparent":
            # version-traceid-parentid-flags (sqlcommenter URL-encodes nothing here)
            parts = value.split("-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                return parts[1]
        return value[:128]
    return None
