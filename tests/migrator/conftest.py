"""Helpers for migrator tests: specs, a control-table workload, byte comparison."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pymysql
import pytest
import trio

from migrator.binlog import BinlogItem, BinlogStreamer
from migrator.db import ConnectionSettings
from migrator.spec import MigrationSpec
from proxy import sandbox

TABLE_DDL = """
CREATE TABLE `{name}` (
  id INT NOT NULL,
  name VARCHAR(64) CHARACTER SET utf8mb4 NULL,
  n BIGINT NULL,
  u INT UNSIGNED NULL,
  d DECIMAL(12,3) NULL,
  f DOUBLE NULL,
  dt DATETIME(6) NULL,
  ts TIMESTAMP NULL DEFAULT NULL,
  dte DATE NULL,
  tm TIME NULL,
  e ENUM('alpha','beta','çé') CHARACTER SET utf8mb4 NULL,
  b BIT(8) NULL,
  bin VARBINARY(16) NULL,
  txt TEXT NULL,
  blb MEDIUMBLOB NULL,
  PRIMARY KEY (id),
  KEY by_n (n)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""

COLUMNS = ("id", "name", "n", "u", "d", "f", "dt", "ts", "dte", "tm", "e", "b", "bin", "txt", "blb")
WORDS = ["plain", "naïve", "日本語", "emoji 🐬", "quote ' \" \\", "", "Ωmega", "tab\tnew\nline"]


def random_row(rng: random.Random, key: int) -> tuple[Any, ...]:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.15 else value

    return (
        key,
        maybe(rng.choice(WORDS) + str(rng.randrange(1000))),
        maybe(rng.randrange(-(2**62), 2**62)),
        maybe(rng.randrange(0, 2**32)),
        maybe(decimal.Decimal(rng.randrange(-10**11, 10**11)) / 1000),
        maybe(rng.uniform(-1e9, 1e9)),
        maybe(dt.datetime(2000, 1, 1) + dt.timedelta(microseconds=rng.randrange(10**15))),
        maybe(dt.datetime(2001, 1, 1) + dt.timedelta(seconds=rng.randrange(10**8))),
        maybe(dt.date(1990, 1, 1) + dt.timedelta(days=rng.randrange(20000))),
        maybe(dt.timedelta(seconds=rng.randrange(-3000000, 3000000))),
        maybe(rng.choice(["alpha", "beta", "çé"])),
        maybe(bytes([rng.randrange(256)])),
        maybe(rng.randbytes(rng.randrange(17))),
        maybe(rng.choice(WORDS) * rng.randrange(1, 50)),
        maybe(rng.randbytes(rng.choice([0, 10, 1000, 200_000 if rng.random() < 0.02 else 100]))),
    )


def create_pair(primary: sandbox.Instance, database: str, rows: int, seed: int = 1, table: str = "t") -> None:
    """``t`` and ``control`` with the same schema and the same rows."""
    rng = random.Random(seed)
    connection = primary.connect(database=database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION time_zone = '+00:00'")
            for name in (table, "control"):
                cursor.execute(TABLE_DDL.format(name=name))
            placeholders = ", ".join(["%s"] * len(COLUMNS))
            data = [random_row(rng, key * 3) for key in range(1, rows + 1)]
            for name in (table, "control"):
                for start in range(0, len(data), 500):
                    cursor.executemany(
                        f"INSERT INTO `{name}` ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                        data[start : start + 500],
                    )
            cursor.execute(f"ANALYZE TABLE `{table}`")
            cursor.fetchall()
    finally:
        connection.close()


@dataclass
class Workload:
    """Random DML applied to ``t`` and ``control`` in the same transaction."""

    primary: sandbox.Instance
    database: str
    table: str = "t"
    threads: int = 3
    seed: int = 7
    key_space: int = 20000
    #: transactions per second per thread (None: as fast as the server goes).  A test
    #: that stops the migrator for a while needs a rate its binlog applier can catch
    #: up with on a loaded 2-core machine, as a real service's write rate is.
    rate: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    committed: int = 0
    rolled_back: int = 0
    unexpected: list[str] = field(default_factory=list)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(self.seed * 100 + index,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def finish(self) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(60)

    def _statements(self, rng: random.Random) -> list[tuple[str, tuple[Any, ...]]]:
        kind = rng.random()
        key = rng.randrange(1, self.key_space)
        if kind < 0.3:
            row = random_row(rng, key)
            cols = ", ".join(COLUMNS)
            return [(f"INSERT INTO `{{t}}` ({cols}) VALUES ({', '.join(['%s'] * len(COLUMNS))})", row)]
        if kind < 0.6:
            row = random_row(rng, key)
            column = rng.choice(COLUMNS[1:])
            return [(f"UPDATE `{{t}}` SET {column} = %s, n = %s WHERE id = %s", (row[COLUMNS.index(column)], row[2], key))]
        if kind < 0.75:
            return [("DELETE FROM `{t}` WHERE id = %s", (key,))]
        if kind < 0.85:
            return [("UPDATE `{t}` SET id = %s WHERE id = %s", (rng.randrange(1, self.key_space), key))]
        if kind < 0.93:
            return [("UPDATE `{t}` SET name = %s, u = NULL WHERE id BETWEEN %s AND %s", (rng.choice(WORDS), key, key + 30))]
        # a multi-statement transaction
        other = rng.randrange(1, self.key_space)
        return [
            ("DELETE FROM `{t}` WHERE id = %s", (key,)),
            ("UPDATE `{t}` SET txt = CONCAT(COALESCE(txt, ''), 'x') WHERE id = %s", (other,)),
        ]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        connection = self.primary.connect(database=self.database, autocommit=False)
        cursor = connection.cursor()
        cursor.execute("SET SESSION time_zone = '+00:00'")
        cursor.execute("SET SESSION innodb_lock_wait_timeout = 50")
        interval = 1.0 / self.rate if self.rate else 0.0
        next_start = time.monotonic()
        while not self.stop.is_set():
            if interval:
                next_start += interval
                delay = next_start - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
                else:
                    next_start = time.monotonic()  # behind: no burst to catch up
            statements = self._statements(rng)
            try:
                cursor.execute("BEGIN")
                for sql, args in statements:
                    cursor.execute(sql.replace("{t}", self.table), args)
                    cursor.execute(sql.replace("{t}", "control"), args)
                cursor.execute("COMMIT")
                with self._lock:
                    self.committed += 1
            except pymysql.err.MySQLError as error:
                code = error.args[0] if error.args else 0
                try:
                    cursor.execute("ROLLBACK")
                except pymysql.err.MySQLError:
                    pass
                with self._lock:
                    self.rolled_back += 1
                    if code not in (1062, 1213):
                        self.unexpected.append(repr(error))
        connection.close()


def table_bytes(primary: sandbox.Instance, database: str, table: str, columns: tuple[str, ...] = COLUMNS) -> list[tuple[Any, ...]]:
    connection = primary.connect(database=database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION time_zone = '+00:00'")
            select = ", ".join(f"CAST(`{c}` AS BINARY)" for c in columns)
            cursor.execute(f"SELECT {select} FROM `{table}` ORDER BY id")
            return list(cursor.fetchall())
    finally:
        connection.close()


def assert_same(primary: sandbox.Instance, database: str, table: str = "t", columns: tuple[str, ...] = COLUMNS) -> None:
    migrated = table_bytes(primary, database, table, columns)
    control = table_bytes(primary, database, "control", columns)
    if migrated != control:
        mine = {r[0]: r for r in migrated}
        theirs = {r[0]: r for r in control}
        missing = sorted(set(theirs) - set(mine))[:10]
        extra = sorted(set(mine) - set(theirs))[:10]
        differ = [k for k in set(mine) & set(theirs) if mine[k] != theirs[k]][:10]
        raise AssertionError(
            f"migrated table differs from control: {len(migrated)} vs {len(control)} rows; "
            f"missing {missing}, extra {extra}, differing {differ}"
        )


@contextlib.asynccontextmanager
async def copying(migration: Any, timeout: float = 60.0) -> AsyncIterator[list[Any]]:
    """Run ``migration`` in the background; enter once it is copying.

    Yields the list its result is appended to; leaving waits for it to end.
    """
    outcome: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            outcome.append(await migration.run())

        nursery.start_soon(run)
        with trio.fail_after(timeout):
            while migration.progress().phase != "copying":
                await trio.sleep(0.01)
        yield outcome


async def stream_until_done(streamer: BinlogStreamer) -> tuple[list[Any], list[Any]]:
    """Run the binlog reader until the changelog row ('done', …) arrives; the keys and changelog rows read."""
    keys: list[Any] = []
    changelog: list[Any] = []
    send, receive = trio.open_memory_channel[BinlogItem](64)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(streamer.run, send)
            async for item in receive:
                keys.extend(item.keys)
                changelog.extend(item.changelog)
                if any(hint == "done" for hint, _ in item.changelog):
                    break
            nursery.cancel_scope.cancel()
    return keys, changelog


def make_spec(primary: sandbox.Instance, database: str, alter: str, table: str = "t", **options: Any) -> MigrationSpec:
    defaults: dict[str, Any] = {
        "execute": True,
        "chunk_size": 300,
        "chunk_time": 0.05,
        "min_chunk_size": 50,
        "status_interval": 3600,
        "attempt_instant_ddl": False,
        "heartbeat_interval": 0.05,
        "flag_poll_interval": 0.05,
        "cut_over_lock_timeout_seconds": 2,
        # verify behind the copy often, so the suite's concurrent-DML tests check that path
        # (test_add_column_under_random_dml checks the after-the-copy path)
        "checksum_behind_copy_interval": 0.1,
    }
    defaults.update(options)
    settings = ConnectionSettings(host=primary.host, port=primary.port, user=primary.user, password=primary.password)
    return MigrationSpec(connection=settings, database=database, table=table, alter=alter, **defaults)


@pytest.fixture
def workload_factory(primary: sandbox.Instance) -> Iterator[Any]:
    workloads: list[Workload] = []

    def factory(database: str, **kwargs: Any) -> Workload:
        workload = Workload(primary, database, **kwargs)
        workloads.append(workload)
        return workload

    yield factory
    for workload in workloads:
        workload.finish()
