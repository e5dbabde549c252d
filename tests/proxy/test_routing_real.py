"""Read/write split, rules, lag and backpressure against the real primary and replica.

Where a statement ran is checked on the servers themselves: ``@@server_id``
is answered by the server that ran the statement (1 = primary, 2 = replica),
and injected text is read back from the server's general log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from pymysql.connections import Connection

from proxy import sandbox
from proxy.metrics import Metrics
from proxy.routing import bucket
from tests.proxy.conftest import RunningProxy, eventually, start_proxy

ADMIN_PASSWORD = "admin-secret"
PRIMARY_ID, REPLICA_ID = 1, 2



@pytest.fixture(scope="module")
def routed(
    primary: sandbox.Instance, replica: sandbox.Instance, app_user: tuple[str, str], tmp_path_factory: Any
) -> Iterator[RunningProxy]:
    sandbox.wait_replica_caught_up(primary, replica)  # the app user exists there too
    config: Path = tmp_path_factory.mktemp("routing") / "tidegate.toml"
    config.write_text(f"""
[[backends]]
dsn = "{primary.dsn()}"
[[backends]]
dsn = "{replica.dsn()}?role=replica&name=replica1"

[routing]
read_write_split = true
max_replica_lag = "1s"
lag_probe_interval = "100ms"

[backpressure]
max_replica_lag = "1s"
max_wait = "600ms"
retry_after = "500ms"

