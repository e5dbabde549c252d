"""Migration benchmark: tidegate vs pt-online-schema-change on a 1M-row sysbench table.

    python bench/migration.py [--rows 1000000] [--rate 200]

Starts its own throwaway MariaDB (proxy.sandbox), prepares sbtest1 with
sysbench, runs ``oltp_read_write`` at a fixed rate in the background, and
meanwhile runs ADD COLUMN with tidegate (ghost copy forced: INSTANT off) and then
with pt-online-schema-change on the same table.  A probe thread runs one small
read-write transaction every 10 ms and records its latency, so p95/p99/max are
measured per window (each migration, and ±1 s around each cut-over); sysbench's
error count per window comes from its per-second report.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymysql
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrator.db import ConnectionSettings
from migrator.runner import Migration
from migrator.spec import MigrationSpec
from proxy import sandbox


class Probe:
    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, float, bool]] = []  # (start, seconds, error)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        connection = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="root",
                                     database="sbtest", autocommit=False)
        cursor = connection.cursor()
        key = 1
        while not self.stop.is_set():
            key = key % 900000 + 7919
            started = time.monotonic()
            error = False
            try:
                cursor.execute("SELECT c FROM sbtest1 WHERE id = %s", (key,))
                cursor.fetchall()
                cursor.execute("UPDATE sbtest1 SET k = k + 1 WHERE id = %s", (key,))
                connection.commit()
            except pymysql.err.MySQLError:
                error = True
                connection.rollback()
            self.samples.append((started, time.monotonic() - started, error))
            time.sleep(max(0.0, 0.01 - (time.monotonic() - started)))

    def window(self, start: float, end: float) -> str:
        values = sorted(s for t, s, _ in self.samples if start <= t <= end)
        errors = sum(1 for t, _, e in self.samples if start <= t <= end and e)
        if not values:
            return "no samples"

        def pct(p: float) -> float:
            return values[min(len(values) - 1, int(p * len(values)))] * 1000

        return f"n={len(values)} p95={pct(0.95):.1f}ms p99={pct(0.99):.1f}ms max={values[-1] * 1000:.1f}ms probe-errors={errors}"


def sysbench(port: int, command: str, *extra: str) -> list[str]:
    return ["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={port}",
            "--mysql-user=root", "--mysql-password=root", "--mysql-db=sbtest", "--tables=1", *extra, command]


def sysbench_errors(output: str, start: float, end: float, t0: float) -> int:
    errors = 0
    for match in re.finditer(r"\[ (\d+)s \].*?err/s: ([\d.]+)", output):
        second = t0 + int(match.group(1))
        if start - 1 <= second <= end + 1:
            errors += round(float(match.group(2)))
    return errors


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=200)
    args = parser.parse_args()
    with sandbox.running() as (primary, _):
        primary.execute("CREATE DATABASE sbtest")
        print(f"preparing {args.rows} rows ...", flush=True)
        subprocess.run(sysbench(primary.port, "prepare", f"--table-size={args.rows}"), check=True,
                       stdout=subprocess.DEVNULL)
        load = subprocess.Popen(
            sysbench(primary.port, "run", f"--table-size={args.rows}", f"--rate={args.rate}", "--threads=8",
                     "--time=100000", "--report-interval=1", "--percentile=99"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        load_t0 = time.monotonic()
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(iter(load.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        probe = Probe(primary.port)
        probe.thread.start()
        time.sleep(3)

        # -- tidegate
        cut_over_at: list[float] = []

        def note(line: str) -> None:
            if line.startswith("cut-over done"):
                cut_over_at.append(time.monotonic())
            print("  tidegate:", line, flush=True)

        spec = MigrationSpec(
            connection=ConnectionSettings(port=primary.port, user="root", password="root"),
            database="sbtest", table="sbtest1", alter="ADD COLUMN tg INT NULL", execute=True,
            chunk_size=2000, chunk_time=0.05, max_chunk_size=20000, attempt_instant_ddl=False, status_interval=2,
        )
        start = time.monotonic()
        result = trio.run(Migration(spec, output=note).run)
        tidegate_end = time.monotonic()
        tidegate_seconds = tidegate_end - start
        time.sleep(3)

        # -- pt-online-schema-change
        pt_start = time.monotonic()
        pt = subprocess.run(
            ["pt-online-schema-change", "--alter", "ADD COLUMN pt INT NULL", "--execute", "--charset=utf8mb4",
             "--recursion-method=none", "--no-check-replication-filters",
             f"D=sbtest,t=sbtest1,h=127.0.0.1,P={primary.port},u=root,p=root"],
            capture_output=True, text=True,
        )
        pt_end = time.monotonic()
        pt_seconds = pt_end - pt_start
        time.sleep(2)
        probe.stop.set()
        load.terminate()
        load.wait()
        reader.join(5)
        text = "".join(output)
        swap_line = [line for line in pt.stdout.splitlines() if "Swapped original and new tables" in line]
        print("\n== results ==")
        print(f"tidegate: {result.phase.value} in {tidegate_seconds:.1f}s, {args.rows / tidegate_seconds:.0f} rows/s")
        print(f"pt-osc:   exit {pt.returncode} in {pt_seconds:.1f}s, {args.rows / pt_seconds:.0f} rows/s")
        print(f"wall time ratio tidegate/pt-osc: {tidegate_seconds / pt_seconds:.2f}")
        print(f"tidegate window: {probe.window(start, tidegate_end)}; "
              f"sysbench errors {sysbench_errors(text, start, tidegate_end, load_t0)}")
        if cut_over_at:
            print(f"tidegate cut-over ±1s: {probe.window(cut_over_at[0] - 1.5, cut_over_at[0] + 1)}")
        print(f"pt-osc window:   {probe.window(pt_start, pt_end)}; "
              f"sysbench errors {sysbench_errors(text, pt_start, pt_end, load_t0)}")
        print(f"pt-osc swap line: {swap_line[:1]}  (cut-over at the end of its run)")
        print(f"pt-osc last 2s:  {probe.window(pt_end - 2, pt_end)}")
        if pt.returncode:
            print(pt.stdout[-2000:], pt.stderr[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
