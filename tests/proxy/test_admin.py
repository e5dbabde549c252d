"""The admin SQL port, driven by real clients (pymysql and the mariadb CLI).

One proxy in front of the sandbox primary serves the module; its admin port
listens on an ephemeral loopback port with a password.  Migration statements
are checked against a fake migration service assigned to ``app.migrations``:
what matters here is that the SQL is parsed and dispatched exactly.
"""

from __future__ import annotations

import builtins
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pymysql
import pytest
import trio
from pymysql.connections import Connection

from proxy import sandbox
from proxy.admin import serve_admin
from proxy.admin.server import is_loopback
from proxy.admin.statements import parse_options, parse_verb
from proxy.admin.tables import AdminError
from proxy.config import AdminConfig, Limits
from proxy.control import Control, ControlError
from tests.proxy.conftest import RunningProxy, start_proxy

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-secret"



def _migration(migration_id: int, table: str, state: str, leader: str | None, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": migration_id, "schema_name": "shop", "table_name": table,
        "alter_statement": "ADD COLUMN note TEXT", "options": "{}", "state": state, "leader": leader,
        "requested_at": None, "updated_at": None, "rows_copied": None, "rows_estimate": None,
        "progress_percent": None, "rows_per_second": None, "eta_seconds": None,
        "binlog_lag_seconds": None, "throttle_reason": None, "postponed": None,
        "cut_over_attempts": None, "last_cut_over_failure": None, "error": None, "message": None,
    }
    row.update(extra)
    return row