[admin]
password = "{ADMIN_PASSWORD}"
""")
    running = start_proxy(["--config", str(config), "--no-migrations-enabled"], metrics=Metrics())
    try:
        yield running
    finally:
        running.stop()


def client(proxy: RunningProxy, database: str | None = None, **options: Any) -> Connection[Any]:
    return pymysql.connect(
        host=proxy.host, port=proxy.port, user="app", password="app-secret", database=database,
        autocommit=options.pop("autocommit", True), **options,
    )


def admin(proxy: RunningProxy) -> Connection[Any]:
    assert proxy.app.admin_listening is not None
    host, port = proxy.app.admin_listening
    return pymysql.connect(host=host, port=port, user="admin", password=ADMIN_PASSWORD, autocommit=True)


def one(connection: Connection[Any], sql: str) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    assert row is not None
    return row[0]


def one_row(connection: Connection[Any], sql: str) -> tuple[Any, ...]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        rows = cursor.fetchall()
    assert len(rows) == 1, rows
    return tuple(rows[0])


def server_of(connection: Connection[Any], sql: str = "SELECT @@server_id") -> int:
    return int(one(connection, sql))


def test_reads_go_to_the_replica_writes_and_transactions_to_the_primary(
    routed: RunningProxy, primary: sandbox.Instance, replica: sandbox.Instance, database: str
) -> None:
    sandbox.wait_replica_caught_up(primary, replica)
    connection = client(routed, database)
    try:
        assert server_of(connection) == REPLICA_ID
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10))")
            cursor.execute("INSERT INTO t VALUES (1, 'a')")
        sandbox.wait_replica_caught_up(primary, replica)
        assert server_of(connection, "SELECT @@server_id FROM t WHERE id = 1") == REPLICA_ID
        # the replica's connection is logged in as the same user, in the same schema
        users = replica.execute(f"SELECT USER, DB FROM information_schema.PROCESSLIST WHERE DB = '{database}'")
        assert ("app", database) in users
        # locking reads, LAST_INSERT_ID(), user variables: primary
        assert server_of(connection, "SELECT @@server_id FROM t WHERE id = 1 FOR UPDATE") == PRIMARY_ID
        assert server_of(connection, "SELECT @@server_id + 0 * LAST_INSERT_ID()") == PRIMARY_ID
        assert server_of(connection, "SELECT @@server_id + 0 * COALESCE(@nothing, 0)") == PRIMARY_ID
        # a transaction: every statement on the primary, reads included
        with connection.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT @@server_id FROM t WHERE id = 1")
            assert cursor.fetchone() == (PRIMARY_ID,)
            cursor.execute("UPDATE t SET v = 'b' WHERE id = 1")
            cursor.execute("SELECT v, @@server_id FROM t WHERE id = 1")
            assert cursor.fetchone() == ("b", PRIMARY_ID)  # its own uncommitted write
            cursor.execute("COMMIT")
        assert server_of(connection) == REPLICA_ID  # transaction over: back to the replica
        # SET NAMES is replayed on the replica: same answer there
        with connection.cursor() as cursor:
            cursor.execute("SET NAMES latin1")
            cursor.execute("SELECT @@server_id, @@character_set_client")
            assert cursor.fetchone() == (REPLICA_ID, "latin1")
        control = admin(routed)
        where = f"SELECT replica, pinned FROM sessions WHERE `schema` = '{database}'"
        assert one_row(control, where) == ("replica1", None)
        # any other session state pins the session to the primary
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
        assert server_of(connection) == PRIMARY_ID
        assert one(connection, "SELECT @@sql_mode") == "ANSI_QUOTES"
        assert one_row(control, where) == (None, "SET")
        control.close()
    finally:
        connection.close()


def test_autocommit_off_and_temporary_tables_stay_on_the_primary(routed: RunningProxy, database: str) -> None:
    connection = client(routed, database, autocommit=False)
    try:
        assert server_of(connection) == PRIMARY_ID  # an implicit transaction would start
    finally:
        connection.close()
    connection = client(routed, database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TEMPORARY TABLE scratch (a INT)")
            cursor.execute("INSERT INTO scratch VALUES (7)")
        assert one(connection, "SELECT a FROM scratch") == 7  # only the primary has it
        assert server_of(connection) == PRIMARY_ID
    finally:
        connection.close()


def test_prepared_statements_run_on_the_primary(routed: RunningProxy, database: str) -> None:
    connection = client(routed, database)
    try:
        with connection.cursor() as cursor:
            # pymysql has no binary protocol; COM_STMT_* are covered by test_clients;
            # SQL-level PREPARE pins the session (its statement lives on the primary)
            cursor.execute("PREPARE s FROM 'SELECT @@server_id'")
            cursor.execute("EXECUTE s")
            assert cursor.fetchone() == (PRIMARY_ID,)
        assert server_of(connection) == PRIMARY_ID
    finally:
        connection.close()


def _general_log(instance: sandbox.Instance, like: str) -> list[str]:
    rows = instance.execute(
        f"SELECT CONVERT(argument USING utf8mb4) FROM mysql.general_log WHERE argument LIKE '{like}' "
        "AND argument NOT LIKE '%mysql.general_log%'"
    )
    return [str(row[0]) for row in rows]


def test_rules_from_the_admin_port_hint_comment_mirror_reject(
    routed: RunningProxy, primary: sandbox.Instance, replica: sandbox.Instance, database: str
) -> None:
    primary.execute(f"CREATE TABLE `{database}`.hinted (id INT PRIMARY KEY)",
                    f"INSERT INTO `{database}`.hinted VALUES (1)")
    sandbox.wait_replica_caught_up(primary, replica)
    for instance in (primary, replica):
        # not binlogged: a replica's own GTIDs would break replication
        instance.execute("SET SESSION sql_log_bin = 0", "SET GLOBAL log_output = 'TABLE'",
                         "TRUNCATE mysql.general_log", "SET GLOBAL general_log = 1")
    control = admin(routed)
    connection = client(routed, database)
    try:
        with control.cursor() as cursor:
            cursor.execute(
                "INSERT INTO rules (id, tables, hint, comment, route, mirror) VALUES "
                "(10, 'hinted', 'MAX_EXECUTION_TIME(500)', 'gray-marker', 'primary', 'replica1')"
            )
            assert "staged, NOT live" in (cursor._result.message or b"").decode()  # type: ignore[union-attr]
            cursor.execute("SHOW WARNINGS")
            assert "APPLY RULES" in cursor.fetchall()[0][2]
        # staged, not applied: traffic is untouched
        assert server_of(connection, "SELECT @@server_id FROM hinted") == REPLICA_ID
        with control.cursor() as cursor:
            cursor.execute("SELECT state, id, pending FROM rules")
            assert cursor.fetchall() == (("staged", 10, "new, not applied"),)
            cursor.execute("APPLY RULES")
        assert server_of(connection, "SELECT @@server_id FROM hinted WHERE id > 0") == PRIMARY_ID
        seen = eventually(lambda: _general_log(primary, "%FROM hinted WHERE id > 0%"), what="primary log")
        assert seen == ["/* gray-marker */ SELECT /*+ MAX_EXECUTION_TIME(500) */ @@server_id FROM hinted WHERE id > 0"]
        mirrored = eventually(lambda: _general_log(replica, "%FROM hinted WHERE id > 0%"), what="mirror")
        assert mirrored == seen  # the same statement reached the mirror
        with control.cursor() as cursor:
            cursor.execute("SELECT hits FROM rules WHERE id = 10 AND state = 'live'")
            assert cursor.fetchone() == (1,)
            # reject: staged, then applied
            cursor.execute("INSERT INTO rules (id, `match`, reject) VALUES (5, 'DELETE\\\\s+FROM\\\\s+hinted', "
                           "'deletes from hinted are not allowed here')")
            cursor.execute("APPLY RULES")
        with pytest.raises(pymysql.err.OperationalError) as info:
            with connection.cursor() as cursor:
                cursor.execute("DELETE FROM hinted")
        assert info.value.args == (1148, "tidegate: deletes from hinted are not allowed here (rule 5)")
        assert one(connection, "SELECT COUNT(*) FROM hinted") == 1  # not deleted; the session goes on
        with control.cursor() as cursor:
            cursor.execute("DELETE FROM rules WHERE id = 5")
            cursor.execute("DELETE FROM rules WHERE id = 10")
            cursor.execute("APPLY RULES")
            cursor.execute("SELECT COUNT(*) FROM rules")
            assert cursor.fetchone() == (0,)
    finally:
        for instance in (primary, replica):
            instance.execute("SET GLOBAL general_log = 0")
        connection.close()
        control.close()


def test_bad_rules_are_refused_and_the_live_set_stays(routed: RunningProxy, database: str) -> None:
    control = admin(routed)
    connection = client(routed, database)
    try:
        with control.cursor() as cursor:
            cursor.execute("INSERT INTO rules (id, kinds, route) VALUES (1, 'read', 'primary')")
            cursor.execute("APPLY RULES")
        assert server_of(connection) == PRIMARY_ID
        bad = [
            ("INSERT INTO rules (id, `match`, route) VALUES (2, '(unclosed', 'primary')",
             "rule 2: match: invalid regular expression '(unclosed'"),
            ("INSERT INTO rules (id, kinds, route) VALUES (3, 'read', 'replica9')",
             "rule 3: route: unknown backend 'replica9'; route to one of: primary, replica, replica1"),
            ("UPDATE rules SET route = 'nowhere' WHERE id = 1", "rule 1: route: unknown backend 'nowhere'"),
            ("INSERT INTO rules (id, percent, route) VALUES (4, 150, 'primary')", "rule 4: percent"),
            ("INSERT INTO rules (id, rout) VALUES (4, 'primary')", "Unknown column 'rout'"),
        ]
        for sql, message in bad:
            with pytest.raises(pymysql.err.MySQLError) as info:
                with control.cursor() as cursor:
                    cursor.execute(sql)
            assert message in info.value.args[1], (sql, info.value.args)
        with control.cursor() as cursor:
            cursor.execute("SELECT state, id, route, pending FROM rules")
            assert cursor.fetchall() == (("live", 1, "primary", None),)  # nothing staged, live unchanged
        assert server_of(connection) == PRIMARY_ID
    finally:
        with control.cursor() as cursor:
            cursor.execute("DELETE FROM rules WHERE id = 1")
            cursor.execute("APPLY RULES")
        control.close()
        connection.close()
    assert server_of(client(routed, database)) == REPLICA_ID


def test_percentage_split_by_uid_on_the_servers(routed: RunningProxy, database: str) -> None:
    control = admin(routed)
    connection = client(routed, database)
    try:
        with control.cursor() as cursor:
            cursor.execute("INSERT INTO rules (id, tags, percent, `key`, route) "
                           "VALUES (20, 'tidegate=gray', 30, 'uid', 'primary')")
            cursor.execute("APPLY RULES")
        for uid in range(40):
            expected = PRIMARY_ID if bucket(str(uid)) < 3000 else REPLICA_ID
            sql = f"SELECT @@server_id /* tidegate:gray uid={uid} */"
            assert server_of(connection, sql) == expected, uid
            assert server_of(connection, sql.replace("@@server_id", "@@server_id + 0")) == expected
    finally:
        with control.cursor() as cursor:
            cursor.execute("DELETE FROM rules WHERE id = 20")
            cursor.execute("APPLY RULES")
        control.close()
        connection.close()


def test_lag_moves_reads_to_the_primary_and_sheds_writes_until_it_recovers(
    routed: RunningProxy, primary: sandbox.Instance, replica: sandbox.Instance, database: str
) -> None:
    primary.execute(f"CREATE TABLE `{database}`.w (id INT AUTO_INCREMENT PRIMARY KEY)")
    sandbox.wait_replica_caught_up(primary, replica)
    connection = client(routed, database)
    control = admin(routed)

    def replica_row() -> tuple[Any, ...]:
        with control.cursor() as cursor:
            cursor.execute("SELECT health, lag_seconds FROM backends WHERE name = 'replica1'")
            return tuple(cursor.fetchone() or ())

    try:
        assert server_of(connection) == REPLICA_ID
        replica.execute("STOP SLAVE SQL_THREAD")
        primary.execute(f"INSERT INTO `{database}`.w VALUES ()")  # the replica will not apply it
        eventually(lambda: server_of(connection) == PRIMARY_ID, what="reads on the primary")
        eventually(lambda: (replica_row()[1] or 0) > 1.0, what="lag over 1 s")
        assert replica_row()[0] == "stopped"
        status = routed.call(routed.app.status)["routing"]
        assert status["replicas"]["replica1"]["state"] == "stopped" and status["backpressure_possible"]
        started = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as info:
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO w VALUES ()")
        waited = time.monotonic() - started
        code, message = info.value.args
        assert code == 1637
        assert re.fullmatch(r"tidegate: too many requests: replica lag \d+\.\d s > 1\.0 s; retry after 500 ms",
                            message), message
        assert waited >= 0.55
        assert server_of(connection, "SELECT COUNT(*) FROM w") == 1  # reads still answered, by the primary
        metrics = routed.app.metrics
        assert metrics is not None
        text = metrics.render()[0].decode()
        assert 'tidegate_rejections_total{reason="replica_lag",tag="default"} 1.0' in text
    finally:
        replica.execute("START SLAVE SQL_THREAD")
    sandbox.wait_replica_caught_up(primary, replica)
    eventually(lambda: replica_row()[0] == "up", what="replica up again")
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO w VALUES ()")
    assert server_of(connection) == REPLICA_ID
    connection.close()
    control.close()


def test_a_cut_over_hold_applies_to_reads_bound_for_the_replica(
    routed: RunningProxy, primary: sandbox.Instance, replica: sandbox.Instance, database: str
) -> None:
    import functools
    import threading

    import trio

    primary.execute(f"CREATE TABLE `{database}`.h (id INT PRIMARY KEY)", f"INSERT INTO `{database}`.h VALUES (1)")
    sandbox.wait_replica_caught_up(primary, replica)
    connection = client(routed, database)
    gate = routed.proxy.gate

    def run(function: Any) -> Any:
        return trio.from_thread.run(function, trio_token=routed.token)

    try:
        assert server_of(connection, "SELECT @@server_id FROM h") == REPLICA_ID
        assert run(functools.partial(gate.hold, database, "h", drain_timeout=5.0, hold_timeout=10.0))
        box: dict[str, Any] = {}

        def read() -> None:
            started = time.monotonic()
            box["server"] = server_of(connection, "SELECT @@server_id FROM h WHERE id = 1")
            box["seconds"] = time.monotonic() - started

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.5)
        assert "server" not in box  # held at the gate, though it would run on the replica
        run(functools.partial(gate.release, database, "h"))
        reader.join(10)
        assert box["server"] == REPLICA_ID and box["seconds"] >= 0.45
    finally:
        connection.close()


def test_binary_prepared_statements_stay_on_the_primary_and_get_backpressure_facts(
    routed: RunningProxy, database: str
) -> None:
    import mysql.connector

    connection = mysql.connector.connect(
        host=routed.host, port=routed.port, user="app", password="app-secret", database=database,
        use_pure=True, autocommit=True,
    )
    try:
        plain = connection.cursor()
        plain.execute("CREATE TABLE p (id INT PRIMARY KEY, v VARCHAR(5))")
        writer = connection.cursor(prepared=True)  # one statement per cursor stays prepared
        writer.execute("INSERT INTO p VALUES (?, ?)", (1, "x"))
        cursor = connection.cursor(prepared=True)
        cursor.execute("SELECT v, @@server_id FROM p WHERE id = ?", (1,))
        assert cursor.fetchall() == [("x", PRIMARY_ID)]
        plain.execute("SELECT @@server_id")
        assert plain.fetchall() == [(REPLICA_ID,)]  # text reads still split
        relay = next(r for r in routed.proxy.relays.values() if r.session.schema == database)
        kinds = {statement.sql: statement.facts.kind.value for statement in relay.session.prepared.values()
                 if statement.facts is not None}
        assert kinds == {"INSERT INTO p VALUES (?, ?)": "write", "SELECT v, @@server_id FROM p WHERE id = ?": "read"}
    finally:
        connection.close()


def test_a_dead_replica_connection_is_retried_on_the_primary(
    routed: RunningProxy, replica: sandbox.Instance, database: str
) -> None:
    connection = client(routed, database)
    try:
        assert server_of(connection) == REPLICA_ID
        [(thread,)] = replica.execute(
            f"SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app' AND DB = '{database}'"
        )
        replica.execute(f"KILL {thread}")
        time.sleep(0.1)
        assert server_of(connection) == PRIMARY_ID  # answered, by the primary
        assert server_of(connection) == REPLICA_ID  # a new replica connection
    finally:
        connection.close()


def test_read_your_writes_window(
    primary: sandbox.Instance, replica: sandbox.Instance, app_user: tuple[str, str], database: str, tmp_path: Path
) -> None:
    config = tmp_path / "ryw.toml"
    config.write_text(f"""
