"""Real clients through the proxy give exactly what they get from the server.

Every driver the issue names runs the same statements twice, once against the
primary and once through tidegate, as the same user; values, column metadata
and error codes must be identical.  The drivers also exercise the commands
only they send (COM_CHANGE_USER, COM_RESET_CONNECTION, COM_SET_OPTION, LOCAL
INFILE, 16 MiB+ packets, SEND_LONG_DATA), and the relay's session state is
checked against what the server reports.  The mariadb CLI and sysbench run as
subprocesses.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import io
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mysql.connector
import MySQLdb
import MySQLdb.connections
import pymysql
import pytest
from pymysql.constants import CLIENT

from proxy import sandbox
from proxy.protocol.constants import Capability
from tests.proxy.conftest import RunningProxy

USER, PASSWORD = "app", "app-secret"

try:
    from mysql.connector import HAVE_CEXT
except ImportError:  # pragma: no cover
    HAVE_CEXT = False


# -- drivers -------------------------------------------------------------------


@dataclass(frozen=True)
class Driver:
    name: str
    errors: tuple[type[BaseException], ...]
    prepared: bool = False

    def connect(self, host: str, port: int, database: str | None = None, **options: Any) -> Any:
        if self.name == "pymysql":
            kwargs: dict[str, Any] = {"charset": "utf8mb4", "autocommit": True}
            kwargs.update(options)
            return pymysql.connect(
                host=host, port=port, user=USER, password=PASSWORD, database=database, **kwargs
            )
        if self.name == "mysqlclient":
            kwargs = {"charset": "utf8mb4", "autocommit": True}
            kwargs.update(options)
            if database:
                kwargs["database"] = database
            return MySQLdb.connect(host=host, port=port, user=USER, password=PASSWORD, **kwargs)
        kwargs = {
            "charset": "utf8mb4",
            "collation": "utf8mb4_general_ci",
            "autocommit": True,
            "use_pure": self.name.startswith("connector-pure"),
        }
        kwargs.update(options)
        if database:
            kwargs["database"] = database
        return mysql.connector.connect(host=host, port=port, user=USER, password=PASSWORD, **kwargs)

    def cursor(self, connection: Any) -> Any:
        return connection.cursor(prepared=True) if self.prepared else connection.cursor()

    def code(self, error: BaseException) -> int:
        if isinstance(error, mysql.connector.Error):
            return int(error.errno or -1)
        return int(error.args[0])


PYMYSQL = Driver("pymysql", (pymysql.err.MySQLError,))
MYSQLCLIENT = Driver("mysqlclient", (MySQLdb.MySQLError,))
CONNECTOR = Driver("connector-pure", (mysql.connector.Error,))
CONNECTOR_PREPARED = Driver("connector-pure", (mysql.connector.Error,), prepared=True)
CONNECTOR_CEXT = Driver("connector-cext", (mysql.connector.Error,))
CONNECTOR_CEXT_PREPARED = Driver("connector-cext", (mysql.connector.Error,), prepared=True)

_NO_CEXT = pytest.mark.skipif(
    not HAVE_CEXT, reason="mysql-connector C extension not importable on this machine"
)
ALL_DRIVERS = [
    pytest.param(PYMYSQL, id="pymysql"),
    pytest.param(MYSQLCLIENT, id="mysqlclient"),
    pytest.param(CONNECTOR, id="connector"),
    pytest.param(CONNECTOR_PREPARED, id="connector-prepared"),
    pytest.param(CONNECTOR_CEXT, id="connector-cext", marks=_NO_CEXT),
    pytest.param(CONNECTOR_CEXT_PREPARED, id="connector-cext-prepared", marks=_NO_CEXT),
]
TEXT_DRIVERS = [p for p in ALL_DRIVERS if not p.values[0].prepared]  # type: ignore[union-attr]
CONNECTORS = [
    pytest.param(CONNECTOR, id="connector"),
    pytest.param(CONNECTOR_CEXT, id="connector-cext", marks=_NO_CEXT),
]
all_drivers = pytest.mark.parametrize("driver", ALL_DRIVERS)
text_drivers = pytest.mark.parametrize("driver", TEXT_DRIVERS)
connectors = pytest.mark.parametrize("driver", CONNECTORS)


def snapshot(cursor: Any) -> tuple[Any, ...]:
    """What a client sees of one result: metadata, rows, affected count."""
    description = cursor.description
    metadata: Any = None
    fields = getattr(getattr(cursor, "_result", None), "fields", None)  # pymysql
    if isinstance(cursor, pymysql.cursors.Cursor) and fields:
        metadata = [sorted(vars(f).items()) for f in fields]
    flags = getattr(cursor, "description_flags", None)  # mysqlclient
    rows = [tuple(row) for row in cursor.fetchall()] if description else None
    return (
        [tuple(d) for d in description] if description else None,
        metadata,
        flags,
        rows,
        cursor.rowcount,
    )


def collect(driver: Driver, connection: Any, sql: str, params: Any = None) -> list[Any]:
    """Every result set of one statement (or batch), errors included as ('error', code)."""
    cursor = driver.cursor(connection)
    out: list[Any] = []
    try:
        cursor.execute(sql, params)
        while True:
            out.append(snapshot(cursor))
            if not cursor.nextset():
                break
    except driver.errors as error:
        out.append(("error", driver.code(error)))
    except UnicodeDecodeError as error:  # the driver could not decode what it got
        out.append(("client-error", type(error).__name__, error.start))
    finally:
        try:
            cursor.close()
        except driver.errors:
            pass
    return out


def scalar(driver: Driver, connection: Any, sql: str, params: Any = None) -> Any:
    cursor = driver.cursor(connection)
    cursor.execute(sql, params)
    row = cursor.fetchone()
    cursor.fetchall()
    cursor.close()
    return row[0] if row else None


@dataclass
class Pair:
    """The same driver connected direct and through the proxy."""

    driver: Driver
    direct: Any
    proxied: Any

    def same(self, sql: str, params: Any = None) -> list[Any]:
        expected = collect(self.driver, self.direct, sql, params)
        got = collect(self.driver, self.proxied, sql, params)
        assert got == expected, f"{self.driver.name}: {sql!r} differs through the proxy"
        return got

    def close(self) -> None:
        for connection in (self.direct, self.proxied):
            try:
                connection.close()
            except Exception:
                pass


@pytest.fixture
def pair_factory(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> Iterator[Callable[..., Pair]]:
    pairs: list[Pair] = []

    def make(driver: Driver, **options: Any) -> Pair:
        pair = Pair(
            driver,
            driver.connect(primary.host, primary.port, database, **options),
            driver.connect(tidegate.host, tidegate.port, database, **options),
        )
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


def relay_session(tidegate: RunningProxy, connection_id: int) -> dict[str, Any]:
    def snapshot_state() -> dict[str, Any]:
        session = tidegate.proxy.relays[connection_id].session
        return {
            "user": session.user,
            "schema": session.schema,
            "in_transaction": session.in_transaction,
            "autocommit": session.autocommit,
            "prepared": len(session.prepared),
            "capabilities": session.capabilities,
        }

    return dict(tidegate.call(snapshot_state))


def proxy_connection_id(connection: Any) -> int:
    """The id the proxy announced in its handshake (its SessionState key)."""
    if isinstance(connection, pymysql.connections.Connection):
        return int(connection.server_thread_id[0])
    if isinstance(connection, MySQLdb.connections.Connection):
        return int(connection.thread_id())
    return int(connection.connection_id)


def server_session(driver: Driver, connection: Any, primary: sandbox.Instance) -> dict[str, Any]:
    cursor = connection.cursor()
    cursor.execute("SELECT DATABASE(), @@in_transaction, @@autocommit, CONNECTION_ID()")
    schema, in_transaction, autocommit, backend_id = cursor.fetchone()
    cursor.close()
    (count,) = primary.execute(
        "SELECT COUNT(*) FROM performance_schema.prepared_statements_instances p "
        "JOIN performance_schema.threads t ON p.OWNER_THREAD_ID = t.THREAD_ID "
        f"WHERE t.PROCESSLIST_ID = {int(backend_id)} AND p.STATEMENT_NAME IS NULL"
    )[0]
    return {
        "schema": schema,
        "in_transaction": bool(int(in_transaction)),
        "autocommit": bool(int(autocommit)),
        "prepared": int(count),
    }


def assert_session_matches(
    tidegate: RunningProxy, driver: Driver, connection: Any, primary: sandbox.Instance, step: str
) -> dict[str, Any]:
    relay = relay_session(tidegate, proxy_connection_id(connection))
    server = server_session(driver, connection, primary)
    facts = {key: relay[key] for key in server}
    assert facts == server, f"{driver.name} after {step!r}: relay {facts} != server {server}"
    return relay


# -- column types ----------------------------------------------------------------

TYPES_TABLE = """
CREATE TABLE types (
  id INT PRIMARY KEY,
  ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
  mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED,
  bi BIGINT, biu BIGINT UNSIGNED,
  dec1 DECIMAL(30,10), dec2 DECIMAL(5,0) UNSIGNED, f FLOAT, d DOUBLE,
  dt DATE, dtm DATETIME(6), dtm0 DATETIME, ts TIMESTAMP(3) NULL, tm TIME(6), yr YEAR,
  c CHAR(10), vc VARCHAR(100), tx TEXT, lt LONGTEXT,
  bn BINARY(8), vb VARBINARY(64), bl BLOB,
  en ENUM('a', 'b', 'ü'), st SET('x', 'y', 'z'),
  js JSON, bt BIT(17), b1 BIT(1), bo BOOLEAN
) DEFAULT CHARSET = utf8mb4
"""

TYPES_ROWS = """
INSERT INTO types VALUES
 (1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
  -9223372036854775808, 18446744073709551615,
  -12345678901234567890.0123456789, 99999, -3.4e38, -1.7976931348623157e308,
  '1000-01-01', '1000-01-01 00:00:00.000000', '9999-12-31 23:59:59', '1970-01-01 00:00:01.000',
  '-838:59:59.000000', 1901,
  '', '', '', '',
  x'0000000000000000', x'', x'',
  'a', '', '{}', b'0', b'0', FALSE),
 (2, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0,
  9223372036854775807, 0,
  12345678901234567890.0123456789, 0, 1.5, 2.2250738585072014e-308,
  '9999-12-31', '9999-12-31 23:59:59.999999', '2024-02-29 12:00:00', '2038-01-19 03:14:07.999',
  '838:59:59.999999', 2155,
  'ü🐟 x', 'héllo wörld 🐟🐠 日本語 ‮', 'tab\\tnew\\nline\\\\ quote'' "dq"', REPEAT('🐟', 5000),
  x'00ff7f80fefdfb0a', x'fb00fe00ff', x'00010203fbfcfdfeff',
  'ü', 'x,z', '{"k": [1, 2.5, null, "ü"], "n": {"e": true}}', b'10101010101010101', b'1', TRUE),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL)