class FakeService:
    """Stands in for the migration service: records what the admin port asks.

    Migration 3 is led by this sidecar (it is in ``running``), 42 by another
    sidecar, 7 is pending and 8 is complete.
    """

    def __init__(self) -> None:
        self.running: dict[int, Any] = {3: object()}
        self.calls: list[tuple[Any, ...]] = []
        self.next_id = 100
        self.rows = [
            _migration(3, "orders", "copying", "pod-a", rows_copied=250, rows_estimate=1000,
                       progress_percent=25.0, eta_seconds=120.0, postponed=True, cut_over_attempts=0,
                       options='{"chunk_size": "2000"}'),
            _migration(7, "carts", "pending", None),
            _migration(8, "users", "complete", "pod-a", cut_over_attempts=2),
            _migration(42, "items", "copying", "pod-b", throttle_reason="deploy", postponed=False,
                       cut_over_attempts=1, last_cut_over_failure="drain timeout: session 12"),
        ]

    async def list(self) -> list[dict[str, Any]]:
        return self.rows

    async def sidecars(self) -> builtins.list[dict[str, Any]]:
        return [{"id": "pod-a", "host": "10.0.0.5", "pid": 7, "listen": "127.0.0.1:6033",
                 "holding": None, "last_ack": "shop.orders#3 ok", "live": True, "this_sidecar": True}]

    async def request(self, schema: str, table: str, alter: str, options: dict[str, str]) -> int:
        self.calls.append(("request", schema, table, alter, options))
        self.next_id += 1
        return self.next_id

    async def command(self, migration_id: int, name: str, value: str | None) -> None:
        if migration_id not in {row["id"] for row in self.rows}:
            raise ControlError(f"no migration with id {migration_id}")
        if name == "set:max_load" and value == "Threads_running=999":
            raise ControlError("max_load cannot change while a migration runs")
        self.calls.append(("command", migration_id, name, value))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def admin_proxy(
    primary: sandbox.Instance, app_user: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    config = tmp_path_factory.mktemp("admin") / "tidegate.toml"
    config.write_text(f'[admin]\nuser = "{ADMIN_USER}"\npassword = "{ADMIN_PASSWORD}"\n')
    running = start_proxy(
        ["--backend", primary.dsn(), "--admin-listen", "127.0.0.1:0", "--config", str(config)]
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def admin(admin_proxy: RunningProxy) -> Iterator[Connection]:
    connection = admin_connect(admin_proxy)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def service(admin_proxy: RunningProxy) -> Iterator[FakeService]:
    fake = FakeService()
    before = admin_proxy.app.migrations
    admin_proxy.call(setattr, admin_proxy.app, "migrations", fake)
    try:
        yield fake
    finally:
        admin_proxy.call(setattr, admin_proxy.app, "migrations", before)


def admin_address(running: RunningProxy) -> tuple[str, int]:
    address = running.app.admin_listening
    assert address is not None
    return address


def admin_connect(running: RunningProxy, **overrides: Any) -> Connection:
    host, port = admin_address(running)
    options: dict[str, Any] = {"host": host, "port": port, "user": ADMIN_USER,
                               "password": ADMIN_PASSWORD, "connect_timeout": 5}
    options.update(overrides)
    return pymysql.connect(**options)


def rows(connection: Connection, sql: str) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def dicts(connection: Connection, sql: str) -> list[dict[str, Any]]:
    with connection.cursor(pymysql.cursors.DictCursor) as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def info_of(connection: Connection) -> str:
    """The OK packet's info text (pymysql keeps its length prefix)."""
    return bytes(connection._result.message).decode("utf-8", "replace")


def error_of(connection: Connection, sql: str) -> tuple[int, str]:
    with pytest.raises(pymysql.MySQLError) as info:
        rows(connection, sql)
    code, message = info.value.args[0], info.value.args[1]
    return int(code), str(message)


# --------------------------------------------------------------------------- reads


def test_sessions_show_a_client_in_a_transaction(
    admin_proxy: RunningProxy, admin: Connection, database: str
) -> None:
    app = pymysql.connect(host=admin_proxy.host, port=admin_proxy.port, user="app",
                          password="app-secret", database=database, autocommit=True)
    try:
        app_id = app.thread_id()
        with app.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT 1")
        [row] = dicts(admin, f"SELECT id, user, `schema`, in_transaction, statement, held "
                             f"FROM sessions WHERE id = {app_id}")
        assert row == {"id": app_id, "user": "app", "schema": database, "in_transaction": 1,
                       "statement": None, "held": 0}
        [(seconds,)] = rows(admin, f"SELECT transaction_seconds FROM sessions WHERE id = {app_id}")
        assert seconds is not None and seconds >= 0
        with app.cursor() as cursor:
            cursor.execute("COMMIT")
        assert rows(admin, f"SELECT in_transaction FROM sessions WHERE id = {app_id}") == [(0,)]
        assert (app_id,) in rows(admin, "SELECT id FROM sessions WHERE user = 'app' AND NOT in_transaction")
    finally:
        app.close()


def test_backends_stats_settings(
    admin_proxy: RunningProxy, admin: Connection, primary: sandbox.Instance
) -> None:
    [backend] = dicts(admin, "SELECT name, role, address, tls FROM backends")
    assert backend["role"] == "primary"
    assert backend["address"].endswith(f":{primary.port}") and backend["tls"] == 0
    stats = dict(rows(admin, "SELECT name, value FROM stats"))
    assert {"client_connections", "held_statements", "active_holds", "holds_finished"} <= set(stats)
    assert stats["held_statements"] == 0
    assert rows(admin, "SELECT value FROM settings WHERE name = 'limits.max_client_connections'") == [(1000,)]
    assert rows(admin, "SELECT * FROM holds") == []


def test_show_tables_and_columns(admin: Connection) -> None:
    assert [name for (name,) in rows(admin, "SHOW TABLES")] == sorted(
        ["sessions", "backends", "holds", "stats", "settings", "migrations", "sidecars", "rules", "fleet_rules",
         "fleet_rule_versions", "sidecar_rules", "blockers", "events"]
    )
    fields = [row[0] for row in rows(admin, "SHOW COLUMNS FROM sessions")]
    assert fields[:4] == ["id", "user", "client", "schema"] and "in_transaction" in fields
    assert [row[0] for row in rows(admin, "DESCRIBE backends")][:3] == ["name", "role", "address"]


def test_projection_where_order_limit(admin: Connection) -> None:
    got = rows(admin, "SELECT name AS setting FROM settings WHERE name LIKE 'limits.%timeout' "
                      "ORDER BY setting DESC LIMIT 2")
    assert got == [("limits.idle_timeout",), ("limits.handshake_timeout",)]
    with admin.cursor() as cursor:
        cursor.execute("SELECT COUNT(*), MAX(value) FROM settings WHERE value > 100")
        assert [column[0] for column in cursor.description] == ["COUNT(*)", "MAX(value)"]
        count, largest = cursor.fetchone()
    assert count >= 3 and largest >= 64 * 1024 * 1024
    assert rows(admin, "SELECT s.name FROM tidegate.settings s WHERE s.name = 'limits.shutdown_grace'") == [
        ("limits.shutdown_grace",)
    ]


def test_what_clients_send_at_connect(admin: Connection) -> None:
    assert rows(admin, "SELECT @@version_comment LIMIT 1") == [("tidegate admin port",)]
    [(version,)] = rows(admin, "SELECT @@version")
    assert "tidegate" in version
    assert rows(admin, "SELECT DATABASE()") == [("tidegate",)]
    for statement in ("SET NAMES utf8mb4", "SET autocommit = 1", "SET SESSION sql_mode = 'ANSI'", "USE tidegate"):
        assert rows(admin, statement) == []
    admin.ping()
    admin.select_db("tidegate")
    assert rows(admin, "SELECT 1 + 1") == [(2,)]


# --------------------------------------------------------------------------- errors

ERRORS = [
    ("SELECT * FROM nope", 1146, "Table 'tidegate.nope' doesn't exist; tables: sessions"),
    ("SELECT * FROM other.sessions", 1146, "only the tidegate schema"),
    ("SELECT nope FROM sessions", 1054, "Unknown column 'nope' in table sessions; its columns are: id, user"),
    ("SELECT id FROM sessions WHERE bogus = 1", 1054, "Unknown column 'bogus'"),
    ("SELECT x.id FROM sessions s", 1054, "no table or alias 'x'"),
    ("SELEC 1", 1064, "error in your admin SQL syntax"),
    ("UPDATE sessions SET user = 'x' WHERE id = 1", 1288, "sessions shows live state"),
    ("UPDATE settings SET value = 1 WHERE name = 'limits.idle_timeout'", 1288, "settings are read-only"),
    ("INSERT INTO stats (name, value) VALUES ('a', 1)", 1288, "not updatable"),
    ("DELETE FROM sessions WHERE id = 1", 1288, "not updatable"),
    ("DELETE FROM migrations WHERE id = 1", 1235, "stop a migration with CANCEL MIGRATION <id>"),
    ("UPDATE migrations SET chunk_size = 100", 1175, "needs WHERE id = <n>"),
    ("UPDATE migrations SET chunk_size = 100 WHERE table_name = 't'", 1175, "needs WHERE id = <n>"),
    ("UPDATE migrations SET state = 'complete' WHERE id = 3", 1348, "Column 'state' is read-only; writable columns: throttle"),
    ("UPDATE migrations SET throttle_reason = NULL WHERE id = 3", 1348, "Column 'throttle_reason' is read-only"),
    ("UPDATE migrations SET colour = 'red' WHERE id = 3", 1054, "Unknown column 'colour' in table migrations"),
    ("UPDATE migrations SET chunk_size = 0 WHERE id = 3", 1231, "chunk_size must be positive"),
    ("UPDATE migrations SET chunk_size = 'lots' WHERE id = 3", 1231, "chunk_size takes an integer"),
    ("UPDATE migrations SET postponed = 2 WHERE id = 3", 1231, "postponed takes 0 or 1"),
    ("UPDATE migrations SET max_load = 'busy' WHERE id = 3", 1231, "max_load takes 'Status_variable=N"),
    ("UPDATE migrations SET chunk_size = NULL WHERE id = 3", 1231, "chunk_size cannot be NULL"),
    ("UPDATE migrations SET chunk_size = 1 + 1 WHERE id = 3", 1231, "expected a constant"),
    ("UPDATE migrations SET chunk_size = 5, chunk_size = 6 WHERE id = 3", 1231, "set twice"),
    ("INSERT INTO migrations (schema_name, table_name) VALUES ('a', 'b')", 1364, "Field 'alter_statement' doesn't have a default"),
    ("INSERT INTO migrations (schema_name, table_name, alter_statement, colour) VALUES ('a', 'b', 'c', 'd')", 1054, "Unknown column 'colour' in INSERT INTO migrations"),
    ("INSERT INTO migrations (schema_name, table_name, alter_statement, state) VALUES ('a', 'b', 'c', 'd')", 1348, "Column 'state' cannot be set by INSERT"),
    ("INSERT INTO migrations (schema_name, table_name, alter_statement, options) VALUES ('a', 'b', 'c', 'chunk_size')", 1231, "options: expected name=value pairs"),
    ("INSERT INTO migrations (schema_name, table_name, alter_statement, options) VALUES ('a', 'b', 'c', 'a=1,a=2')", 1231, "options: a given twice"),
    ("INSERT INTO migrations VALUES ('a', 'b')", 1136, "Column count doesn't match"),
    ("INSERT INTO migrations VALUES ('a', 'b', 'c'), ('d', 'e', 'f')", 1235, "one migration per statement"),
    ("INSERT INTO migrations (schema_name, table_name, alter_statement) SELECT name, name, name FROM stats", 1235, "takes VALUES"),
    ("INSERT INTO migrations VALUES ('a', '', 'c')", 1231, "table_name takes a non-empty string"),
    ("CANCEL MIGRATION", 1064, "syntax: CANCEL MIGRATION <id>"),
    ("CANCEL MIGRATION three", 1064, "syntax: CANCEL MIGRATION <id>"),
    ("CUT OVER MIGRATION 3 'now'", 1064, "only THROTTLE takes a reason"),
    ("THROTTLE MIGRATION 3 ''", 1231, "throttle reason cannot be empty"),
    ("DROP TABLE sessions", 1235, "DROP is not supported on the admin port"),
    ("CREATE TABLE x (id INT)", 1235, "CREATE is not supported on the admin port"),
    ("USE app", 1049, "Unknown database 'app'"),
    ("SET @x = 1", 1235, "User-defined variables not supported"),
    ("CANCEL MIGRATION 99", 1105, "no migration with id 99"),
    ("UPDATE migrations SET throttle = 'x' WHERE id = 99", 1105, "no migration with id 99"),
]


@pytest.mark.usefixtures("service")
def test_every_bad_statement_gets_an_error_that_says_why(admin: Connection) -> None:
    wrong = []
    for sql, code, text in ERRORS:
        got = error_of(admin, sql)
        if got[0] != code or text not in got[1]:
            wrong.append((sql, got))
    assert wrong == []
    # Nothing above dropped the connection or left it confused.
    assert rows(admin, "SELECT name FROM settings WHERE name = 'limits.idle_timeout'") == [("limits.idle_timeout",)]


def test_partial_update_says_what_was_applied(admin: Connection, service: FakeService) -> None:
    code, message = error_of(
        admin, "UPDATE migrations SET chunk_size = 500, max_load = 'Threads_running=999' WHERE id = 3"
    )
    assert code == 1105
    assert "cannot change while a migration runs" in message
    assert "already accepted for migration 3: chunk_size=500" in message
    assert service.calls == [("command", 3, "set:chunk_size", "500")]


def test_migrations_not_enabled_is_a_clean_error(admin_proxy: RunningProxy, admin: Connection) -> None:
    before = admin_proxy.app.migrations
    admin_proxy.call(setattr, admin_proxy.app, "migrations", None)
    try:
        for sql in (
            "SELECT * FROM migrations",
            "SELECT * FROM sidecars",
            "INSERT INTO migrations VALUES ('shop', 'orders', 'ADD COLUMN c INT')",
            "UPDATE migrations SET throttle = NULL WHERE id = 1",
            "CANCEL MIGRATION 1",
        ):
            code, message = error_of(admin, sql)
            assert code == 1105 and message.startswith("migrations are not enabled"), (sql, message)
        # Tables that do not need the service still answer, and SHOW still lists migrations.
        assert "migrations" in [name for (name,) in rows(admin, "SHOW TABLES")]
        assert rows(admin, "SELECT COUNT(*) FROM sessions WHERE id = 0") == [(0,)]
    finally:
        admin_proxy.call(setattr, admin_proxy.app, "migrations", before)


# --------------------------------------------------------------------------- authentication


def test_wrong_admin_password_is_refused(admin_proxy: RunningProxy) -> None:
    for password in ("wrong", ""):
        with pytest.raises(pymysql.err.OperationalError) as info:
            admin_connect(admin_proxy, password=password)
        assert info.value.args[0] == 1045
        assert "Access denied for user 'admin' to the tidegate admin port" in info.value.args[1]


def test_app_users_cannot_use_the_admin_port(admin_proxy: RunningProxy) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        admin_connect(admin_proxy, user="app", password="app-secret")
    assert info.value.args[0] == 1045
    # ... and the admin account is no app user.
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host=admin_proxy.host, port=admin_proxy.port, user=ADMIN_USER, password=ADMIN_PASSWORD)
    assert info.value.args[0] == 1045


def _no_app() -> Any:
    """Just enough of ``App`` for ``Control``: no proxy, no service."""
    config = SimpleNamespace(backends=[], limits=Limits())
    return SimpleNamespace(proxy=None, metrics=None, migrations=None, primary_reachable=False, config=config)


def _non_loopback_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if is_loopback(address) else address


def _try_login(host: str, port: int, user: str, password: str) -> tuple[int, str] | None:
    try:
        connection = pymysql.connect(host=host, port=port, user=user, password=password, connect_timeout=5)
    except pymysql.MySQLError as error:
        return int(error.args[0]), str(error.args[1])
    try:
        assert rows(connection, "SELECT COUNT(*) FROM settings")[0][0] > 0
    finally:
        connection.close()
    return None


async def test_empty_password_when_none_is_configured() -> None:
    config = AdminConfig(listen=("127.0.0.1", 0), user="ops", password=None)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_admin, Control(_no_app()), config)
        assert await trio.to_thread.run_sync(_try_login, host, port, "ops", "") is None
        refused = await trio.to_thread.run_sync(_try_login, host, port, "ops", "guess")
        assert refused is not None and refused[0] == 1045
        refused = await trio.to_thread.run_sync(_try_login, host, port, "admin", "")
        assert refused is not None and refused[0] == 1045
        nursery.cancel_scope.cancel()


