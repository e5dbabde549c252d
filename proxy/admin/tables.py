"""The admin port's tables: their columns, and SELECT over snapshots of them.

Pure code: rows come in as the dicts ``proxy.control`` returns, a query
comes in as a sqlglot expression, and a result (or an ``AdminError``) comes
out.  No sockets, no trio, no asyncio, so it is tested without a server.

Every table is a live view: a SELECT reads the proxy's state at that moment;
nothing here is staged or cached.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlglot.errors
from sqlglot import exp
from sqlglot.executor import execute

SCHEMA_NAME = "tidegate"

Row = Mapping[str, Any]


# MySQL error codes the admin port answers with (never classified by text).
ER_UNKNOWN_ERROR = 1105
ER_PARSE_ERROR = 1064
ER_BAD_DB_ERROR = 1049
ER_NO_SUCH_TABLE = 1146
ER_BAD_FIELD_ERROR = 1054
ER_NONUPDATEABLE_COLUMN = 1348
ER_WRONG_VALUE_FOR_VAR = 1231
ER_UPDATE_WITHOUT_KEY = 1175
ER_NOT_SUPPORTED_YET = 1235
ER_WRONG_VALUE_COUNT = 1136
ER_TABLE_NOT_UPDATABLE = 1288

SQLSTATES = {
    ER_PARSE_ERROR: "42000",
    ER_BAD_DB_ERROR: "42000",
    ER_NO_SUCH_TABLE: "42S02",
    ER_BAD_FIELD_ERROR: "42S22",
    ER_NONUPDATEABLE_COLUMN: "HY000",
    ER_WRONG_VALUE_FOR_VAR: "42000",
    ER_NOT_SUPPORTED_YET: "42000",
    ER_WRONG_VALUE_COUNT: "21S01",
    ER_TABLE_NOT_UPDATABLE: "HY000",
}


class AdminError(Exception):
    """A bad admin statement: becomes a MySQL ERR packet with this code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    doc: str


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    columns: tuple[Column, ...]
    #: columns ``UPDATE`` may set (only ``migrations`` has any)
    writable: tuple[Column, ...] = ()
    #: rows may carry more keys than declared (the migration service decides);
    #: extra keys become extra columns, after the declared ones
    open_ended: bool = False

    def column_names(self, rows: Iterable[Row] = ()) -> list[str]:
        names = [column.name for column in self.columns]
        if self.open_ended:
            seen = set(names)
            for row in rows:
                for key in row:
                    if key not in seen:
                        seen.add(key)
                        names.append(key)
        return names

    def column_type(self, name: str) -> str:
        for column in self.columns:
            if column.name == name:
                return column.type
        return "TEXT"


def _c(name: str, type_: str, doc: str) -> Column:
    return Column(name, type_, doc)


SESSIONS = Table(
    "sessions",
    "client connections through the proxy, one row each",
    (
        _c("id", "BIGINT", "the proxy's connection id (what the client sees as CONNECTION_ID())"),
        _c("user", "TEXT", "authenticated application user"),
        _c("client", "TEXT", "client address host:port"),
        _c("schema", "TEXT", "current default schema"),
        _c("backend_connection_id", "BIGINT", "connection id on the primary (NULL before login)"),
        _c("in_transaction", "TINYINT", "1 while an explicit or implicit transaction is open"),
        _c("transaction_seconds", "DOUBLE", "age of the open transaction"),
        _c("autocommit", "TINYINT", "session autocommit"),
        _c("statement", "TEXT", "statement running now (NULL when idle)"),
        _c("held", "TINYINT", "1 while the statement waits in a cut-over hold"),
        _c("queries", "BIGINT", "statements run by this session"),
        _c("prepared_statements", "BIGINT", "open prepared statements"),
        _c("connected_seconds", "DOUBLE", "age of the connection"),
        _c("tags", "TEXT", "tidegate* connection attributes, k=v,..."),
        _c("replica", "TEXT", "replica the session's reads go to (its connection there), if any"),
        _c("pinned", "TEXT", "why the session's reads stay on the primary (session state), if they do"),
    ),
)

