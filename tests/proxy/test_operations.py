"""Who is in the way of a cut-over, the event log, and lifecycle hooks — against real sessions.

Each test runs a real sidecar (``start_proxy``) in front of the test primary,
starts an ``ADD COLUMN`` migration (``attempt_instant_ddl=off`` so it copies
and cuts over, ``cut_over_lock_timeout_seconds=1`` so attempts are short) and
puts a real session in its way: directly on the primary, or through the
sidecar.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import trio

from proxy import sandbox
from proxy.backends import Credentials, Endpoint
from proxy.blockers import collect
from proxy.fleet import ServiceDatabase
from proxy.metrics import Metrics
from tests.proxy.conftest import RunningProxy, start_proxy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
FAST = "attempt_instant_ddl=off,cut_over_lock_timeout_seconds=1"
MDL_INSTRUMENT = "wait/lock/metadata/sql/mdl"


# ------------------------------------------------------------------------ helpers


def admin(running: RunningProxy) -> pymysql.connections.Connection[Any]:
    assert running.app.admin_listening is not None
    host, port = running.app.admin_listening
    return pymysql.connect(host=host, port=port, user="admin", password="", connect_timeout=5, autocommit=True)


def query(connection: pymysql.connections.Connection[Any], sql: str) -> list[dict[str, Any]]:
    with connection.cursor(pymysql.cursors.DictCursor) as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def events(running: RunningProxy, name: str | None = None) -> list[dict[str, Any]]:
    records = running.call(lambda: running.app.events.tail())
    return [r for r in records if name is None or r["event"] == name]


def migration(connection: pymysql.connections.Connection[Any], migration_id: int) -> dict[str, Any]:
    [row] = query(connection, f"SELECT * FROM migrations WHERE id = {migration_id}")
    return row


def start_migration(connection: pymysql.connections.Connection[Any], database: str, options: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO migrations (schema_name, table_name, alter_statement, options) "
            f"VALUES ('{database}', 'items', 'ADD COLUMN note TEXT NULL', '{options}')"
        )
        return int(cursor.lastrowid)


def make_table(primary: sandbox.Instance, database: str, rows: int = 50) -> None:
    values = ", ".join(f"({i}, 'row {i}')" for i in range(1, rows + 1))
    primary.execute(
        f"CREATE TABLE `{database}`.items (id INT PRIMARY KEY, name VARCHAR(20))",
        f"INSERT INTO `{database}`.items VALUES {values}",
    )


def through(running: RunningProxy, database: str) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(host=running.host, port=running.port, user="app", password="app-secret",
                           database=database, autocommit=True, connect_timeout=5)


def open_transaction(primary: sandbox.Instance, database: str, statement: str = "SELECT COUNT(*) FROM items",
                     **login: Any) -> tuple[Any, int]:
    """A direct session inside a transaction that ran ``statement``: (connection, its id)."""
    holder = primary.connect(database=database, **login)
    with holder.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(statement)
        cursor.execute("SELECT CONNECTION_ID()")
        (holder_id,) = cursor.fetchone()
    return holder, int(holder_id)


def finished(control: pymysql.connections.Connection[Any], migration_id: int, what: str = "completion",
             timeout: float = 30.0) -> dict[str, Any]:
    """The migration's row once it is complete or failed."""
    return wait_for(what, lambda: (row := migration(control, migration_id))["state"] in ("complete", "failed")
                    and row, timeout=timeout)


def state_schema(tmp_path: Path) -> str:
    """A state schema of the test's own: its fleet is this test's sidecar alone."""
    return "_tg_ops_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)[-40:]


@pytest.fixture
def sidecar(primary: sandbox.Instance, app_user: tuple[str, str], tmp_path: Path) -> Iterator[RunningProxy]:
    schema = state_schema(tmp_path)
    running = start_proxy(["--backend", primary.dsn(), "--events-file", str(tmp_path / "events.jsonl"),
                           "--state-schema", schema], metrics=Metrics(process_metrics=False))
    try:
        yield running
    finally:
        running.stop()
        primary.execute(f"DROP DATABASE IF EXISTS `{schema}`")