async def test_remote_peers_are_refused_unless_allowed() -> None:
    remote = _non_loopback_address()
    if remote is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    for allow_remote in (False, True):
        config = AdminConfig(listen=("0.0.0.0", 0), password="pw", allow_remote=allow_remote)
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_admin, Control(_no_app()), config)
            assert await trio.to_thread.run_sync(_try_login, "127.0.0.1", port, "admin", "pw") is None
            got = await trio.to_thread.run_sync(_try_login, remote, port, "admin", "pw")
            if allow_remote:
                assert got is None
            else:
                assert got is not None and got[0] == 1130 and "is not allowed to connect" in got[1]
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- migrations (fake service)


def test_insert_starts_a_migration(admin: Connection, service: FakeService) -> None:
    with admin.cursor() as cursor:
        affected = cursor.execute(
            "INSERT INTO migrations (schema_name, table_name, alter_statement, options) "
            "VALUES ('shop', 'orders', 'ADD COLUMN note TEXT', "
            "'chunk_size=2000, postpone=1, max_load=\"Threads_running=25,Threads_connected=500\"')"
        )
        assert affected == 1 and cursor.lastrowid == 101
    assert admin.insert_id() == 101
    assert rows(admin, "SELECT LAST_INSERT_ID()") == [(101,)]
    # Knobs as columns; positional values.
    rows(admin, "INSERT INTO migrations (schema_name, table_name, alter_statement, chunk_size, postponed) "
                "VALUES ('shop', 'items', 'ADD INDEX (sku)', 500, 1)")
    rows(admin, "INSERT INTO tidegate.migrations VALUES ('shop', 'carts', 'DROP COLUMN legacy')")
    assert rows(admin, "SELECT LAST_INSERT_ID()") == [(103,)]
    assert service.calls == [
        ("request", "shop", "orders", "ADD COLUMN note TEXT",
         {"chunk_size": "2000", "postpone": "1", "max_load": "Threads_running=25,Threads_connected=500"}),
        ("request", "shop", "items", "ADD INDEX (sku)", {"chunk_size": "500", "postpone": "1"}),
        ("request", "shop", "carts", "DROP COLUMN legacy", {}),
    ]


