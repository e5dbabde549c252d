"""Zero-error cut-over with several sidecars in front of one primary.

Three ``tidegate serve`` processes; strict clients on each (no retries, every
error counts) run transactions, prepared statements and autocommit writes,
each applied to the migrated table and to a control table in the same
transaction.  An ``ADD COLUMN`` migration requested through one sidecar runs
online; afterwards the tables match, and no client saw an error.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mysql.connector
import pymysql
import pytest

from proxy import sandbox

ROWS = int(os.environ.get("TIDEGATE_FLEET_ROWS", "200000"))
pytestmark = pytest.mark.slow


@dataclass
class Sidecar:
    port: int
    http_port: int
    admin_port: int
    process: subprocess.Popen[bytes]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def metric(self, name: str, labels: str = "") -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if (line.startswith(name + ("{" if labels else "")) and labels in line) or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_sidecars(primary: sandbox.Instance, state_schema: str, count: int) -> list[Sidecar]:
    sidecars = []
    for _ in range(count):
        port, http_port, admin_port = sandbox.free_port(), sandbox.free_port(), sandbox.free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--backend", primary.dsn(),
             "--listen", f"127.0.0.1:{port}", "--http-listen", f"127.0.0.1:{http_port}",
             "--admin-listen", f"127.0.0.1:{admin_port}",
             "--state-schema", state_schema, "--log-level", os.environ.get("TIDEGATE_TEST_LOG_LEVEL", "warning")],
            env=dict(os.environ),
        )
        sidecars.append(Sidecar(port, http_port, admin_port, process))
    deadline = time.monotonic() + 30
    for sidecar in sidecars:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.http_port}/readyz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "sidecar not ready"
                time.sleep(0.1)
    # every sidecar registered in the fleet
    while True:
        rows = primary.execute(f"SELECT COUNT(*) FROM `{state_schema}`.sidecars") if _exists(primary, state_schema, "sidecars") else [(0,)]
        if rows[0][0] == count:
            return sidecars
        assert time.monotonic() < deadline, "sidecars did not register"
        time.sleep(0.1)


def _exists(primary: sandbox.Instance, schema: str, table: str) -> bool:
    return bool(primary.execute(
        f"SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{schema}' AND TABLE_NAME = '{table}'"
    )[0][0])


@dataclass
class Workload:
    errors: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    statements: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, client: str, error: Exception, connection: Any) -> None:
        """Every error counts (no retries); the transaction is rolled back if the connection allows."""
        self.errors.append(f"{client}: {error!r}")
        with contextlib.suppress(Exception):
            connection.rollback()

    def record(self, started: float) -> None:
        with self.lock:
            self.latencies.append((started, time.monotonic() - started))
            self.statements += 1


def _pymysql_worker(port: int, database: str, work: Workload, seed: int, next_id: list[int]) -> None:
    rng = random.Random(seed)
    connection = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                 database=database, autocommit=True, ssl_disabled=True)
    cursor = connection.cursor()
    while not work.stop.is_set():
        try:
            key = rng.randint(1, ROWS)
            delta = rng.randint(1, 100)
            if rng.random() < 0.5:
                started = time.monotonic()
                cursor.execute("BEGIN")
                cursor.execute("UPDATE orders SET k = k + %s WHERE id = %s", (delta, key))
                cursor.execute("UPDATE control SET k = k + %s WHERE id = %s", (delta, key))
                with work.lock:
                    next_id[0] += 1
                    new_id = next_id[0]
                cursor.execute("INSERT INTO orders (id, k, c) VALUES (%s, %s, 'ins')", (new_id, delta))
                cursor.execute("INSERT INTO control (id, k, c) VALUES (%s, %s, 'ins')", (new_id, delta))
                cursor.execute("COMMIT")
                work.record(started)
            else:
                started = time.monotonic()
                cursor.execute("SELECT k FROM orders WHERE id = %s", (key,))
                cursor.fetchall()
                work.record(started)
        except Exception as error:
            work.failed("pymysql", error, connection)
    connection.close()


def _prepared_worker(port: int, database: str, work: Workload, seed: int) -> None:
    """mysql-connector with server-side prepared statements; the same change to
    both tables in one autocommit=off transaction."""
    rng = random.Random(seed)
    connection = mysql.connector.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                         database=database, autocommit=False, ssl_disabled=True)
    cursor = connection.cursor(prepared=True)
    while not work.stop.is_set():
        try:
            key = rng.randint(1, ROWS)
            text = f"p{rng.randint(0, 999)}"
            started = time.monotonic()
            cursor.execute("UPDATE orders SET c = ? WHERE id = ?", (text, key))
            cursor.execute("UPDATE control SET c = ? WHERE id = ?", (text, key))
            connection.commit()
            work.record(started)
        except Exception as error:
            work.failed("prepared", error, connection)
    connection.close()


@pytest.fixture
def fleet_table(primary: sandbox.Instance, database: str, app_user: tuple[str, str]) -> Iterator[str]:
    primary.execute(
        f"USE `{database}`",
        f"CREATE TABLE `{database}`.orders (id BIGINT PRIMARY KEY, k INT NOT NULL, c VARCHAR(40) NOT NULL)",
        f"CREATE TABLE `{database}`.control (id BIGINT PRIMARY KEY, k INT NOT NULL, c VARCHAR(40) NOT NULL)",
        f"INSERT INTO `{database}`.orders SELECT seq, seq % 1000, CONCAT('row ', seq) FROM seq_1_to_{ROWS}",
        f"INSERT INTO `{database}`.control SELECT * FROM `{database}`.orders",
    )
    yield database


def request_migration(primary: sandbox.Instance, state_schema: str, database: str, alter: str,
                      options: str = '{"attempt_instant_ddl": "off"}') -> int:
    deadline = time.monotonic() + 20
    while not _exists(primary, state_schema, "migration_requests"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    connection = primary.connect()
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO `{state_schema}`.migration_requests (schema_name, table_name, alter_statement, options, "
            "state, requested_at, updated_at) VALUES (%s, 'orders', %s, %s, 'pending', NOW(6), NOW(6))",
            (database, alter, options),
        )
        request_id = cursor.lastrowid
    connection.close()
    return int(request_id)


def wait_for_migration(primary: sandbox.Instance, state_schema: str, request_id: int, timeout: float) -> tuple[str, str | None]:
    deadline = time.monotonic() + timeout
    while True:
        state, error = primary.execute(
            f"SELECT state, error FROM `{state_schema}`.migration_requests WHERE id = {request_id}"
        )[0]
        if state in ("complete", "failed", "cancelled"):
            return str(state), error
        assert time.monotonic() < deadline, f"migration still {state} after {timeout}s"
        time.sleep(0.2)


def run_workload(sidecars: list[Sidecar], database: str) -> tuple[Workload, list[threading.Thread]]:
    work = Workload()
    next_id = [10_000_000]
    threads = []
    for index, sidecar in enumerate(sidecars):
        threads.append(threading.Thread(target=_pymysql_worker, args=(sidecar.port, database, work, index, next_id)))
        threads.append(threading.Thread(target=_prepared_worker, args=(sidecar.port, database, work, 100 + index)))
    for thread in threads:
        thread.start()
    return work, threads


def compare_with_control(primary: sandbox.Instance, database: str) -> None:
    diff = primary.execute(
        f"SELECT COUNT(*) FROM `{database}`.orders o LEFT JOIN `{database}`.control c "
        "ON c.id = o.id AND BINARY c.c = BINARY o.c AND c.k = o.k WHERE c.id IS NULL"
    )[0][0]
    counts = primary.execute(
        f"SELECT (SELECT COUNT(*) FROM `{database}`.orders), (SELECT COUNT(*) FROM `{database}`.control)"
    )[0]
    assert diff == 0 and counts[0] == counts[1], f"migrated table differs from control: {diff} rows, counts {counts}"


def stop_all(sidecars: list[Sidecar]) -> None:
    for sidecar in sidecars:
        if sidecar.process.poll() is None:
            sidecar.process.send_signal(signal.SIGTERM)
    for sidecar in sidecars:
        try:
            sidecar.process.wait(15)
        except subprocess.TimeoutExpired:
            sidecar.process.kill()


def test_three_sidecars_zero_errors(primary: sandbox.Instance, fleet_table: str) -> None:
    database = fleet_table
    state_schema = f"_tg_{database}"
    sidecars = start_sidecars(primary, state_schema, 3)
    try:
        work, threads = run_workload(sidecars, database)
        time.sleep(1)
        # Started from one sidecar's admin port, as an operator would.
        admin = pymysql.connect(host="127.0.0.1", port=sidecars[1].admin_port, user="admin", password="",
                                autocommit=True)
        with admin.cursor() as cursor:
            cursor.execute(
                "INSERT INTO migrations (schema_name, table_name, alter_statement, options) "
                "VALUES (%s, 'orders', %s, 'attempt_instant_ddl=off')",
                (database, "ADD COLUMN note VARCHAR(32) NOT NULL DEFAULT ''"),
            )
            request_id = int(cursor.lastrowid)
        admin.close()
        state, error = wait_for_migration(primary, state_schema, request_id, timeout=400)
        time.sleep(0.5)
        work.stop.set()
        for thread in threads:
            thread.join(30)
        assert state == "complete", error
        assert work.errors == [], work.errors[:5]
        assert work.statements > 100
        assert ROWS < 200_000 or primary.execute(f"SELECT COUNT(*) FROM `{database}`.orders")[0][0] >= 200_000
        compare_with_control(primary, database)
        columns = [row[0] for row in primary.execute(f"SHOW COLUMNS FROM `{database}`.orders")]
        assert columns == ["id", "k", "c", "note"]
        # every sidecar took part in the successful hold
        for sidecar in sidecars:
            assert sidecar.metric("tidegate_gate_holds_total", 'result="released"') >= 1
        worst = max(seconds for _, seconds in work.latencies)
        print(f"\n{work.statements} statements, 0 errors, max latency {worst * 1000:.0f} ms")
    finally:
        stop_all(sidecars)


def wait_for_phase(primary: sandbox.Instance, state_schema: str, request_id: int, phase: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        (progress,) = primary.execute(
            f"SELECT progress FROM `{state_schema}`.migration_requests WHERE id = {request_id}"
        )[0]
        if progress and f'"phase": "{phase}"' in progress:
            return
        assert time.monotonic() < deadline, f"migration never reached {phase}: {progress}"
        time.sleep(0.2)


def test_long_transaction_blocks_drain_then_retry(primary: sandbox.Instance, fleet_table: str) -> None:
    database = fleet_table
    state_schema = f"_tg_{database}"
    sidecars = start_sidecars(primary, state_schema, 2)
    try:
        work, threads = run_workload(sidecars[1:], database)
        request_id = request_migration(
            primary, state_schema, database, "ADD COLUMN note VARCHAR(32) NOT NULL DEFAULT ''",
            '{"attempt_instant_ddl": "off", "cut_over_lock_timeout_seconds": "1", "postpone": "1"}',
        )
        wait_for_phase(primary, state_schema, request_id, "postponed", 300)
        # A long transaction through sidecar 0 touches the table, then the cut-over may go.
        blocker = pymysql.connect(host="127.0.0.1", port=sidecars[0].port, user="app", password="app-secret",
                                  database=database, autocommit=True, ssl_disabled=True)
        with blocker.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT k FROM orders WHERE id = 1 FOR UPDATE")
        primary.execute(
            f"UPDATE `{state_schema}`.migration_requests SET control = '[[\"postpone\", \"0\"]]' WHERE id = {request_id}"
        )
        deadline = time.monotonic() + 60
        while sidecars[0].metric("tidegate_gate_holds_total", 'result="abandoned"') < 2:
            assert time.monotonic() < deadline, "no abandoned drains seen"
            time.sleep(0.2)
        assert wait_state(primary, state_schema, request_id) not in ("complete", "failed")
        with blocker.cursor() as cursor:  # the long transaction was never held nor broken
            cursor.execute("UPDATE orders SET k = k + 1 WHERE id = 1")
            cursor.execute("UPDATE control SET k = k + 1 WHERE id = 1")
            cursor.execute("COMMIT")
        state, error = wait_for_migration(primary, state_schema, request_id, timeout=120)
        work.stop.set()
        for thread in threads:
            thread.join(30)
        assert state == "complete", error
        assert work.errors == [], work.errors[:5]
        compare_with_control(primary, database)
        blocker.close()
    finally:
        stop_all(sidecars)


def wait_state(primary: sandbox.Instance, state_schema: str, request_id: int) -> str:
    return str(primary.execute(
        f"SELECT state FROM `{state_schema}`.migration_requests WHERE id = {request_id}"
    )[0][0])


def test_sidecar_killed_mid_hold(primary: sandbox.Instance, fleet_table: str) -> None:
    database = fleet_table
    state_schema = f"_tg_{database}"
    sidecars = start_sidecars(primary, state_schema, 3)
    try:
        request_id = request_migration(primary, state_schema, database,
                                       "ADD COLUMN note VARCHAR(32) NOT NULL DEFAULT ''",
                                       '{"attempt_instant_ddl": "off", "postpone": "1"}')
        deadline = time.monotonic() + 300
        while True:
            (leader,) = primary.execute(
                f"SELECT leader FROM `{state_schema}`.migration_requests WHERE id = {request_id}"
            )[0]
            if leader:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # find a sidecar that is not the leader: the leader's id carries its pid
        victim = next(s for s in sidecars if f"-{s.process.pid}-" not in str(leader))
        survivors = [s for s in sidecars if s is not victim]
        work, threads = run_workload(survivors, database)
        # Let the victim hold the table locally (a hold the leader abandons
        # later), then kill it in the middle: simulate by killing right after
        # lifting the postpone so the first attempt meets a dying sidecar.
        primary.execute(
            f"UPDATE `{state_schema}`.migration_requests SET control = '[[\"postpone\", \"0\"]]' WHERE id = {request_id}"
        )
        while not primary.execute(f"SELECT COUNT(*) FROM `{state_schema}`.cutovers WHERE phase = 'hold'")[0][0]:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        victim.process.kill()
        state, error = wait_for_migration(primary, state_schema, request_id, timeout=300)
        work.stop.set()
        for thread in threads:
            thread.join(30)
        assert state == "complete", error
        assert work.errors == [], work.errors[:5]
        compare_with_control(primary, database)
    finally:
        stop_all(sidecars)
