"""Who is in the way of a cut-over: the sessions that hold or wait for a table's lock.

A cut-over waits in two places: the sidecars' drain (a transaction that
touched the table has not ended) and the database-level ``LOCK TABLES`` /
``RENAME`` (a session that bypasses the sidecars holds the table's metadata
lock).  This module answers "who?" for both, in one report:

* from the server: the table's metadata locks (``information_schema.
  METADATA_LOCK_INFO`` when that plugin is loaded, ``performance_schema.
  metadata_locks`` when its ``wait/lock/metadata/sql/mdl`` instrument is on),
  the processlist (who waits for a metadata lock, who runs a statement on the
  table) and ``INNODB_TRX`` (transaction ages);
* from the sidecars: the client behind a backend connection (user, address,
  statement, transaction age, tags) — this sidecar's own sessions live, other
  sidecars' from the ``sessions`` snapshot each publishes in the state schema
  while a cut-over is announced (``proxy.fleet``).

Without a metadata-lock source the server does not say who holds a lock;
the report then names what is certain (sidecar sessions whose transaction
touched the table, statements running on it) and lists the oldest open
transactions as ``may_hold``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.backends import BackendError
from proxy.classify import Classifier
from proxy.fleet import ServiceDatabase, literal

if TYPE_CHECKING:
    from proxy.relay import Proxy

log = logging.getLogger("tidegate.blockers")

#: sessions a sidecar publishes at most (oldest transactions first)
MAX_PUBLISHED = 200
#: open transactions listed as ``may_hold`` when the server cannot say more
MAX_CANDIDATES = 5
ROLE_ORDER = {"holding": 0, "may_hold": 1, "waiting": 2, "queued": 3}
MDL_WAIT = "Waiting for table metadata lock"
MDL_INSTRUMENT = "wait/lock/metadata/sql/mdl"


@dataclass
class ClientSession:
    """A client session behind a sidecar, as published for blocker reports."""

    sidecar: str
    session_id: int
    backend_id: int | None
    user: str
    client: str
    schema: str | None = None
    transaction_seconds: float | None = None
    statement: str | None = None
    tags: str = ""
    #: ``schema.table`` keys (of tables being cut over) its open transaction touched
    touched: list[str] = field(default_factory=list)


def session_tags(attributes: Mapping[str, str], sql: Iterable[bytes], classifier: Classifier) -> str:
    """``k=v,...``: tidegate* connection attributes and the comment tags of its statements."""
    tags = {key: value for key, value in attributes.items() if key.startswith("tidegate")}
    for statement in sql:
        for key, value in classifier.classify(statement).tags.items():
            tags.setdefault(key, value)
    text = ",".join(f"{key}={value}" for key, value in tags.items())
    return text[:300]


def local_sessions(proxy: Proxy, sidecar: str, tables: Iterable[str] = (),
                   limit: int = MAX_PUBLISHED) -> list[ClientSession]:
    """This sidecar's sessions in a transaction or running a statement, oldest first.

    ``touched`` lists which of ``tables`` (``schema.table``, lower case) each
    open transaction touched; a statement whose tables cannot be told counts
    as touching all of them, as in the gate.
    """
    keys = frozenset(table.lower() for table in tables)
    classifier = proxy.gate.classifier
    now = time.time()
    out: list[ClientSession] = []
    for relay in list(proxy.relays.values()):
        session = relay.session
        inflight = session.inflight_sql()
        if not session.in_transaction and inflight is None:
            continue
        statements = list(session.transaction_sql()) if session.in_transaction else []
        if inflight is not None and not session.held:
            statements.append(inflight)
        touched: set[str] = set()
        if keys:
            for sql in statements:
                resolved = classifier.classify(sql).resolved(session.schema)
                touched |= set(keys) if resolved is None else resolved & keys
                if touched == keys:
                    break
        started = session.transaction_started
        backend = relay.backend
        out.append(ClientSession(
            sidecar=sidecar,
            session_id=session.connection_id,
            backend_id=backend.connection_id if backend is not None else None,
            user=session.user,
            client=session.peer,
            schema=session.schema,
            transaction_seconds=round(now - started, 3) if started else None,
            statement=(session.current or (statements[-1].decode("utf-8", "replace") if statements else None)),
            tags=session_tags(session.attributes, statements[:3] + statements[-1:], classifier),
            touched=sorted(touched),
        ))
    out.sort(key=lambda s: -(s.transaction_seconds or 0.0))
    return out[:limit]


def describe_client(session: ClientSession) -> str:
    """``session 17 app@10.0.0.5:5555 (backend 45, transaction 12.3 s, tags k=v)``."""
    facts = []
    if session.backend_id is not None:
        facts.append(f"backend connection {session.backend_id}")
    if session.transaction_seconds is not None:
        facts.append(f"transaction open {session.transaction_seconds:.1f} s")
    if session.tags:
        facts.append(f"tags {session.tags}")
    text = f"session {session.session_id} {session.user}@{session.client}"
    return text + (f" ({', '.join(facts)})" if facts else "")


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    schema: str
    table: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: which sources answered, and what the server could not say
    notes: list[str] = field(default_factory=list)
    #: whether a metadata-lock source named the holders
    exact: bool = False

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.table}".lower()

    def holders(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["role"] in ("holding", "may_hold")]

    def text(self, limit: int = 5) -> str:
        return chain_text(self, limit)


def _short(text: str | None, size: int = 100) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= size else flat[: size - 1] + "…"


def _who(row: Mapping[str, Any]) -> str:
    parts = [f"connection {row['processlist_id']}" if row.get("processlist_id") is not None else "a session"]
    if row.get("sidecar"):
        parts.append(f"via sidecar {row['sidecar']} session {row['session_id']} "
                     f"({row.get('client_user') or row.get('server_user')} from {row.get('client')}")
    else:
        parts.append(f"direct ({row.get('server_user')}@{row.get('server_host')}")
    facts = []
    if row.get("transaction_seconds") is not None:
        facts.append(f"transaction open {float(row['transaction_seconds']):.1f} s")
    statement = row.get("client_statement") or row.get("statement")
    if row.get("command") == "Sleep" and not row.get("client_statement"):
        facts.append("idle")
    elif statement:
        facts.append(f"'{_short(statement)}'")
    if row.get("lock"):
        facts.append(str(row["lock"]))
    if row.get("tags"):
        facts.append(f"tags {row['tags']}")
    return " ".join(parts) + "".join(f", {fact}" for fact in facts) + ")"


def chain_text(report: Report, limit: int = 5) -> str:
    """One line: who waits, held by whom, and how many queue behind."""
    waiting = [row for row in report.rows if row["role"] == "waiting"]
    queued = [row for row in report.rows if row["role"] == "queued"]
    holding = [row for row in report.rows if row["role"] == "holding"]
    maybe = [row for row in report.rows if row["role"] == "may_hold"]
    head = f"{report.key}: "
    if waiting:
        first = waiting[0]
        head += (f"cut-over '{_short(first.get('statement'), 60)}' (connection {first['processlist_id']}) "
                 f"waits {float(first.get('seconds') or 0):.1f} s for the metadata lock; ")
    if holding:
        text = head + "held by " + "; ".join(_who(row) for row in holding[:limit])
        if len(holding) > limit:
            text += f"; and {len(holding) - limit} more"
    elif maybe:
        text = head + ("no lock holder named by the server (no metadata-lock source); open transactions: "
                       + "; ".join(_who(row) for row in maybe[:limit]))
    else:
        text = head + "no session holding its metadata lock was found"
    if queued:
        text += f"; {len(queued)} statement{'s' if len(queued) != 1 else ''} queued behind"
    return text


class _Sources:
    """Which metadata-lock sources a server offers (looked up once per process)."""

    plugin: bool | None = None


async def _query(db: ServiceDatabase, sql: str) -> list[dict[str, str | None]]:
    return (await db.query(sql)).dicts()


async def _locks(db: ServiceDatabase, schema: str, table: str, report: Report) -> list[dict[str, Any]]:
    """(processlist id, lock, status) of the table's metadata locks, from what the server has."""
    locks: list[dict[str, Any]] = []
    where = f"TABLE_SCHEMA = {literal(schema)} AND TABLE_NAME = {literal(table)}"
    if _Sources.plugin is not False:
        try:
            for row in await _query(db, "SELECT THREAD_ID, LOCK_MODE, LOCK_DURATION FROM "
                                        f"information_schema.METADATA_LOCK_INFO WHERE {where}"):
                locks.append({"id": int(row["THREAD_ID"] or 0), "lock": f"{row['LOCK_MODE']} granted",
                              "granted": True, "explicit": "EXPLICIT" in str(row["LOCK_DURATION"])})
            _Sources.plugin = True
            report.exact = True
            report.notes.append("metadata locks: information_schema.METADATA_LOCK_INFO")
        except BackendError as error:
            if error.err.code in (1109, 1146):  # unknown table: the plugin is not loaded
                _Sources.plugin = False
            else:
                report.notes.append(f"METADATA_LOCK_INFO: {error}")
    try:
        enabled = await _query(db, "SELECT ENABLED FROM performance_schema.setup_instruments "
                                   f"WHERE NAME = {literal(MDL_INSTRUMENT)}")
        if enabled and enabled[0]["ENABLED"] == "YES":
            rows = await _query(
                db,
                "SELECT t.PROCESSLIST_ID AS id, m.LOCK_TYPE AS type, m.LOCK_STATUS AS status, "
                "m.LOCK_DURATION AS duration "
                "FROM performance_schema.metadata_locks m JOIN performance_schema.threads t "
                "ON t.THREAD_ID = m.OWNER_THREAD_ID WHERE m.OBJECT_TYPE = 'TABLE' "
                f"AND m.OBJECT_SCHEMA = {literal(schema)} AND m.OBJECT_NAME = {literal(table)}",
            )
            for row in rows:
                if row["id"] is None:
                    continue
                granted = row["status"] == "GRANTED"
                if granted and any(lock["id"] == int(row["id"]) and lock["granted"] for lock in locks):
                    continue
                locks.append({"id": int(row["id"]), "lock": f"{row['type']} {str(row['status']).lower()}",
                              "granted": granted, "explicit": row["duration"] == "EXPLICIT"})
            report.exact = True
            report.notes.append("metadata locks: performance_schema.metadata_locks "
                                "(locks taken before the instrument was enabled are missing)")
        elif not report.exact:
            report.notes.append(
                f"no metadata-lock source: enable the performance_schema instrument {MDL_INSTRUMENT} "
                "or INSTALL SONAME 'metadata_lock_info' to name lock holders exactly"
            )
    except BackendError as error:
        if not report.exact:
            report.notes.append(f"performance_schema unavailable ({error.err.code}); no metadata-lock source")
    return locks