def test_update_changes_a_running_migration(admin: Connection, service: FakeService) -> None:
    with admin.cursor() as cursor:
        assert cursor.execute(
            "UPDATE migrations SET throttle = 'deploy in progress', chunk_size = 250, "
            "max_load = 'Threads_running=25', critical_load = 'Threads_running=100', "
            "max_lag_millis = 800 WHERE id = 3"
        ) == 1
    info = admin._result.message
    assert b"migration 3: throttle='deploy in progress', chunk_size=250" in info
    assert b"in force now (led by this sidecar)" in info and admin._result.warning_count == 0
    rows(admin, "UPDATE migrations SET throttle = NULL, postponed = 0 WHERE (id = 3)")
    rows(admin, "UPDATE migrations SET postponed = TRUE WHERE 3 = id")
    assert service.calls == [
        ("command", 3, "throttle", "deploy in progress"),
        ("command", 3, "set:chunk_size", "250"),
        ("command", 3, "set:max_load", "Threads_running=25"),
        ("command", 3, "set:critical_load", "Threads_running=100"),
        ("command", 3, "set:max_lag_millis", "800"),
        ("command", 3, "throttle", None),
        ("command", 3, "postpone", "0"),
        ("command", 3, "postpone", "1"),
    ]


def test_verbs(admin: Connection, service: FakeService) -> None:
    for sql in (
        "POSTPONE MIGRATION 3",
        "cut over migration 3",
        "THROTTLE MIGRATION 3 'backup running'",
        "THROTTLE MIGRATION 3",
        "UNTHROTTLE MIGRATION 3;",
        "CANCEL MIGRATION 42",
    ):
        with admin.cursor() as cursor:
            assert cursor.execute(sql) == 1, sql
    assert service.calls == [
        ("command", 3, "postpone", "1"),
        ("command", 3, "postpone", "0"),
        ("command", 3, "throttle", "backup running"),
        ("command", 3, "throttle", "throttled from the admin port"),
        ("command", 3, "throttle", None),
        ("command", 42, "cancel", None),
    ]