@pytest.fixture
def mdl_instrument(primary: sandbox.Instance) -> Iterator[None]:
    """performance_schema's metadata-lock instrument on (MariaDB ships it off)."""
    primary.execute(f"UPDATE performance_schema.setup_instruments SET ENABLED = 'YES', TIMED = 'YES' "
                    f"WHERE NAME = '{MDL_INSTRUMENT}'")
    try:
        yield
    finally:
        primary.execute(f"UPDATE performance_schema.setup_instruments SET ENABLED = 'NO', TIMED = 'NO' "
                        f"WHERE NAME = '{MDL_INSTRUMENT}'")


# ------------------------------------------------------------------------ who is in the way


def test_report_without_a_lock_source_names_open_transactions(primary: sandbox.Instance, database: str) -> None:
    """MariaDB's default: no metadata-lock source, so open transactions are candidates."""
    make_table(primary, database, rows=3)
    holder = primary.connect(database=database)
    try:
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT COUNT(*) FROM items")
            cursor.execute("SELECT CONNECTION_ID()")
            (holder_id,) = cursor.fetchone()

        async def report() -> Any:
            db = ServiceDatabase(Endpoint("primary", "127.0.0.1", primary.port),
                                 Credentials.from_password(primary.user, primary.password))
            try:
                return await collect(db, database, "items", service_user="nobody")
            finally:
                await db.aclose()

        result = trio.run(report)
        [row] = [r for r in result.rows if r["processlist_id"] == holder_id]
        assert row["role"] == "may_hold" and row["source"] == "innodb_trx"
        assert row["command"] == "Sleep" and row["transaction_seconds"] >= 0
        assert not result.exact and any("no metadata-lock source" in note for note in result.notes)
        assert f"connection {holder_id} direct" in result.text()
    finally:
        holder.close()


def test_direct_session_blocks_the_database_lock(
    sidecar: RunningProxy, primary: sandbox.Instance, database: str, mdl_instrument: None, tmp_path: Path
) -> None:
    make_table(primary, database)
    holder, holder_id = open_transaction(primary, database)  # bypasses every sidecar
    control = admin(sidecar)
    try:
        migration_id = start_migration(control, database, FAST)
        blocked = wait_for("a cut-over.blocked event", lambda: events(sidecar, "cutover.blocked"))
        text = blocked[0]["blockers"]
        assert f"connection {holder_id} direct" in text and "waits" in text, text
        assert blocked[0]["migration"] == migration_id and blocked[0]["table"] == f"{database}.items"

        # The admin port's live view names it too, exactly (the MDL instrument is on).
        rows = query(control, f"SELECT * FROM blockers WHERE processlist_id = {holder_id}")
        assert [(r["role"], r["source"], r["sidecar"]) for r in rows] == [("holding", "metadata_locks", None)]
        assert rows[0]["migration"] == migration_id and "SHARED_READ" in rows[0]["lock"]
        assert rows[0]["command"] == "Sleep" and rows[0]["transaction_seconds"] > 0

        failure = wait_for("the failure reason", lambda: migration(control, migration_id)["last_cut_over_failure"])
        assert f"connection {holder_id} direct" in failure and "lock not granted" in failure, failure

        holder.commit()
        final = finished(control, migration_id)
        assert final["state"] == "complete", final
    finally:
        holder.close()
        control.close()

    # The event log: JSON lines with microsecond UTC timestamps, in order.  The
    # sidecar relays the child leader's last events once the child has exited.
    wait_for("the leader's last events", lambda: any(
        record.get("migration") == migration_id for record in events(sidecar, "migration.end")))
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    names = [line["event"] for line in lines if line.get("migration") == migration_id]
    for name in ("migration.start", "migration.phase", "cutover.hold", "cutover.held", "cutover.blocked",
                 "cutover.rolled_back", "cutover.done", "migration.end"):
        assert name in names, (name, names)
    assert names.index("cutover.blocked") < names.index("cutover.rolled_back") < names.index("cutover.done")
    # every event the child leader recorded was relayed exactly once, then deleted
    assert len({(line["ts"], line["event"]) for line in lines}) == len(lines)
    assert primary.execute(f"SELECT COUNT(*) FROM `{state_schema(tmp_path)}`.migration_events")[0][0] == 0
    assert all(len(line["ts"]) == 27 and line["ts"].endswith("Z") for line in lines)  # ...HH:MM:SS.ffffffZ
    # a child leader's events arrive in batches (with their own timestamps): in order among themselves
    stamps = [line["ts"] for line in lines if line.get("migration") == migration_id]
    assert stamps == sorted(stamps)
    phases = [(line["previous"], line["phase"]) for line in lines if line["event"] == "migration.phase"]
    assert ("copying", "verifying") in phases or ("copying", "ready") in phases, phases
    end = [line for line in lines if line["event"] == "migration.end"][-1]
    assert end["state"] == "complete"
    # each sidecar's own gate logged its holds
    assert {"drain.start", "drain.end", "hold.start", "hold.release"} <= {line["event"] for line in lines}