BACKENDS = Table(
    "backends",
    "configured database servers",
    (
        _c("name", "TEXT", "backend name from the configuration"),
        _c("role", "TEXT", "primary or replica"),
        _c("address", "TEXT", "host:port"),
        _c("tls", "TINYINT", "1 if the proxy speaks TLS to it"),
        _c("reachable", "TINYINT", "last probe result (primary only; NULL otherwise)"),
        _c("connections", "BIGINT", "client sessions' connections open to it"),
        _c("queue_waiting", "BIGINT", "clients waiting for a backend connection"),
        _c("health", "TEXT", "up; replicas: unknown (not probed yet), lagging, stopped (replication "
           "thread stopped) or down (probe failed); only up replicas get reads"),
        _c("lag_seconds", "DOUBLE", "replicas: estimated replication lag at the last probe"),
        _c("sql_running", "TINYINT", "replicas: replication SQL thread running"),
        _c("io_running", "TINYINT", "replicas: replication I/O thread running"),
        _c("routed", "BIGINT", "statements the router sent to it (with routing active)"),
        _c("error", "TEXT", "replicas: why it gets no reads"),
    ),
)

RULES = Table(
    "rules",
    "routing rules: the live ones (with hit counters), then staged changes that APPLY RULES "
    "would make live; INSERT, UPDATE and DELETE edit the staged set",
    (
        _c("state", "TEXT", "live, or staged (a change not applied yet)"),
        _c("id", "BIGINT", "rule id; rules run in ascending id order"),
        _c("active", "TINYINT", "0 keeps the rule without using it"),
        _c("note", "TEXT", "free text"),
        _c("user", "TEXT", "matches the session's user"),
        _c("schema", "TEXT", "matches the session's default schema"),
        _c("kinds", "TEXT", "statement kinds: read, write, ddl, transaction, session, other"),
        _c("tables", "TEXT", "tables (table or schema.table, * wildcards) the statement names"),
        _c("tags", "TEXT", "comment tags name=value (value * for any), e.g. tidegate=gray"),
        _c("attributes", "TEXT", "connection attributes name=value"),
        _c("digest", "TEXT", "16-hex digest, or a statement whose shape to match"),
        _c("match", "TEXT", "regular expression searched in the statement (case-insensitive)"),
        _c("percent", "DOUBLE", "only this share of keys (0..100), by a stable hash of key"),
        _c("key", "TEXT", "tag or connection attribute hashed for percent (default uid)"),
        _c("salt", "TEXT", "changes which keys fall in the percentage"),
        _c("route", "TEXT", "primary, replica, or a backend name"),
        _c("rewrite", "TEXT", "replacement for match (\\1 for groups)"),
        _c("comment", "TEXT", "comment put in front of the statement"),
        _c("hint", "TEXT", "optimizer hint put after the first keyword as /*+ hint */"),
        _c("mirror", "TEXT", "backend that gets a fire-and-forget copy"),
        _c("reject", "TEXT", "refuse the statement with this message (error 1148)"),
        _c("last", "TINYINT", "1: no rule after this one is evaluated when it matches"),
        _c("hits", "BIGINT", "live rules: statements matched since the rule went live"),
        _c("pending", "TEXT", "a staged change not applied yet (new, changed, deleted)"),
    ),
)

_RULE_COLUMNS = tuple(column for column in RULES.columns if column.name not in ("state", "hits", "pending", "note"))

FLEET_RULES = Table(
    "fleet_rules",
    "the fleet's newest published rule set (APPLY RULES TO FLEET), one rule a row; every sidecar "
    "that follows the fleet loads it (see sidecar_rules)",
    (
        _c("version", "BIGINT", "the published version these rules belong to"),
        _c("published_by", "TEXT", "sidecar whose admin port published it"),
        _c("published_at", "DATETIME", "when"),
        _c("note", "TEXT", "the text given to APPLY RULES TO FLEET 'note'"),
        *_RULE_COLUMNS,
        _c("rule_note", "TEXT", "the rule's own note"),
    ),
)

FLEET_RULE_VERSIONS = Table(
    "fleet_rule_versions",
    "published fleet rule sets, newest first (the last 100 are kept)",
    (
        _c("version", "BIGINT", "version number; the newest one is the fleet's rule set"),
        _c("published_by", "TEXT", "sidecar whose admin port published it"),
        _c("published_at", "DATETIME", "when"),
        _c("note", "TEXT", "the text given to APPLY RULES TO FLEET 'note'"),
        _c("rules", "BIGINT", "rules in the set"),
        _c("latest", "TINYINT", "1 for the newest version"),
        _c("live_here", "TINYINT", "1 if this sidecar runs this version now"),
    ),
)

