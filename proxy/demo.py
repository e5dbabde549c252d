"""``tidegate demo``: a throwaway database, the sidecar, a workload, a summary.

Starts its own MariaDB (never the one on 3306), starts ``tidegate serve`` as a
separate process in front of it, runs the same mixed workload (point reads,
updates in transactions, inserts) directly and through the sidecar, and then,
while the workload keeps running through the sidecar, starts an online
``ALTER`` from the sidecar's admin port, shows its live progress, and reports
the cut-over's hold time.  It prints throughput, latency percentiles and
client errors for every phase.
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pymysql

from proxy import sandbox

ROWS = 20_000
#: ids for inserted rows, unique across threads and phases (next() is atomic in CPython)
_NEW_IDS = itertools.count(10_000_000)


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    def merge(self, other: Stats) -> None:
        self.latencies.extend(other.latencies)
        self.errors.extend(other.errors)

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def line(self, label: str) -> str:
        elapsed = max(self.finished - self.started, 1e-9)
        return (
            f"{label:<28} {len(self.latencies) / elapsed:>9.0f} stmt/s   "
            f"p50 {self.percentile(0.5) * 1e3:6.2f} ms   p99 {self.percentile(0.99) * 1e3:6.2f} ms   "
            f"max {max(self.latencies, default=0) * 1e3:7.2f} ms   errors {len(self.errors)}"
        )


def _worker(options: dict[str, Any], stop: threading.Event, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    try:
        connection = pymysql.connect(**options)
    except pymysql.MySQLError as error:
        stats.errors.append(f"connect: {error}")
        return
    cursor = connection.cursor()
    try:
        while not stop.is_set():
            choice = rng.random()
            started = time.perf_counter()
            try:
                if choice < 0.7:
                    cursor.execute("SELECT id, k, c FROM demo.accounts WHERE id = %s", (rng.randint(1, ROWS),))
                    cursor.fetchall()
                elif choice < 0.95:
                    cursor.execute("BEGIN")
                    key = rng.randint(1, ROWS)
                    cursor.execute("SELECT k FROM demo.accounts WHERE id = %s FOR UPDATE", (key,))
                    cursor.fetchall()
                    cursor.execute("UPDATE demo.accounts SET k = k + 1 WHERE id = %s", (key,))
                    cursor.execute("COMMIT")
                else:
                    cursor.execute(
                        "INSERT INTO demo.accounts (id, k, c) VALUES (%s, %s, %s)",
                        (next(_NEW_IDS), rng.randint(1, 1000), "new"),
                    )
            except pymysql.MySQLError as error:
                stats.errors.append(str(error))
                try:
                    connection.rollback()
                except pymysql.MySQLError:
                    pass
                continue
            stats.latencies.append(time.perf_counter() - started)
    finally:
        connection.close()


def run_workload(options: dict[str, Any], threads: int, seconds: float | None, stop: threading.Event | None = None) -> Stats:
    stop = stop or threading.Event()
    per_thread = [Stats() for _ in range(threads)]
    workers = [
        threading.Thread(target=_worker, args=(options, stop, per_thread[i], i), daemon=True)
        for i in range(threads)
    ]
    total = Stats(started=time.perf_counter())
    for worker in workers:
        worker.start()
    if seconds is not None:
        time.sleep(seconds)
        stop.set()
    for worker in workers:
        worker.join()
    total.finished = time.perf_counter()
    for stats in per_thread:
        total.merge(stats)
    return total


def _free_port() -> int:
    return sandbox.free_port()


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tidegate demo", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each workload phase")
    parser.add_argument("--threads", type=int, default=8, help="workload connections")
    parser.add_argument("--rows", type=int, default=20_000, help="rows in the demo table")
    parser.add_argument("--no-migration", action="store_true", help="skip the online ALTER phase")
    args = parser.parse_args(argv)
    global ROWS
    ROWS = args.rows

    print("tidegate demo: starting a throwaway MariaDB (primary with binlog) ...", flush=True)
    sandbox.ensure_installed()
    with sandbox.Sandbox() as box:
        primary = box.start_primary()
        primary.execute(
            "CREATE DATABASE demo",
            "CREATE TABLE demo.accounts (id BIGINT PRIMARY KEY, k INT NOT NULL, c VARCHAR(64) NOT NULL, "
            "KEY k (k)) ENGINE=InnoDB",
            "CREATE USER 'app'@'%' IDENTIFIED BY 'app-secret'",
            "GRANT ALL ON demo.* TO 'app'@'%'",
        )
        connection = primary.connect(database="demo")
        with connection.cursor() as cursor:
            batch = 2000
            for start in range(1, ROWS + 1, batch):
                values = ",".join(
                    f"({i},{random.randint(1, 1000)},'row {i}')" for i in range(start, min(start + batch, ROWS + 1))
                )
                cursor.execute(f"INSERT INTO accounts (id, k, c) VALUES {values}")
        connection.close()
        print(f"  primary on 127.0.0.1:{primary.port}, table demo.accounts with {ROWS} rows", flush=True)

        listen_port, http_port, admin_port = _free_port(), _free_port(), _free_port()
        command = [
            sys.executable, "-m", "proxy.cli", "serve",
            "--backend", primary.dsn(),
            "--listen", f"127.0.0.1:{listen_port}",
            "--http-listen", f"127.0.0.1:{http_port}",
            "--admin-listen", f"127.0.0.1:{admin_port}",
            "--log-level", "warning",
        ]
        print(f"tidegate demo: starting the sidecar: {' '.join(command[1:])}", flush=True)
        sidecar = subprocess.Popen(command)
        try:
            _wait_http(f"http://127.0.0.1:{http_port}/readyz")
            common = {"user": "app", "password": "app-secret", "database": "demo", "ssl_disabled": True,
                      "autocommit": True, "charset": "utf8mb4"}
            direct = {"host": "127.0.0.1", "port": primary.port, **common}
            proxied = {"host": "127.0.0.1", "port": listen_port, **common}

            print(f"tidegate demo: workload, {args.threads} connections, {args.seconds:g}s per phase", flush=True)
            results = [("direct to MariaDB", run_workload(direct, args.threads, args.seconds))]
            results.append(("through tidegate", run_workload(proxied, args.threads, args.seconds)))
            migration_ok = True
            if not args.no_migration:
                migration_ok = _migration_phase(primary, proxied, args, results, admin_port)
            print("\nsummary")
            for label, stats in results:
                print("  " + stats.line(label))
            ratio = (len(results[1][1].latencies) / max(results[1][1].finished - results[1][1].started, 1e-9)) / max(
                len(results[0][1].latencies) / max(results[0][1].finished - results[0][1].started, 1e-9), 1e-9
            )
            print(f"  proxied/direct throughput: {ratio:.2f}x")
            errors = sum(len(stats.errors) for _, stats in results)
            for label, stats in results:
                for error in stats.errors[:3]:
                    print(f"  error ({label}): {error}")
            print(f"  client errors in total: {errors}")
            return 0 if errors == 0 and migration_ok else 1
        finally:
            sidecar.send_signal(signal.SIGTERM)
            try:
                sidecar.wait(15)
            except subprocess.TimeoutExpired:
                sidecar.kill()


def _migration_phase(
    primary: sandbox.Instance, proxied: dict[str, Any], args: argparse.Namespace, results: list[tuple[str, Stats]],
    admin_port: int,
) -> bool:
    """An online ALTER started from the sidecar's admin port, under load through the sidecar."""
    alter = "ADD COLUMN note VARCHAR(32) NOT NULL DEFAULT ''"
    print(f"tidegate demo: online ALTER TABLE demo.accounts {alter}", flush=True)
    print(f"  started from the admin port: mariadb -h127.0.0.1 -P{admin_port} -uadmin", flush=True)
    stop = threading.Event()
    holder: dict[str, Stats] = {}
    runner = threading.Thread(
        target=lambda: holder.setdefault("stats", run_workload(proxied, args.threads, None, stop)), daemon=True
    )
    runner.start()
    time.sleep(0.5)
    admin = pymysql.connect(host="127.0.0.1", port=admin_port, user="admin", password="", autocommit=True)
    started = time.perf_counter()
    state = "?"
    with admin.cursor() as cursor:
        cursor.execute(
            "INSERT INTO migrations (schema_name, table_name, alter_statement, options) "
            "VALUES ('demo', 'accounts', %s, 'attempt_instant_ddl=off')",
            (alter,),
        )
        migration_id = cursor.lastrowid
        print(f"  INSERT INTO migrations ... -> migration {migration_id}", flush=True)
        last = ""
        while time.perf_counter() - started < 600:
            cursor.execute(
                "SELECT state, progress_percent, rows_copied, rows_estimate, rows_per_second, eta_seconds, "
                f"binlog_lag_seconds, cut_over_attempts, error FROM migrations WHERE id = {int(migration_id)}"
            )
            row = cursor.fetchone()
            state = str(row[0])
            line = (f"  [{time.perf_counter() - started:5.1f}s] {state:<13} {row[1] or 0:5.1f}% "
                    f"{row[2] or 0}/{row[3] or 0} rows, {row[4] or 0:.0f} rows/s, eta {row[5] or 0:.0f}s, "
                    f"binlog lag {(row[6] or 0) * 1000:.0f} ms, cut-over attempts {row[7] or 0}")
            if line != last:
                print(line, flush=True)
                last = line
            if state in ("complete", "failed", "cancelled"):
                if row[8]:
                    print(f"  error: {row[8]}")
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - started
        cursor.execute("SELECT result, hold_seconds, drain_seconds, held_statements FROM holds "
                       "WHERE state = 'finished' AND result = 'released'")
        holds = cursor.fetchall()
    admin.close()
    time.sleep(0.5)
    stop.set()
    runner.join()
    results.append(("through tidegate, migrating", holder["stats"]))
    columns = [row[0] for row in primary.execute("SHOW COLUMNS FROM demo.accounts")]
    ok = state == "complete" and "note" in columns
    print(f"  migration {state} in {elapsed:.1f}s; columns now: {', '.join(columns)}")
    for _, hold_seconds, drain_seconds, held in holds:
        print(f"  cut-over hold: table held {float(hold_seconds) * 1000:.0f} ms after a {float(drain_seconds) * 1000:.0f} ms "
              f"drain; {held} statements waited and then ran on the new table")
    return ok