def test_sidecar_session_blocks_the_drain(sidecar: RunningProxy, primary: sandbox.Instance, database: str) -> None:
    make_table(primary, database)
    client = through(sidecar, database)
    with client.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(f"SELECT COUNT(*) FROM items /*controller='checkout',traceparent='{TRACEPARENT}'*/")
        cursor.execute("SELECT CONNECTION_ID()")  # runs on the server: the backend connection's id
        (backend_id,) = cursor.fetchone()
    proxy = sidecar.proxy
    [session] = sidecar.call(lambda: [{"id": r.session.connection_id, "peer": r.session.peer}
                                      for r in proxy.relays.values()])
    control = admin(sidecar)
    stop = threading.Event()

    def traced_reads() -> None:
        """Another client whose reads carry a trace id: held while the drain runs."""
        reader = through(sidecar, database)
        with reader.cursor() as cursor:
            while not stop.is_set():
                cursor.execute(f"SELECT name FROM items WHERE id = 1 /*traceparent='{TRACEPARENT}'*/")
                cursor.fetchall()
                time.sleep(0.02)
        reader.close()

    worker = threading.Thread(target=traced_reads, daemon=True)
    try:
        migration_id = start_migration(control, database, FAST)
        worker.start()
        refused = wait_for("a cutover.refused event", lambda: events(sidecar, "cutover.refused"))
        reason = refused[0]["reason"]
        assert f"session {session['id']} app@{session['peer']}" in reason, reason
        assert f"backend connection {backend_id}" in reason and "traceparent=" + TRACEPARENT in reason, reason
        assert "controller=checkout" in reason and "open transaction touched" in reason, reason

        rows = query(control, f"SELECT * FROM blockers WHERE processlist_id = {backend_id}")
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["role"], row["source"], row["session_id"], row["client_user"], row["client"]) == (
            "holding", "sidecar", session["id"], "app", session["peer"])
        assert row["sidecar"] is not None and row["migration"] == migration_id
        assert row["server_user"] == "app" and row["transaction_seconds"] > 0

        failure = wait_for("the failure reason", lambda: migration(control, migration_id)["last_cut_over_failure"])
        assert "drain did not finish" in failure and f"backend connection {backend_id}" in failure, failure

        held = wait_for("a traced statement held", lambda: events(sidecar, "statement.held"))
        assert held[0]["trace_id"] == TRACE_ID and held[0]["tables"] == [f"{database}.items"]
        abandoned = wait_for("hold.abandon", lambda: events(sidecar, "hold.abandon"))
        assert any(f"session {session['id']}" in b for b in abandoned[0]["blockers"])
        event_rows = query(control, "SELECT event, trace_id FROM events WHERE event = 'statement.held'")
        assert event_rows and event_rows[0]["trace_id"] == TRACE_ID

        client.commit()
        final = finished(control, migration_id)
        assert final["state"] == "complete", final
    finally:
        stop.set()
        worker.join(5)
        client.close()
        control.close()
    metrics = sidecar.app.metrics
    assert metrics is not None
    body = metrics.render()[0].decode()
    seen = [line for line in body.splitlines() if line.startswith('tidegate_traced_statements_total{outcome="seen"}')]
    held_count = [line for line in body.splitlines()
                  if line.startswith('tidegate_traced_statements_total{outcome="held"}')]
    assert float(seen[0].split()[-1]) >= 2 and float(held_count[0].split()[-1]) >= 1