def test_commands_for_another_sidecar_say_they_are_not_in_force(admin: Connection, service: FakeService) -> None:
    with admin.cursor() as cursor:
        cursor.execute("UPDATE migrations SET chunk_size = 100 WHERE id = 42")
        info = info_of(admin)
        assert "chunk_size=100: recorded, not in force yet: sidecar pod-b leads it" in info
        assert admin._result.warning_count == 1
        cursor.execute("SHOW WARNINGS")
        [(level, _, text)] = cursor.fetchall()
        assert level == "Warning" and "not in force yet" in text
        cursor.execute("POSTPONE MIGRATION 7")
        assert "the migration has not started" in info_of(admin)
        cursor.execute("CANCEL MIGRATION 8")
        assert "it is complete now" in info_of(admin)
        assert admin._result.warning_count == 0
        cursor.execute("SHOW WARNINGS")
        assert cursor.fetchall() == ()
    assert [call[1] for call in service.calls] == [42, 7, 8]


@pytest.mark.usefixtures("service")
def test_migrations_and_sidecars_tables(admin: Connection) -> None:
    got = dicts(admin, "SELECT id, table_name, state, progress_percent, throttle_reason, postponed, options "
                       "FROM migrations WHERE state NOT IN ('complete', 'pending') ORDER BY id")
    assert got == [
        {"id": 3, "table_name": "orders", "state": "copying", "progress_percent": 25.0,
         "throttle_reason": None, "postponed": 1, "options": '{"chunk_size": "2000"}'},
        {"id": 42, "table_name": "items", "state": "copying", "progress_percent": None,
         "throttle_reason": "deploy", "postponed": 0, "options": "{}"},
    ]
    assert rows(admin, "SELECT id, last_cut_over_failure FROM migrations WHERE cut_over_attempts > 0 "
                       "ORDER BY id DESC LIMIT 1") == [(42, "drain timeout: session 12")]
    fields = [row[0] for row in rows(admin, "SHOW COLUMNS FROM migrations")]
    assert fields[:6] == ["id", "schema_name", "table_name", "alter_statement", "options", "state"]
    assert {"progress_percent", "eta_seconds", "cut_over_attempts", "last_cut_over_failure"} <= set(fields)
    assert dicts(admin, "SELECT id, last_ack, live FROM sidecars WHERE this_sidecar") == [
        {"id": "pod-a", "last_ack": "shop.orders#3 ok", "live": 1}
    ]


