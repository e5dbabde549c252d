"""Proxy benchmark: sysbench direct vs through tidegate, in one run.

    python bench/proxy.py [--time 10] [--threads 8] [--table-size 10000] [--tables 4]

Starts a throwaway MariaDB primary (``proxy.sandbox``), prepares sysbench
tables, starts ``tidegate serve`` as a separate process and runs, each direct
and proxied, back to back:

* ``oltp_point_select`` and ``oltp_read_write`` at ``--threads`` threads:
  throughput ratio proxied/direct;
* the same two with 1 thread: added p50 and p99 latency (from sysbench's
  latency histogram);
* for every proxied run, the proxy process's CPU time per query
  (``utime + stime`` from ``/proc/PID/stat`` before and after, divided by the
  queries sysbench completed).

Nothing is asserted: the figures are printed beside the targets of issue 2
(>= 0.5x direct point-select throughput at 8 threads, <= 20 us proxy CPU per
query, <= 60 us added p50).  On a shared machine the figures move with the
load, so the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pymysql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import sandbox  # noqa: E402

USER, PASSWORD, SCHEMA = "sbtest", "sbtest-secret", "sbtest"
TARGET_RATIO = 0.5
TARGET_CPU_US = 20.0
TARGET_ADDED_P50_US = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    test: str
    threads: int
    target: str  # "direct" or "proxied"
    transactions: int
    queries: int
    seconds: float
    errors: int
    reconnects: int
    histogram: list[tuple[float, int]]  # (latency ms, count), ascending
    proxy_cpu: float | None = None  # seconds of proxy CPU during the run
    proxy_system: float = 0.0  # of which in the kernel (syscalls: mostly loopback TCP)

    @property
    def qps(self) -> float:
        return self.queries / self.seconds

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds

    def percentile(self, fraction: float) -> float:
        """Latency (ms) at a fraction of events, from the histogram."""
        total = sum(count for _, count in self.histogram)
        if not total:
            return float("nan")
        wanted = fraction * total
        seen = 0
        for value, count in self.histogram:
            seen += count
            if seen >= wanted:
                return value
        return self.histogram[-1][0]

    @property
    def cpu_per_query_us(self) -> float | None:
        if self.proxy_cpu is None or not self.queries:
            return None
        return self.proxy_cpu / self.queries * 1e6


def parse_sysbench(output: str) -> dict[str, object]:
    def number(pattern: str) -> float:
        match = re.search(pattern, output, re.M)
        if not match:
            raise RuntimeError(f"sysbench output lacks {pattern!r}:\n{output}")
        return float(match.group(1))

    histogram = [
        (float(value), int(count))
        for value, count in re.findall(r"^\s*([\d.]+)\s+\|\**\s+(\d+)\s*$", output, re.M)
    ]
    return {
        "transactions": int(number(r"^\s*transactions:\s+(\d+)")),
        "queries": int(number(r"^\s*queries:\s+(\d+)")),
        "seconds": number(r"^\s*total time:\s+([\d.]+)s"),
        "errors": int(number(r"^\s*ignored errors:\s+(\d+)")),
        "reconnects": int(number(r"^\s*reconnects:\s+(\d+)")),
        "histogram": histogram,
    }


def sysbench_command(test: str, host: str, port: int, args: argparse.Namespace) -> list[str]:
    return [
        "sysbench",
        test,
        "--db-driver=mysql",
        f"--mysql-host={host}",
        f"--mysql-port={port}",
        f"--mysql-user={USER}",
        f"--mysql-password={PASSWORD}",
        f"--mysql-db={SCHEMA}",
        f"--tables={args.tables}",
        f"--table-size={args.table_size}",
        "--db-ps-mode=auto",
    ]


def proxy_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is field 3, utime 14 and stime 15 (1-based)
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def run_sysbench(
    test: str, threads: int, target: str, port: int, args: argparse.Namespace, proxy_pid: int | None
) -> Run:
    command = [
        *sysbench_command(test, "127.0.0.1", port, args),
        f"--threads={threads}",
        f"--time={args.time}",
        "--report-interval=0",
        "--histogram=on",
        "--percentile=99",
        "run",
    ]
    cpu_before = proxy_cpu_seconds(proxy_pid) if proxy_pid else None
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    cpu_after = proxy_cpu_seconds(proxy_pid) if proxy_pid else None
    if result.returncode != 0:
        raise RuntimeError(f"sysbench {test} {target} failed:\n{result.stdout}\n{result.stderr}")
    facts = parse_sysbench(result.stdout)
    run = Run(test, threads, target, **facts)  # type: ignore[arg-type]
    if cpu_before is not None and cpu_after is not None:
        run.proxy_cpu = sum(cpu_after) - sum(cpu_before)
        run.proxy_system = cpu_after[1] - cpu_before[1]
    return run


def wait_for_proxy(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tidegate exited with {process.returncode}:\n{log.read_text()}")
        try:
            connection = pymysql.connect(
                host="127.0.0.1", port=port, user=USER, password=PASSWORD, connect_timeout=2
            )
        except pymysql.err.MySQLError:
            time.sleep(0.2)
            continue
        connection.close()
        return
    raise RuntimeError(f"tidegate did not accept logins within 30 s:\n{log.read_text()}")


_steal_start: list[int] = []


def _cpu_counters() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def steal_share() -> float:
    """Share of CPU time the hypervisor stole since the first call."""
    now = _cpu_counters()
    if not _steal_start:
        _steal_start.extend(now)
        return 0.0
    delta = [a - b for a, b in zip(now, _steal_start, strict=False)]
    total = sum(delta[:8]) or 1
    return delta[7] / total if len(delta) > 7 else 0.0


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", type=int, default=10, help="seconds per sysbench run (10)")
    parser.add_argument("--threads", type=int, default=8, help="threads of the throughput runs (8)")
    parser.add_argument("--table-size", type=int, default=10000, help="rows per table (10000)")
    parser.add_argument("--tables", type=int, default=4, help="sysbench tables (4)")
    args = parser.parse_args(argv)
    if not shutil.which("sysbench"):
        print("sysbench not found: apt-get install -y sysbench", file=sys.stderr)
        return 2

    sandbox.ensure_installed()
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)")
    with sandbox.Sandbox() as box:
        primary = box.start_primary()
        primary.execute(
            f"CREATE DATABASE {SCHEMA}",
            f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
            f"GRANT ALL ON {SCHEMA}.* TO '{USER}'@'%'",
        )
        print(
            f"primary: MariaDB on 127.0.0.1:{primary.port}; preparing {args.tables} x "
            f"{args.table_size} rows"
        )
        subprocess.run(
            [*sysbench_command("oltp_read_write", "127.0.0.1", primary.port, args), "prepare"],
            check=True,
            capture_output=True,
        )
        proxy_port = sandbox.free_port()
        assert box.base is not None
        log = box.base / "tidegate.log"
        command = [
            sys.executable, "-m", "proxy.cli", "serve",
            "--backend", f"mysql://root:root@127.0.0.1:{primary.port}",
            "--listen", f"127.0.0.1:{proxy_port}",
            "--http-listen", f"127.0.0.1:{sandbox.free_port()}",
            "--admin-listen", f"127.0.0.1:{sandbox.free_port()}",
            "--log-level", "warning",
        ]  # fmt: skip
        with open(log, "wb") as log_file:
            proxy = subprocess.Popen(
                command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_for_proxy(proxy_port, proxy, log)
            print(f"tidegate: pid {proxy.pid} on 127.0.0.1:{proxy_port}")
            runs = measure(args, primary.port, proxy_port, proxy.pid)
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(15)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait(5)
    report(runs, args)
    return 0


def measure(args: argparse.Namespace, direct_port: int, proxy_port: int, pid: int) -> list[Run]:
    plan = [
        ("oltp_point_select", args.threads),
        ("oltp_read_write", args.threads),
        ("oltp_point_select", 1),
        ("oltp_read_write", 1),
    ]
    steal_share()
    # Warm the buffer pool and the proxy (connections, code paths) before measuring.
    run_sysbench("oltp_point_select", 2, "direct", direct_port, _short(args), None)
    run_sysbench("oltp_point_select", 2, "proxied", proxy_port, _short(args), None)
    runs = []
    for test, threads in plan:
        for target, port, proxy_pid in (
            ("direct", direct_port, None),
            ("proxied", proxy_port, pid),
        ):
            run = run_sysbench(test, threads, target, port, args, proxy_pid)
            runs.append(run)
            cpu = f", proxy CPU {run.cpu_per_query_us:.1f} us/query" if run.proxy_cpu else ""
            print(
                f"  {test:18} {threads:2} thr {target:8} {run.qps:9.0f} qps "
                f"{run.tps:8.0f} tps  p50 {run.percentile(0.5) * 1000:7.1f} us  "
                f"p99 {run.percentile(0.99) * 1000:8.1f} us  errors {run.errors}{cpu}",
                flush=True,
            )
    return runs


def _short(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "time": min(args.time, 3)})


def report(runs: list[Run], args: argparse.Namespace) -> None:
    def pick(test: str, threads: int, target: str) -> Run:
        return next(r for r in runs if (r.test, r.threads, r.target) == (test, threads, target))

    def verdict(ok: bool) -> str:
        return "meets target" if ok else "MISSES target"

    print()
    print(f"== tidegate proxy benchmark ({args.time} s per run, load average now {load_average()})")
    for test in ("oltp_point_select", "oltp_read_write"):
        direct = pick(test, args.threads, "direct")
        proxied = pick(test, args.threads, "proxied")
        ratio = proxied.qps / direct.qps
        line = (
            f"{test:18} {args.threads} threads: throughput proxied/direct {ratio:.2f}x "
            f"({proxied.qps:.0f} vs {direct.qps:.0f} qps)"
        )
        if test == "oltp_point_select":
            line += f"   target >= {TARGET_RATIO}x: {verdict(ratio >= TARGET_RATIO)}"
        print(line)
    for test in ("oltp_point_select", "oltp_read_write"):
        direct = pick(test, 1, "direct")
        proxied = pick(test, 1, "proxied")
        unit = "query" if test == "oltp_point_select" else "transaction"
        added50 = (proxied.percentile(0.5) - direct.percentile(0.5)) * 1000
        added99 = (proxied.percentile(0.99) - direct.percentile(0.99)) * 1000
        line = (
            f"{test:18} 1 thread: added latency per {unit}: p50 {added50:+.0f} us, "
            f"p99 {added99:+.0f} us (direct p50 {direct.percentile(0.5) * 1000:.0f} us)"
        )
        if test == "oltp_point_select":
            line += f"   target p50 <= {TARGET_ADDED_P50_US:.0f} us: "
            line += verdict(added50 <= TARGET_ADDED_P50_US)
        print(line)
    for run in runs:
        if run.target != "proxied" or run.cpu_per_query_us is None:
            continue
        cpu = run.cpu_per_query_us
        kernel = run.proxy_system / run.queries * 1e6
        print(
            f"proxy CPU per query, {run.test} {run.threads} thr: {cpu:.1f} us, {kernel:.1f} of "
            f"them in the kernel ({run.proxy_cpu:.2f} s for {run.queries} queries)   target <= "
            f"{TARGET_CPU_US:.0f} us: {verdict(cpu <= TARGET_CPU_US)}"
        )
    errors = sum(r.errors + r.reconnects for r in runs)
    print(f"sysbench errors + reconnects over all runs: {errors}")
    print(
        f"CPU steal while measuring: {steal_share():.0%} (a loaded or shared host inflates all of this)"
    )


if __name__ == "__main__":
    sys.exit(main())