def test_failure_reason_names_the_blocker(sidecar: RunningProxy, primary: sandbox.Instance, database: str) -> None:
    make_table(primary, database, rows=3)
    holder, holder_id = open_transaction(primary, database)
    control = admin(sidecar)
    try:
        migration_id = start_migration(control, database, FAST + ",cut_over_max_attempts=1")
        final = finished(control, migration_id, "the failure")
        assert final["state"] == "failed", final
        assert "cut-over failed 1 times" in final["error"] and f"connection {holder_id}" in final["error"], final
        [end] = wait_for("migration.end", lambda: events(sidecar, "migration.end"))
        assert end["state"] == "failed" and f"connection {holder_id}" in end["error"]
    finally:
        holder.close()
        control.close()


def test_instant_change_blocked(
    sidecar: RunningProxy, primary: sandbox.Instance, database: str, mdl_instrument: None
) -> None:
    """An INSTANT change that waits on the metadata lock is reported too (then falls back to a copy)."""
    make_table(primary, database, rows=3)
    holder, holder_id = open_transaction(primary, database, user="app", password="app-secret")
    control = admin(sidecar)
    try:
        migration_id = start_migration(control, database, "cut_over_lock_timeout_seconds=1")
        [blocked, *_] = wait_for("migration.blocked", lambda: events(sidecar, "migration.blocked"))
        assert blocked["phase"] == "validating" and "ALGORITHM=INSTANT" in blocked["statement"], blocked
        assert f"connection {holder_id} direct (app@" in blocked["blockers"], blocked
        row = migration(control, migration_id)
        assert row["blocked_by"] is None or f"connection {holder_id}" in row["blocked_by"]
        holder.commit()
        final = finished(control, migration_id)
        assert final["state"] == "complete", final
    finally:
        holder.close()
        control.close()


def test_rejected_statement_is_logged_with_its_trace_id(sidecar: RunningProxy, database: str) -> None:
    control = admin(sidecar)
    client = through(sidecar, database)
    try:
        with control.cursor() as cursor:
            cursor.execute("INSERT INTO rules (id, `match`, reject) VALUES (7, 'forbidden_table', 'not here')")
            cursor.execute("APPLY RULES")
        with pytest.raises(pymysql.err.OperationalError) as error, client.cursor() as cursor:
            cursor.execute(f"SELECT * FROM forbidden_table /*traceparent='{TRACEPARENT}'*/")
        assert error.value.args[0] == 1148
        [rejected] = events(sidecar, "statement.rejected")
        assert rejected["trace_id"] == TRACE_ID and rejected["reason"] == "not here" and rejected["rule"] == 7
    finally:
        client.close()
        control.close()


