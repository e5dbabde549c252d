"""Cut-over benchmark: the sidecar's integrated cut-over vs database-lock cut-overs.

One command starts a throwaway MariaDB, a table, one ``tidegate serve``
sidecar, and a fixed-rate workload through the sidecar (default 500
statements/s: point reads, single-row updates and inserts, each timed).
It runs the same ``ADD COLUMN`` three ways on fresh copies of the table:

* ``tidegate (sidecar)``: requested through the admin port; the sidecar
  drains and holds the table's traffic around the database lock-and-rename;
* ``tidegate (standalone)``: ``tidegate migrate`` with no sidecar involvement
  (database-level lock-and-rename only), the workload still through the
  sidecar so the path is identical;
* ``pt-online-schema-change`` when installed (trigger based, its defaults).

For each it prints wall time, client errors, and p99 / max statement latency
over the whole run and in the window around the cut-over (2 s before the
rename is observed to 1 s after), plus the hold duration for the sidecar.
Figures are ratios and distributions measured in the same run; no assertion.

    python bench/cutover.py [--rows 200000] [--rate 500] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy import sandbox

ALTER = "ADD COLUMN note VARCHAR(32) NOT NULL DEFAULT ''"


@dataclass
class Record:
    started: float
    seconds: float
    error: str | None = None


@dataclass
class Workload:
    port: int
    rate: float
    threads: int
    rows: int
    records: list[Record] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Any = None

    def run(self) -> list[threading.Thread]:
        self.ids = iter(range(50_000_000, 60_000_000))
        workers = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in workers:
            worker.start()
        return workers

    def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        connection = pymysql.connect(host="127.0.0.1", port=self.port, user="app", password="app-secret",
                                     database="bench", autocommit=True, ssl_disabled=True)
        cursor = connection.cursor()
        interval = self.threads / self.rate
        next_at = time.monotonic() + rng.random() * interval
        while not self.stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            started = time.monotonic()
            error = None
            try:
                choice = rng.random()
                if choice < 0.6:
                    cursor.execute("SELECT k, c FROM t WHERE id = %s", (rng.randint(1, self.rows),))
                    cursor.fetchall()
                elif choice < 0.9:
                    cursor.execute("UPDATE t SET k = k + 1 WHERE id = %s", (rng.randint(1, self.rows),))
                else:
                    with self.lock:
                        new_id = next(self.ids)
                    cursor.execute("INSERT INTO t (id, k, c) VALUES (%s, 1, 'new')", (new_id,))
            except pymysql.MySQLError as failure:
                error = f"{failure.args[0]}"
            with self.lock:
                self.records.append(Record(started, time.monotonic() - started, error))
        connection.close()


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def prepare_table(primary: sandbox.Instance, rows: int) -> None:
    primary.execute(
        "DROP DATABASE IF EXISTS bench", "CREATE DATABASE bench", "USE bench",
        "CREATE TABLE t (id BIGINT PRIMARY KEY, k INT NOT NULL, c CHAR(60) NOT NULL, KEY k (k)) ENGINE=InnoDB",
        f"INSERT INTO t SELECT seq, seq % 10000, REPEAT(CHAR(97 + seq % 26), 60) FROM seq_1_to_{rows}",
    )


def wait_column(primary: sandbox.Instance, timeout: float = 900) -> float:
    """Polls for the new column; returns when it appeared (the rename)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        columns = [row[0] for row in primary.execute("SHOW COLUMNS FROM bench.t")]
        if "note" in columns:
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError("migration did not finish")


