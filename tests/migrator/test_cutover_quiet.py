"""Standalone cut-over: no deadlock victim among transactions that read the table first.

An application transaction that has read ``t`` holds a shared metadata lock
on it; if it then writes ``t`` while the cut-over's ``LOCK TABLES … WRITE``
request waits for that lock, the server breaks the cycle by failing the
application's statement with 1213.  The cut-over asks with ``NOWAIT`` first
(every 2 ms, for half the lock timeout), so its request is never pending
while such a transaction is open: the transaction finishes untouched.  No
performance_schema instrument needed (MariaDB ships it off; it stays off).
"""

from __future__ import annotations

import pymysql
import trio

from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import assert_same, create_pair, make_spec
from tests.migrator.test_control import wait_phase


async def cut_over_with_a_reader_that_then_writes(primary: sandbox.Instance, database: str) -> tuple[object, str | None]:
    """(migration result, the application's error or None)."""
    create_pair(primary, database, rows=500, seed=31)
    migration = Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL", cut_over_lock_timeout_seconds=3))
    migration.postpone(True)
    app = primary.connect(database=database, autocommit=False)
    outcome: list[object] = []
    error: str | None = None
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            outcome.append(await migration.run())

        nursery.start_soon(run)
        await wait_phase(primary, database, {"postponed"})
        (key,) = primary.execute(f"SELECT MIN(id) FROM `{database}`.t")[0]
        await trio.to_thread.run_sync(lambda: app.cursor().execute("SELECT COUNT(*) FROM t"))
        migration.postpone(False)
        await trio.sleep(0.8)  # the cut-over attempt has started by now
        assert not outcome

        def write_and_commit() -> None:
            with app.cursor() as cursor:
                cursor.execute("UPDATE t SET n = n + 1 WHERE id = %s", (key,))
                cursor.execute("UPDATE control SET n = n + 1 WHERE id = %s", (key,))
            app.commit()

        try:
            await trio.to_thread.run_sync(write_and_commit)
        except pymysql.err.MySQLError as failure:
            error = repr(failure)
            app.rollback()
    app.close()
    return outcome[0], error


async def test_a_transaction_that_read_the_table_is_not_a_deadlock_victim(
    primary: sandbox.Instance, database: str
) -> None:
    result, error = await cut_over_with_a_reader_that_then_writes(primary, database)
    assert error is None, error
    assert result.phase == Phase.COMPLETE  # type: ignore[attr-defined]
    assert_same(primary, database)
    assert len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 16
