"""The binlog reader: mysql-replication in one worker thread, feeding a bounded channel.

The only user of ``pymysqlreplication``.  It starts from a GTID (MariaDB's
``auto_position``) and reads with ``blocking=True`` (the non-blocking reader
replays from the start on MariaDB because of a dump-request bug), and it
tracks its own position: an item carries the GTID of the last *complete*
transaction in it, so a consumer that has applied an item may checkpoint that
GTID and later restart there without losing a change.

Only primary-key values leave this module: the applier re-reads rows from the
original table, so nothing depends on how a column type decodes here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pymysql.protocol
import trio
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import GtidEvent, MariadbGtidEvent, QueryEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from migrator import rowkeys
from migrator.db import Connection, ConnectionSettings, PyMySQLConnection

log = logging.getLogger("tidegate.migrator.binlog")

KeyValues = tuple[Any, ...]


@dataclass
class BinlogItem:
    """Changes from one or more whole transactions, in binlog order."""

    #: (key, deleted) for rows of the original table; both images of an update
    #: whose key changed appear (old key deleted, new key present).
    keys: list[tuple[KeyValues, bool]] = field(default_factory=list)
    #: (hint, value) rows written to the changelog table.
    changelog: list[tuple[str, str]] = field(default_factory=list)
    #: DDL statements that touched the original table.
    ddl: list[str] = field(default_factory=list)
    #: position after the last complete transaction in this item (None: none complete)
    gtid: str | None = None
    transactions: int = 0

    def empty(self) -> bool:
        return not (self.keys or self.changelog or self.ddl)

    @staticmethod
    def merge(items: Sequence[BinlogItem]) -> BinlogItem:
        """Consecutive items as one, in order; its position is the last one any of them had."""
        if len(items) == 1:
            return items[0]
        merged = BinlogItem()
        for item in items:
            merged.keys += item.keys
            merged.changelog += item.changelog
            merged.ddl += item.ddl
            merged.transactions += item.transactions
            if item.gtid is not None:
                merged.gtid = item.gtid
        return merged


class _Handoff:
    """Items from the reader thread to trio, coalesced: one wake-up takes everything queued.

    ``trio.from_thread.run`` per item cost a round trip through the trio loop
    for every transaction the reader saw (about 250 a second under a sysbench
    load at 200 tps), and the reader waited for each.  Here the reader appends
    and wakes the trio side only when it is not already woken; the trio side
    takes all that is queued and sends it on as one item.  The busier the loop,
    the more each wake-up carries; nothing waits longer than one loop turn.
    The reader blocks when ``limit`` items are queued (backpressure).
    """

    def __init__(self, token: trio.lowlevel.TrioToken, stop: threading.Event, limit: int = 64) -> None:
        self._token = token
        self._stop = stop
        self._limit = limit
        self._condition = threading.Condition()
        self._items: list[BinlogItem] = []
        self._woken = False
        self._event = trio.Event()

    def put(self, item: BinlogItem) -> None:
        """Reader thread: queue ``item``; raises ``trio.RunFinishedError`` once trio is gone."""
        with self._condition:
            while len(self._items) >= self._limit and not self._stop.is_set():
                self._condition.wait(0.1)
            self._items.append(item)
            if self._woken:
                return
            self._woken = True
        self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._event.set()

    def _take(self) -> list[BinlogItem]:
        with self._condition:
            items, self._items = self._items, []
            self._woken = False
            self._condition.notify_all()
        return items

    async def pump(self, send_channel: trio.MemorySendChannel[BinlogItem]) -> None:
        """Trio side: forward what the reader queued, until cancelled."""
        while True:
            await self._event.wait()
            self._event = trio.Event()  # before taking: a later put wakes this new one
            items = self._take()
            if items:
                try:
                    await send_channel.send(BinlogItem.merge(items))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._stop.set()  # nobody reads any more: the reader stops
                    return

    async def flush(self, send_channel: trio.MemorySendChannel[BinlogItem]) -> None:
        """Trio side, after the reader has stopped: forward what is left."""
        items = self._take()
        if items:
            await send_channel.send(BinlogItem.merge(items))


class GtidPosition:
    """Where the reader stands: every transaction up to here has been received.

    MariaDB: a GTID position, the last GTID per replication domain
    (``0-1-100,1-2-7``).  MySQL: the set of executed GTIDs
    (``3e11fa47-…:1-100``); a transaction adds its GTID to the set.  Either
    text is what the server takes to start a binlog dump from (MariaDB's
    ``slave_connect_state``, MySQL's ``COM_BINLOG_DUMP_GTID``).
    """

    def __init__(self, text: str, *, mariadb: bool) -> None:
        self.mariadb = mariadb
        self._domains: dict[int, str] = {}
        self._sets: dict[str, list[list[int]]] = {}
        for part in filter(None, (p.strip() for p in text.replace("\n", "").split(","))):
            if mariadb:
                self._domains[int(part.split("-", 1)[0])] = part
                continue
            fields = part.split(":")
            source = fields[0].lower()
            for field_ in fields[1:]:
                if re.fullmatch(r"\d+(-\d+)?", field_):
                    first, _, last = field_.partition("-")
                    self._add_interval(source, int(first), int(last or first))
                else:  # a tag (MySQL 8.4+): the intervals after it belong to uuid:tag
                    source = f"{fields[0].lower()}:{field_}"

    def _add_interval(self, source: str, first: int, last: int) -> None:
        intervals = self._sets.setdefault(source, [])
        if intervals and intervals[-1][1] + 1 >= first >= intervals[-1][0]:
            intervals[-1][1] = max(intervals[-1][1], last)  # the usual case: the next GTID
            return
        intervals.append([first, last])
        intervals.sort()
        merged: list[list[int]] = []
        for interval in intervals:
            if merged and interval[0] <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], interval[1])
            else:
                merged.append(interval)
        self._sets[source] = merged

    def add(self, gtid: str) -> None:
        """A complete transaction was received."""
        if self.mariadb:
            self._domains[int(gtid.split("-", 1)[0])] = gtid
            return
        source, _, number = gtid.rpartition(":")
        self._add_interval(source.lower(), int(number), int(number))

    def __str__(self) -> str:
        if self.mariadb:
            return ",".join(self._domains[d] for d in sorted(self._domains))
        return ",".join(
            source + ":" + ":".join(f"{a}-{b}" if a != b else str(a) for a, b in intervals)
            for source, intervals in sorted(self._sets.items())
        )


class BinlogError(RuntimeError):
    pass


#: rows events: WRITE/UPDATE/DELETE v1 (23-25) and v2 (30-32), MariaDB's compressed ones (166-171)
_ROWS_EVENTS = frozenset({23, 24, 25, 30, 31, 32, 166, 167, 168, 169, 170, 171})
_TABLE_MAP_EVENT = 19
_DUMP_COMMANDS = (0x12, 0x1E)  # COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID


class _Stopped(Exception):
    """The dump connection was closed because the streamer is stopping."""


class _DumpConnection(PyMySQLConnection):
    """A binlog connection that drops other tables' rows events before they are decoded.

    The copy writes every row of the table once more, into the ghost; the
    reader receives all of it (1M rows, ~200 MB for the bench's table) and
    mysql-replication built an event object for each rows event only to find
    its table filtered out.  Once this connection has sent a dump request,
    each event packet is looked at here: a table map names its table (kept
    by id), and a table map or rows event of a table that is not ``wanted``
    is skipped; anything else, or an id not seen in a table map, goes on to
    the library unchanged.  Offsets: OK byte, the 19-byte event header, then
    the 6-byte table id (the post-header of both event kinds since MySQL 5.1).
    """

    def __init__(
        self, *, wanted: frozenset[tuple[bytes, bytes]] | None, stop: threading.Event | None = None, **kwargs: Any
    ) -> None:
        self._wanted = wanted  # None: pass everything on
        self._stop = stop
        self._tables: dict[bytes, bool] = {}  # table id bytes -> wanted
        self._dumping = False
        self.skipped = 0
        super().__init__(**kwargs)

    def _write_bytes(self, data: bytes) -> None:
        if len(data) > 4 and data[4] in _DUMP_COMMANDS:
            self._dumping = True
        super()._write_bytes(data)

    def _read_packet(self, packet_type: Any = pymysql.protocol.MysqlPacket) -> Any:
        while True:
            try:
                packet = super()._read_packet(packet_type)
            except pymysql.OperationalError as error:
                if self._stop is not None and self._stop.is_set():
                    # Our own KILL at the end: mysql-replication would log a warning and
                    # open a new dump connection for a reader that is about to return.
                    raise _Stopped() from error
                raise
            if not self._dumping or self._wanted is None:
                return packet
            data = packet.get_all_data()
            if len(data) < 27 or data[0] != 0:
                return packet
            kind = data[5]
            if kind == _TABLE_MAP_EVENT:
                table_id = data[20:26]
                schema_end = 29 + data[28]
                schema = data[29:schema_end]
                name = data[schema_end + 2 : schema_end + 2 + data[schema_end + 1]]
                wanted = (schema, name) in self._wanted
                self._tables[table_id] = wanted
                if wanted:
                    return packet
            elif kind in _ROWS_EVENTS and self._tables.get(data[20:26]) is False:
                pass
            else:
                return packet
            self.skipped += 1


class BinlogStreamer:
    """Reads the binlog from ``start_gtid`` into ``send_channel`` until cancelled."""

    def __init__(
        self,
        settings: ConnectionSettings,
        schema: str,
        table: str,
        changelog_table: str,
        key_columns: Sequence[str],
        start_gtid: str,
        *,
        server_id: int,
        mariadb: bool = True,
        ghost_table: str | None = None,
        reconnect_attempts: int = 10,
    ) -> None:
        self._settings = settings
        self._schema = schema
        self._table = table
        self._changelog = changelog_table
        self._key_columns = tuple(key_columns)
        self._mariadb = mariadb
        self._position = GtidPosition(start_gtid, mariadb=mariadb)
        self._server_id = server_id
        self._reconnect_attempts = reconnect_attempts
        self._stop = threading.Event()
        self._thread_ids: list[int] = []
        self._connections: list[_DumpConnection] = []
        #: drop other tables' events before mysql-replication decodes them (:class:`_DumpConnection`)
        self.prefilter = True
        self._ids_lock = threading.Lock()
        name = re.escape(table)
        self._ddl_pattern = re.compile(
            rf"^\s*(ALTER|DROP|RENAME|TRUNCATE)\b.*?(?<![\w$`])`?{name}`?(?![\w$])", re.I | re.S
        )
        # our own ALTER of the ghost (deferred indexes) may name t in a key or column
        self._ghost_alter = re.compile(
            rf"^\s*ALTER\s+TABLE\s+(`?{re.escape(schema)}`?\s*\.\s*)?`?{re.escape(ghost_table)}`?(?![\w$])", re.I
        ) if ghost_table else None
        self.events_read = 0
        self.last_event_time = 0.0
        #: read keys from the rows events' bytes where the types allow (``migrator.rowkeys``)
        self._fast_keys = True
        self._reader_cache: tuple[Any, rowkeys.KeyReader | None] | None = None

    @property
    def events_skipped(self) -> int:
        """Events of other tables dropped before decoding, over every connection so far."""
        with self._ids_lock:
            return sum(c.skipped for c in self._connections)

    # -- trio side ---------------------------------------------------------------

    async def run(
        self,
        send_channel: trio.MemorySendChannel[BinlogItem],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        handoff = _Handoff(trio.lowlevel.current_trio_token(), self._stop)
        task_status.started()
        async with send_channel:
            try:
                failure: Exception | None = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(handoff.pump, send_channel)
                    try:
                        await trio.to_thread.run_sync(self._thread_main, handoff, abandon_on_cancel=True)
                        await handoff.flush(send_channel)
                    except Exception as error:  # raised as itself, not in the nursery's group
                        failure = error
                    nursery.cancel_scope.cancel()
                if failure is not None:
                    raise failure
            finally:
                self._stop.set()
                with trio.CancelScope(shield=True):
                    await self._kill_connections()

    async def _kill_connections(self) -> None:
        with self._ids_lock:
            ids = list(self._thread_ids)
        if not ids:
            return
        try:
            async with Connection(self._settings, setup=()) as control:
                for thread_id in ids:
                    with contextlib.suppress(Exception):
                        await control.execute(f"KILL CONNECTION {int(thread_id)}")
        except Exception as error:  # the server may be gone; the thread dies with it
            log.debug("could not kill binlog connections: %s", error)

    # -- worker thread -------------------------------------------------------------

    def _connect(self, **kwargs: Any) -> Any:
        # mysql-replication still passes pymysql's deprecated spellings
        for old, new in (("db", "database"), ("passwd", "password")):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
        if self._stop.is_set():  # mysql-replication reconnecting after our KILL
            raise _Stopped()
        wanted = frozenset((self._schema.encode(), name.encode()) for name in (self._table, self._changelog))
        connection = _DumpConnection(wanted=wanted if self.prefilter else None, stop=self._stop, **kwargs)
        with self._ids_lock:
            self._thread_ids.append(int(connection.thread_id()))
            self._connections.append(connection)
        return connection

    def _send(self, handoff: _Handoff, item: BinlogItem) -> None:
        # The position only moves at a transaction's end, so here it is the one after the
        # item's last complete transaction; formatted once per item, not per transaction.
        if item.transactions:
            item.gtid = str(self._position)
        handoff.put(item)

    def _thread_main(self, handoff: _Handoff) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._stream(handoff)
            except (trio.Cancelled, trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as error:
                if self._stop.is_set():
                    return
                failures += 1
                if failures > self._reconnect_attempts:
                    raise BinlogError(f"binlog stream failed {failures} times: {error}") from error
                log.warning("binlog stream error (%s); reconnecting from %s", error, self._position)
                time.sleep(min(2.0, 0.1 * 2**failures))

    def _stream(self, handoff: _Handoff) -> None:
        settings = {
            "host": self._settings.host,
            "port": self._settings.port,
            "user": self._settings.user,
            "password": self._settings.password,
            "connect_timeout": self._settings.connect_timeout,
        }
        stream = BinLogStreamReader(
            connection_settings=settings,
            server_id=self._server_id,
            blocking=True,
            is_mariadb=self._mariadb,
            auto_position=str(self._position),
            only_schemas=[self._schema],
            only_tables=[self._table, self._changelog],
            only_events=[MariadbGtidEvent if self._mariadb else GtidEvent, XidEvent, QueryEvent, WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
            freeze_schema=True,
            pymysql_wrapper=self._connect,
            enable_logging=False,
        )
        item = BinlogItem()
        current: str | None = None  # GTID of the open transaction
        last_send = time.monotonic()
        try:
            for event in stream:
                if self._stop.is_set():
                    return
                self.events_read += 1
                self.last_event_time = time.time()
                if isinstance(event, MariadbGtidEvent | GtidEvent):
                    current = event.gtid
                    continue
                if isinstance(event, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
                    self._collect_rows(event, item)
                    if len(item.keys) >= 2000:
                        # A huge transaction: pass on its keys without advancing the position.
                        self._send(handoff, item)
                        item = BinlogItem()
                        last_send = time.monotonic()
                    continue
                ends = False
                if isinstance(event, XidEvent):
                    ends = True
                elif isinstance(event, QueryEvent):
                    query = event.query if isinstance(event.query, str) else event.query.decode("utf-8", "replace")
                    stripped = query.strip().upper()
                    if stripped == "BEGIN":
                        continue
                    ends = True
                    if stripped != "COMMIT" and str(getattr(event, "schema", b"") or b"", ) and self._ddl_pattern.search(query) \
                            and not (self._ghost_alter is not None and self._ghost_alter.match(query)):
                        schema = event.schema.decode() if isinstance(event.schema, bytes) else str(event.schema)
                        if schema == self._schema or f"{self._schema}." in query or f"`{self._schema}`." in query:
                            item.ddl.append(query)
                if ends and current is not None:
                    self._position.add(current)
                    item.transactions += 1
                    current = None
                    now = time.monotonic()
                    if not item.empty() or item.transactions >= 500 or now - last_send > 0.2:
                        self._send(handoff, item)
                        item = BinlogItem()
                        last_send = now
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    def _collect_rows(self, event: Any, item: BinlogItem) -> None:
        table = event.table
        if event.schema != self._schema:
            return
        if table == self._changelog:
            for row in event.rows:
                values = row.get("after_values") or row.get("values") or {}
                if isinstance(event, DeleteRowsEvent):
                    continue
                item.changelog.append((str(values.get("hint")), str(values.get("value"))))
            return
        if table != self._table:
            return
        if self._fast_keys:
            try:
                if self._collect_keys_fast(event, item):
                    return
            except Exception as error:  # any defect here falls back to the library
                # Never expected (a test compares both readers over every type); if it
                # happens, the stream restarts from the last whole transaction and
                # mysql-replication decodes from then on.
                self._fast_keys = False
                log.error("fast key reader failed on %s.%s (%r); decoding with mysql-replication from now on",
                          self._schema, self._table, error)
                raise
        columns = self._key_columns
        for row in event.rows:
            if isinstance(event, UpdateRowsEvent):
                before = tuple(row["before_values"][c] for c in columns)
                after = tuple(row["after_values"][c] for c in columns)
                if before != after:
                    item.keys.append((before, True))
                item.keys.append((after, False))
            elif isinstance(event, WriteRowsEvent):
                item.keys.append((tuple(row["values"][c] for c in columns), False))
            else:
                item.keys.append((tuple(row["values"][c] for c in columns), True))

    def _collect_keys_fast(self, event: Any, item: BinlogItem) -> bool:
        """The keys of a rows event read straight from its bytes (``migrator.rowkeys``).

        False, with nothing read, when the table's types need mysql-replication.
        """
        if not getattr(event, "complete", True) or getattr(event, "is_partial_json_update", False):
            return False
        columns = event.columns
        cached = self._reader_cache
        if cached is None or cached[0] is not columns:
            reader = rowkeys.KeyReader(columns, self._key_columns) if rowkeys.supported(
                columns, self._key_columns) else None
            self._reader_cache = cached = (columns, reader)
        reader = cached[1]
        if reader is None:
            return False
        packet = event.packet
        data = packet.read(event.event_size - packet.read_bytes)
        pos, end = 0, len(data)
        keys = item.keys
        if isinstance(event, UpdateRowsEvent):
            before_present, after_present = event.columns_present_bitmap, event.columns_present_bitmap2
            while pos < end:
                before, pos = reader.read_image(data, pos, before_present)
                after, pos = reader.read_image(data, pos, after_present)
                if before is not None and before != after:
                    keys.append((before, True))
                if after is not None:
                    keys.append((after, False))
        else:
            deleted = isinstance(event, DeleteRowsEvent)
            present = event.columns_present_bitmap
            while pos < end:
                key, pos = reader.read_image(data, pos, present)
                if key is not None:
                    keys.append((key, deleted))
        return True
