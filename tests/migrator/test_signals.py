"""SIGTERM / SIGINT on the CLI: locks released, ghost and checkpoint kept, original untouched, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import trio

from proxy import sandbox
from tests.migrator.conftest import assert_same, create_pair
from tests.migrator.test_control import (
    copy_some_then_throttle,
    migrate_command,
    phase_of,
    wait_phase,
)

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))


def tables(primary: sandbox.Instance, database: str) -> list[str]:
    return sorted(str(r[0]) for r in primary.execute(f"SHOW TABLES FROM `{database}`"))


def triggers(primary: sandbox.Instance, database: str) -> int:
    return int(primary.execute(
        f"SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = '{database}'")[0][0])


async def stop(process: subprocess.Popen[bytes], signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    out, err = await trio.to_thread.run_sync(lambda: process.communicate(timeout=60))
    return process.returncode, (out + err).decode()


async def test_sigterm_during_copy_and_sigint_while_postponed_then_resume(
    primary: sandbox.Instance, database: str, tmp_path: Path, workload_factory
) -> None:
    create_pair(primary, database, rows=6000, seed=21)
    workload = workload_factory(database, key_space=20000, threads=2, rate=150)
    workload.start()
    alter = "ADD COLUMN extra INT NOT NULL DEFAULT 3"
    small = ("--chunk-size", "10", "--max-chunk-size", "10")
    throttle = tmp_path / "throttle"
    throttle.touch()
    process = subprocess.Popen(
        migrate_command(primary, database, "--alter", alter, "--execute", "--throttle-flag-file", str(throttle), *small),
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await wait_phase(primary, database, {"copying"}, process=process)
        await copy_some_then_throttle(primary, database, throttle, rows=1000)  # some chunks in the ghost
        code, output = await stop(process, signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 130, output
    assert "received SIGTERM: stopping cleanly" in output and "continue with --resume" in output
    phase = phase_of(primary, database)
    assert phase is not None and phase[0] in ("copying", "verifying"), phase
    assert tables(primary, database) == ["_t_ghc", "_t_gho", "control", "t"]  # ghost and changelog kept
    assert triggers(primary, database) == 0
    assert len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 15  # original untouched
    # No lock left behind: the application's writes go on.
    committed = workload.committed
    await trio.sleep(0.5)
    assert workload.committed > committed

    # Resume, hold it before the swap, and interrupt it there with SIGINT.
    postpone = tmp_path / "postpone"
    postpone.touch()
    process = subprocess.Popen(
        migrate_command(primary, database, "--resume", "--postpone-cut-over-flag-file", str(postpone), *small),
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        await wait_phase(primary, database, {"postponed"}, timeout=90, process=process)
        code, output = await stop(process, signal.SIGINT)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 130, output
    assert phase_of(primary, database)[0] == "postponed"  # type: ignore[index]
    assert len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 15

    postpone.unlink()
    run = await trio.to_thread.run_sync(lambda: subprocess.run(
        migrate_command(primary, database, "--resume", *small), env=ENV, capture_output=True, timeout=120))
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    await trio.sleep(0.3)
    await trio.to_thread.run_sync(workload.finish)
    assert phase_of(primary, database)[0] == "complete"  # type: ignore[index]
    assert workload.unexpected == []
    assert_same(primary, database)
    assert primary.execute(f"SELECT COUNT(*) FROM `{database}`.t WHERE extra <> 3")[0][0] == 0
    assert tables(primary, database) == ["_t_del", "control", "t"]
