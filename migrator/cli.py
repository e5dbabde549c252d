"""``tidegate migrate`` and ``tidegate schema-version``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from migrator import db, inspector
from migrator.db import ConnectionSettings
from migrator.hooks import HOOKS, HookError, Hooks, HookSettings, settings_from_flags
from migrator.inspector import Refusal
from migrator.runner import Migration, MigrationFailed, Progress, cancel_migration
from migrator.spec import LoadThreshold, MigrationSpec, OldTablePolicy, SpecError
from migrator.state import MigrationState, Phase, definition_hash
from migrator.throttler import CriticalLoad


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--dsn", help="mysql://user:password@host:port/database")
    group.add_argument("--host", default=None)
    group.add_argument("--port", type=int, default=None)
    group.add_argument("--user", default=None)
    group.add_argument("--password", default=None)
    group.add_argument("--database", "-d", default=None)
    group.add_argument("--state-schema", default="_tidegate", help="schema holding migration state (default _tidegate)")


def _settings(args: argparse.Namespace) -> tuple[ConnectionSettings, str]:
    settings = ConnectionSettings.from_dsn(args.dsn) if args.dsn else ConnectionSettings()
    overrides = {k: getattr(args, k) for k in ("host", "port", "user", "password") if getattr(args, k) is not None}
    if overrides:
        settings = ConnectionSettings(
            host=overrides.get("host", settings.host),
            port=overrides.get("port", settings.port),
            user=overrides.get("user", settings.user),
            password=overrides.get("password", settings.password),
            database=settings.database,
        )
    database = args.database or settings.database
    return settings, database


def migrate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidegate migrate",
        description="Online schema change through a ghost table and the binlog (gh-ost style), "
        "or ALGORITHM=INSTANT when the server can.",
    )
    _connection_arguments(parser)
    parser.add_argument("--table", "-t", required=True)
    parser.add_argument("--alter", help='the ALTER clause, e.g. "ADD COLUMN c INT NULL"')
    parser.add_argument("--execute", action="store_true", help="migrate (without it: dry run that prints the plan)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted migration of the table")
    parser.add_argument("--cancel", action="store_true", help="abandon the unfinished migration: drop the ghost")
    tuning = parser.add_argument_group("copy")
    tuning.add_argument("--chunk-size", type=int, default=1000, help="starting rows per chunk (default 1000)")
    tuning.add_argument("--chunk-time", type=float, default=0.1, help="target seconds per chunk (default 0.1)")
    tuning.add_argument("--max-chunk-size", type=int, default=100_000, help="largest chunk in rows (default 100000)")
    tuning.add_argument("--copy-sessions", type=int, default=1,
                        help="sessions copying consecutive chunks at once (default 1)")
    tuning.add_argument("--exact-rowcount", action="store_true", help="COUNT(*) for the estimate")
    tuning.add_argument("--default-retries", type=int, default=60)
    throttle = parser.add_argument_group("throttling")
    throttle.add_argument("--max-load", default="", help="e.g. Threads_running=25,Threads_connected=500")
    throttle.add_argument("--critical-load", default="", help="abort (or hibernate) above, e.g. Threads_running=100")
    throttle.add_argument("--critical-load-hibernate-seconds", type=float, default=0.0,
                          help="instead of aborting on critical load, pause this long")
    throttle.add_argument("--max-lag-millis", type=int, default=1500)
    throttle.add_argument("--replica", action="append", default=[], help="replica DSN for lag (repeatable)")
    throttle.add_argument("--throttle-flag-file", type=Path)
    cut = parser.add_argument_group("cut-over")
    cut.add_argument("--postpone-cut-over-flag-file", type=Path)
    cut.add_argument("--panic-flag-file", type=Path)
    cut.add_argument("--cut-over-lock-timeout-seconds", type=float, default=3.0)
    cut.add_argument("--cut-over-max-attempts", type=int, default=60)
    cut.add_argument("--old-table", choices=[p.value for p in OldTablePolicy], default="keep",
                     help="after cut-over: keep the old table as _<t>_del, or drop it")
    safety = parser.add_argument_group("safety")
    safety.add_argument("--attempt-instant-ddl", type=_bool, default=True, metavar="on|off")
    safety.add_argument("--checksum", type=_bool, default=True, metavar="on|off")
    safety.add_argument("--defer-secondary-indexes", type=_bool, default=True, metavar="on|off",
                        help="build the ghost's non-unique secondary indexes once after the copy instead "
                             "of row by row during it (default on)")
    safety.add_argument("--checksum-workers", type=int, default=1,
                        help="sessions comparing ranges in the same snapshot (default 1)")
    safety.add_argument("--checksum-behind-copy-interval", type=float, default=0.5, metavar="SECONDS",
                        help="verify the ranges copied so far every SECONDS while the copy runs, so that "
                             "only the last ranges are left after it (default 0.5; 0: all after the copy)")
    safety.add_argument("--checksum-during-index-build", type=float, default=0.0, metavar="SHARE",
                        help="with secondary indexes built after the copy, verify this share of the table "
                             "(the last rows copied) while they are built instead of behind the copy "
                             "(default 0: all behind the copy)")
    safety.add_argument("--approve-renamed-columns", action="store_true")
    safety.add_argument("--approve-lossy-changes", action="store_true")
    safety.add_argument("--drop-leftovers", action="store_true", help="drop leftover _<t>_gho/_ghc/_del tables")
    parser.add_argument("--status-interval", type=float, default=5.0)
    parser.add_argument("--quiet", "-q", action="store_true")
    return parser


def hook_arguments(parser: argparse.ArgumentParser) -> None:
    """``--hook``, ``--hooks-path``, ``--hook-timeout``, ``--hook-retry-interval`` (the CLI's own:
    a sidecar configures hooks in ``[hooks]`` and migration options instead)."""
    names = ", ".join(name.replace("_", "-") for name in HOOKS)
    group = parser.add_argument_group(
        "hooks", f"gh-ost style lifecycle hooks ({names}); see docs/migrator.md")
    group.add_argument("--hook", action="append", default=[], metavar="NAME=COMMAND_OR_URL",
                       help="run a shell command (facts in TIDEGATE_MIGRATION_* variables) or POST the facts "
                       "as JSON to an http(s) URL at that point (repeatable; several for one hook run in order)")
    group.add_argument("--hooks-path", metavar="DIR",
                       help="every executable file in DIR named tidegate-on-<hook>* runs for that hook, "
                       "in name order (gh-ost's --hooks-path)")
    group.add_argument("--hook-timeout", metavar="SECONDS",
                       help="longest a hook command or URL may take (default 30)")
    group.add_argument("--hook-retry-interval", metavar="SECONDS",
                       help="seconds between asks while before-cut-over vetoes (default 10)")


def hook_settings_from_args(args: argparse.Namespace) -> tuple[HookSettings, list[str]]:
    """The hooks the flags configure, and warnings about --hooks-path files; ``HookError`` when bad."""
    return settings_from_flags(getattr(args, "hook", None) or [], getattr(args, "hooks_path", None),
                               getattr(args, "hook_timeout", None), getattr(args, "hook_retry_interval", None))


def spec_from_args(args: argparse.Namespace) -> MigrationSpec:
    settings, database = _settings(args)
    if not args.alter and not (args.resume or args.cancel):
        raise SpecError("--alter is required")
    return MigrationSpec(
        connection=settings,
        database=database or "",
        table=args.table,
        alter=args.alter or "COMMENT ''",
        execute=args.execute or args.resume,
        chunk_size=args.chunk_size,
        chunk_time=args.chunk_time,
        max_chunk_size=args.max_chunk_size,
        min_chunk_size=min(100, args.chunk_size),
        max_load=LoadThreshold.parse_list(args.max_load),
        critical_load=LoadThreshold.parse_list(args.critical_load),
        critical_load_hibernate_seconds=args.critical_load_hibernate_seconds,
        max_lag_millis=args.max_lag_millis,
        replicas=tuple(ConnectionSettings.from_dsn(r) for r in args.replica),
        throttle_flag_file=args.throttle_flag_file,
        postpone_cut_over_flag_file=args.postpone_cut_over_flag_file,
        panic_flag_file=args.panic_flag_file,
        cut_over_lock_timeout_seconds=args.cut_over_lock_timeout_seconds,
        cut_over_max_attempts=args.cut_over_max_attempts,
        default_retries=args.default_retries,
        exact_rowcount=args.exact_rowcount,
        attempt_instant_ddl=args.attempt_instant_ddl,
        defer_secondary_indexes=args.defer_secondary_indexes,
        checksum=args.checksum,
        checksum_workers=args.checksum_workers,
        copy_sessions=args.copy_sessions,
        checksum_behind_copy_interval=args.checksum_behind_copy_interval,
        checksum_during_index_build=args.checksum_during_index_build,
        resume=args.resume,
        old_table=OldTablePolicy(args.old_table),
        drop_leftovers=args.drop_leftovers,
        approve_renamed_columns=args.approve_renamed_columns,
        approve_lossy_changes=args.approve_lossy_changes,
        state_schema=args.state_schema,
        status_interval=args.status_interval,
    )


class _HookLines:
    """Hook results as status lines (the event sink of the CLI's hooks)."""

    def __init__(self, say: Any) -> None:
        self.say = say

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        if event in ("hook.ok", "hook.failed"):
            detail = str(fields.get("detail") or "").replace("\n", " | ")
            self.say(f"hook {fields.get('hook')} {'ok' if event == 'hook.ok' else 'failed'} "
                     f"({float(fields.get('seconds') or 0):.2f}s, {fields.get('target')})"
                     + (f": {detail}" if detail else ""))
        return fields


async def _migrate(spec: MigrationSpec, cancel: bool, quiet: bool,
                   hook_settings: HookSettings | None = None) -> int:
    if cancel:
        print(await cancel_migration(spec))
        return 0
    tty = sys.stderr.isatty() and not quiet

    def say(line: str) -> None:
        if tty:
            sys.stderr.write("\r\x1b[K")
        print(line, flush=True)

    def on_progress(progress: Progress) -> None:
        if not quiet:
            say(progress.line())

    hooks = None
    if hook_settings is not None and hook_settings.targets:
        # Each result is a status line; the logger would say the failures a second time.
        logging.getLogger("tidegate.hooks").setLevel(logging.ERROR)
        hooks = Hooks(hook_settings, _HookLines(say))
    migration = Migration(spec, on_progress=on_progress, output=say, hooks=hooks)
    result_box: list[object] = []
    failures: list[Exception] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            try:
                result_box.append(await migration.run())
            except Exception as error:  # raised below as itself, not inside the nursery's ExceptionGroup
                failures.append(error)
            finally:
                nursery.cancel_scope.cancel()

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for signum in received:
                    say(f"received {signal.Signals(signum).name}: stopping cleanly")
                    result_box.append("interrupted")
                    nursery.cancel_scope.cancel()
                    return

        async def bar() -> None:
            while tty:
                await trio.sleep(0.5)
                p = migration.progress()
                estimate = max(p.rows_estimate, p.rows_copied) or 1
                filled = int(30 * min(1.0, p.rows_copied / estimate))
                sys.stderr.write(f"\r\x1b[K[{'#' * filled}{'.' * (30 - filled)}] {p.phase} {p.rows_copied}/{estimate}"
                                 + (f" eta {p.eta_seconds:.0f}s" if p.eta_seconds else ""))
                sys.stderr.flush()

        nursery.start_soon(run)
        nursery.start_soon(signals)
        nursery.start_soon(bar)
    if tty:
        sys.stderr.write("\r\x1b[K")
    if failures:
        raise failures[0]
    if not result_box or result_box[0] == "interrupted":
        return 130
    result = result_box[0]
    phase = getattr(result, "phase", None)
    return 0 if phase in (Phase.COMPLETE, Phase.PENDING) else 1


async def _schema_version(settings: ConnectionSettings, database: str, table: str | None, state_schema: str) -> int:
    async with db.Connection(settings.with_database(database)) as connection:
        await MigrationState.ensure_schema(connection, state_schema)
        rows = await connection.query(
            f"SELECT table_name, version_hash, applied_at FROM {db.quote(state_schema)}.schema_versions v "
            f"WHERE schema_name = %s AND id = (SELECT MAX(id) FROM {db.quote(state_schema)}.schema_versions w "
            "WHERE w.schema_name = v.schema_name AND w.table_name = v.table_name)"
            + (" AND table_name = %s" if table else "") + " ORDER BY table_name",
            (database, table) if table else (database,),
        )
        drift = 0
        if not rows:
            print(f"no recorded schema versions in `{database}`" + (f" for `{table}`" if table else ""))
            return 0
        for name, recorded, applied_at in rows:
            try:
                live = await inspector.read_table(connection, database, str(name))
                live_hash = definition_hash(live.create_sql)
            except Refusal:
                live_hash = "(missing)"
            status = "ok" if live_hash == recorded else "DRIFT"
            drift += status != "ok"
            print(f"{name}: recorded {str(recorded)[:12]} at {applied_at}, live {live_hash[:12]}: {status}")
        return 3 if drift else 0


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command, rest = argv[0], list(argv[1:])
    if command == "schema-version":
        parser = argparse.ArgumentParser(prog="tidegate schema-version",
                                         description="compare live table definitions with recorded versions (exit 3 on drift)")
        _connection_arguments(parser)
        parser.add_argument("--table", "-t")
        args = parser.parse_args(rest)
        settings, database = _settings(args)
        if not database:
            parser.error("--database is required")
        try:
            return trio.run(_schema_version, settings, database, args.table, args.state_schema)
        except db.DatabaseError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    parser = migrate_parser()
    hook_arguments(parser)
    args = parser.parse_args(rest)
    try:
        spec = spec_from_args(args)
        hook_settings, warnings = hook_settings_from_args(args)
    except (SpecError, HookError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        return trio.run(_migrate, spec, args.cancel, args.quiet, hook_settings)
    except Refusal as refusal:
        print(f"refused: {refusal}", file=sys.stderr)
        return 4
    except (MigrationFailed, CriticalLoad) as error:
        print(f"failed: {error}", file=sys.stderr)
        return 1
    except db.DatabaseError as error:
        print(f"database error: {error}", file=sys.stderr)
        return 1