def _ours(process: Mapping[str, Any], service_user: str | None, table: str, explicit: bool = False) -> bool:
    """One of the migrator's own connections: the service account taking table locks, or
    touching its helper tables.  (An application that logs in as the service account
    is reported like any other session.)"""
    if not service_user or process.get("USER") != service_user:
        return False
    info = str(process.get("INFO") or "").lstrip().upper()
    return explicit or info.startswith(("LOCK TABLE", "RENAME TABLE", "ALTER TABLE")) or (
        f"`_{table.lower()}_" in info.lower())


def _mentions(info: str | None, table: str) -> bool:
    if not info:
        return False
    text = info.lower()
    name = table.lower()
    return f"`{name}`" in text or f".{name}" in text or f" {name}" in text


async def collect(
    db: ServiceDatabase,
    schema: str,
    table: str,
    *,
    service_user: str | None = None,
    sessions: Iterable[ClientSession] = (),
) -> Report:
    """The report for ``schema.table`` now (a few reads of the server's status tables)."""
    report = Report(schema, table)
    key = report.key
    clients = {s.backend_id: s for s in sessions if s.backend_id is not None}
    locks = await _locks(db, schema, table, report)
    try:
        transactions = {
            int(row["id"] or 0): row
            for row in await _query(
                db,
                "SELECT trx_mysql_thread_id AS id, TIMESTAMPDIFF(MICROSECOND, trx_started, NOW(6)) / 1e6 AS age, "
                "trx_state AS state, trx_rows_locked AS rows_locked, trx_rows_modified AS rows_modified "
                "FROM information_schema.INNODB_TRX ORDER BY trx_started LIMIT 500",
            )
        }
    except BackendError as error:
        transactions = {}
        report.notes.append(f"INNODB_TRX unavailable: {error}")
    ids = {lock["id"] for lock in locks} | set(clients) | set(transactions)
    id_list = ",".join(str(i) for i in sorted(ids)[:1000]) or "NULL"
    like = literal(f"%{table}%")
    processes: dict[int, dict[str, Any]] = {}
    try:
        for column in ("TIME_MS / 1000", "TIME"):
            try:
                rows = await _query(
                    db,
                    f"SELECT ID, USER, HOST, DB, COMMAND, {column} AS seconds, STATE, LEFT(INFO, 1000) AS INFO "
                    "FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() AND "
                    f"(ID IN ({id_list}) OR STATE LIKE 'Waiting for%metadata lock' OR INFO LIKE {like})",
                )
                break
            except BackendError as error:
                if error.err.code != 1054 or column == "TIME":  # TIME_MS is MariaDB's
                    raise
        processes = {int(row["ID"] or 0): row for row in rows}
    except BackendError as error:
        report.notes.append(f"PROCESSLIST unavailable: {error}")

    rows_by_id: dict[int, dict[str, Any]] = {}

    def add(process_id: int | None, role: str, source: str, lock: str | None = None,
            client: ClientSession | None = None) -> None:
        if process_id is not None and process_id in rows_by_id:
            known = rows_by_id[process_id]
            if ROLE_ORDER[role] < ROLE_ORDER[known["role"]]:
                known["role"] = role
            if lock and not known.get("lock"):
                known["lock"] = lock
            return
        process = processes.get(process_id or -1, {})
        transaction = transactions.get(process_id or -1, {})
        client = client or (clients.get(process_id) if process_id is not None else None)
        age = transaction.get("age")
        row: dict[str, Any] = {
            "table": key,
            "role": role,
            "source": source,
            "processlist_id": process_id,
            "lock": lock,
            "migrator": _ours(process, service_user, table),
            "server_user": process.get("USER"),
            "server_host": process.get("HOST"),
            "command": process.get("COMMAND"),
            "state": process.get("STATE") or None,
            "seconds": round(float(process["seconds"]), 3) if process.get("seconds") is not None else None,
            "statement": process.get("INFO"),
            "transaction_seconds": round(float(age), 3) if age is not None else (
                client.transaction_seconds if client else None),
            "transaction_rows_locked": int(str(transaction["rows_locked"])) if transaction.get("rows_locked") else None,
            "sidecar": client.sidecar if client else None,
            "session_id": client.session_id if client else None,
            "client_user": client.user if client else None,
            "client": client.client if client else None,
            "client_statement": client.statement if client else None,
            "tags": client.tags if client else None,
        }
        rows_by_id[process_id if process_id is not None else -len(rows_by_id) - 1] = row

    for lock in locks:
        process = processes.get(lock["id"], {})
        ours = _ours(process, service_user, table, lock["explicit"])
        if lock["granted"]:
            if not ours:  # the migrator's own lock (an earlier step of its cut-over) is no blocker
                add(lock["id"], "holding", "metadata_locks", lock["lock"])
        else:
            add(lock["id"], "waiting" if ours else "queued", "metadata_locks", lock["lock"])
    for process_id, process in processes.items():
        if not _mentions(process.get("INFO"), table):
            continue
        is_ours = _ours(process, service_user, table)
        if str(process.get("STATE") or "").startswith("Waiting for") and "metadata lock" in str(process.get("STATE")):
            add(process_id, "waiting" if is_ours else "queued", "processlist")
        elif not is_ours and process.get("COMMAND") not in ("Sleep", "Killed", "Daemon"):
            add(process_id, "holding", "processlist", "running a statement on the table")
    for client in clients.values():
        if key in client.touched:
            add(client.backend_id, "holding", "sidecar", "its open transaction touched the table", client)
    if not report.exact:
        waiting_since = max((float(row["seconds"] or 0) for row in rows_by_id.values()
                             if row["role"] == "waiting"), default=0.0)
        candidates = [
            (float(trx["age"] or 0), process_id) for process_id, trx in transactions.items()
            if process_id not in rows_by_id and process_id in processes
            and not _ours(processes[process_id], service_user, table)
            and float(trx["age"] or 0) >= waiting_since
        ]
        for _, process_id in sorted(candidates, reverse=True)[:MAX_CANDIDATES]:
            add(process_id, "may_hold", "innodb_trx", "open transaction (the server does not say which tables)")
    report.rows = sorted(
        rows_by_id.values(),
        key=lambda row: (ROLE_ORDER[row["role"]], -(row.get("transaction_seconds") or row.get("seconds") or 0.0)),
    )
    return report


async def migrator_waits(db: ServiceDatabase, service_user: str, table: str, at_least: float) -> list[dict[str, Any]]:
    """The service account's statements on ``table`` waiting for a metadata lock ≥ ``at_least`` s."""
    rows = await _query(
        db,
        "SELECT ID, TIME_MS / 1000 AS seconds, LEFT(INFO, 300) AS INFO FROM information_schema.PROCESSLIST "
        f"WHERE USER = {literal(service_user)} AND STATE = {literal(MDL_WAIT)} "
        f"AND INFO LIKE {literal('%' + table + '%')}",
    )
    return [row for row in rows if float(row["seconds"] or 0) >= at_least and _mentions(row["INFO"], table)
            and _ours({"USER": service_user, "INFO": row["INFO"]}, service_user, table)]


async def kill_connection(db: ServiceDatabase, process_id: int) -> str | None:
    """``KILL CONNECTION``: ends the session and rolls its transaction back; an error text or None."""
    try:
        await db.query(f"KILL CONNECTION {int(process_id)}")
        return None
    except BackendError as error:
        return str(error)