def test_kill_blockers_after(
    sidecar: RunningProxy, primary: sandbox.Instance, database: str, mdl_instrument: None
) -> None:
    """Off by default; with the option, a transaction that keeps blocking is ended (here it blocks the
    checksum snapshot's lock: it writes the table).  Direct sessions are only killed when the server
    names them as lock holders (here: the performance_schema instrument)."""
    make_table(primary, database)
    # The application's account (the service account's own connections are never killed).
    holder, holder_id = open_transaction(primary, database, "UPDATE items SET name = 'mine' WHERE id = 1",
                                         user="app", password="app-secret")
    control = admin(sidecar)
    try:
        migration_id = start_migration(control, database, FAST + ",kill_blockers_after=1.5")
        final = finished(control, migration_id, "completion", timeout=40)
        assert final["state"] == "complete", final
        [killed] = wait_for("the kill event", lambda: events(sidecar, "cutover.blocker_killed"))
        assert killed["processlist_id"] == holder_id and killed["blocked_seconds"] >= 1.5
        with pytest.raises(pymysql.err.OperationalError), holder.cursor() as cursor:
            cursor.execute("SELECT 1")  # its connection was killed: the update rolled back
        assert primary.execute(f"SELECT name FROM `{database}`.items WHERE id = 1") == [("row 1",)]
    finally:
        holder.close()
        control.close()


# ------------------------------------------------------------------------ hooks


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        _Recorder.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_hooks_fire_in_order_and_before_cut_over_vetoes(
    primary: sandbox.Instance, app_user: tuple[str, str], database: str, tmp_path: Path
) -> None:
    make_table(primary, database)
    log_file = tmp_path / "hooks.log"
    go = tmp_path / "go"
    record = (f'echo "$TIDEGATE_HOOK $TIDEGATE_MIGRATION_ID $TIDEGATE_MIGRATION_SCHEMA $TIDEGATE_MIGRATION_TABLE '
              f'$TIDEGATE_MIGRATION_PHASE $TIDEGATE_MIGRATION_ROWS_COPIED [$TIDEGATE_MIGRATION_ALTER]" >> {log_file}')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.bodies = []
    config = tmp_path / "tidegate.toml"
    config.write_text(
        "[hooks]\n"
        f"startup = '{record}'\n"
        f"row_copy_complete = '{record}'\n"
        f"success = '{record}'\n"
        f"failure = '{record}'\n"
        "before_cut_over = 'exit 3'\n"  # replaced per migration below
        f"after_cut_over = 'http://127.0.0.1:{server.server_address[1]}/after'\n"
        "timeout = 5\n"
        "allow_option_commands = true\n"  # the veto below is a command given in the migration's options
    )
    schema = state_schema(tmp_path)
    running = start_proxy(["--backend", primary.dsn(), "--config", str(config), "--state-schema", schema])
    control = admin(running)
    try:
        # Vetoes until the pipeline has rolled its code (here: until the file exists).
        veto = f"{record}; test -f {go}"
        migration_id = trio.from_thread.run(
            running.app.migrations.request, database, "items", "ADD COLUMN note TEXT NULL",
            {"attempt_instant_ddl": "off", "cut_over_lock_timeout_seconds": "1",
             "hook_before_cut_over": veto, "hook_retry_interval": "0.3"},
            trio_token=running.token,
        )
        row = wait_for("postponed by the hook", lambda: (r := migration(control, migration_id))["state"] ==
                       "postponed" and r)
        assert row["postponed_by"].startswith("hook before_cut_over: exit code 1"), row
        status = wait_for("/status to say ready", lambda: [
            m for m in running.call(running.app.status)["migrations"]
            if m["id"] == migration_id and m["ready_to_cut_over"] and m["postponed_by"]])
        assert status[0]["state"] == "postponed"
        with control.cursor() as cursor:  # throttle on/off with a reason: migration events
            cursor.execute(f"THROTTLE MIGRATION {migration_id} 'nightly backup'")
            time.sleep(0.5)
            cursor.execute(f"UNTHROTTLE MIGRATION {migration_id}")
        time.sleep(0.5)  # a few vetoes, each retried
        assert migration(control, migration_id)["state"] == "postponed"
        assert [r for r in (tmp_path / "hooks.log").read_text().splitlines() if r.startswith("before_cut_over")]

        go.touch()
        final = finished(control, migration_id)
        assert final["state"] == "complete", final
        wait_for("the success hook", lambda: "success" in log_file.read_text())
    finally:
        control.close()
        running.stop()
        server.shutdown()
        primary.execute(f"DROP DATABASE IF EXISTS `{schema}`")

    lines = log_file.read_text().splitlines()
    hooks = [line.split()[0] for line in lines]
    vetoes = hooks.count("before_cut_over")
    assert vetoes >= 2, lines
    assert hooks == ["startup", "row_copy_complete", *["before_cut_over"] * vetoes, "success"], lines
    first = lines[0].split()
    assert first[1:4] == [str(migration_id), database, "items"], lines[0]
    assert lines[0].endswith("[ADD COLUMN note TEXT NULL]")
    copy_done = lines[1].split()
    assert copy_done[5] == "50", lines[1]  # rows copied
    assert lines[-1].split()[4] == "complete"
    # the URL hook got the facts as JSON, after the cut-over and before success
    [body] = _Recorder.bodies
    assert body["hook"] == "after_cut_over" and body["id"] == migration_id and body["table"] == "items"
    assert body["alter"] == "ADD COLUMN note TEXT NULL" and body["rows_copied"] == 50
    recorded = running.app.events.tail()
    veto_events = [e for e in recorded if e["event"] == "hook.veto"]
    assert len(veto_events) >= 2 and veto_events[0]["migration"] == migration_id
    throttles = [(e["throttled"], e["reason"]) for e in recorded if e["event"] == "migration.throttle"]
    assert throttles == [(True, "nightly backup"), (False, "nightly backup")], throttles
    hooks_run = [(e["event"], e["hook"]) for e in recorded if e["event"] in ("hook.ok", "hook.failed")]
    assert hooks_run[0] == ("hook.ok", "startup") and hooks_run[-1] == ("hook.ok", "success"), hooks_run
    assert ("hook.ok", "after_cut_over") in hooks_run and ("hook.failed", "before_cut_over") in hooks_run