"""


@pytest.fixture
def types_table(primary: sandbox.Instance, database: str) -> str:
    primary.execute(f"USE `{database}`", "SET time_zone = '+00:00'", TYPES_TABLE, TYPES_ROWS)
    # Every byte value, in a blob, in its own row.
    primary.execute(
        f"INSERT INTO `{database}`.types (id, bl, vb) VALUES (4, {_hex(bytes(range(256)))}, x'fb')"
    )
    return database


def _hex(data: bytes) -> str:
    return f"x'{data.hex()}'" if data else "''"


@all_drivers
def test_column_types(driver: Driver, pair_factory: Callable[..., Pair], types_table: str) -> None:
    pair = pair_factory(driver)
    for connection in (pair.direct, pair.proxied):
        collect(driver, connection, "SET time_zone = '+00:00'")
    columns = "*"
    if driver.prepared:
        # mysql-connector's binary row parser reads a YEAR value with the wrong width
        # and misparses every later column (direct too), so YEAR goes last for it.
        columns = "id, ti, tiu, si, siu, mi, miu, i, iu, bi, biu, dec1, dec2, f, d, dt, dtm, dtm0, "
        columns += "ts, tm, c, vc, tx, lt, bn, vb, bl, en, st, js, bt, b1, bo, yr"
    results = pair.same(f"SELECT {columns} FROM types WHERE id >= %s ORDER BY id", (0,))
    description, _, _, rows, _ = results[0]
    assert len(rows) == 4
    by_name = dict(zip([d[0] for d in description], rows[0], strict=True))
    assert by_name["biu"] == 18446744073709551615 or by_name["biu"] == b"18446744073709551615"
    row2 = dict(zip([d[0] for d in description], rows[1], strict=True))
    assert str(row2["dec1"]) == "12345678901234567890.0123456789"
    vc = row2["vc"]
    assert (vc.decode() if isinstance(vc, bytes | bytearray) else vc).startswith("héllo")
    assert rows[2][1:] == (None,) * (len(description) - 1)
    # Expressions, not just columns: computed types and charsets.
    pair.same(
        "SELECT 1, -1, 18446744073709551615, 1.5, 1e300, NULL, 'ü🐟', _binary'\\0\\xff', "
        "CAST(1 AS UNSIGNED), NOW() - NOW(), DATE('2024-01-01'), TIME('12:34:56.5'), "
        "JSON_OBJECT('a', 1), CAST('1.50' AS DECIMAL(10,4)), b'101', x'cafe', 0.1 + 0.2"
    )


@all_drivers
def test_parameters_of_every_type(driver: Driver, pair_factory: Callable[..., Pair]) -> None:
    """Client-side interpolation (text drivers) or binary parameters (prepared=True)."""
    pair = pair_factory(driver)
    values: list[Any] = [
        0,
        -1,
        127,
        -(2**63),
        2**63 - 1,
        2**64 - 1,
        decimal.Decimal("-12345678901234567890.0123456789"),
        1.5,
        -2.2250738585072014e-308,
        datetime.date(2024, 2, 29),
        datetime.datetime(1999, 12, 31, 23, 59, 59, 999999),
        datetime.datetime(2000, 1, 1),
        datetime.timedelta(days=-1, seconds=3, microseconds=7),
        datetime.timedelta(hours=838),
        "ü🐟 日本語",
        "quote ' \" \\ \x00 nul",
        "",
        bytes(range(256)),
        b"",
        None,
        True,
    ]
    table = (
        "CREATE TEMPORARY TABLE params (id INT PRIMARY KEY AUTO_INCREMENT, "
        "v VARBINARY(1000), t TEXT, d DECIMAL(40,10), f DOUBLE, dt DATETIME(6), tm TIME(6))"
    )
    for connection in (pair.direct, pair.proxied):
        assert collect(driver, connection, table)[0][3] is None
    for value in values:
        pair.same("SELECT %s", (value,))
        pair.same("INSERT INTO params (v) VALUES (%s)", (value,))
    # The same statement text, parameters re-bound with other types each time.
    for params in ((1, "a", None), ("x", 2.5, b"\x00"), (None, None, None), (2**64 - 1, -1, 0)):
        pair.same("SELECT %s, %s, %s", params)
    pair.same(
        "INSERT INTO params (t, d, f, dt, tm) VALUES (%s, %s, %s, %s, %s)",
        (
            "ü",
            decimal.Decimal("1.25"),
            1e-5,
            datetime.datetime(2020, 2, 2, 2, 2, 2, 2),
            datetime.timedelta(seconds=1, microseconds=500000),
        ),
    )
    pair.same("SELECT * FROM params ORDER BY id")


@text_drivers
def test_multi_statements_and_errors_mid_batch(
    driver: Driver, pair_factory: Callable[..., Pair]
) -> None:
    options = {"client_flag": CLIENT.MULTI_STATEMENTS} if driver is PYMYSQL else {}
    pair = pair_factory(driver, **options)
    pair.same("CREATE TEMPORARY TABLE m (id INT PRIMARY KEY, v VARCHAR(10))")
    results = pair.same(
        "INSERT INTO m VALUES (1, 'a'), (2, 'b'); SELECT * FROM m ORDER BY id; "
        "SELECT 'two', 2.5, NULL; UPDATE m SET v = 'c' WHERE id = 2; SELECT COUNT(*) FROM m"
    )
    assert len(results) == 5
    # An error in the middle: the sets before it arrive, the error surfaces, the rest never runs.
    results = pair.same("SELECT 1; SELECT * FROM no_such_table; SELECT 3")
    assert results[-1] == ("error", 1146)
    pair.same("SELECT 'still usable'")
    results = pair.same("INSERT INTO m VALUES (3, 'x'); INSERT INTO m VALUES (3, 'dup'); SELECT 9")
    assert results[-1] == ("error", 1062)
    pair.same("SELECT * FROM m ORDER BY id")
    results = pair.same("SELECT 1; SELEC 2")
    assert results[-1] == ("error", 1064)
    pair.same("SELECT 'usable again'")


@text_drivers
def test_stored_procedure_with_two_result_sets(
    driver: Driver, pair_factory: Callable[..., Pair], primary: sandbox.Instance, database: str
) -> None:
    primary.execute(
        f"CREATE PROCEDURE `{database}`.two_sets(IN n INT) BEGIN "
        "SELECT n AS first, 'ü' AS label; SELECT n + 1 AS second UNION SELECT n + 2; END",
        f"CREATE PROCEDURE `{database}`.fails_midway() BEGIN "
        "SELECT 1 AS ok_first; SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'boom', MYSQL_ERRNO = 1644; "
        "END",
    )
    pair = pair_factory(driver)
    results = pair.same("CALL two_sets(5)")
    assert [r[3] for r in results[:2]] == [[(5, "ü")], [(6,), (7,)]] or driver is not PYMYSQL
    assert len(results) == 3  # two sets and the CALL's own OK
    results = pair.same("CALL fails_midway()")
    assert results[-1] == ("error", 1644)
    pair.same("SELECT 'after the failed call'")


@connectors
def test_connector_prepared_statements(
    driver: Driver,
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
) -> None:
    """COM_STMT_* from mysql-connector: long data, reset, close then reuse."""
    pair = pair_factory(driver)
    blob = os.urandom(300_000)
    outcomes = []
    for connection in (pair.direct, pair.proxied):
        cursor = connection.cursor()
        cursor.execute("CREATE TEMPORARY TABLE ld (id INT PRIMARY KEY, b LONGBLOB, t TEXT)")
        prepared = connection.cursor(prepared=True)
        # A file-like parameter goes as COM_STMT_SEND_LONG_DATA chunks.
        prepared.execute("INSERT INTO ld VALUES (%s, %s, %s)", (1, io.BytesIO(blob), "ü"))
        prepared.execute("INSERT INTO ld VALUES (%s, %s, %s)", (2, b"short", None))
        prepared.execute("INSERT INTO ld VALUES (%s, %s, %s)", (3, io.BytesIO(b"tiny"), "small"))
        select = connection.cursor(prepared=True)
        select.execute("SELECT id, b, t FROM ld WHERE id >= %s ORDER BY id", (0,))
        rows = [tuple(r) for r in select.fetchall()]
        if connection is pair.proxied:
            state = assert_session_matches(tidegate, driver, connection, primary, "prepare")
            assert state["prepared"] == 2
        # COM_STMT_RESET between executions (long data + reset: see test_fidelity).
        statement_id = select._prepared["statement_id"]
        connection.cmd_stmt_reset(statement_id)
        select.execute("SELECT id, b, t FROM ld WHERE id >= %s ORDER BY id", (2,))
        after_reset = [tuple(r) for r in select.fetchall()]
        # COM_STMT_CLOSE behind the cursor's back, then execute the same statement again.
        connection.cmd_stmt_close(statement_id)
        try:
            select.execute("SELECT id, b, t FROM ld WHERE id >= %s ORDER BY id", (2,))
            select.fetchall()
            reuse = None
        except mysql.connector.Error as error:
            reuse = error.errno
        cursor.execute("SELECT 'usable'")
        usable = cursor.fetchall()
        outcomes.append((rows, after_reset, reuse, usable))
    assert outcomes[1] == outcomes[0]
    rows, after_reset, reuse, usable = outcomes[1]
    assert bytes(rows[0][1]) == blob and len(rows) == 3
    assert [r[0] for r in after_reset] == [2, 3]
    assert reuse == 1243  # ER_UNKNOWN_STMT_HANDLER
    assert usable == [("usable",)]
    assert_session_matches(tidegate, driver, pair.proxied, primary, "COM_STMT_CLOSE")


# -- commands only drivers send ------------------------------------------------


def test_admin_commands_pymysql(
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
    database: str,
) -> None:
    pair = pair_factory(PYMYSQL)
    for connection in (pair.direct, pair.proxied):
        connection.ping(reconnect=False)
        connection.select_db("mysql")
    assert_session_matches(tidegate, PYMYSQL, pair.proxied, primary, "select_db")
    pair.same("SELECT DATABASE()")
    for connection in (pair.direct, pair.proxied):
        with pytest.raises(pymysql.err.OperationalError) as info:
            connection.select_db("no_such_db")
        assert info.value.args[0] == 1049
        connection.select_db(database)
    assert_session_matches(tidegate, PYMYSQL, pair.proxied, primary, "select_db back")


def test_admin_commands_mysqlclient(
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
) -> None:
    pair = pair_factory(MYSQLCLIENT)
    for connection in (pair.direct, pair.proxied):
        connection.ping()
        stat = connection.stat()
        assert stat.startswith("Uptime:") and "Questions:" in stat
        connection.select_db("mysql")
    assert_session_matches(tidegate, MYSQLCLIENT, pair.proxied, primary, "select_db")
    # COM_SET_OPTION: multi-statements off, then on again.
    for connection in (pair.direct, pair.proxied):
        connection.set_server_option(1)  # MYSQL_OPTION_MULTI_STATEMENTS_OFF
    results = pair.same("SELECT 1; SELECT 2")
    assert results == [("error", 1064)]
    for connection in (pair.direct, pair.proxied):
        connection.set_server_option(0)
    assert len(pair.same("SELECT 1; SELECT 2")) == 2


@connectors
def test_statistics_ping_init_db(
    driver: Driver,
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
) -> None:
    pair = pair_factory(driver)
    for connection in (pair.direct, pair.proxied):
        assert connection.cmd_statistics()["Uptime"] > 0
        assert connection.cmd_ping()["status_flag"] & 0x0002
        connection.cmd_init_db("mysql")
    assert_session_matches(tidegate, driver, pair.proxied, primary, "COM_INIT_DB")
    pair.same("SELECT DATABASE()")


@connectors
def test_change_user(
    driver: Driver,
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
    database: str,
) -> None:
    """COM_CHANGE_USER to root and back; the session starts over on the server."""
    pair = pair_factory(driver)
    outcomes = []
    for connection in (pair.direct, pair.proxied):
        connection.cmd_query("SET @marker = 'before'")
        connection.cmd_query("BEGIN")
        connection.cmd_change_user(username="root", password="root", database=database)
        cursor = connection.cursor()
        cursor.execute("SELECT CURRENT_USER(), DATABASE(), @marker, @@in_transaction")
        outcomes.append(cursor.fetchall())
        cursor.close()
    assert outcomes[1] == outcomes[0]
    assert outcomes[1][0] == ("root@%", database, None, 0)
    state = assert_session_matches(tidegate, driver, pair.proxied, primary, "COM_CHANGE_USER")
    assert state["user"] == "root"
    for connection in (pair.direct, pair.proxied):
        connection.cmd_change_user(username=USER, password=PASSWORD, database="mysql")
    pair.same("SELECT CURRENT_USER(), DATABASE()")
    state = assert_session_matches(tidegate, driver, pair.proxied, primary, "change back")
    assert state["user"] == USER


@connectors
def test_failed_change_user_resets_the_session(
    driver: Driver,
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
    database: str,
) -> None:
    pair = pair_factory(driver)
    outcomes = []
    for connection in (pair.direct, pair.proxied):
        connection.cmd_query("SET @marker = 'before'")
        with pytest.raises(mysql.connector.Error) as info:
            connection.cmd_change_user(username=USER, password="wrong", database=database)
        assert info.value.errno == 1045
        outcomes.append(collect(driver, connection, "SELECT CURRENT_USER(), DATABASE(), @marker"))
    assert outcomes[1] == outcomes[0]


@connectors
def test_reset_connection(
    driver: Driver,
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
    database: str,
) -> None:
    """COM_RESET_CONNECTION: user variables, temp tables, prepared statements and the
    transaction go; the schema stays."""
    pair = pair_factory(driver)
    for connection in (pair.direct, pair.proxied):
        cursor = connection.cursor()
        cursor.execute("SET @marker = 'set'")
        cursor.execute("CREATE TEMPORARY TABLE tmp (id INT)")
        cursor.execute("BEGIN")
        cursor.execute("INSERT INTO tmp VALUES (1)")
        prepared = connection.cursor(prepared=True)
        prepared.execute("SELECT %s", (1,))
        prepared.fetchall()
        if connection is pair.proxied:
            state = assert_session_matches(tidegate, driver, connection, primary, "before reset")
            assert state["in_transaction"] and state["prepared"] == 1
        assert connection.cmd_reset_connection()
    pair.same("SELECT @marker, DATABASE(), @@autocommit, @@in_transaction")
    results = pair.same("SELECT * FROM tmp")
    assert results == [("error", 1146)]
    state = assert_session_matches(tidegate, driver, pair.proxied, primary, "COM_RESET_CONNECTION")
    assert state["prepared"] == 0 and state["schema"] == database


# -- LOCAL INFILE ------------------------------------------------------------------


@pytest.fixture
def infile(tmp_path: Path) -> Path:
    path = tmp_path / "rows.tsv"
    lines = [f"{n}\tvalue {n} ü🐟\t{'x' * (n % 700)}" for n in range(1, 20001)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert path.stat().st_size > 4 * 1024 * 1024 // 2  # several packets' worth
    return path


LOAD = "LOAD DATA LOCAL INFILE '{}' INTO TABLE li CHARACTER SET utf8mb4 (id, v, pad)"
LI_TABLE = "CREATE TEMPORARY TABLE li (id INT PRIMARY KEY, v VARCHAR(50), pad TEXT)"


@pytest.mark.parametrize(
    ("driver", "allowed"),
    [
        pytest.param(PYMYSQL, {"local_infile": True}, id="pymysql"),
        pytest.param(MYSQLCLIENT, {"local_infile": 1}, id="mysqlclient"),
        pytest.param(CONNECTOR, {"allow_local_infile": True}, id="connector"),
    ],
)
def test_load_data_local_infile(
    driver: Driver, allowed: dict[str, Any], pair_factory: Callable[..., Pair], infile: Path
) -> None:
    pair = pair_factory(driver, **allowed)
    pair.same(LI_TABLE)
    results = pair.same(LOAD.format(infile))
    assert results[0][4] == 20000
    pair.same("SELECT COUNT(*), SUM(LENGTH(pad)), MAX(v) FROM li")
    pair.same("SELECT * FROM li WHERE id IN (1, 699, 20000) ORDER BY id")
    if driver is not CONNECTOR:  # mysql-connector drops its own connection on a missing file
        # The client answers the server's request with an empty file: an error or a no-op.
        pair.same(LOAD.format(infile.with_name("missing.tsv")))
        pair.same("SELECT COUNT(*) FROM li")


@pytest.mark.parametrize(
    "driver",
    [pytest.param(PYMYSQL, id="pymysql"), pytest.param(MYSQLCLIENT, id="mysqlclient")],
)
def test_load_data_local_infile_refused(
    driver: Driver, pair_factory: Callable[..., Pair], infile: Path
) -> None:
    """A client that did not enable LOCAL INFILE gets the server's clear error, and lives on."""
    # libmariadb (mysqlclient) enables LOCAL INFILE unless told not to.
    pair = pair_factory(driver, **({"local_infile": 0} if driver is MYSQLCLIENT else {}))
    pair.same(LI_TABLE)
    results = pair.same(LOAD.format(infile))
    assert results[0][0] == "error" and results[0][1] in (1148, 2068, 4166), results
    pair.same("SELECT 'usable', COUNT(*) FROM li")


