"""A small, steady OLTP load for trying tidegate: orders inserted, read, paid, shipped.

Runs in the tidegate image (it has pymysql) and talks to tidegate over
127.0.0.1:6033 like an application in the same pod.  Every few seconds it
prints how many statements succeeded and failed and the worst latency, so an
online migration's cut-over can be watched from the application's side:

    docker compose -f deploy/compose/compose.yaml logs -f loadgen

Settings (environment): DATABASE_URL (mysql://user:password@host:port/db),
LOADGEN_RATE (transactions per second, all workers together), LOADGEN_WORKERS,
LOADGEN_SECONDS (0: until stopped), LOADGEN_REPORT (seconds between lines).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import pymysql

RECONNECT_ERRORS = (pymysql.err.OperationalError, pymysql.err.InterfaceError)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    errors: int = 0
    worst: float = 0.0
    last_error: str = ""

    def record(self, seconds: float, error: Exception | None = None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
            else:
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
            self.worst = max(self.worst, seconds)

    def take(self) -> tuple[int, int, float, str]:
        with self.lock:
            line = (self.ok, self.errors, self.worst, self.last_error)
            self.ok = self.errors = 0
            self.worst = 0.0
            self.last_error = ""
            return line


def connect_options(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb"):
        raise SystemExit(f"DATABASE_URL must start with mysql://, got {url!r}")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": unquote(parts.path.lstrip("/")) or None,
        "autocommit": True,
        "connect_timeout": 5,
        "read_timeout": 30,
        "write_timeout": 30,
    }


def ensure_schema(options: dict[str, object]) -> None:
    connection = pymysql.connect(**options)  # type: ignore[arg-type]
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS orders ("
                " id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,"
                " customer_id INT UNSIGNED NOT NULL,"
                " status ENUM('new','paid','shipped','cancelled') NOT NULL DEFAULT 'new',"
                " amount_cents INT UNSIGNED NOT NULL,"
                " created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
                " updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),"
                " KEY customer_created (customer_id, created_at))"
            )
    finally:
        connection.close()


def transaction(cursor: pymysql.cursors.Cursor, rng: random.Random) -> None:
    """One business transaction, picked at random: mostly reads, some writes."""
    customer = rng.randint(1, 10_000)
    pick = rng.random()
    if pick < 0.5:
        cursor.execute(
            "SELECT id, status, amount_cents FROM orders WHERE customer_id = %s"
            " ORDER BY created_at DESC LIMIT 10",
            (customer,),
        )
        cursor.fetchall()
    elif pick < 0.8:
        cursor.execute(
            "INSERT INTO orders (customer_id, amount_cents) VALUES (%s, %s)",
            (customer, rng.randint(100, 100_000)),
        )
    else:
        cursor.execute("BEGIN")
        cursor.execute("SELECT MAX(id) FROM orders")
        (top,) = cursor.fetchone() or (None,)
        if top:
            order = rng.randint(max(1, top - 1000), top)
            cursor.execute("SELECT status FROM orders WHERE id = %s FOR UPDATE", (order,))
            cursor.fetchall()
            cursor.execute(
                "UPDATE orders SET status = IF(status = 'new', 'paid', 'shipped') WHERE id = %s",
                (order,),
            )
        cursor.execute("COMMIT")


def worker(options: dict[str, object], interval: float, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    connection = None
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += interval
        started = time.monotonic()
        try:
            if connection is None:
                connection = pymysql.connect(**options)  # type: ignore[arg-type]
            with connection.cursor() as cursor:
                transaction(cursor, rng)
            tally.record(time.monotonic() - started)
        except pymysql.err.MySQLError as error:
            tally.record(time.monotonic() - started, error)
            if isinstance(error, RECONNECT_ERRORS) and connection is not None:
                connection.close()
                connection = None
        stop.wait(max(0.0, next_at - time.monotonic()))
    if connection is not None:
        connection.close()


def main() -> int:
    options = connect_options(os.environ.get("DATABASE_URL", "mysql://shop:shop-pass@127.0.0.1:6033/shop"))
    rate = float(os.environ.get("LOADGEN_RATE", "200"))
    workers = int(os.environ.get("LOADGEN_WORKERS", "4"))
    seconds = float(os.environ.get("LOADGEN_SECONDS", "0"))
    report = float(os.environ.get("LOADGEN_REPORT", "5"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    for attempt in range(60):
        try:
            ensure_schema(options)
            break
        except pymysql.err.MySQLError as error:
            print(f"loadgen: waiting for the database ({error})", flush=True)
            if stop.wait(min(1.0 + attempt, 5.0)):
                return 0
    else:
        return 1

    tally = Tally()
    threads = [
        threading.Thread(target=worker, args=(options, workers / rate, stop, tally, seed), daemon=True)
        for seed in range(workers)
    ]
    for thread in threads:
        thread.start()
    print(f"loadgen: {rate:g} transactions/s over {workers} connections to "
          f"{options['host']}:{options['port']}", flush=True)
    deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
    failed = 0
    while not stop.is_set():
        stop.wait(max(0.0, min(report, deadline - time.monotonic())))
        ok, errors, worst, last_error = tally.take()
        failed += errors
        line = f"loadgen: {ok / report:7.1f} ok/s  {errors:4d} errors  worst {worst * 1000:7.1f} ms"
        print(line + (f"  last error: {last_error}" if last_error else ""), flush=True)
        if time.monotonic() >= deadline:
            stop.set()
    for thread in threads:
        thread.join(timeout=10)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
