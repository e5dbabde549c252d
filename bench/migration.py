"""Migration benchmark: tidegate vs pt-online-schema-change under a fixed-rate load.

    python bench/migration.py                     # 1,000,000 rows, 200 tps
    python bench/migration.py --rows 100000 --rate 100   # a quick run
    python bench/migration.py --repeat 3          # 3 rounds, order alternating; ratio of medians

One command: it starts its own throwaway MariaDB (``proxy.sandbox``), prepares
``sbtest.sbtest1`` with sysbench and keeps a pristine copy of it.  Then, for
each tool in turn, on the same data (the table is restored from the pristine
copy before every run):

- ``sysbench oltp_read_write --rate=R`` runs in the background (started 3 s
  before the migration, stopped 3 s after it) with every error ignored: its
  per-second report gives the error count (err/s) and its debug log the codes
  (it logs a code once, not every occurrence);
- a latency probe (two Python threads, 25 small read-write transactions per
  second each: point select, index update, non-index update, commit) records
  every statement with its own start timestamp and duration, so p95/p99/max
  can be cut to any window: the whole migration, its copy phase, and ±1 s
  around the cut-over.  sysbench's own per-second p99 cannot be cut finer than
  a second and hides the maximum, hence the probe; sysbench's per-second
  report is still summarised (tps and worst p99 per window);
- the tool runs as a subprocess with its defaults (tidegate:
  ``python -m proxy.cli migrate … --execute --attempt-instant-ddl off`` — the
  ADD COLUMN would otherwise be INSTANT and copy nothing; pt-osc:
  ``--alter … --execute --charset=utf8mb4 --recursion-method=none
  --no-check-replication-filters``), and its output lines are timestamped as
  they arrive to find the copy and cut-over windows.

The server's metadata-lock instrument (``performance_schema``
``wait/lock/metadata/sql/mdl``, on by default in MySQL 8, off in MariaDB) is
switched on, as on MySQL 8 (tidegate's blocker reports use it); its cost is
the same for both tools.  ``--no-mdl-instrument`` leaves MariaDB's default.

The server's buffer pool is 1G (``--buffer-pool``): the table, the copy each
tool makes of it and the pristine copy (~240 MB each at 1M rows) stay in
memory, as on a server sized for its data.  With the test sandboxes' 256M
they evict each other, and both tools read pages back from disk: pt-osc its
source rows, tidegate also the ghost for its deferred index build (~190 MB
read at ~130 MB/s on the development VM, 1.5-1.8 s instead of 0.7 s).
Its redo log is 1G (``--redo-log``): with 256M the copy holds the checkpoint
age at its limit for the whole copy, and InnoDB's flushing then stalls every
writer now and then (probe statements of 50-80 ms), whichever tool copies.

It prints wall time and the tidegate/pt-osc ratio, rows/s, workload errors
(the probe's by code), and latency per window, plus the load average of the machine (other
work on a small machine moves every number here).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pymysql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy import sandbox

ROOT = Path(__file__).resolve().parents[1]
TABLE = "sbtest1"
HELPERS = ("_sbtest1_gho", "_sbtest1_ghc", "_sbtest1_del", "_sbtest1_new", "_sbtest1_old")


def load_average() -> str:
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a running process (all its threads), from /proc; 0 when it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


# -- the latency probe ------------------------------------------------------------------


@dataclass
class Sample:
    started: float
    seconds: float
    code: int  # 0 = ok, else the MySQL error code
    kind: str = ""  # select, update k, update c, commit


class Probe:
    """Small read-write transactions at a fixed rate; every statement timed."""

    def __init__(self, port: int, rows: int, threads: int = 2, rate_per_thread: float = 25.0) -> None:
        self.port = port
        self.rows = rows
        self.interval = 1.0 / rate_per_thread
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        connection = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="root",
                                     database="sbtest", autocommit=False)
        cursor = connection.cursor()
        statements = (
            ("select", "SELECT c FROM sbtest1 WHERE id = %s", lambda key: (key,)),
            ("update k", "UPDATE sbtest1 SET k = k + 1 WHERE id = %s", lambda key: (key,)),
            ("update c", "UPDATE sbtest1 SET c = %s WHERE id = %s", lambda key: (f"probe-{rng.randrange(10**9)}", key)),
        )
        next_start = time.monotonic()
        while not self.stop.is_set():
            key = rng.randrange(1, self.rows + 1)
            ok = True
            for kind, sql, args in statements:
                started = time.monotonic()
                try:
                    cursor.execute(sql, args(key))
                    cursor.fetchall()
                    self._record(started, 0, kind)
                except pymysql.err.MySQLError as error:
                    self._record(started, int(error.args[0]) if error.args else -1, kind)
                    ok = False
                    break
            started = time.monotonic()
            try:
                if ok:
                    connection.commit()
                    self._record(started, 0, "commit")
                else:
                    connection.rollback()
            except pymysql.err.MySQLError as error:
                self._record(started, int(error.args[0]) if error.args else -1, "commit")
            next_start += self.interval
            time.sleep(max(0.0, next_start - time.monotonic()))
        connection.close()

    def _record(self, started: float, code: int, kind: str) -> None:
        with self._lock:
            self.samples.append(Sample(started, time.monotonic() - started, code, kind))

    def window(self, start: float, end: float) -> dict[str, object]:
        inside = [s for s in self.samples if start <= s.started <= end]
        values = sorted(s.seconds for s in inside)
        errors = Counter(s.code for s in inside if s.code)
        if not values:
            return {"n": 0, "errors": dict(errors)}

        def pct(p: float) -> float:
            return values[min(len(values) - 1, int(p * len(values)))] * 1000

        slowest = max(inside, key=lambda s: s.seconds)
        return {"n": len(values), "p95": pct(0.95), "p99": pct(0.99), "max": values[-1] * 1000,
                "max_at": slowest.started, "errors": dict(errors)}


def describe(window: dict[str, object]) -> str:
    if not window.get("n"):
        return "no samples"
    errors = window["errors"]
    return (f"n={window['n']} p95={window['p95']:.1f}ms p99={window['p99']:.1f}ms "
            f"max={window['max']:.1f}ms errors={errors or 0}")


# -- sysbench ------------------------------------------------------------------------------


def sysbench_command(port: int, command: str, rows: int, *extra: str) -> list[str]:
    return ["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={port}",
            "--mysql-user=root", "--mysql-password=root", "--mysql-db=sbtest", "--tables=1",
            f"--table-size={rows}", *extra, command]


@dataclass
class Load:
    """sysbench in the background; its per-second report and its ignored errors."""

    port: int
    rows: int
    rate: int
    threads: int
    started: float = 0.0
    process: subprocess.Popen[str] | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            sysbench_command(self.port, "run", self.rows, f"--rate={self.rate}", f"--threads={self.threads}",
                             "--time=0", "--report-interval=1", "--percentile=99", "--verbosity=5",
                             "--mysql-ignore-errors=all"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(5)

    def error_codes(self) -> list[int]:
        """Codes of the errors sysbench ignored (its debug log names each code, not each error)."""
        return sorted({int(m.group(1)) for _, line in self.lines if (m := re.search(r"Ignoring error (\d+)", line))})

    def report(self, start: float, end: float) -> str:
        """tps and worst per-second p99 of the seconds inside [start, end]."""
        tps: list[float] = []
        p99: list[float] = []
        errors = 0.0
        for match in re.finditer(r"\[ (\d+)s \] thds: \d+ tps: ([\d.]+) .*?lat \(ms,99%\): ([\d.]+) err/s: ([\d.]+)",
                                 "\n".join(line for _, line in self.lines)):
            second = self.started + int(match.group(1))
            if start <= second <= end + 1:
                tps.append(float(match.group(2)))
                p99.append(float(match.group(3)))
                errors += float(match.group(4))
        if not tps:
            return "no report"
        return (f"tps avg {sum(tps) / len(tps):.0f} (min {min(tps):.0f}), worst 1-s p99 {max(p99):.1f}ms, "
                f"errors {errors:.0f}")


# -- one tool run ------------------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    command: list[str]
    start: float = 0.0
    end: float = 0.0
    returncode: int = 0
    lines: list[tuple[float, str]] = field(default_factory=list)
    copy_window: tuple[float, float] | None = None
    cut_over_window: tuple[float, float] | None = None
    load_before: str = ""
    load_after: str = ""
    round: int = 0  # 1, 2, … with --repeat; 0 for a single round
    #: CPU seconds used during the run: the tool, the server, sysbench
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def execute(self, server_pid: int | None, load_pid: int | None) -> None:
        self.load_before = load_average()
        server, load = cpu_seconds(server_pid), cpu_seconds(load_pid)
        self.start = time.monotonic()
        process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        # wait4, not wait: it gives the tool's own rusage (and that of any children it waited for)
        _, status, usage = os.wait4(process.pid, 0)
        self.end = time.monotonic()
        process.returncode = self.returncode = os.waitstatus_to_exitcode(status)
        self.cpu = {"tool": usage.ru_utime + usage.ru_stime, "server": cpu_seconds(server_pid) - server,
                    "sysbench": cpu_seconds(load_pid) - load}
        self.load_after = load_average()

    def find(self, pattern: str) -> tuple[float, str] | None:
        for at, line in self.lines:
            if re.search(pattern, line):
                return at, line
        return None


def tidegate_windows(run: Run) -> None:
    copy_done = run.find(r"^copy done")
    if copy_done:
        run.copy_window = (run.start, copy_done[0])
    cut = run.find(r"^cut-over done")
    if cut:
        held = re.search(r"table held (\d+)ms", cut[1])
        begin = cut[0] - (int(held.group(1)) / 1000 if held else 0.0)
        run.cut_over_window = (begin, cut[0])


def pt_windows(run: Run) -> None:
    copying = run.find(r"Copying approximately")
    copied = run.find(r"Copied rows OK")
    if copying and copied:
        run.copy_window = (copying[0], copied[0])
    swapping = run.find(r"Swapping tables")
    swapped = run.find(r"Swapped original and new tables")
    if swapping and swapped:
        run.cut_over_window = (swapping[0], swapped[0])


def restore(primary: sandbox.Instance) -> None:
    primary.execute(
        "USE sbtest",
        *(f"DROP TABLE IF EXISTS {name}" for name in (TABLE, *HELPERS)),
        "DROP DATABASE IF EXISTS _tidegate",
        f"CREATE TABLE {TABLE} LIKE pristine",
        f"INSERT INTO {TABLE} SELECT * FROM pristine",
        f"ANALYZE TABLE {TABLE}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="sbtest1 size (default 1,000,000)")
    parser.add_argument("--rate", type=int, default=200, help="sysbench transactions per second (default 200)")
    parser.add_argument("--threads", type=int, default=8, help="sysbench threads (default 8)")
    parser.add_argument("--tools", default="tidegate,pt-osc", help="which tools, in order (default tidegate,pt-osc)")
    parser.add_argument("--tidegate-args", default="", help="extra flags for tidegate migrate")
    parser.add_argument("--variant-args", default="",
                        help="flags for the tool 'tidegate+': tidegate with these added, to compare a setting "
                             "with the defaults in the same run (e.g. --tools tidegate,tidegate+,pt-osc)")
    parser.add_argument("--no-mdl-instrument", dest="mdl_instrument", action="store_false",
                        help="leave performance_schema's metadata-lock instrument off (MariaDB's default)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every tool, the order reversed each round (A B, B A, …); "
                             "the ratio is then of the median wall times (default 1)")
    parser.add_argument("--logs", type=Path, help="write each run's tool and sysbench output to this directory")
    parser.add_argument("--server", choices=("mariadb", "mysql"), default="mariadb",
                        help="the throwaway server: MariaDB 10.11 (default) or MySQL (the test sandbox's, "
                             "Debian sid's 9.7 unless TIDEGATE_MYSQLD names another mysqld)")
    parser.add_argument("--buffer-pool", default="1G", metavar="SIZE",
                        help="the server's innodb_buffer_pool_size (default 1G: the table, the tool's copy of it "
                             "and the pristine copy, ~240 MB each at 1M rows, stay in memory, as on a server sized "
                             "for its data; the test sandboxes' 256M makes both tools read pages back from disk)")
    parser.add_argument("--redo-log", default="1G", metavar="SIZE",
                        help="the server's redo log (MariaDB innodb_log_file_size, MySQL innodb_redo_log_capacity; "
                             "default 1G: with the sandboxes' 256M the copy keeps the checkpoint age at its limit "
                             "and InnoDB's flushing stalls every writer now and then, whichever tool copies)")
    args = parser.parse_args()
    for flag, value in (("--buffer-pool", args.buffer_pool), ("--redo-log", args.redo_log)):
        if not re.fullmatch(r"[1-9][0-9]*[KMG]?", value):
            parser.error(f"{flag}: {value!r} is not a size such as 1G or 256M")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in ("tidegate", "pt-osc", "tidegate+")]
    if unknown:
        parser.error(f"--tools: unknown tool {unknown[0]!r} (tidegate, tidegate+, pt-osc)")
    missing = [name for name, needed in (("sysbench", True), ("pt-online-schema-change", "pt-osc" in tools))
               if needed and shutil.which(name) is None]
    if missing:
        print(f"missing: {', '.join(missing)}; install it (Debian: apt-get install -y "
              f"{' '.join('percona-toolkit' if m.startswith('pt-') else m for m in missing)}), "
              "or run ./dev bench migration, which does", file=sys.stderr)
        return 2
    print(f"load average at start: {load_average()} on {os.cpu_count()} cores", flush=True)
    if args.server == "mariadb":
        sandbox.ensure_installed()
    sizes = (f"--innodb-buffer-pool-size={args.buffer_pool}",
             f"--innodb-log-file-size={args.redo_log}" if args.server == "mariadb"
             else f"--innodb-redo-log-capacity={args.redo_log}")
    with sandbox.Sandbox(server_options=sizes) if args.server == "mariadb" else \
            sandbox.MysqlSandbox(server_options=sizes) as box:
        primary = box.start_primary()
        port = primary.port
        (version, pool_bytes) = primary.execute("SELECT @@version, @@innodb_buffer_pool_size")[0]
        (redo_bytes,) = primary.execute("SELECT @@innodb_log_file_size" if args.server == "mariadb"
                                        else "SELECT @@innodb_redo_log_capacity")[0]
        print(f"server: {version}, buffer pool {int(pool_bytes) // 2**20}M, redo log {int(redo_bytes) // 2**20}M",
              flush=True)
        if args.server == "mysql":
            # MySQL 9 has only caching_sha2_password: one full login (RSA, through pymysql and
            # cryptography) puts root in the server's cache, so that sysbench's and pt-osc's
            # clients, which cannot do the RSA exchange without TLS, log in the fast way.
            pymysql.connect(host="127.0.0.1", port=port, user="root", password="root").close()
        primary.execute("CREATE DATABASE sbtest")
        if args.mdl_instrument:
            primary.execute("UPDATE performance_schema.setup_instruments SET ENABLED = 'YES', TIMED = 'YES' "
                            "WHERE NAME = 'wait/lock/metadata/sql/mdl'")
        print(f"performance_schema metadata-lock instrument: {'on' if args.mdl_instrument else 'off'}", flush=True)
        print(f"preparing {args.rows} rows ...", flush=True)
        subprocess.run(sysbench_command(port, "prepare", args.rows), check=True, stdout=subprocess.DEVNULL)
        primary.execute("USE sbtest", f"CREATE TABLE pristine LIKE {TABLE}", f"INSERT INTO pristine SELECT * FROM {TABLE}")
        # Python writes its bytecode caches on the first start: done here, untimed.
        subprocess.run([sys.executable, "-m", "compileall", "-q", "proxy", "migrator"], cwd=ROOT, check=False)
        dsn = f"D=sbtest,t={TABLE},h=127.0.0.1,P={port},u=root,p=root"
        commands = {
            "tidegate": [sys.executable, "-m", "proxy.cli", "migrate", "--host", "127.0.0.1", "--port", str(port),
                         "--user", "root", "--password", "root", "--database", "sbtest", "--table", TABLE,
                         "--alter", "ADD COLUMN tg INT NULL", "--execute", "--attempt-instant-ddl", "off",
                         "--status-interval", "2", *args.tidegate_args.split()],
            "pt-osc": ["pt-online-schema-change", "--alter", "ADD COLUMN pt INT NULL", "--execute",
                       "--charset=utf8mb4", "--recursion-method=none", "--no-check-replication-filters", dsn],
        }
        commands["tidegate+"] = [*commands["tidegate"], *args.variant_args.split()]
        results: list[tuple[Run, Load, Probe]] = []
        order = [tool for round_ in range(max(1, args.repeat)) for tool in (tools if round_ % 2 == 0 else tools[::-1])]
        for index, tool in enumerate(order):
            # Every run, the first included, starts from a table just restored: the first run
            # used to get sysbench's table as prepared, its pages pushed out of the buffer pool
            # by the pristine copy, and was 20-40 % slower than the others whichever tool ran it.
            print("restoring the table ...", flush=True)
            restore(primary)
            time.sleep(1)
            load = Load(port, args.rows, args.rate, args.threads)
            probe = Probe(port, args.rows)
            load.start()
            probe.start()
            time.sleep(3)
            round_ = index // len(tools) + 1
            run = Run(tool, commands[tool], round=round_ if args.repeat > 1 else 0)
            print(f"== {tool}" + (f" round {round_}" if args.repeat > 1 else "") + f" (load average {load_average()})",
                  flush=True)
            run.execute(primary.pid, load.process.pid if load.process else None)
            for at, line in run.lines:
                print(f"  {at - run.start:7.2f}s {tool}: {line}", flush=True)
            time.sleep(3)
            probe.finish()
            load.stop()
            (tidegate_windows if tool.startswith("tidegate") else pt_windows)(run)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                suffix = f".{round_}" if args.repeat > 1 else ""
                (args.logs / f"{tool}{suffix}.log").write_text("\n".join(f"{at - run.start:.3f} {line}" for at, line in run.lines))
                (args.logs / f"{tool}{suffix}.sysbench.log").write_text(
                    "\n".join(f"{at - load.started:.3f} {line}" for at, line in load.lines))
            results.append((run, load, probe))
        report(results, args.rows, args.rate)
    return 0


def report(results: list[tuple[Run, Load, Probe]], rows: int, rate: int) -> None:
    print(f"\n== results: {rows} rows, sysbench oltp_read_write --rate={rate}, "
          f"probe 2x25 tps; load average now {load_average()}")
    seconds: dict[str, list[float]] = {}
    for run, load, probe in results:
        ok = run.returncode == 0
        if ok:
            seconds.setdefault(run.tool, []).append(run.seconds)
        print(f"\n{run.tool}{f' round {run.round}' if run.round else ''}: exit {run.returncode} in {run.seconds:.1f}s"
              + (f", {rows / run.seconds:.0f} rows/s" if ok else "")
              + f" (load average {run.load_before} -> {run.load_after})")
        if run.cpu:
            print(f"  CPU during the run: tool {run.cpu['tool']:.1f}s, server {run.cpu['server']:.1f}s, "
                  f"sysbench {run.cpu['sysbench']:.1f}s, total {sum(run.cpu.values()):.1f}s "
                  f"({sum(run.cpu.values()) / run.seconds:.2f} cores)")
        print(f"  sysbench during the run: {load.report(run.start, run.end)}; "
              f"error codes seen (±3 s): {load.error_codes() or 'none'}")
        print(f"  probe before  (3 s): {describe(probe.window(run.start - 3, run.start))}")
        whole = probe.window(run.start, run.end)
        slowest = whole.get("max_at")
        print(f"  probe whole run:     {describe(whole)}"
              + (f" (slowest at +{float(slowest) - run.start:.2f}s)" if isinstance(slowest, float) else ""))
        slow = [sample for sample in probe.samples if run.start <= sample.started <= run.end and sample.seconds > 0.05]
        if slow:  # when they happened, to line up with the tool's own timed log
            print("  probe statements over 50 ms: " + ", ".join(
                f"+{sample.started - run.start:.2f}s {sample.seconds * 1000:.0f}ms {sample.kind}" for sample in slow[:12])
                + (f" (and {len(slow) - 12} more)" if len(slow) > 12 else ""))
        if run.copy_window:
            start, end = run.copy_window
            print(f"  probe copy ({end - start:5.1f}s): {describe(probe.window(start, end))}")
        if run.cut_over_window:
            start, end = run.cut_over_window
            print(f"  probe cut-over ±1 s (swap {1000 * (end - start):.0f}ms): "
                  f"{describe(probe.window(start - 1, end + 1))}")
        if not ok:
            print("  last output:\n    " + "\n    ".join(line for _, line in run.lines[-15:]))
    for variant in ("tidegate", "tidegate+"):
        if variant in seconds and "pt-osc" in seconds:
            ratios(variant, seconds[variant], seconds["pt-osc"])


def ratios(tool: str, ours: list[float], theirs: list[float]) -> None:
    if len(ours) == 1 and len(theirs) == 1:
        print(f"\nwall time ratio {tool}/pt-osc: {ours[0] / theirs[0]:.2f}")
        return
    # Rounds alternate the order (A B, B A, …) so that a drift of the machine's
    # speed over the run falls on both tools; medians damp a single noisy run.
    rounds = [f"{a / b:.2f}" for a, b in zip(ours, theirs, strict=False)]
    print(f"\nwall times: {tool} {' '.join(f'{x:.1f}' for x in ours)} s, "
          f"pt-osc {' '.join(f'{x:.1f}' for x in theirs)} s; per-round ratios {' '.join(rounds)}")
    print(f"wall time ratio {tool}/pt-osc (medians): {statistics.median(ours) / statistics.median(theirs):.2f}")


if __name__ == "__main__":
    sys.exit(main())