def test_bad_hook_options_are_refused_at_request(sidecar: RunningProxy, database: str) -> None:
    control = admin(sidecar)
    try:
        for options, expected in (
            ("hook_success=ftp://example.com/x", "hook_success: a URL hook must be http"),
            ("hook_timeout=0", "hook_timeout: must be more than 0"),
            ("kill_blockers_after=soon", "kill_blockers_after: expected seconds"),
            # not allowed by this sidecar's configuration: a shell command from the state schema
            ("hook_failure=\"touch /tmp/x\"", "hook_failure: a command from migration options runs a shell"),
        ):
            with pytest.raises(pymysql.err.OperationalError) as error, control.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO migrations (schema_name, table_name, alter_statement, options) "
                    f"VALUES ('{database}', 'items', 'ADD COLUMN c INT', '{options}')"
                )
            assert expected in str(error.value), (options, error.value)
    finally:
        control.close()



# ------------------------------------------------------------------------ pure pieces


def test_trace_ids_from_comment_tags() -> None:
    from proxy.classify import classify_text
    from proxy.events import trace_id_of

    tags = classify_text(f"SELECT 1 /*controller='x',traceparent='{TRACEPARENT}'*/").tags
    assert trace_id_of(tags, ("traceparent",)) == TRACE_ID
    assert trace_id_of({"request_id": "r-42"}, ("traceparent", "request_id")) == "r-42"
    assert trace_id_of({"traceparent": "garbage"}, ("traceparent",)) == "garbage"
    assert trace_id_of({}, ("traceparent",)) is None


def test_event_log_file_relay_and_statement_limit(tmp_path: Path) -> None:
    from proxy.events import STATEMENT_EVENTS_PER_SECOND, EventLog, admin_rows

    log = EventLog(str(tmp_path / "e.jsonl"), keep=5, source="me")
    log.emit("hold.start", table="d.t", drain_seconds=0.001)
    log.relay({"ts": "2025-01-01T00:00:00.000001Z", "event": "migration.phase", "seq": 9, "migration": 3})
    for _ in range(STATEMENT_EVENTS_PER_SECOND + 10):
        log.emit("statement.held", trace_id="t")
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines[:2]] == ["hold.start", "migration.phase"]
    assert lines[1]["ts"] == "2025-01-01T00:00:00.000001Z" and lines[1]["sidecar"] == "me"
    assert len(lines) <= STATEMENT_EVENTS_PER_SECOND + 2 and len(log.recent) == 5
    [row] = admin_rows([lines[0]])
    assert row["table"] == "d.t" and json.loads(row["data"]) == {"drain_seconds": 0.001}