SIDECAR_RULES = Table(
    "sidecar_rules",
    "every registered sidecar and the fleet rule version it runs: who has not converged, and why",
    (
        _c("sidecar", "TEXT", "sidecar id (see sidecars)"),
        _c("listen", "TEXT", "its proxy address"),
        _c("version", "BIGINT", "fleet rule version live there (NULL: configuration-file or local rules)"),
        _c("fleet_version", "BIGINT", "the newest published version now"),
        _c("converged", "TINYINT", "1 if version = fleet_version"),
        _c("state", "TEXT", "converged, behind (loads it at its next poll), refused (cannot load the newest "
           "version, keeps its rules), diverged (a local APPLY RULES), none (nothing published), ignoring "
           "(routing.fleet_rules = false)"),
        _c("source", "TEXT", "where its live rules come from: config, fleet or local"),
        _c("seen_version", "BIGINT", "newest version it had seen at its last report"),
        _c("detail", "TEXT", "why it refused the newest version, or how it diverged"),
        _c("updated_at", "DATETIME", "its last report (NULL: it has not reported, e.g. an older sidecar)"),
        _c("live", "TINYINT", "1 if its heartbeat is recent"),
        _c("this_sidecar", "TINYINT", "1 for the sidecar this admin port belongs to"),
    ),
)

HOLDS = Table(
    "holds",
    "cut-over holds of this sidecar: active ones first, then the last 100 finished",
    (
        _c("state", "TEXT", "active or finished"),
        _c("table", "TEXT", "schema.table being cut over"),
        _c("phase", "TEXT", "active holds: draining or holding"),
        _c("result", "TEXT", "finished holds: released, abandoned, expired, ..."),
        _c("seconds", "DOUBLE", "active holds: time since the hold was requested"),
        _c("drain_seconds", "DOUBLE", "finished holds: time spent draining"),
        _c("hold_seconds", "DOUBLE", "finished holds: time new statements were held"),
        _c("held_statements", "BIGINT", "statements waiting (active) or that waited (finished)"),
        _c("aliases", "TEXT", "views/triggers/routines counted as the table (JSON list)"),
        _c("blockers", "TEXT", "what the drain waited for (JSON list)"),
    ),
    open_ended=True,
)

STATS = Table(
    "stats",
    "counters and gauges, one per row",
    (
        _c("name", "TEXT", "counter name"),
        _c("value", "TEXT", "its value now (a number)"),
    ),
)

SETTINGS = Table(
    "settings",
    "the configuration in force (read-only here: change the configuration and restart)",
    (
        _c("name", "TEXT", "setting, e.g. limits.max_client_connections"),
        _c("value", "TEXT", "value in force"),
    ),
)

#: the runtime knobs of a running migration, as ``UPDATE migrations SET ...``
MIGRATION_WRITABLE = (
    _c("throttle", "TEXT", "a reason string throttles the copy; NULL lifts the admin throttle "
       "(throttle_reason shows the effect)"),
    _c("postponed", "TINYINT", "1 postpones the cut-over, 0 lets it happen"),
    _c("chunk_size", "BIGINT", "rows per copy chunk (the chunker adapts from here)"),
    _c("max_load", "TEXT", "throttle above these, e.g. 'Threads_running=25,Threads_connected=500'"),
    _c("critical_load", "TEXT", "abort above these, e.g. 'Threads_running=100'"),
    _c("max_lag_millis", "BIGINT", "throttle while replica lag exceeds this"),
)