# -- 16 MiB and more -----------------------------------------------------------

BIG = 17 * 1024 * 1024 + 12345


@pytest.fixture(scope="module")
def big_blob() -> bytes:
    return (
        os.urandom(BIG // 2)
        + bytes(range(256)) * ((BIG - BIG // 2) // 256)
        + b"\xfe" * ((BIG - BIG // 2) % 256)
    )


def test_large_payloads_both_directions(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str, big_blob: bytes
) -> None:
    assert len(big_blob) == BIG
    digest = hashlib.md5(big_blob).hexdigest()
    primary.execute(f"CREATE TABLE `{database}`.big (id INT PRIMARY KEY, b LONGBLOB)")
    max_packet = 64 * 1024 * 1024
    # client -> server: a 17 MiB COM_QUERY (text) through pymysql ...
    connection = PYMYSQL.connect(
        tidegate.host, tidegate.port, database, max_allowed_packet=max_packet
    )
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO big VALUES (1, %s)", (big_blob,))
    # ... and a 17 MiB COM_STMT_EXECUTE (binary) through mysql-connector.
    connector = CONNECTOR.connect(tidegate.host, tidegate.port, database)
    prepared = connector.cursor(prepared=True)
    prepared.execute("INSERT INTO big VALUES (%s, %s)", (2, big_blob))
    (server_digests,) = [
        primary.execute(f"SELECT GROUP_CONCAT(MD5(b) ORDER BY id) FROM `{database}`.big")[0]
    ]
    assert server_digests[0] == f"{digest},{digest}"
    # server -> client: the blob first in the row, so a row packet starts with 0xfe
    # (8-byte length) and runs over the 16 MiB frame limit, with and without DEPRECATE_EOF.
    with connection.cursor() as cursor:
        cursor.execute("SELECT b, id FROM big WHERE id = 1")
        assert cursor.fetchone() == (big_blob, 1)
    connection.close()
    # (mysql-connector's pure binary row parser cannot read a > 16 MiB row even direct,
    # so the binary read-back is covered by the raw-frame tests in test_fidelity.)
    text = connector.cursor()
    text.execute("SELECT id, b FROM big ORDER BY id")
    assert [(r[0], hashlib.md5(r[1]).hexdigest()) for r in text.fetchall()] == [
        (1, digest),
        (2, digest),
    ]
    connector.close()
    mysqlclient = MYSQLCLIENT.connect(tidegate.host, tidegate.port, database)
    cursor = mysqlclient.cursor()
    cursor.execute("SELECT b FROM big WHERE id = 2")
    assert cursor.fetchone()[0] == big_blob
    mysqlclient.close()


# -- transactions and session state -------------------------------------------


@text_drivers
def test_transactions_and_session_state(
    driver: Driver,
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
    database: str,
) -> None:
    pair = pair_factory(driver)
    pair.same("CREATE TEMPORARY TABLE tx (id INT PRIMARY KEY, v INT) ENGINE = InnoDB")
    steps = [
        ("BEGIN", True),
        ("INSERT INTO tx VALUES (1, 1)", True),
        ("COMMIT", False),
        ("START TRANSACTION", True),
        ("INSERT INTO tx VALUES (2, 2)", True),
        ("ROLLBACK", False),
        ("BEGIN; UPDATE tx SET v = 10 WHERE id = 1", True),
        ("SAVEPOINT s1", True),
        ("UPDATE tx SET v = 11 WHERE id = 1", True),
        ("ROLLBACK TO SAVEPOINT s1", True),
        ("COMMIT", False),
    ]
    for sql, in_transaction in steps:
        if ";" in sql and driver is PYMYSQL:
            for part in sql.split(";"):
                pair.same(part)
        else:
            pair.same(sql)
        state = assert_session_matches(tidegate, driver, pair.proxied, primary, sql)
        assert state["in_transaction"] is in_transaction
    results = pair.same("SELECT * FROM tx ORDER BY id")
    assert results[0][3] == [(1, 10)]


@pytest.mark.parametrize(
    "driver", [pytest.param(PYMYSQL, id="pymysql"), pytest.param(CONNECTOR, id="connector")]
)
def test_autocommit_off_session_state(
    driver: Driver,
    pair_factory: Callable[..., Pair],
    tidegate: RunningProxy,
    primary: sandbox.Instance,
    database: str,
) -> None:
    """autocommit=False as most drivers default to: state must follow COMMIT/ROLLBACK."""
    pair = pair_factory(driver, autocommit=False)
    pair.same("CREATE TEMPORARY TABLE ac (id INT PRIMARY KEY) ENGINE = InnoDB")
    for sql in (
        "SELECT 1",
        "INSERT INTO ac VALUES (1)",
        "COMMIT",
        "INSERT INTO ac VALUES (2)",
        "ROLLBACK",
    ):
        pair.same(sql)
        assert_session_matches(tidegate, driver, pair.proxied, primary, sql)


# -- capabilities, authentication ----------------------------------------------


@pytest.mark.parametrize(
    ("driver", "client_flags"),
    [
        pytest.param(PYMYSQL, lambda c: c.client_flag, id="pymysql"),
        pytest.param(CONNECTOR, lambda c: c._client_flags, id="connector"),
        pytest.param(MYSQLCLIENT, None, id="mysqlclient"),
    ],
)
def test_capabilities_negotiated_per_client(
    driver: Driver,
    client_flags: Callable[[Any], int] | None,
    tidegate: RunningProxy,
    database: str,
) -> None:
    """The relay negotiates with each client what that client asked for (DEPRECATE_EOF
    included: none of these drivers asks for it; the raw-frame tests cover it on)."""
    connection = driver.connect(tidegate.host, tidegate.port, database)
    try:
        state = relay_session(tidegate, proxy_connection_id(connection))
        negotiated = state["capabilities"]
        assert not negotiated & Capability.DEPRECATE_EOF
        assert negotiated & Capability.PROTOCOL_41 and negotiated & Capability.MULTI_RESULTS
        if client_flags is not None:
            asked = client_flags(connection)
            relayable = asked & ~int(Capability.SSL | Capability.COMPRESS)
            assert negotiated & relayable == negotiated
            assert negotiated & Capability.DEPRECATE_EOF == asked & Capability.DEPRECATE_EOF
    finally:
        connection.close()


def _login_footprint(primary: sandbox.Instance, user: str) -> tuple[int, int, int]:
    rows = dict(
        primary.execute(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('Aborted_connects', 'Access_denied_errors')"
        )
    )
    (sessions,) = primary.execute(
        f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '{user}'"
    )[0]
    return int(rows["Aborted_connects"]), int(rows["Access_denied_errors"]), int(sessions)


@pytest.mark.parametrize(
    ("user", "password"),
    [("app", "wrong"), ("nobody_here", "x"), ("app", "")],
    ids=["wrong-password", "unknown-user", "no-password"],
)
@pytest.mark.parametrize("driver", TEXT_DRIVERS)
def test_access_denied_opens_no_backend_connection(
    driver: Driver, user: str, password: str, tidegate: RunningProxy, primary: sandbox.Instance
) -> None:
    before = _login_footprint(primary, user)
    with pytest.raises(driver.errors) as info:
        if driver is PYMYSQL:
            pymysql.connect(host=tidegate.host, port=tidegate.port, user=user, password=password)
        elif driver is MYSQLCLIENT:
            MySQLdb.connect(host=tidegate.host, port=tidegate.port, user=user, password=password)
        else:
            mysql.connector.connect(
                host=tidegate.host,
                port=tidegate.port,
                user=user,
                password=password,
                use_pure=driver.name == "connector-pure",
            )
    assert driver.code(info.value) == 1045
    assert "Access denied" in str(info.value)
    # The server never saw a login attempt: no failed handshake, no session.
    assert _login_footprint(primary, user) == before


@text_drivers
def test_unknown_database_forwarded(
    driver: Driver, tidegate: RunningProxy, primary: sandbox.Instance
) -> None:
    errors = []
    for host, port in ((primary.host, primary.port), (tidegate.host, tidegate.port)):
        with pytest.raises(driver.errors) as info:
            driver.connect(host, port, "no_such_database")
        errors.append((driver.code(info.value), str(info.value)))
    assert errors[0][0] == errors[1][0] == 1049
    assert "no_such_database" in errors[1][1]


def test_kill_by_the_thread_id_from_the_handshake(
    tidegate: RunningProxy, primary: sandbox.Instance
) -> None:
    outcomes = []
    for host, port in ((primary.host, primary.port), (tidegate.host, tidegate.port)):
        victim = PYMYSQL.connect(host, port)
        killer = PYMYSQL.connect(host, port)
        # KILL QUERY <id> while the victim sleeps: the sleep ends early.
        box: dict[str, Any] = {}

        def sleep(victim: Any = victim, box: dict[str, Any] = box) -> None:
            box["started"] = time.monotonic()
            box["result"] = collect(PYMYSQL, victim, "SELECT SLEEP(3)")
            box["seconds"] = time.monotonic() - box["started"]

        thread = threading.Thread(target=sleep)
        thread.start()
        # Kill only once the server runs the sleep (a fixed pause can be too short on a loaded machine).
        deadline = time.monotonic() + 20
        while not primary.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                                  "WHERE INFO = 'SELECT SLEEP(3)'")[0][0]:
            assert time.monotonic() < deadline, "the victim's SLEEP never started"
            time.sleep(0.01)
        killed_query = collect(PYMYSQL, killer, f"KILL QUERY {victim.thread_id()}")
        thread.join(10)
        # KILL <id> (pymysql's Connection.kill): the victim's connection ends.
        try:
            killer.kill(victim.thread_id())
            killed: Any = "ok"
        except pymysql.err.MySQLError as error:
            killed = error.args[0]
        alive = collect(PYMYSQL, victim, "SELECT 1")  # 2013 once killed
        outcomes.append((killed_query, box["result"], box["seconds"] < 2.5, killed, alive))
        killer.close()
    assert outcomes[1] == outcomes[0]


# -- the mariadb CLI -------------------------------------------------------------


def run_cli(
    host: str, port: int, database: str, sql: str, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            "mariadb",
            "--no-defaults",
            "--host",
            host,
            "--port",
            str(port),
            "-u",
            USER,
            f"-p{PASSWORD}",
            "--default-character-set=utf8mb4",
            *extra,
            database,
        ],
        input=sql.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )


CLI_SCRIPT = """
SET time_zone = '+00:00';
SELECT * FROM types ORDER BY id;
SELECT 1 AS a; SELECT 'ü🐟' AS b, NULL AS c;
CALL two_sets(3);
use mysql
SELECT DATABASE();
use {db}
CREATE TEMPORARY TABLE li (id INT PRIMARY KEY, v VARCHAR(50), pad TEXT);
{load};
SELECT COUNT(*), MD5(GROUP_CONCAT(v ORDER BY id)) FROM li;
SELECT * FROM no_such_table;
SELECT 'after error';
"""


def test_mariadb_cli(
    tidegate: RunningProxy, primary: sandbox.Instance, types_table: str, infile: Path
) -> None:
    database = types_table
    primary.execute(
        f"CREATE PROCEDURE `{database}`.two_sets(IN n INT) BEGIN SELECT n AS first; "
        "SELECT n + 1 AS second, 'x' AS label; END"
    )
    script = CLI_SCRIPT.format(db=database, load=LOAD.format(infile))
    outputs = []
    for host, port in ((primary.host, primary.port), (tidegate.host, tidegate.port)):
        for options in (
            ("--batch", "--column-type-info", "--force", "--local-infile=1"),
            ("--table", "--force", "--local-infile=1", "--binary-as-hex"),
            ("--batch", "--force", "--local-infile=0"),
        ):
            result = run_cli(host, port, database, script, *options)
            outputs.append((options, result.returncode, result.stdout, result.stderr))
    direct, proxied = outputs[:3], outputs[3:]
    for expected, got in zip(direct, proxied, strict=True):
        assert got == expected, f"mariadb {' '.join(expected[0])} differs through the proxy"
    batch = proxied[0][2].decode("utf-8", "replace")
    assert "18446744073709551615" in batch and "ü🐟" in batch
    assert "20000" in batch and "after error" in batch
    assert b"ERROR 1146" in proxied[0][3]
    refused = proxied[2][3].decode()
    assert re.search(r"ERROR (1148|2068|4166)", refused), refused


def test_mariadb_cli_access_denied(tidegate: RunningProxy) -> None:
    result = subprocess.run(
        [
            "mariadb",
            "--no-defaults",
            "--host",
            tidegate.host,
            "--port",
            str(tidegate.port),
            "-u",
            USER,
            "-pnot-it",
            "-e",
            "SELECT 1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "ERROR 1045" in result.stderr


# -- sysbench ----------------------------------------------------------------------


def sysbench(test: str, command: str, host: str, port: int, database: str, *extra: str) -> str:
    result = subprocess.run(
        [
            "sysbench",
            test,
            "--db-driver=mysql",
            f"--mysql-host={host}",
            f"--mysql-port={port}",
            f"--mysql-user={USER}",
            f"--mysql-password={PASSWORD}",
            f"--mysql-db={database}",
            "--tables=2",
            "--table-size=2000",
            *extra,
            command,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def sysbench_counts(output: str) -> dict[str, int]:
    counts = {}
    for name in ("transactions", "queries", "ignored errors", "reconnects"):
        match = re.search(rf"^\s*{name}:\s+(\d+)", output, re.M)
        assert match, f"no {name!r} in sysbench output:\n{output}"
        counts[name] = int(match.group(1))
    return counts


@pytest.mark.parametrize(("test", "threads"), [("oltp_read_write", 1), ("oltp_point_select", 4)])
def test_sysbench_through_proxy(
    test: str, threads: int, tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    sysbench(test, "prepare", primary.host, primary.port, database)
    output = sysbench(
        test,
        "run",
        tidegate.host,
        tidegate.port,
        database,
        f"--threads={threads}",
        "--time=3",
        "--db-ps-mode=auto",
    )
    counts = sysbench_counts(output)
    assert counts["ignored errors"] == 0 and counts["reconnects"] == 0, output
    assert counts["transactions"] > 50, output
