"""Cut-over under a conflicting lock, postpone, panic, kill -9 and resume, schema versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import assert_same, create_pair, make_spec


def phase_of(primary: sandbox.Instance, database: str) -> tuple[str, int] | None:
    if not primary.execute("SHOW TABLES FROM mysql LIKE 'user'") or not primary.execute(
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = '_tidegate' AND TABLE_NAME = 'migrations'"
    ):
        return None
    rows = primary.execute(
        "SELECT phase, rows_copied FROM _tidegate.migrations WHERE schema_name = %s ORDER BY id DESC LIMIT 1"
        .replace("%s", f"'{database}'")
    )
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


async def wait_phase(
    primary: sandbox.Instance, database: str, phases: set[str], timeout: float = 60,
    process: subprocess.Popen[bytes] | None = None,
) -> str:
    """Wait for the newest migration of ``database`` to reach one of ``phases``.

    With ``process`` (a ``tidegate migrate`` child), fail at once with its output
    when it exits first, and show its output on timeout: a CI log then says why.
    """
    found: tuple[str, int] | None = None
    with trio.move_on_after(timeout):
        while True:
            found = await trio.to_thread.run_sync(phase_of, primary, database)
            if found and found[0] in phases:
                return found[0]
            if process is not None and process.poll() is not None:
                break
            await trio.sleep(0.05)
    output = ""
    if process is not None:
        if process.poll() is None:
            process.kill()
        out, err = await trio.to_thread.run_sync(process.communicate)
        output = f"; exit {process.returncode}; output:\n{(out + err).decode(errors='replace')[-4000:]}"
    raise AssertionError(f"phase {found} never reached {sorted(phases)} in {timeout}s{output}")


async def copy_some_then_throttle(primary: sandbox.Instance, database: str, throttle: Path, rows: int = 300) -> None:
    """Let a throttled copy run until the ghost holds ``rows`` rows, then throttle it again.

    On a quiet machine a whole small table is copied within a second, so the
    copy must be stopped by the flag (polled every 0.25 s) rather than by luck
    for a test to interrupt it mid-copy.
    """
    throttle.unlink()
    with trio.fail_after(60):
        while not await trio.to_thread.run_sync(
                lambda: primary.execute(f"SELECT COUNT(*) >= {rows} FROM `{database}`._t_gho")[0][0]):
            await trio.sleep(0.01)
    throttle.touch()
    await trio.sleep(0.6)  # the flag is seen within 0.25 s; the chunk in flight lands


async def test_conflicting_lock_then_retry(primary: sandbox.Instance, database: str, workload_factory) -> None:
    create_pair(primary, database, rows=2000, seed=3)
    workload = workload_factory(database, key_space=7000, threads=2)
    workload.start()
    migration = Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL", cut_over_lock_timeout_seconds=1))
    migration.postpone(True)
    blocker = primary.connect(database=database, autocommit=False)
    async with trio.open_nursery() as nursery:
        outcome: list[object] = []

        async def run() -> None:
            outcome.append(await migration.run())

        nursery.start_soon(run)
        await wait_phase(primary, database, {"postponed"})
        assert primary.execute(f"SHOW TABLES FROM `{database}` LIKE '_t_gho'")
        # Another session holds a metadata lock on t (an open transaction that read it).
        await trio.to_thread.run_sync(lambda: blocker.cursor().execute("SELECT COUNT(*) FROM t"))
        migration.postpone(False)
        with trio.fail_after(30):  # each attempt times out after 1 s, then backs off
            while migration.progress().cut_over_attempts < 2:
                await trio.sleep(0.05)
        assert not outcome  # still trying: the blocker is there
        await trio.to_thread.run_sync(blocker.commit)
    await trio.to_thread.run_sync(workload.finish)
    blocker.close()
    result = outcome[0]
    assert result.phase == Phase.COMPLETE
    assert workload.unexpected == []
    assert_same(primary, database)


async def test_postpone_flag_file(primary: sandbox.Instance, database: str, tmp_path: Path) -> None:
    create_pair(primary, database, rows=500, seed=4)
    flag = tmp_path / "postpone"
    flag.touch()
    migration = Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL", postpone_cut_over_flag_file=flag))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(migration.run)
        await wait_phase(primary, database, {"postponed"})
        await trio.sleep(0.5)
        assert migration.progress().postponed
        assert len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 15  # not swapped yet
        flag.unlink()
    assert len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 16
    assert_same(primary, database)


async def test_panic_flag_cancels(primary: sandbox.Instance, database: str, tmp_path: Path) -> None:
    create_pair(primary, database, rows=3000, seed=5)
    panic, throttle = tmp_path / "panic", tmp_path / "throttle"
    throttle.touch()  # keep it copying
    migration = Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL", panic_flag_file=panic,
                                    throttle_flag_file=throttle))
    async with trio.open_nursery() as nursery:
        results: list[object] = []

        async def run() -> None:
            results.append(await migration.run())

        nursery.start_soon(run)
        await wait_phase(primary, database, {"copying"})
        with trio.fail_after(30):
            while not migration.progress().throttle_reason:
                await trio.sleep(0.02)
        panic.touch()
    assert results[0].phase == Phase.CANCELLED
    assert primary.execute(f"SHOW TABLES FROM `{database}`") == [("control",), ("t",)]
    assert_same(primary, database)


def migrate_command(primary: sandbox.Instance, database: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "import sys; from migrator.cli import main; sys.exit(main(sys.argv[1:]))",
        "migrate", "--host", primary.host, "--port", str(primary.port), "--user", primary.user,
        "--password", primary.password, "--database", database, "--table", "t",
        "--chunk-size", "100", "--chunk-time", "0.02", "--attempt-instant-ddl", "off",
        "--cut-over-lock-timeout-seconds", "1", "--status-interval", "1", "-q", *extra,
    ]


async def test_kill9_during_copy_and_cut_over_then_resume(
    primary: sandbox.Instance, database: str, tmp_path: Path, workload_factory
) -> None:
    create_pair(primary, database, rows=6000, seed=6)
    workload = workload_factory(database, key_space=20000, threads=2, rate=150)
    workload.start()
    throttle = tmp_path / "throttle"
    throttle.touch()
    alter = "ADD COLUMN extra VARCHAR(8) NOT NULL DEFAULT 'z'"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    process = subprocess.Popen(
        # Small fixed chunks: the copy must still be running when it is killed
        # (the adaptive size would copy 6000 rows in one chunk).
        migrate_command(primary, database, "--alter", alter, "--execute", "--throttle-flag-file", str(throttle),
                        "--chunk-size", "10", "--max-chunk-size", "10"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        await wait_phase(primary, database, {"copying"}, process=process)
        await copy_some_then_throttle(primary, database, throttle)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    copied_before = phase_of(primary, database)
    assert copied_before is not None and copied_before[0] == "copying"
    throttle.unlink()
    # Resume, and kill it again while a cut-over attempt waits on a conflicting lock.
    postpone = tmp_path / "postpone"
    postpone.touch()
    process = subprocess.Popen(
        migrate_command(primary, database, "--resume", "--postpone-cut-over-flag-file", str(postpone)),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    blocker = primary.connect(database=database, autocommit=False)
    try:
        await wait_phase(primary, database, {"postponed"}, timeout=90)
        blocker.cursor().execute("SELECT COUNT(*) FROM t")
        postpone.unlink()
        await wait_phase(primary, database, {"cutting_over"}, timeout=30)
        await trio.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    blocker.commit()
    blocker.close()
    assert phase_of(primary, database)[0] in ("cutting_over", "ready")  # type: ignore[index]
    process = subprocess.run(migrate_command(primary, database, "--resume"), env=env, capture_output=True, timeout=120)
    assert process.returncode == 0, process.stderr.decode()[-2000:]
    await trio.sleep(0.3)
    await trio.to_thread.run_sync(workload.finish)
    assert phase_of(primary, database)[0] == "complete"  # type: ignore[index]
    assert workload.unexpected == []
    assert_same(primary, database)
    # the index left out of the ghost for the copy was built by the resumed run
    assert "KEY `by_n` (`n`)" in str(primary.execute(f"SHOW CREATE TABLE `{database}`.t")[0][1])
    rows = primary.execute(f"SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = '{database}'")
    assert rows[0][0] == 0


def test_schema_version_drift(primary: sandbox.Instance, database: str) -> None:
    primary.execute(f"CREATE TABLE `{database}`.t (id INT PRIMARY KEY, a INT)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    run = subprocess.run(migrate_command(primary, database, "--alter", "ADD COLUMN b INT", "--execute"),
                         env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    version = [sys.executable, "-c", "import sys; from migrator.cli import main; sys.exit(main(sys.argv[1:]))",
               "schema-version", "--host", primary.host, "--port", str(primary.port), "--user", "root",
               "--password", "root", "--database", database]
    check = subprocess.run(version, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout + check.stderr
    primary.execute(f"ALTER TABLE `{database}`.t ADD COLUMN sneaky INT")
    check = subprocess.run(version, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 3 and "DRIFT" in check.stdout, check.stdout + check.stderr
    _ = time


async def test_a_resumed_index_build_waits_for_the_one_a_killed_migrator_left_running(
    primary: sandbox.Instance, database: str
) -> None:
    """kill -9 during the index build leaves its ALTER running on the server.  The resumed
    migration must wait for it and not add the same index a second time (1061 at its end)."""
    from migrator import db

    create_pair(primary, database, rows=300, seed=71)
    primary.execute(f"USE `{database}`", "CREATE TABLE _t_gho LIKE t", "ALTER TABLE _t_gho DROP KEY by_n",
                    "INSERT INTO _t_gho SELECT * FROM t")
    # The killed migrator's ALTER, here held at its start by a transaction that read the ghost.
    blocker = primary.connect(database=database)
    leftover = primary.connect(database=database)
    blocker.cursor().execute("START TRANSACTION")
    blocker.cursor().execute("SELECT COUNT(*) FROM _t_gho")
    alter = f"ALTER TABLE `{database}`.`_t_gho` ADD KEY `by_n` (`n`), LOCK=NONE"
    lines: list[str] = []
    migration = Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL"), output=lines.append)
    migration._deferred_indexes = ["KEY `by_n` (`n`)"]
    spec = migration.spec
    connections: list[db.Connection] = []

    async def open_connection() -> db.Connection:
        connection = await db.connect(spec.settings.with_database(database))
        connections.append(connection)
        return connection

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, leftover.cursor().execute, alter)
            with trio.fail_after(30):
                while not primary.execute("SELECT 1 FROM information_schema.PROCESSLIST WHERE INFO LIKE 'ALTER TABLE%'"):
                    await trio.sleep(0.01)
            built = trio.Event()
            nursery.start_soon(migration._build_deferred_indexes, open_connection, built)
            await trio.sleep(0.5)
            assert not built.is_set()
            blocker.cursor().execute("COMMIT")  # the leftover ALTER goes on and ends
            with trio.fail_after(30):
                await built.wait()
    finally:
        for connection in connections:
            await connection.close()
        blocker.close()
        leftover.close()
    assert "KEY `by_n` (`n`)" in str(primary.execute(f"SHOW CREATE TABLE `{database}`._t_gho")[0][1])
    # it waited for the leftover instead of adding the index once more
    assert any("an earlier statement on" in line for line in lines), lines
    assert not any("secondary indexes built" in line for line in lines), lines


async def test_resume_waits_for_a_statement_left_running_on_the_ghost(
    primary: sandbox.Instance, database: str
) -> None:
    """After a kill -9 the old migrator's last statement on the ghost may still run on the
    server (a chunk, a binlog batch).  --resume waits for it before it starts: a leftover
    chunk that ended later could write an older row over one the new applier wrote."""
    import threading

    create_pair(primary, database, rows=6000, seed=72)  # keys 3 … 18000
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL", chunk_size=50, min_chunk_size=50,
                     max_chunk_size=50, chunk_time=0.02)
    first = Migration(spec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.run)
        with trio.fail_after(60):
            while first.progress().rows_copied < 200:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()  # interrupted mid-copy: resumable
    assert phase_of(primary, database) is not None and phase_of(primary, database)[0] == "copying"
    # The leftover: a statement on the ghost, held by a row lock another session keeps.
    holder = primary.connect(database=database)
    leftover = primary.connect(database=database)
    holder.cursor().execute("START TRANSACTION")
    holder.cursor().execute("SELECT id FROM _t_gho WHERE id = 3 FOR UPDATE")
    thread = threading.Thread(target=leftover.cursor().execute,
                              args=(f"DELETE FROM `{database}`.`_t_gho` WHERE id = 3",), daemon=True)
    thread.start()
    try:
        with trio.fail_after(30):
            while not primary.execute("SELECT 1 FROM information_schema.PROCESSLIST WHERE INFO LIKE 'DELETE FROM%'"):
                await trio.sleep(0.01)
        lines: list[str] = []
        second = Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL", resume=True), output=lines.append)
        outcome: list[object] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                outcome.append(await second.run())

            nursery.start_soon(run)
            with trio.fail_after(30):
                while not any("an earlier statement on" in line for line in lines):
                    await trio.sleep(0.01)
            await trio.sleep(0.5)
            assert second._applier is None, lines  # nothing started while it runs
            holder.cursor().execute("ROLLBACK")  # the leftover deletes its row and ends
    finally:
        holder.close()
        thread.join(30)
        leftover.close()
    result = outcome[0]
    assert result.phase == Phase.COMPLETE, lines  # type: ignore[attr-defined]
    assert_same(primary, database)  # the row the leftover deleted from the ghost was found and re-synced
