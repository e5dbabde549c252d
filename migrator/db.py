"""The only user of pymysql: connections, blocking calls in worker threads, retries.

Every blocking call runs through ``trio.to_thread.run_sync``.  Each hop costs
about 80 µs, so callers hand over a whole batch (``run``/``execute_many``)
instead of one statement at a time.  Errors are classified by MySQL error
code, never by message text.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pymysql
import pymysql.connections
import pymysql.cursors
import trio

log = logging.getLogger("tidegate.migrator.db")

T = TypeVar("T")
Row = tuple[Any, ...]
Statement = tuple[str, Sequence[Any] | None]

# Error codes (include/mysqld_error.h, errmsg-utf8.txt).
ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
ER_QUERY_INTERRUPTED = 1317
ER_STATEMENT_TIMEOUT = 1969  # MariaDB max_statement_time
ER_NO_SUCH_TABLE = 1146
ER_TABLE_EXISTS = 1050
ER_DUP_KEYNAME = 1061
ER_BAD_TABLE = 1051
ER_TRG_DOES_NOT_EXIST = 1360
ER_ALTER_OPERATION_NOT_SUPPORTED = 1845
ER_ALTER_OPERATION_NOT_SUPPORTED_REASON = 1846
CR_CONNECTION_ERROR = 2002
CR_CONN_HOST_ERROR = 2003
CR_SERVER_GONE = 2006
CR_SERVER_LOST = 2013
ER_CONNECTION_KILLED = 1927
ER_SERVER_SHUTDOWN = 1053

#: Worth another try on the same connection: the statement lost a lock race.
RETRY_CODES = frozenset({ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK})
#: The connection is gone; reconnect, then retry.
RECONNECT_CODES = frozenset(
    {CR_CONNECTION_ERROR, CR_CONN_HOST_ERROR, CR_SERVER_GONE, CR_SERVER_LOST,
     ER_CONNECTION_KILLED, ER_SERVER_SHUTDOWN}
)


class DatabaseError(Exception):
    """A MySQL error with its numeric code (0 when the driver gave none)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"({code}) {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRY_CODES or self.code in RECONNECT_CODES

    @property
    def connection_lost(self) -> bool:
        return self.code in RECONNECT_CODES