MIGRATIONS = Table(
    "migrations",
    "online schema changes requested on any sidecar (the state schema's view); "
    "INSERT starts one, UPDATE changes a running one",
    (
        _c("id", "BIGINT", "migration id"),
        _c("schema_name", "TEXT", "schema of the table"),
        _c("table_name", "TEXT", "table being altered"),
        _c("alter_statement", "TEXT", "the ALTER clause"),
        _c("options", "TEXT", "options given at start (JSON object)"),
        _c("state", "TEXT", "pending, then the migrator's phase (validating, copying, verifying, ready, "
           "postponed, cutting_over), then complete, failed or cancelled"),
        _c("leader", "TEXT", "id of the sidecar running it (see sidecars)"),
        _c("requested_at", "DATETIME", "when it was requested"),
        _c("updated_at", "DATETIME", "last progress report"),
        _c("rows_copied", "BIGINT", "rows copied into the new table so far"),
        _c("rows_estimate", "BIGINT", "rows the copy expects (raised to rows_copied when the copy passes it)"),
        _c("progress_percent", "DOUBLE", "rows_copied / rows_estimate, in percent (at most 100)"),
        _c("rows_per_second", "DOUBLE", "copy rate"),
        _c("eta_seconds", "DOUBLE", "estimated time left for the copy"),
        _c("binlog_lag_seconds", "DOUBLE", "how far the change stream is behind"),
        _c("throttle_reason", "TEXT", "why the copy waits now (load, lag or an admin throttle); NULL if it does not"),
        _c("postponed", "TINYINT", "1 while the cut-over is postponed"),
        _c("cut_over_attempts", "BIGINT", "cut-over attempts so far"),
        _c("last_cut_over_failure", "TEXT", "why the last cut-over attempt was abandoned"),
        _c("error", "TEXT", "why it failed or was cancelled"),
        _c("message", "TEXT", "the migrator's last status line"),
        _c("postponed_by", "TEXT", "why the cut-over waits besides postponed=1: a before_cut_over hook that "
           "fails (retried until it succeeds)"),
        _c("blocked_by", "TEXT", "while one of its lock requests on the table waits: who holds the lock "
           "(see blockers)"),
    ),
    writable=MIGRATION_WRITABLE,
    open_ended=True,
)

SIDECARS = Table(
    "sidecars",
    "sidecars registered in the state schema, with their last hold acknowledgement",
    (
        _c("id", "TEXT", "sidecar id"),
        _c("host", "TEXT", "host it runs on"),
        _c("pid", "BIGINT", "process id"),
        _c("listen", "TEXT", "its proxy address"),
        _c("started_at", "DATETIME", "registration time"),
        _c("heartbeat_at", "DATETIME", "last heartbeat"),
        _c("holding", "TEXT", "table it is holding now, if any"),
        _c("heartbeat_age", "DOUBLE", "seconds since the last heartbeat"),
        _c("last_ack", "TEXT", "its last hold acknowledgement: table#epoch result"),
        _c("live", "TINYINT", "1 if its heartbeat is recent (it takes part in cut-overs)"),
        _c("this_sidecar", "TINYINT", "1 for the sidecar this admin port belongs to"),
    ),
    open_ended=True,
)

BLOCKERS = Table(
    "blockers",
    "who holds or waits for the lock of each table being migrated, now: the server's view "
    "(metadata locks, processlist, InnoDB transactions) and the client behind sidecar sessions",
    (
        _c("migration", "BIGINT", "migration id (NULL: a cut-over row without a request)"),
        _c("table", "TEXT", "schema.table"),
        _c("role", "TEXT", "holding (holds the table's metadata lock), may_hold (an open transaction the "
           "server cannot place), waiting (the migration's own lock request), queued (waits behind it), "
           "none (nobody in the way)"),
        _c("processlist_id", "BIGINT", "the session's connection id on the server (KILL takes it)"),
        _c("lock", "TEXT", "lock type and status, or why it counts as holding"),
        _c("source", "TEXT", "metadata_locks, processlist, sidecar or innodb_trx"),
        _c("migrator", "TINYINT", "1 for tidegate's own lock requests (the service account)"),
        _c("server_user", "TEXT", "user on the server"),
        _c("server_host", "TEXT", "client address the server sees (a sidecar's, for proxied sessions)"),
        _c("command", "TEXT", "processlist command (Sleep: idle in its transaction)"),
        _c("state", "TEXT", "processlist state"),
        _c("seconds", "DOUBLE", "time in the current command"),
        _c("statement", "TEXT", "statement running on the server"),
        _c("transaction_seconds", "DOUBLE", "age of its open transaction"),
        _c("transaction_rows_locked", "BIGINT", "rows its transaction locks (InnoDB)"),
        _c("sidecar", "TEXT", "sidecar the session comes through (NULL: direct to the server)"),
        _c("session_id", "BIGINT", "the session's id on that sidecar (its sessions.id)"),
        _c("client_user", "TEXT", "application user behind the sidecar session"),
        _c("client", "TEXT", "application address behind the sidecar session"),
        _c("client_statement", "TEXT", "the session's current or last statement, as the sidecar saw it"),
        _c("tags", "TEXT", "tidegate* connection attributes and comment tags (e.g. traceparent)"),
        _c("notes", "TEXT", "which lock sources the server offered, and what it could not say"),
    ),
)