[[backends]]
dsn = "{primary.dsn()}"
[[backends]]
dsn = "{replica.dsn()}?role=replica&name=replica1"
[routing]
read_write_split = true
read_your_writes = "1s"
lag_probe_interval = "100ms"
""")
    proxy = start_proxy(["--config", str(config), "--no-migrations-enabled"])
    connection = client(proxy, database)
    try:
        assert server_of(connection) == REPLICA_ID
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE ryw (id INT PRIMARY KEY)")
            cursor.execute("INSERT INTO ryw VALUES (1)")
        assert server_of(connection, "SELECT @@server_id FROM ryw") == PRIMARY_ID  # sees its own write
        time.sleep(1.1)
        sandbox.wait_replica_caught_up(primary, replica)
        assert server_of(connection, "SELECT @@server_id FROM ryw") == REPLICA_ID
    finally:
        connection.close()
        proxy.stop()


def test_a_migration_led_by_another_sidecar_sheds_writes_here_while_its_lag_is_high(
    primary: sandbox.Instance, app_user: tuple[str, str], database: str, tmp_path: Path
) -> None:
    """Every sidecar applies migration-lag backpressure, not only the one leading it.

    The migration is "led elsewhere": its request row says running, its lag
    report is fresh, and the test holds the leader lock so this sidecar cannot
    take it over.
    """
    schema = f"_tg_lag_{database}"[:64]
    config = tmp_path / "tidegate.toml"
    config.write_text(f"""
