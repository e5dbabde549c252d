"""Throttling on real signals: --max-load / --critical-load on Threads_running, replica lag."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymysql
import pytest
import trio

from migrator.db import ConnectionSettings
from migrator.runner import Migration, cancel_migration
from migrator.spec import LoadThreshold
from migrator.state import Phase
from migrator.throttler import CriticalLoad
from proxy import sandbox
from tests.migrator.conftest import assert_same, create_pair, make_spec
from tests.migrator.test_control import phase_of, wait_phase

SLOW_COPY = {"chunk_size": 100, "max_chunk_size": 100, "min_chunk_size": 50, "chunk_time": 0.02}


def threads_running(primary: sandbox.Instance) -> int:
    return int(primary.execute("SHOW GLOBAL STATUS LIKE 'Threads_running'")[0][1])


@contextmanager
def busy_server(primary: sandbox.Instance, sessions: int) -> Iterator[None]:
    """``sessions`` extra statements running (SELECT SLEEP) until the block ends."""
    connections = [primary.connect() for _ in range(sessions)]
    threads = []
    for connection in connections:
        def sleep(connection: pymysql.connections.Connection = connection) -> None:  # type: ignore[type-arg]
            try:
                connection.cursor().execute("SELECT SLEEP(120)")
            except pymysql.err.MySQLError:
                pass

        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        threads.append(thread)
    try:
        for _ in range(100):
            if threads_running(primary) >= sessions:
                break
            threading.Event().wait(0.02)
        yield
    finally:
        for connection in connections:
            primary.execute(f"KILL QUERY {connection.thread_id()}")
        for thread in threads:
            thread.join(10)
        for connection in connections:
            connection.close()


async def test_max_load_pauses_the_copy_until_the_load_drops(primary: sandbox.Instance, database: str) -> None:
    create_pair(primary, database, rows=2000, seed=11)
    limit = threads_running(primary) + 8
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL",
                     max_load=LoadThreshold.parse_list(f"Threads_running={limit}"), **SLOW_COPY)
    migration = Migration(spec)
    results: list[object] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            results.append(await migration.run())

        with busy_server(primary, 12):
            nursery.start_soon(run)
            await wait_phase(primary, database, {"copying"})
            await trio.sleep(1.0)
            progress = migration.progress()
            assert progress.throttle_reason is not None
            assert f">= {limit:g}" in progress.throttle_reason and "Threads_running" in progress.throttle_reason
            assert progress.rows_copied == 0  # paused before the first chunk
        # the sleepers are gone: the copy goes on by itself
    assert results[0].phase == Phase.COMPLETE  # type: ignore[attr-defined]
    assert_same(primary, database)


async def test_critical_load_aborts_and_leaves_the_original_alone(primary: sandbox.Instance, database: str) -> None:
    create_pair(primary, database, rows=500, seed=12)
    limit = threads_running(primary) + 8
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL",
                     critical_load=LoadThreshold.parse_list(f"Threads_running={limit}"), **SLOW_COPY)
    with busy_server(primary, 12), pytest.raises(CriticalLoad, match="critical load"):
        await Migration(spec).run()
    assert phase_of(primary, database) is not None and phase_of(primary, database)[0] == "failed"  # type: ignore[index]
    assert_same(primary, database)  # original untouched
    assert "cancelled" not in await cancel_migration(spec)  # helpers dropped, nothing left running
    assert sorted(r[0] for r in primary.execute(f"SHOW TABLES FROM `{database}`")) == ["control", "t"]


async def test_replica_lag_pauses_the_copy(
    primary: sandbox.Instance, replica: sandbox.Instance, database: str, tmp_path: Path
) -> None:
    create_pair(primary, database, rows=2000, seed=13)
    sandbox.wait_replica_caught_up(primary, replica)
    flag = tmp_path / "throttle"
    flag.touch()  # hold the copy until the replica is stopped
    on_replica = ConnectionSettings(host=replica.host, port=replica.port, user=replica.user, password=replica.password)
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL", replicas=(on_replica,), max_lag_millis=400,
                     throttle_flag_file=flag, **SLOW_COPY)
    migration = Migration(spec)
    results: list[object] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            results.append(await migration.run())

        nursery.start_soon(run)
        await wait_phase(primary, database, {"copying"})
        await trio.sleep(0.5)
        assert migration.progress().rows_copied == 0
        replica.execute("STOP REPLICA SQL_THREAD")  # MariaDB 10.5+ and MySQL 8.0.22+
        try:
            await trio.sleep(1.0)  # our heartbeat on the replica grows older than 400 ms
            flag.unlink()
            await trio.sleep(1.5)
            progress = migration.progress()
            assert progress.throttle_reason is not None and "replica lag" in progress.throttle_reason
            assert progress.rows_copied == 0
        finally:
            replica.execute("START REPLICA SQL_THREAD")
        with trio.fail_after(60):
            while migration.progress().rows_copied == 0:
                await trio.sleep(0.05)
    assert results[0].phase == Phase.COMPLETE  # type: ignore[attr-defined]
    assert_same(primary, database)
    sandbox.wait_replica_caught_up(primary, replica)
    assert len(replica.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 16  # the change replicated