def test_hook_settings_from_options() -> None:
    from proxy.hooks import HookError, HookSettings

    base = HookSettings({"success": "echo ok", "failure": "http://127.0.0.1:1/f"}, allow_option_commands=True)
    merged = base.with_options({"hook_success": "", "hook_before_cut_over": "https://deploy/ready",
                                "hook_timeout": "5", "hook_retry_interval": "0.5"})
    assert dict(merged.targets) == {"failure": "http://127.0.0.1:1/f", "before_cut_over": "https://deploy/ready"}
    assert (merged.timeout, merged.retry_interval) == (5.0, 0.5)
    assert HookSettings.from_json(merged.to_json()) == merged
    with pytest.raises(HookError, match="allow_option_commands"):
        HookSettings().with_options({"hook_startup": "rm -rf /"})
    with pytest.raises(HookError, match="http:// or https://"):
        HookSettings().with_options({"hook_startup": "file:///etc/passwd"})


async def test_hooks_run_in_order_with_the_facts(tmp_path: Path) -> None:
    from proxy.events import EventLog
    from proxy.hooks import Hooks, HookSettings

    out = tmp_path / "out"
    record = f'echo "$TIDEGATE_HOOK $TIDEGATE_MIGRATION_ID $TIDEGATE_MIGRATION_PHASE" >> {out}'
    log = EventLog()
    hooks = Hooks(HookSettings({"startup": record, "row_copy_complete": f"sleep 0.2; {record}",
                                "before_cut_over": f"{record}; exit 7"}, timeout=5), log, migration_id=9)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        hooks.fire("startup", {"id": 9, "phase": "validating"})
        hooks.fire("row_copy_complete", {"id": 9, "phase": "copying"})
        hooks.fire("success", {"id": 9})  # not configured: nothing
        result = await hooks.run_now("before_cut_over", {"id": 9, "phase": "ready"})
        nursery.cancel_scope.cancel()
    assert not result.ok and result.detail.startswith("exit code 7")
    assert out.read_text().splitlines() == ["startup 9 validating", "row_copy_complete 9 copying",
                                            "before_cut_over 9 ready"]
    assert [(e["event"], e["hook"]) for e in log.tail()] == [
        ("hook.ok", "startup"), ("hook.ok", "row_copy_complete"), ("hook.failed", "before_cut_over")]


def test_chain_text() -> None:
    from proxy.blockers import Report, chain_text

    report = Report("shop", "orders", rows=[
        {"role": "holding", "processlist_id": 45, "sidecar": "pod-a", "session_id": 17, "client_user": "app",
         "client": "10.0.0.5:5555", "transaction_seconds": 12.25, "command": "Sleep",
         "client_statement": "UPDATE orders SET k = 1", "tags": "controller=checkout", "lock": None},
        {"role": "waiting", "processlist_id": 12, "statement": "LOCK TABLES `shop`.`orders` WRITE", "seconds": 0.8},
        {"role": "queued", "processlist_id": 50},
        {"role": "queued", "processlist_id": 51},
    ])
    assert chain_text(report) == (
        "shop.orders: cut-over 'LOCK TABLES `shop`.`orders` WRITE' (connection 12) waits 0.8 s for the "
        "metadata lock; held by connection 45 via sidecar pod-a session 17 (app from 10.0.0.5:5555, "
        "transaction open 12.2 s, 'UPDATE orders SET k = 1', tags controller=checkout); 2 statements queued behind"
    )