# --------------------------------------------------------------------------- the mariadb CLI

CLI_SCRIPT = """
SHOW TABLES;
SELECT name, value FROM settings WHERE name = 'limits.max_client_connections';
INSERT INTO migrations (schema_name, table_name, alter_statement) VALUES ('shop', 'orders', 'ADD COLUMN c INT');
SELECT LAST_INSERT_ID() AS started;
SELECT nope FROM sessions;
THROTTLE MIGRATION 3 'nightly backup';
SELECT 'still connected' AS after_error;
"""


@pytest.mark.skipif(shutil.which("mariadb") is None, reason="mariadb CLI not installed")
def test_mariadb_cli(admin_proxy: RunningProxy, service: FakeService) -> None:
    host, port = admin_address(admin_proxy)
    result = subprocess.run(
        ["mariadb", "--no-defaults", "-h", host, "-P", str(port), "-u", ADMIN_USER,
         f"-p{ADMIN_PASSWORD}", "--batch", "--force"],
        input=CLI_SCRIPT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.stderr.count("ERROR") == 1, result.stderr  # --force went on after it
    out = result.stdout.splitlines()
    assert out[0] == "Table_name" and "migrations" in out
    assert "limits.max_client_connections\t1000" in out
    assert out[out.index("started") + 1] == "101"
    assert "still connected" in out
    assert "ERROR 1054 (42S22) at line 6: Unknown column 'nope' in table sessions" in result.stderr
    assert service.calls[-1] == ("command", 3, "throttle", "nightly backup")


# --------------------------------------------------------------------------- lifecycle


def test_shutdown_with_an_admin_client_connected(primary: sandbox.Instance, app_user: tuple[str, str]) -> None:
    running = start_proxy(["--backend", primary.dsn(), "--admin-listen", "127.0.0.1:0"])
    host, port = admin_address(running)
    idle = pymysql.connect(host=host, port=port, user="admin", password="")
    assert rows(idle, "SELECT COUNT(*) > 0 FROM stats") == [(1,)]
    running.stop(timeout=10)
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()
    idle.close()


def test_kill_and_hostile_clients_leave_the_port_serving(admin_proxy: RunningProxy, admin: Connection) -> None:
    host, port = admin_address(admin_proxy)
    victim = admin_connect(admin_proxy)
    rows(admin, f"KILL {victim.thread_id()}")
    with pytest.raises(pymysql.MySQLError):
        rows(victim, "SELECT 1")
    victim.close()
    with socket.create_connection((host, port), timeout=5) as raw:  # hangs up at once
        pass
    with socket.create_connection((host, port), timeout=5) as raw:  # garbage for a handshake
        raw.recv(4096)
        raw.sendall(b"\x05\x00\x00\x01garbage-garbage")
        raw.settimeout(5)
        assert raw.recv(4096)[4:5] == b"\xff"  # an ERR, then the port hangs up
    with socket.create_connection((host, port), timeout=5) as raw:  # hangs up mid-handshake
        raw.recv(4096)
        raw.sendall(b"\x40\x00\x00\x01")
    assert rows(admin, "SELECT 1") == [(1,)]
    fresh = admin_connect(admin_proxy)
    assert rows(fresh, "SELECT COUNT(*) FROM backends") == [(1,)]
    fresh.close()


async def test_a_taken_port_is_a_plain_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"admin port 127.0.0.1:{port}: .*see admin.listen"):
            await serve_admin(Control(_no_app()), AdminConfig(listen=("127.0.0.1", port)))


