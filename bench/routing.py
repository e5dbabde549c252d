"""Routing benchmark: what rules and the read/write split cost the relay.

    python bench/routing.py [--time 8] [--threads 8] [--rounds 3] [--ps-modes disable,auto]
                            [--baseline /path/to/older/checkout]

Starts a throwaway MariaDB primary and a GTID replica (``proxy.sandbox``),
prepares sysbench tables, and starts one ``tidegate serve`` process per
variant:

* ``none``: no rules, no replicas (routing off: the relay's hot path);
* ``rules20``: 20 active rules of every matcher type (user, tags, tables,
  regex, digest, percentage, kinds), 19 of which never match the benchmark's
  statements and one that matches every read (``route = "primary"``);
* ``split``: read/write split on, reads answered by the replica;
* ``baseline`` (with ``--baseline``): the proxy of another checkout, no
  rules: "before" for the hot path.

Each round runs ``oltp_point_select`` against the primary directly and
through each proxy, back to back, per ``--ps-modes``: ``disable`` sends text
``COM_QUERY`` statements (the path rules apply to; every statement text is
different, as with literal-heavy applications), ``auto`` uses prepared
statements (``COM_STMT_EXECUTE``).  The report gives, per variant, the
median throughput over the rounds, its ratio to ``none``, and the proxy
process's CPU time per query (``/proc/PID/stat``).  Interleaving the
variants in every round keeps a shared machine's load drift out of the
ratios; the load average is printed anyway.

Targets (issue 5): ``rules20`` at most 10% slower than ``none``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import sandbox  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_proxy", ROOT / "bench" / "proxy.py")
assert _spec is not None and _spec.loader is not None
bench_proxy = importlib.util.module_from_spec(_spec)
sys.modules["bench_proxy"] = bench_proxy  # dataclasses look their module up
_spec.loader.exec_module(bench_proxy)

USER, PASSWORD, SCHEMA = "sbtest", "sbtest-secret", "sbtest"
TARGET_SLOWDOWN = 0.10

RULES_20 = """
[[rules]]
id = 1
user = "reporting"
route = "replica"
[[rules]]
id = 2
user = "batch"
kinds = ["write"]
comment = "batch"
[[rules]]
id = 3
schema = "crm"
route = "primary"
[[rules]]
id = 4
tags = { tidegate = "gray" }
percent = 10
key = "uid"
route = "primary"
[[rules]]
id = 5
tags = { tidegate = "gray" }
comment = "gray"
[[rules]]
id = 6
tags = { priority = "batch" }
hint = "MAX_EXECUTION_TIME(5000)"
[[rules]]
id = 7
tables = ["audit_log"]
kinds = ["write", "ddl"]
reject = "append-only"
[[rules]]
id = 8
tables = ["shop.orders", "shop.order_items"]
hint = "MAX_EXECUTION_TIME(500)"
[[rules]]
id = 9
tables = ["reports_*"]
route = "replica"
[[rules]]
id = 10
match = '\\bFROM\\s+legacy_users\\b'
rewrite = 'FROM users_v2'
[[rules]]
id = 11
match = '^\\s*DELETE\\s+FROM\\s+sessions\\b'
reject = "use the cleanup job"
[[rules]]
id = 12
match = 'SLEEP\\('
reject = "no sleeping"
[[rules]]
id = 13
digest = "SELECT * FROM products WHERE MATCH(name) AGAINST ('x') LIMIT 50"
hint = "MAX_EXECUTION_TIME(500)"
[[rules]]
id = 14
digest = "SELECT COUNT(*) FROM orders WHERE created_at > '2020-01-01'"
route = "primary"
[[rules]]
id = 15
attributes = { program_name = "cron" }
route = "primary"
[[rules]]
id = 16
user = "admin_tool"
last = true
[[rules]]
id = 17
kinds = ["ddl"]
comment = "ddl through sidecar"
[[rules]]
id = 18
tags = { traceparent = "*" }
tables = ["payments"]
comment = "traced payment"
[[rules]]
id = 19
kinds = ["session"]
tags = { tidegate = "debug" }
comment = "debug"
[[rules]]
id = 20
kinds = ["read"]
route = "primary"
"""


@dataclass
class Variant:
    name: str
    root: Path
    backends: list[str]
    config: str = ""
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    runs: dict[str, list[bench_proxy.Run]] = field(default_factory=dict)


def sysbench(test: str, port: int, args: argparse.Namespace, ps_mode: str, pid: int | None,
             target: str) -> bench_proxy.Run:
    command = [
        "sysbench", test, "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={port}",
        f"--mysql-user={USER}", f"--mysql-password={PASSWORD}", f"--mysql-db={SCHEMA}",
        f"--tables={args.tables}", f"--table-size={args.table_size}", f"--db-ps-mode={ps_mode}",
        f"--threads={args.threads}", f"--time={args.time}", "--report-interval=0", "--histogram=on",
        "--percentile=99", "run",
    ]  # fmt: skip
    before = bench_proxy.proxy_cpu_seconds(pid) if pid else None
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    after = bench_proxy.proxy_cpu_seconds(pid) if pid else None
    if result.returncode != 0:
        raise RuntimeError(f"sysbench {target} failed:\n{result.stdout}\n{result.stderr}")
    run = bench_proxy.Run(test, args.threads, target, **bench_proxy.parse_sysbench(result.stdout))
    if before is not None and after is not None:
        run.proxy_cpu = sum(after) - sum(before)
        run.proxy_system = after[1] - before[1]
    return run


def start(variant: Variant, box: sandbox.Sandbox) -> None:
    assert box.base is not None
    variant.port = sandbox.free_port()
    command = [
        sys.executable, "-m", "proxy.cli", "serve",
        "--listen", f"127.0.0.1:{variant.port}",
        "--http-listen", f"127.0.0.1:{sandbox.free_port()}",
        "--admin-listen", f"127.0.0.1:{sandbox.free_port()}",
        "--log-level", "warning", "--no-migrations-enabled",
    ]  # fmt: skip
    for dsn in variant.backends:
        command += ["--backend", dsn]
    if variant.config:
        path = box.base / f"{variant.name}.toml"
        path.write_text(variant.config)
        command += ["--config", str(path)]
    log = box.base / f"{variant.name}.log"
    env = dict(os.environ, PYTHONPATH=str(variant.root))
    with open(log, "wb") as handle:
        variant.process = subprocess.Popen(
            command, cwd=variant.root, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    bench_proxy.wait_for_proxy(variant.port, variant.process, log)


def stop(variant: Variant) -> None:
    process = variant.process
    if process is None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", type=int, default=8, help="seconds per sysbench run (8)")
    parser.add_argument("--threads", type=int, default=8, help="sysbench threads (8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants (3)")
    parser.add_argument("--table-size", type=int, default=10000, help="rows per table (10000)")
    parser.add_argument("--tables", type=int, default=4, help="sysbench tables (4)")
    parser.add_argument("--ps-modes", default="disable,auto", help="sysbench --db-ps-mode values (disable,auto)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose proxy is the 'before'")
    parser.add_argument("--variants", default="baseline,none,rules20,split",
                        help="which proxies to measure (baseline,none,rules20,split; none is always in)")
    args = parser.parse_args(argv)
    if not shutil.which("sysbench"):
        print("sysbench not found: apt-get install -y sysbench", file=sys.stderr)
        return 2
    modes = [mode.strip() for mode in args.ps_modes.split(",") if mode.strip()]
    sandbox.ensure_installed()
    print(f"load average at start: {bench_proxy.load_average()} ({os.cpu_count()} CPUs)")
    with sandbox.Sandbox() as box:
        primary = box.start_primary()
        replica = box.start_replica(primary) if "split" in args.variants else None
        primary.execute(
            f"CREATE DATABASE {SCHEMA}",
            f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
            f"GRANT ALL ON {SCHEMA}.* TO '{USER}'@'%'",
        )
        subprocess.run(
            [*bench_proxy.sysbench_command("oltp_read_write", "127.0.0.1", primary.port, args), "prepare"],
            check=True, capture_output=True,
        )  # fmt: skip
        if replica is not None:
            sandbox.wait_replica_caught_up(primary, replica)
        print(f"primary :{primary.port}, replica :{replica.port if replica else '-'}; "
              f"{args.tables} x {args.table_size} rows")
        primary_dsn = f"mysql://root:root@127.0.0.1:{primary.port}"
        replica_dsn = f"mysql://root:root@127.0.0.1:{replica.port if replica else 0}?role=replica&name=replica1"
        variants = []
        if args.baseline is not None:
            variants.append(Variant("baseline", args.baseline.resolve(), [primary_dsn]))
        variants += [
            Variant("none", ROOT, [primary_dsn]),
            Variant("rules20", ROOT, [primary_dsn], RULES_20),
            Variant("split", ROOT, [primary_dsn, replica_dsn], "[routing]\nread_write_split = true\n"),
        ]
        wanted = {name.strip() for name in args.variants.split(",")} | {"none"}
        variants = [variant for variant in variants if variant.name in wanted]
        try:
            for variant in variants:
                start(variant, box)
                print(f"  {variant.name}: pid {variant.process.pid if variant.process else '?'} :{variant.port}")
            measure(args, modes, primary.port, variants)
        finally:
            for variant in variants:
                stop(variant)
    report(args, modes, variants)
    return 0


DIRECT: dict[str, list[bench_proxy.Run]] = {}


def measure(args: argparse.Namespace, modes: list[str], direct_port: int, variants: list[Variant]) -> None:
    warm = argparse.Namespace(**{**vars(args), "time": 2})
    for variant in variants:  # connections, caches, buffer pool
        for mode in modes:
            sysbench("oltp_point_select", variant.port, warm, mode, None, variant.name)
    bench_proxy.steal_share()
    for round_number in range(1, args.rounds + 1):
        for mode in modes:
            run = sysbench("oltp_point_select", direct_port, args, mode, None, "direct")
            DIRECT.setdefault(mode, []).append(run)
            line = [f"round {round_number} ps={mode:7} direct {run.qps:7.0f}"]
            for variant in variants:
                assert variant.process is not None
                run = sysbench("oltp_point_select", variant.port, args, mode, variant.process.pid, variant.name)
                variant.runs.setdefault(mode, []).append(run)
                line.append(f"{variant.name} {run.qps:7.0f} ({run.cpu_per_query_us or 0:.1f} us)")
                if run.errors or run.reconnects:
                    line.append(f"[{run.errors} errors]")
            print("  " + "  ".join(line), flush=True)


def report(args: argparse.Namespace, modes: list[str], variants: list[Variant]) -> None:
    print()
    print(f"== routing benchmark: oltp_point_select, {args.threads} threads, {args.rounds} x {args.time} s "
          f"per variant and mode (load average now {bench_proxy.load_average()}, "
          f"CPU steal {bench_proxy.steal_share():.0%})")
    for mode in modes:
        direct = statistics.median(run.qps for run in DIRECT[mode])
        none = next(v for v in variants if v.name == "none")
        reference = statistics.median(run.qps for run in none.runs[mode])
        what = "text COM_QUERY" if mode == "disable" else "prepared COM_STMT_EXECUTE"
        print(f"-- ps-mode={mode} ({what}); direct to the primary: {direct:.0f} qps")
        for variant in variants:
            runs = variant.runs[mode]
            qps = statistics.median(run.qps for run in runs)
            cpu = statistics.median(run.cpu_per_query_us or 0.0 for run in runs)
            slower = 1 - qps / reference
            line = (f"   {variant.name:9} {qps:8.0f} qps  {qps / direct:4.2f}x direct  "
                    f"{-slower:+6.1%} vs none  proxy CPU {cpu:5.1f} us/query")
            if variant.name == "rules20":
                verdict = "meets" if slower <= TARGET_SLOWDOWN else "MISSES"
                line += f"   target <= {TARGET_SLOWDOWN:.0%} slower: {verdict}"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