def report(label: str, work: Workload, began: float, ended: float, cutover_at: float, extra: str = "") -> dict[str, Any]:
    during = [r for r in work.records if began <= r.started <= ended]
    window = [r for r in work.records if cutover_at - 2 <= r.started <= cutover_at + 1]
    errors: dict[str, int] = {}
    for record in during:
        if record.error:
            errors[record.error] = errors.get(record.error, 0) + 1
    row = {
        "method": label,
        "wall_seconds": round(ended - began, 2),
        "statements": len(during),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "p99_ms": round(percentile([r.seconds for r in during], 0.99) * 1000, 1),
        "max_ms": round(max((r.seconds for r in during), default=0) * 1000, 1),
        "cutover_p99_ms": round(percentile([r.seconds for r in window], 0.99) * 1000, 1),
        "cutover_max_ms": round(max((r.seconds for r in window), default=0) * 1000, 1),
        "extra": extra,
    }
    print(f"{label:<24} wall {row['wall_seconds']:7.2f}s  errors {row['errors']:4d} {errors or ''}  "
          f"p99 {row['p99_ms']:7.1f} ms  max {row['max_ms']:7.1f} ms  | around cut-over: "
          f"p99 {row['cutover_p99_ms']:7.1f} ms  max {row['cutover_max_ms']:7.1f} ms  {extra}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=500.0, help="workload statements per second")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sandbox.ensure_installed()
    results = []
    with sandbox.Sandbox() as box:
        primary = box.start_primary()
        primary.execute("CREATE USER 'app'@'%' IDENTIFIED BY 'app-secret'", "GRANT ALL ON *.* TO 'app'@'%'",
                        "SET GLOBAL log_bin_trust_function_creators = 1")
        listen, http, admin = sandbox.free_port(), sandbox.free_port(), sandbox.free_port()
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--backend", primary.dsn(),
             "--listen", f"127.0.0.1:{listen}", "--http-listen", f"127.0.0.1:{http}",
             "--admin-listen", f"127.0.0.1:{admin}", "--log-level", "warning"],
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            methods = ["tidegate (sidecar)", "tidegate (standalone)"]
            if shutil.which("pt-online-schema-change"):
                methods.append("pt-online-schema-change")
            for method in methods:
                prepare_table(primary, args.rows)
                work = Workload(listen, args.rate, args.threads, args.rows)
                workers = work.run()
                time.sleep(2)
                began = time.monotonic()
                extra = ""
                if method == "tidegate (sidecar)":
                    connection = pymysql.connect(host="127.0.0.1", port=admin, user="admin", password="",
                                                 autocommit=True)
                    with connection.cursor() as cursor:
                        cursor.execute("INSERT INTO migrations (schema_name, table_name, alter_statement, options) "
                                       "VALUES ('bench', 't', %s, 'attempt_instant_ddl=off')", (ALTER,))
                    cutover_at = wait_column(primary)
                    while True:
                        with connection.cursor() as cursor:
                            cursor.execute("SELECT state FROM migrations ORDER BY id DESC LIMIT 1")
                            (state,) = cursor.fetchone()
                        if state in ("complete", "failed", "cancelled"):
                            break
                        time.sleep(0.1)
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT hold_seconds, drain_seconds, held_statements FROM holds "
                                       "WHERE state = 'finished' AND result = 'released'")
                        holds = cursor.fetchall()
                    connection.close()
                    if holds:
                        hold, drain, held = holds[0]  # newest first
                        extra = f"hold {float(hold) * 1000:.0f} ms (drain {float(drain) * 1000:.0f} ms, {held} held)"
                elif method == "tidegate (standalone)":
                    process = subprocess.Popen(
                        [sys.executable, "-m", "proxy.cli", "migrate", "--host", "127.0.0.1", "--port",
                         str(primary.port), "--user", "root", "--password", "root", "--database", "bench",
                         "--table", "t", "--alter", ALTER, "--attempt-instant-ddl", "off", "--execute", "--quiet",
                         "--state-schema", "_tidegate_standalone"],
                        stdout=subprocess.DEVNULL,
                    )
                    cutover_at = wait_column(primary)
                    process.wait()
                else:
                    process = subprocess.Popen(
                        ["pt-online-schema-change", "--alter", ALTER, "--execute", "--charset=utf8mb4",
                         "--recursion-method=none", "--no-check-replication-filters",
                         f"h=127.0.0.1,P={primary.port},u=root,p=root,D=bench,t=t"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                    cutover_at = wait_column(primary)
                    process.wait()
                ended = time.monotonic()
                time.sleep(1)
                work.stop.set()
                for worker in workers:
                    worker.join()
                results.append(report(method, work, began, ended, cutover_at, extra))
        finally:
            sidecar.terminate()
            sidecar.wait(15)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("targets: zero errors; maximum hold under 100 ms at 500 statements/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