state_schema = "{schema}"
[[backends]]
dsn = "{primary.dsn()}"
[backpressure]
max_migration_lag = "2s"
max_wait = "300ms"
retry_after = "250ms"
""")
    primary.execute(f"CREATE TABLE `{database}`.hot (id INT AUTO_INCREMENT PRIMARY KEY)",
                    f"CREATE TABLE `{database}`.cold (id INT AUTO_INCREMENT PRIMARY KEY)")
    running = start_proxy(["--config", str(config)], metrics=Metrics())
    leader = primary.connect()
    try:
        eventually(lambda: primary.execute(
            f"SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{schema}' "
            "AND TABLE_NAME = 'migration_requests'")[0][0], what="the state schema")
        with leader.cursor() as cursor:  # the other sidecar's leader lock
            cursor.execute(f"SELECT GET_LOCK('tidegate:{schema}:migration:77', 0)")
        primary.execute(
            f"INSERT INTO `{schema}`.migration_requests (id, schema_name, table_name, alter_statement, options, state,"
            f" leader, requested_at, updated_at, progress) VALUES (77, '{database}', 'hot', 'ADD COLUMN x INT', '{{}}',"
            f" 'running', 'elsewhere', NOW(6), NOW(6), '{{\"phase\": \"copying\", \"binlog_lag_seconds\": 6.5}}')")
        connection = client(running, database)

        def insert(table: str) -> None:
            with connection.cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} VALUES ()")

        def refused() -> str | None:
            try:
                insert("hot")
            except pymysql.err.OperationalError as error:
                assert error.args[0] == 1637, error.args
                return str(error.args[1])
            return None

        message = eventually(refused, what="a refused write to the migrating table")
        assert re.fullmatch(rf"tidegate: too many requests: migration lag on {database}\.hot 6\.5 s > 2\.0 s; "
                            r"retry after 250 ms", message), message
        insert("cold")  # migration_scope = "table": other tables are not held back
        # The lag recovers in the leader's next report: writes go through again.
        primary.execute(f"UPDATE `{schema}`.migration_requests SET updated_at = NOW(6),"
                        " progress = '{\"phase\": \"copying\", \"binlog_lag_seconds\": 0.2}' WHERE id = 77")
        eventually(lambda: refused() is None, what="writes admitted again")
        # A stale report (the leader died and nobody took over yet) is not trusted.
        primary.execute(f"UPDATE `{schema}`.migration_requests SET updated_at = NOW(6) - INTERVAL 1 MINUTE,"
                        " progress = '{\"phase\": \"copying\", \"binlog_lag_seconds\": 30}' WHERE id = 77")
        time.sleep(1.5)  # a poll (1 s) and a probe later
        assert refused() is None
        assert one(connection, "SELECT COUNT(*) FROM hot") >= 2
        connection.close()
    finally:
        leader.close()
        running.stop()
        primary.execute(f"DROP DATABASE IF EXISTS `{schema}`")
