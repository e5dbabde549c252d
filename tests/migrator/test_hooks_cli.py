"""Lifecycle hooks of ``tidegate migrate``: order, facts, the before_cut_over veto, URLs, failures, bad flags."""

from __future__ import annotations

import http.server
import json
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from migrator.hooks import Hooks, HookSettings
from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import assert_same, create_pair, make_spec
from tests.migrator.test_control import migrate_command, phase_of, wait_phase

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
ALTER = "ADD COLUMN extra INT NOT NULL DEFAULT 7"


def recorder(log: Path, tag: str = "-") -> str:
    """A hook command appending ``hook tag id schema table phase rows state held resumed [alter] error`` to ``log``."""
    fields = " ".join(f"${{TIDEGATE_MIGRATION_{name}:--}}" for name in (
        "ID", "SCHEMA", "TABLE", "PHASE", "ROWS_COPIED", "STATE", "TABLE_HELD_MS", "RESUMED"))
    return f'echo "$TIDEGATE_HOOK {tag} {fields} [$TIDEGATE_MIGRATION_ALTER] $TIDEGATE_MIGRATION_ERROR" >> {log}'


def records(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def columns(primary: sandbox.Instance, database: str) -> int:
    return len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t"))


def start(primary: sandbox.Instance, database: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(migrate_command(primary, database, *extra), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def finished(process: subprocess.Popen[bytes], timeout: float = 90) -> tuple[int, str]:
    """Exit code and output of the child, killed (and the test failed) after ``timeout``."""
    try:
        out, err = await trio.to_thread.run_sync(lambda: process.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"tidegate migrate still running after {timeout}s:\n"
                             f"{(out + err).decode(errors='replace')[-4000:]}") from None
    return process.returncode, (out + err).decode(errors="replace")


async def wait_until(what: str, check: Callable[[], bool], process: subprocess.Popen[bytes] | None = None,
                     timeout: float = 60) -> None:
    with trio.move_on_after(timeout):
        while not check():
            if process is not None and process.poll() is not None:
                code, output = await finished(process)
                raise AssertionError(f"exited {code} before {what}:\n{output[-4000:]}")
            await trio.sleep(0.05)
        return
    raise AssertionError(f"{what}: not within {timeout}s")


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Recorder.bodies.append((str(self.headers["X-Tidegate-Hook"]), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_hook() -> Iterator[str]:
    """A URL that records what hooks POST to it (``_Recorder.bodies``)."""
    _Recorder.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def executable(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_hooks_fire_in_order_and_before_cut_over_vetoes_until_it_agrees(
    primary: sandbox.Instance, database: str, tmp_path: Path, workload_factory: Any, http_hook: str
) -> None:
    create_pair(primary, database, rows=1500, seed=31)
    workload = workload_factory(database, key_space=5000, threads=2, rate=100)
    workload.start()
    log, go = tmp_path / "hooks.log", tmp_path / "go"
    # gh-ost's --hooks-path: tidegate-on-<hook>* files, in name order; the rest from --hook
    hooks_dir = tmp_path / "hooks"
    hooks_dir.mkdir()
    executable(hooks_dir / "tidegate-on-startup", recorder(log, "dir"))
    executable(hooks_dir / "tidegate-on-success-2", recorder(log, "dir2"))
    executable(hooks_dir / "tidegate-on-success-1", recorder(log, "dir1"))
    (hooks_dir / "tidegate-on-failure.txt").write_text("not executable")
    process = start(
        primary, database, "--alter", ALTER, "--execute", "--hooks-path", str(hooks_dir),
        "--hook", f"row-copy-complete={recorder(log)}",
        "--hook", f"before_cut_over={recorder(log)}; test -f {go}",
        "--hook", f"after-cut-over={recorder(log)}",
        "--hook", f"after-cut-over={http_hook}",
        "--hook", f"failure={recorder(log)}",
        "--hook", f"success={recorder(log, 'flag')}",
        "--hook-retry-interval", "0.2", "--hook-timeout", "10",
    )
    try:
        await wait_phase(primary, database, {"postponed"}, process=process)

        def vetoes() -> int:
            return [r[0] for r in records(log)].count("before_cut_over")

        await wait_until("three vetoes", lambda: vetoes() >= 3, process)
        assert phase_of(primary, database) is not None and phase_of(primary, database)[0] == "postponed"  # type: ignore[index]
        assert columns(primary, database) == 15  # not swapped while the hook says no
        go.touch()
        code, output = await finished(process)
    finally:
        if process.poll() is None:
            process.kill()
        await trio.to_thread.run_sync(workload.finish)
    assert code == 0, output
    assert "warning: hooks path: " in output and "tidegate-on-failure.txt is not an executable file" in output
    assert "cut-over postponed by hook before_cut_over: exit code 1" in output, output
    assert "hook before_cut_over agreed: cutting over" in output

    lines = records(log)
    hooks = [(line[0], line[1]) for line in lines]
    count = vetoes()
    assert hooks == [("startup", "dir"), ("row_copy_complete", "-"), *[("before_cut_over", "-")] * count,
                     ("after_cut_over", "-"), ("success", "dir1"), ("success", "dir2"), ("success", "flag")], lines
    migration_id = lines[0][2]
    for line in lines:
        assert line[2:5] == [migration_id, database, "t"], line
        assert f"[{ALTER}]" in " ".join(line), line
    by_hook = {line[0]: line for line in lines}
    assert by_hook["startup"][5] == "validating" and by_hook["startup"][9] == "0"  # not resumed
    assert by_hook["row_copy_complete"][5] == "verifying" and int(by_hook["row_copy_complete"][6]) >= 1500
    assert by_hook["before_cut_over"][5] == "ready"
    assert by_hook["after_cut_over"][5] == "cutting_over" and int(by_hook["after_cut_over"][8]) >= 0
    assert by_hook["success"][7] == "complete"
    # the URL after the command of the same hook, with the facts as JSON
    [(header, body)] = _Recorder.bodies
    assert header == "after_cut_over" and body["hook"] == "after_cut_over"
    assert body["id"] == int(migration_id) and body["schema"] == database and body["table"] == "t"
    assert body["alter"] == ALTER and body["ghost_table"] == "_t_gho" and body["rows_copied"] >= 1500
    assert workload.unexpected == []
    assert columns(primary, database) == 16
    assert_same(primary, database)


async def test_failure_hook_on_refusal_panic_and_sigterm(
    primary: sandbox.Instance, database: str, tmp_path: Path, http_hook: str
) -> None:
    create_pair(primary, database, rows=400, seed=32)
    log = tmp_path / "hooks.log"
    every = [arg for name in ("startup", "row_copy_complete", "before_cut_over", "success", "failure")
             for arg in ("--hook", f"{name}={recorder(log)}")]

    # refused before it starts: only failure, with the refusal
    code, output = await finished(start(primary, database, "--alter", "ADD COLUMN c NOSUCHTYPE", "--execute",
                                        *every, "--hook", f"failure={http_hook}"))
    assert code == 4, output
    [line] = records(log)
    assert line[0] == "failure" and line[7] == "refused" and "alter-invalid" in " ".join(line), line
    [(_, body)] = _Recorder.bodies
    assert body["state"] == "refused" and body["error"].startswith("[alter-invalid]")
    log.unlink()

    # interrupted by SIGTERM while postponed: failure (interrupted), exit 130, resumable
    postpone = tmp_path / "postpone"
    postpone.touch()
    process = start(primary, database, "--alter", ALTER, "--execute", "--postpone-cut-over-flag-file", str(postpone),
                    *every)
    try:
        await wait_phase(primary, database, {"postponed"}, process=process)
        await wait_until("two hooks", lambda: len(records(log)) == 2, process)  # queued ones are dropped on a signal
        process.send_signal(signal.SIGTERM)
        code, output = await finished(process, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 130, output
    assert [(r[0], r[7]) for r in records(log)] == [("startup", "-"), ("row_copy_complete", "-"),
                                                     ("failure", "interrupted")], records(log)
    assert phase_of(primary, database) is not None and phase_of(primary, database)[0] == "postponed"  # type: ignore[index]
    log.unlink()

    # resumed, then the panic flag: startup (resumed) and failure (cancelled); original untouched
    panic = tmp_path / "panic"
    process = start(primary, database, "--resume", "--postpone-cut-over-flag-file", str(postpone),
                    "--panic-flag-file", str(panic), *every)
    try:
        await wait_phase(primary, database, {"postponed"}, process=process)
        await wait_until("the startup hook", lambda: bool(records(log)), process)
        panic.touch()
        code, output = await finished(process, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 1, output
    lines = records(log)
    assert [(r[0], r[7]) for r in lines] == [("startup", "-"), ("failure", "cancelled")], lines
    assert lines[0][9] == "1" and f"[{ALTER}]" in " ".join(lines[0])  # resumed; the alter from the state
    assert primary.execute(f"SHOW TABLES FROM `{database}`") == [("control",), ("t",)]
    assert_same(primary, database)


async def test_dry_run_lists_hooks_and_runs_none(primary: sandbox.Instance, database: str, tmp_path: Path) -> None:
    create_pair(primary, database, rows=50, seed=33)
    log = tmp_path / "hooks.log"
    code, output = await finished(start(
        primary, database, "--alter", ALTER, "--hook", f"startup=touch {log}",
        "--hook", "success=https://user:secret@deploy.example/done?token=x", "--hook-timeout", "4"))
    assert code == 0, output
    assert f"hook startup: touch {log}" in output
    assert "hook success: https://deploy.example/done" in output and "secret" not in output
    assert "hooks: timeout 4s each" in output and "dry run: nothing changed" in output
    assert not log.exists()


async def test_veto_in_progress_and_failing_hooks_do_not_break_it(
    primary: sandbox.Instance, database: str, tmp_path: Path
) -> None:
    create_pair(primary, database, rows=300, seed=34)
    go = tmp_path / "go"
    hooks = Hooks(HookSettings({"startup": "echo no >&2; exit 9", "row_copy_complete": "sleep 30",
                                "before_cut_over": f"test -f {go}", "after_cut_over": "http://127.0.0.1:9/x"},
                               timeout=0.5, retry_interval=0.1))
    lines: list[str] = []
    migration = Migration(make_spec(primary, database, ALTER), hooks=hooks, output=lines.append)
    async with trio.open_nursery() as nursery:
        results: list[Any] = []

        async def run() -> None:
            results.append(await migration.run())

        nursery.start_soon(run)
        with trio.fail_after(60):
            while not migration.progress().postponed_by:
                await trio.sleep(0.05)
        progress = migration.progress()
        assert progress.postponed and progress.postponed_by == "hook before_cut_over: exit code 1"
        assert "cut-over postponed by hook before_cut_over: exit code 1" in progress.line()
        await wait_phase(primary, database, {"postponed"})
        go.touch()
    [result] = results
    assert result.phase == Phase.COMPLETE
    assert not migration.progress().postponed and migration.progress().postponed_by is None
    outcome = {name: result.detail for name, result in hooks.results if not result.ok}
    assert outcome["startup"] == "exit code 9: no"
    assert outcome["row_copy_complete"] == "timed out after 0.5s"
    assert outcome["after_cut_over"].startswith("could not call")
    assert [name for name, _ in hooks.results].count("before_cut_over") >= 2
    assert columns(primary, database) == 16
    assert_same(primary, database)


@pytest.mark.parametrize(("flags", "message"), [
    (["--hook", "on-success=echo"], "error: --hook on-success=…: unknown hook 'on-success'; one of: startup, "
                                    "row-copy-complete, before-cut-over, after-cut-over, success, failure"),
    (["--hook", "success"], "error: --hook 'success': expected NAME=COMMAND_OR_URL"),
    (["--hook", "failure= "], "error: --hook failure: the command or URL is empty"),
    (["--hook", "success=ftp://host/x"], "error: --hook success: a URL hook must be http:// or https://"),
    (["--hooks-path", "/nonexistent/hooks"], "error: --hooks-path '/nonexistent/hooks' is not a directory"),
    (["--hook-timeout", "0"], "error: --hook-timeout: must be more than 0 seconds, got '0'"),
    (["--hook-timeout", "soon"], "error: --hook-timeout: expected seconds, got 'soon'"),
    (["--hook-retry-interval", "-1"], "error: --hook-retry-interval: must be more than 0 seconds"),
    (["--checksum-during-index-build", "1.5"], "error: --checksum-during-index-build must be a share between 0 and 1"),
])
def test_bad_hook_flags_exit_2(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from migrator.cli import main

    # checked before anything connects (nothing listens on port 1)
    code = main(["migrate", "--host", "127.0.0.1", "--port", "1", "--database", "d", "--table", "t",
                 "--alter", ALTER, "--execute", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_hooks_path_is_not_a_sidecar_option() -> None:
    """The sidecar takes hooks from [hooks] and hook_<name> options, never a directory from the state schema."""
    from migrator.db import ConnectionSettings
    from proxy.control import ControlError
    from proxy.migrations import build_spec

    for option in ({"hooks_path": "/tmp"}, {"hook": "startup=touch /tmp/x"}):
        with pytest.raises(ControlError, match="invalid migration options"):
            build_spec(ConnectionSettings(), "d", "t", ALTER, option, resume=False)