# --------------------------------------------------------------------------- pure parts


def test_option_strings() -> None:
    assert parse_options("") == {}
    assert parse_options(" chunk_size = 2000 ,postpone=1,") == {"chunk_size": "2000", "postpone": "1"}
    assert parse_options('max_load="Threads_running=25,Threads_connected=500"') == {
        "max_load": "Threads_running=25,Threads_connected=500"
    }
    assert parse_options('{"chunk_size": 2000, "postpone": true}') == {"chunk_size": "2000", "postpone": "1"}
    for bad in ("chunk_size", "1x=2", 'a="b', "[1]", "{oops"):
        with pytest.raises(AdminError):
            parse_options(bad)


def test_verb_grammar() -> None:
    assert parse_verb("SELECT 1") is None
    assert parse_verb("cancelled_things") is None
    verb = parse_verb("  Throttle  Migration 12  'it''s \\'late\\''  ; ")
    assert verb is not None and (verb.migration_id, verb.verb, verb.reason) == (12, "throttle", "it's 'late'")
    verb = parse_verb("CUT\n OVER MIGRATION 5")
    assert verb is not None and (verb.migration_id, verb.verb) == (5, "cut_over")


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.10") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.7") and not is_loopback("::ffff:10.0.0.1") and not is_loopback("")


