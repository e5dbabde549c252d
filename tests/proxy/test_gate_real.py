"""The gate in a real proxy in front of a real primary: held statements wait,
other tables flow, transactions drain, prepared statements map to their table."""

from __future__ import annotations

import threading
import time

import mysql.connector
import pymysql
import trio

from proxy import sandbox
from tests.proxy.conftest import RunningProxy

APP = {"user": "app", "password": "app-secret", "autocommit": True}


def hold(running: RunningProxy, schema: str, table: str, drain: float = 2.0, timeout: float = 10.0) -> bool:
    result: bool = trio.from_thread.run(
        lambda: running.proxy.gate.hold(schema, table, drain_timeout=drain, hold_timeout=timeout),
        trio_token=running.token,
    )
    return result


def release(running: RunningProxy, schema: str, table: str) -> None:
    trio.from_thread.run(lambda: running.proxy.gate.release(schema, table), trio_token=running.token)


def setup(primary: sandbox.Instance, database: str) -> None:
    primary.execute(
        f"CREATE TABLE `{database}`.orders (id INT PRIMARY KEY, n INT)",
        f"CREATE TABLE `{database}`.other (id INT PRIMARY KEY, n INT)",
        f"INSERT INTO `{database}`.orders VALUES (1, 0)",
        f"INSERT INTO `{database}`.other VALUES (1, 0)",
    )


def timed(function: object) -> tuple[threading.Thread, dict[str, float]]:
    box: dict[str, float] = {}

    def run() -> None:
        started = time.monotonic()
        function()  # type: ignore[operator]
        box["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_held_table_waits_other_tables_flow(tidegate: RunningProxy, primary: sandbox.Instance, database: str) -> None:
    setup(primary, database)
    held = pymysql.connect(host=tidegate.host, port=tidegate.port, database=database, **APP)
    free = pymysql.connect(host=tidegate.host, port=tidegate.port, database=database, **APP)
    assert hold(tidegate, database, "orders")

    def update() -> None:
        with held.cursor() as cursor:
            cursor.execute("UPDATE orders SET n = n + 1 WHERE id = 1")

    thread, box = timed(update)
    time.sleep(0.3)
    with free.cursor() as cursor:
        started = time.monotonic()
        cursor.execute("UPDATE other SET n = n + 1 WHERE id = 1")
        assert time.monotonic() - started < 0.2
    assert thread.is_alive()  # still held
    assert tidegate.call(lambda: tidegate.proxy.gate.held_statements) == 1
    release(tidegate, database, "orders")
    thread.join(5)
    assert 0.25 < box["seconds"] < 2
    assert primary.execute(f"SELECT n FROM `{database}`.orders") == [(1,)]
    held.close()
    free.close()


def test_open_transaction_on_table_blocks_drain_then_not_now(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    setup(primary, database)
    txn = pymysql.connect(host=tidegate.host, port=tidegate.port, database=database, **APP)
    with txn.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("SELECT * FROM orders WHERE id = 1 FOR UPDATE")
    started = time.monotonic()
    assert not hold(tidegate, database, "orders", drain=0.5)
    assert 0.45 < time.monotonic() - started < 2
    with txn.cursor() as cursor:  # the transaction was never held nor broken
        cursor.execute("UPDATE orders SET n = 5 WHERE id = 1")
        cursor.execute("COMMIT")
    assert hold(tidegate, database, "orders", drain=0.5)  # nothing open now: drains at once
    release(tidegate, database, "orders")
    txn.close()


def test_prepared_statement_on_held_table_waits(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    setup(primary, database)
    connection = mysql.connector.connect(host=tidegate.host, port=tidegate.port, database=database,
                                         autocommit=True, user="app", password="app-secret")
    cursor = connection.cursor(prepared=True)
    cursor.execute("SELECT n FROM orders WHERE id = ?", (1,))
    cursor.fetchall()
    assert hold(tidegate, database, "orders")

    def execute() -> None:
        cursor.execute("SELECT n FROM orders WHERE id = ?", (1,))
        cursor.fetchall()

    thread, box = timed(execute)
    time.sleep(0.3)
    assert thread.is_alive()
    release(tidegate, database, "orders")
    thread.join(5)
    assert box["seconds"] >= 0.25
    connection.close()


def test_views_triggers_and_stored_functions_count_as_the_held_table(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    """A statement that reaches the table through a view, another table's trigger
    or a stored function waits like one that names it; others flow."""
    setup(primary, database)
    primary.execute(
        f"CREATE VIEW `{database}`.orders_view AS SELECT id, n FROM `{database}`.orders",
        f"CREATE TABLE `{database}`.audit (id INT AUTO_INCREMENT PRIMARY KEY, n INT)",
        f"CREATE TRIGGER `{database}`.audit_ai AFTER INSERT ON `{database}`.audit FOR EACH ROW "
        f"UPDATE `{database}`.orders SET n = n + 1 WHERE id = 1",
        f"CREATE FUNCTION `{database}`.order_count() RETURNS INT READS SQL DATA "
        f"RETURN (SELECT COUNT(*) FROM orders)",
        f"CREATE FUNCTION `{database}`.unrelated(x INT) RETURNS INT DETERMINISTIC RETURN x + 1",
    )
    statements = {
        "view": "SELECT COUNT(*) FROM orders_view",
        "trigger": "INSERT INTO audit (n) VALUES (1)",
        "function": "SELECT order_count()",
        "qualified function": f"SELECT `{database}`.order_count() FROM other",
    }
    connections = {name: pymysql.connect(host=tidegate.host, port=tidegate.port, database=database, **APP)
                   for name in [*statements, "free"]}
    assert hold(tidegate, database, "orders")
    try:
        waiting = {}
        for name, sql in statements.items():
            def run(connection: pymysql.connections.Connection = connections[name], sql: str = sql) -> None:  # type: ignore[type-arg]
                with connection.cursor() as cursor:
                    cursor.execute(sql)
                    cursor.fetchall()

            waiting[name] = timed(run)
        # Unrelated statements, including another stored function, flow during the hold.
        with connections["free"].cursor() as cursor:
            started = time.monotonic()
            cursor.execute("SELECT unrelated(1), COUNT(*) FROM other")
            assert cursor.fetchone() == (2, 1)
            assert time.monotonic() - started < 0.5
        time.sleep(0.5)
        assert [name for name, (thread, _) in waiting.items() if not thread.is_alive()] == []  # all held
    finally:
        release(tidegate, database, "orders")
    for name, (thread, box) in waiting.items():
        thread.join(10)
        assert not thread.is_alive() and box["seconds"] >= 0.5, (name, box)
    for connection in connections.values():
        connection.close()