def _translate(error: BaseException) -> DatabaseError:
    args = getattr(error, "args", ())
    if args and isinstance(args[0], int):
        return DatabaseError(args[0], str(args[1]) if len(args) > 1 else "")
    return DatabaseError(0, f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class ConnectionSettings:
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    database: str = ""
    charset: str = "utf8mb4"
    connect_timeout: float = 10.0

    @classmethod
    def from_dsn(cls, dsn: str) -> ConnectionSettings:
        """``mysql://user:password@host:port/database``."""
        parsed = urllib.parse.urlsplit(dsn if "://" in dsn else f"mysql://{dsn}")
        if parsed.scheme not in ("mysql", "mariadb"):
            raise ValueError(f"unsupported DSN scheme {parsed.scheme!r} (use mysql://)")
        return cls(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 3306,
            user=urllib.parse.unquote(parsed.username or "root"),
            password=urllib.parse.unquote(parsed.password or ""),
            database=parsed.path.lstrip("/"),
        )

    def with_database(self, database: str) -> ConnectionSettings:
        return replace(self, database=database)

    def with_charset(self, charset: str) -> ConnectionSettings:
        return replace(self, charset=charset)

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def pymysql_kwargs(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database or None,
            "charset": self.charset,
            "autocommit": True,
            "connect_timeout": self.connect_timeout,
            "local_infile": False,
        }


#: Session settings of every migrator connection: strict so that a value that
#: does not fit the new column fails loudly instead of being truncated;
#: NO_AUTO_VALUE_ON_ZERO so that copying a row whose AUTO_INCREMENT id is 0
#: keeps 0; READ COMMITTED so INSERT … SELECT reads the source without share
#: locks (the application never waits on the copier); UTC for TIMESTAMPs.
SESSION_SETUP: tuple[str, ...] = (
    "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION'",
    "SET SESSION time_zone = '+00:00'",
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
)


class PyMySQLConnection(pymysql.connections.Connection):  # type: ignore[misc]
    """pymysql's connection, with one TLS context for all sessions that asked for none.

    pymysql 1.2 tries TLS on every connection (its "preferred" mode) and builds
    a new default ``SSLContext`` for each, loading the system's CA store: about
    40 ms of CPU per connection, a dozen connections per migration, several on
    the way to the cut-over.  That context depends on nothing of the
    connection, so it is built once (lazily, under a lock: sessions connect in
    worker threads) and shared; explicit TLS options still get their own.
    """

    _preferred: Any = None
    _preferred_lock = threading.Lock()

    def _create_ssl_ctx(self, sslp: Any) -> Any:
        if sslp != {}:
            return super()._create_ssl_ctx(sslp)
        with PyMySQLConnection._preferred_lock:
            if PyMySQLConnection._preferred is None:
                PyMySQLConnection._preferred = super()._create_ssl_ctx({})
            return PyMySQLConnection._preferred


class Connection:
    """One server session.  Calls are serialized; each runs in a worker thread."""

    def __init__(self, settings: ConnectionSettings, setup: Sequence[str] = SESSION_SETUP) -> None:
        self.settings = settings
        self._setup = tuple(setup)
        self._raw: Any = None
        self._lock = trio.Lock()
        self.thread_id: int | None = None
        #: the server's version string from its handshake ("10.11.19-MariaDB-…", "8.0.36")
        self.server_version = ""

    # -- lifecycle -------------------------------------------------------

    def _connect_blocking(self) -> None:
        try:
            raw = PyMySQLConnection(**self.settings.pymysql_kwargs())
            with raw.cursor() as cursor:
                for statement in self._setup:
                    cursor.execute(statement)
        except pymysql.err.MySQLError as error:
            raise _translate(error) from error
        except OSError as error:
            raise DatabaseError(CR_CONN_HOST_ERROR, str(error)) from error
        self._raw = raw
        self.thread_id = int(raw.thread_id())
        self.server_version = str(raw.get_server_info())

    async def connect(self) -> Connection:
        await trio.to_thread.run_sync(self._connect_blocking)
        return self

    def _close_blocking(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.close()

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close_blocking)

    async def __aenter__(self) -> Connection:
        if self._raw is None:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._raw is not None

    @property
    def mariadb(self) -> bool:
        """Whether the server is MariaDB (else MySQL); known once connected."""
        return is_mariadb(self.server_version)

    # -- work --------------------------------------------------------------

    def _call(self, work: Callable[[Any], T]) -> T:
        if self._raw is None:
            self._connect_blocking()
        try:
            with self._raw.cursor() as cursor:
                return work(cursor)
        except pymysql.err.MySQLError as error:
            translated = _translate(error)
            if translated.connection_lost:
                self._close_blocking()
            raise translated from error
        except (OSError, AttributeError) as error:  # socket died mid-call
            self._close_blocking()
            raise DatabaseError(CR_SERVER_LOST, str(error)) from error

    async def run(self, work: Callable[[Any], T], *, abandon_on_cancel: bool = False) -> T:
        """Run ``work(cursor)`` in a worker thread: the unit of batching.

        With ``abandon_on_cancel`` a cancelled caller returns at once and the
        connection is discarded (its thread may still be blocked in the server).
        """
        async with self._lock:
            if not abandon_on_cancel:
                return await trio.to_thread.run_sync(self._call, work)
            raw_before = self._raw
            try:
                return await trio.to_thread.run_sync(self._call, work, abandon_on_cancel=True)
            except trio.Cancelled:
                if raw_before is self._raw:
                    self._raw = None  # owned by the abandoned thread now
                raise

    async def query(self, sql: str, args: Sequence[Any] | None = None) -> list[Row]:
        def work(cursor: Any) -> list[Row]:
            cursor.execute(sql, args)
            return list(cursor.fetchall())

        return await self.run(work)

    async def execute(self, sql: str, args: Sequence[Any] | None = None) -> int:
        def work(cursor: Any) -> int:
            return int(cursor.execute(sql, args))

        return await self.run(work)

    async def execute_many(self, statements: Sequence[Statement]) -> list[Row]:
        """Run statements in order in one thread hop; rows of the last one."""

        def work(cursor: Any) -> list[Row]:
            rows: list[Row] = []
            for sql, args in statements:
                cursor.execute(sql, args)
                rows = list(cursor.fetchall())
            return rows

        return await self.run(work)

    async def transaction(self, statements: Sequence[Statement]) -> list[int]:
        """Run statements in one transaction; affected row counts."""

        def work(cursor: Any) -> list[int]:
            counts: list[int] = []
            cursor.execute("BEGIN")
            try:
                for sql, args in statements:
                    counts.append(int(cursor.execute(sql, args)))
                cursor.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    cursor.execute("ROLLBACK")
                raise
            return counts

        return await self.run(work)


async def connect(settings: ConnectionSettings, setup: Sequence[str] = SESSION_SETUP) -> Connection:
    return await Connection(settings, setup).connect()


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    retries: int,
    what: str,
    initial_backoff: float = 0.05,
    max_backoff: float = 2.0,
) -> T:
    """Retry ``operation`` on retryable error codes with exponential backoff."""
    backoff = initial_backoff
    attempt = 0
    while True:
        try:
            return await operation()
        except DatabaseError as error:
            attempt += 1
            if not error.retryable or attempt > retries:
                raise
            log.warning("%s failed (%s); retry %d/%d in %.2fs", what, error, attempt, retries, backoff)
            await trio.sleep(backoff)
            backoff = min(max_backoff, backoff * 2)


def is_mariadb(version: str) -> bool:
    return "mariadb" in version.lower()


def version_tuple(version: str) -> tuple[int, ...]:
    """``"8.0.36-log"`` → ``(8, 0, 36)``."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(part) for part in match.groups()) if match else (0, 0, 0)


def gtid_position_sql(mariadb: bool) -> str:
    """The server's current binlog position as a GTID position (MariaDB) or executed set (MySQL)."""
    return "SELECT @@gtid_binlog_pos" if mariadb else "SELECT @@GLOBAL.gtid_executed"


def quote(name: str) -> str:
    """Quote an identifier."""
    return "`" + name.replace("`", "``") + "`"


def qualified(schema: str, table: str) -> str:
    return f"{quote(schema)}.{quote(table)}"