EVENTS = Table(
    "events",
    "this sidecar's last events (migrations, cut-over attempts, holds, hooks, traced statements), "
    "oldest first; the same as the JSON event log",
    (
        _c("seq", "BIGINT", "sequence number in this sidecar's log"),
        _c("ts", "TEXT", "UTC time to the microsecond, e.g. 2025-01-31T12:00:00.123456Z"),
        _c("event", "TEXT", "event name, e.g. cutover.refused, hold.release, statement.held"),
        _c("sidecar", "TEXT", "sidecar that recorded it"),
        _c("migration", "BIGINT", "migration id, for migration events"),
        _c("table", "TEXT", "schema.table it concerns"),
        _c("trace_id", "TEXT", "trace id of a held or rejected statement"),
        _c("data", "TEXT", "the event's other fields (JSON object)"),
    ),
)

TABLES: dict[str, Table] = {
    table.name: table
    for table in (SESSIONS, BACKENDS, HOLDS, STATS, SETTINGS, MIGRATIONS, SIDECARS, RULES, FLEET_RULES,
                  FLEET_RULE_VERSIONS, SIDECAR_RULES, BLOCKERS, EVENTS)
}


def table_named(name: str, db: str | None = None) -> Table:
    """The table a statement names, or the MySQL error for a wrong name."""
    if db and db.lower() != SCHEMA_NAME:
        raise AdminError(ER_NO_SUCH_TABLE, f"Table '{db}.{name}' doesn't exist: the admin port has only "
                         f"the {SCHEMA_NAME} schema ({', '.join(TABLES)})")
    table = TABLES.get(name.lower())
    if table is None:
        raise AdminError(
            ER_NO_SUCH_TABLE,
            f"Table '{SCHEMA_NAME}.{name}' doesn't exist; tables: {', '.join(TABLES)}",
        )
    return table


def info_schema(live_columns: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, dict[str, str]]]:
    """The tables for SHOW TABLES / SHOW COLUMNS / information_schema.

    ``live_columns`` adds the columns open-ended tables have right now.
    """
    live = live_columns or {}
    return {
        SCHEMA_NAME: {
            table.name: {
                name: table.column_type(name)
                for name in live.get(table.name, table.column_names())
            }
            for table in TABLES.values()
        }
    }


# --------------------------------------------------------------------------- values


def plain(value: Any) -> Any:
    """A row value as the SQL executor and the wire should see it."""
    if value is None or isinstance(value, bool | int | float | str | dt.datetime | dt.date):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return json.dumps(items, default=str, sort_keys=True)
    return str(value)


def normalize(rows: Iterable[Row], columns: Sequence[str]) -> list[dict[str, Any]]:
    return [{name: plain(row.get(name)) for name in columns} for row in rows]


@dataclass(frozen=True)
class Result:
    columns: list[str]
    #: a MySQL column type per column: TINY, LONGLONG, DOUBLE, NEWDECIMAL, DATETIME or VARCHAR
    types: list[str]
    rows: list[tuple[Any, ...]]