def test_docs_cover_every_table() -> None:
    text = (Path(__file__).parents[2] / "docs" / "admin.md").read_text()
    from proxy.admin.tables import TABLES

    for name, table in TABLES.items():
        assert f"### {name}" in text, name
        for column in (*table.columns, *table.writable):
            assert f"`{column.name}`" in text, (name, column.name)


# --------------------------------------------------------------------------- the real migration service


def _wait_for_state(admin: Connection, migration_id: int, wanted: set[str], timeout: float = 60.0) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        [row] = dicts(admin, f"SELECT * FROM migrations WHERE id = {migration_id}")
        if row["state"] in wanted:
            return row
        if row["state"] in ("complete", "failed", "cancelled"):
            break
        time.sleep(0.1)
    raise AssertionError(f"migration {migration_id} did not reach {wanted}: {row}")


def test_real_migration_from_the_admin_port(
    admin_proxy: RunningProxy, admin: Connection, primary: sandbox.Instance, database: str
) -> None:
    if admin_proxy.app.migrations is None:
        pytest.skip("this proxy runs no migration service")
    primary.execute(
        f"CREATE TABLE `{database}`.items (id INT PRIMARY KEY, name VARCHAR(20))",
        f"INSERT INTO `{database}`.items VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    )
    with admin.cursor() as cursor:
        cursor.execute(
            "INSERT INTO migrations (schema_name, table_name, alter_statement, options) "
            f"VALUES ('{database}', 'items', 'ADD COLUMN note TEXT NULL', 'postpone=1,attempt_instant_ddl=off')"
        )
        migration_id = cursor.lastrowid
    assert migration_id > 0
    row = _wait_for_state(admin, migration_id, {"postponed"})
    assert row["table_name"] == "items" and row["postponed"] == 1
    [(live, here)] = rows(admin, f"SELECT live, this_sidecar FROM sidecars WHERE id = '{row['leader']}'")
    assert (live, here) == (1, 1)

    rows(admin, f"UPDATE migrations SET chunk_size = 500 WHERE id = {migration_id}")
    assert "in force now (led by this sidecar)" in info_of(admin)
    code, message = error_of(admin, f"UPDATE migrations SET max_lag_millis = 100 WHERE id = {migration_id}")
    assert code == 1105 and "max_lag_millis" in message  # the service's own refusal, passed through
    assert error_of(admin, "CANCEL MIGRATION 999999")[1] == "no migration with id 999999"

    rows(admin, f"CUT OVER MIGRATION {migration_id}")
    row = _wait_for_state(admin, migration_id, {"complete"})
    assert row["error"] is None
    columns = [name for (name, *_) in primary.execute(f"SHOW COLUMNS FROM `{database}`.items")]
    assert columns == ["id", "name", "note"]
    code, message = error_of(admin, f"CANCEL MIGRATION {migration_id}")
    assert code == 1105 and "complete" in message


def test_progress_never_passes_100_percent() -> None:
    """Rows inserted during the copy take the count past the statistics' estimate (the demo: 24781/24300)."""
    from proxy.migrations import copy_share

    assert copy_share(250, 1000) == {"rows_estimate": 1000, "progress_percent": 25.0}
    assert copy_share(24781, 24300) == {"rows_estimate": 24781, "progress_percent": 100.0}
    assert copy_share(0, 0) == {"rows_estimate": 0, "progress_percent": None}
    assert copy_share(None, None) == {"rows_estimate": None, "progress_percent": None}