def wire_types(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One MySQL type per output column, chosen from all its values (not the first).

    Mixed columns (a counter that is sometimes a float) must not be typed
    from the first row, or clients decode the rest wrongly.
    """
    types: list[str] = []
    for index in range(len(columns)):
        values = [row[index] for row in rows if row[index] is not None]
        if values and all(isinstance(v, bool) for v in values):
            types.append("TINY")
        elif values and all(isinstance(v, int) for v in values):
            types.append("LONGLONG")
        elif values and all(isinstance(v, float) for v in values):
            types.append("DOUBLE")
        elif values and all(isinstance(v, int | float) for v in values):
            types.append("NEWDECIMAL")  # ints and floats: exact text, still a number
        elif values and all(isinstance(v, dt.datetime) for v in values):
            types.append("DATETIME")
        else:
            types.append("VARCHAR")
    converted = []
    for row in rows:
        out: list[Any] = []
        for value, kind in zip(row, types, strict=True):
            if value is None:
                out.append(None)
            elif kind == "TINY":
                out.append(int(value))
            elif kind == "VARCHAR":
                out.append(value if isinstance(value, str) else str(plain(value)))
            else:
                out.append(value)
        converted.append(tuple(out))
    return types, converted


# --------------------------------------------------------------------------- SELECT


def referenced_tables(query: exp.Expression) -> list[Table]:
    """Base tables a query reads (validated), in order of appearance."""
    derived = {
        node.alias for node in query.find_all(exp.Subquery, exp.CTE) if node.alias
    }
    tables: dict[str, Table] = {}
    for node in query.find_all(exp.Table):
        if not node.name:
            raise AdminError(ER_NOT_SUPPORTED_YET, f"unsupported table expression: {node.sql('mysql')}")
        if node.name in derived and not node.db:
            continue
        table = table_named(node.name, node.db or None)
        tables.setdefault(table.name, table)
    return list(tables.values())


def check_columns(query: exp.Expression, columns: Mapping[str, Sequence[str]], aliases: Mapping[str, str]) -> None:
    """Unknown column → ER_BAD_FIELD_ERROR naming the columns there are.

    ``columns``: table name → its columns; ``aliases``: alias → table name.
    """
    known = {name.lower() for names in columns.values() for name in names}
    output_aliases = {node.alias.lower() for node in query.find_all(exp.Alias) if node.alias}
    derived = {node.alias.lower() for node in query.find_all(exp.Subquery, exp.CTE) if node.alias}
    for column in query.find_all(exp.Column):
        name = column.name.lower()
        if not name:
            continue
        qualifier = column.table.lower()
        if qualifier:
            if qualifier in derived:
                continue
            table = aliases.get(qualifier)
            if table is None:
                raise AdminError(ER_BAD_FIELD_ERROR, f"Unknown column '{column.sql('mysql')}': "
                                 f"no table or alias '{column.table}' in this query")
            if name not in {n.lower() for n in columns[table]}:
                raise AdminError(ER_BAD_FIELD_ERROR, _unknown_column(column.name, table, columns[table]))
        elif name not in known and name not in output_aliases and not derived:
            if len(columns) == 1:
                (table, names), = columns.items()
                raise AdminError(ER_BAD_FIELD_ERROR, _unknown_column(column.name, table, names))
            raise AdminError(ER_BAD_FIELD_ERROR, f"Unknown column '{column.name}' in {', '.join(columns)}")


def _unknown_column(name: str, table: str, columns: Sequence[str]) -> str:
    return f"Unknown column '{name}' in table {table}; its columns are: {', '.join(columns)}"


def _name_projections(query: exp.Expression) -> None:
    """``COUNT(*)`` is a column called ``COUNT(*)``, as MySQL names it, not ``_col_0``."""
    if not isinstance(query, exp.Select):
        return
    for index, projection in enumerate(query.expressions):
        if isinstance(projection, exp.Column | exp.Star | exp.Alias):
            continue
        text = projection.sql("mysql")
        query.expressions[index] = exp.alias_(projection, exp.to_identifier(text, quoted=True))


def run_select(query: exp.Expression, rows_by_table: Mapping[str, list[Row]]) -> Result:
    """Run a SELECT over row snapshots with sqlglot's executor.

    ``rows_by_table`` has the rows of every table ``referenced_tables`` returned.
    """
    query = query.copy()
    columns: dict[str, list[str]] = {}
    aliases: dict[str, str] = {}
    for node in query.find_all(exp.Table):
        known = TABLES.get(node.name.lower())
        if known is not None and known.name in rows_by_table:
            aliases[node.alias_or_name.lower()] = known.name
            aliases[known.name] = known.name
            node.set("db", None)
            node.set("catalog", None)
            node.set("this", exp.to_identifier(known.name))
    for name, rows in rows_by_table.items():
        columns[name] = TABLES[name].column_names(rows)
    check_columns(query, columns, aliases)
    _name_projections(query)
    schema = {
        name: {column: _executor_type(TABLES[name].column_type(column)) for column in names}
        for name, names in columns.items()
    }
    tables = {name: normalize(rows_by_table[name], names) for name, names in columns.items()}
    try:
        result = execute(query, schema=schema, tables=tables)
    except sqlglot.errors.OptimizeError as error:
        raise AdminError(ER_BAD_FIELD_ERROR, _first_line(error)) from None
    except (sqlglot.errors.SqlglotError, TypeError, ValueError, ZeroDivisionError, KeyError) as error:
        # The executor evaluates in Python: comparing a number with a string
        # and the like surface as TypeError.
        raise AdminError(ER_UNKNOWN_ERROR, f"cannot evaluate the query: {_first_line(error)}") from None
    names = list(result.columns)
    types, converted = wire_types(names, result.rows)
    return Result(names, types, converted)


def _executor_type(declared: str) -> str:
    return {"TINYINT": "INT", "BIGINT": "BIGINT", "DOUBLE": "DOUBLE"}.get(declared, "TEXT")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
