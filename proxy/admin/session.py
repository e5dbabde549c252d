"""One admin client's session: admin SQL in, ``proxy.control`` calls out.

mysql-mimic runs it on asyncio (inside trio, through trio-asyncio); every
call into the proxy crosses back into trio with ``trio_as_aio`` so it sees
the proxy's state from trio's side.  Bad input never escapes as a traceback:
everything a statement can raise becomes a ``MysqlError`` with a MySQL code
and a message that says what is wrong.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlglot.errors
import trio_asyncio
from mysql_mimic import ResultColumn, Session
from mysql_mimic.errors import MysqlError
from mysql_mimic.types import ColumnType
from mysql_mimic.variables import SessionVariables, Variables
from sqlglot import exp

from proxy.admin.statements import (
    ChangeMigration,
    MigrationVerb,
    RulesVerb,
    StartMigration,
    change_from_update,
    describe,
    option_text,
    parse_rules_verb,
    parse_verb,
    refuse,
    rule_change_from_update,
    rule_delete,
    rules_from_insert,
    start_from_insert,
    target_table,
)
from proxy.admin.tables import (
    ER_BAD_DB_ERROR,
    ER_PARSE_ERROR,
    ER_UNKNOWN_ERROR,
    ER_WRONG_VALUE_FOR_VAR,
    MIGRATIONS,
    SCHEMA_NAME,
    TABLES,
    AdminError,
    Row,
    info_schema,
    referenced_tables,
    run_select,
)
from proxy.control import Control, ControlError
from proxy.routing import RuleError

log = logging.getLogger("tidegate.admin")

_SHOW_WARNINGS = re.compile(r"\s*SHOW\s+(COUNT\s*\(\s*\*\s*\)\s+)?WARNINGS", re.I)
_FINISHED = ("complete", "failed", "cancelled")

T = TypeVar("T")

DATABASES = (SCHEMA_NAME, "information_schema")

#: tables whose rows come from the migration service (may be disabled)
_SERVICE_TABLES = ("migrations", "sidecars")
#: tables whose rows come from the state schema's fleet rules (proxy.fleet.FleetRules)
_FLEET_RULE_READERS = {
    "fleet_rules": "published_rules",
    "fleet_rule_versions": "versions",
    "sidecar_rules": "sidecar_rows",
}
_NO_FLEET = ("fleet rules need the state schema: this sidecar has no service account (a DSN with user) "
             "or migrations_enabled is false")


@dataclass(frozen=True)
class Outcome:
    """What the OK packet of a statement that changed something reports."""

    affected_rows: int = 0
    last_insert_id: int = 0
    info: str = ""
    #: also the answer to SHOW WARNINGS until the next statement
    warnings: tuple[str, ...] = ()


class AdminSession(Session):  # type: ignore[misc]
    database: str | None

    def __init__(self, control: Control, global_variables: Variables) -> None:
        super().__init__(SessionVariables(global_variables))
        self.control = control
        self.outcome: Outcome | None = None
        self.warnings: tuple[str, ...] = ()
        self.last_insert_id = 0
        self.middlewares.insert(0, self._last_insert_id_middleware)

    # -- mysql-mimic hooks ---------------------------------------------------

    async def init(self, connection: Any) -> None:
        await super().init(connection)
        if self.database is None or self.database.lower() not in DATABASES:
            self.database = SCHEMA_NAME

    async def use(self, database: str) -> None:
        if database.lower() not in DATABASES:
            raise MysqlError(
                f"Unknown database '{database}': the admin port has {' and '.join(DATABASES)}",
                ER_BAD_DB_ERROR,
            )
        self.database = database.lower()

    async def schema(self) -> dict[str, Any]:
        live: dict[str, list[str]] = {}
        for name in ("holds", *_SERVICE_TABLES):
            try:
                rows = await self._rows(name)
            except ControlError:
                continue
            live[name] = TABLES[name].column_names(rows)
        return info_schema(live)

    async def handle_query(self, sql: str, attrs: dict[str, str]) -> Any:
        self.outcome = None
        if not _SHOW_WARNINGS.match(sql):
            self.warnings = ()
        try:
            verb = parse_verb(sql)
            if verb is not None:
                await self._run_verb(verb)
                return None
            rules_verb = parse_rules_verb(sql)
            if rules_verb is not None:
                await self._rules_verb(rules_verb)
                return None
            return await super().handle_query(sql, attrs)
        except MysqlError:
            raise
        except RuleError as error:
            raise MysqlError(str(error), ER_WRONG_VALUE_FOR_VAR) from None
        except AdminError as error:
            raise MysqlError(error.message, error.code) from None
        except ControlError as error:
            raise MysqlError(str(error), ER_UNKNOWN_ERROR) from None
        except sqlglot.errors.ParseError as error:
            raise MysqlError(_syntax_message(error), ER_PARSE_ERROR) from None
        except sqlglot.errors.SqlglotError as error:
            raise MysqlError(f"cannot run this statement: {_first_line(error)}", ER_UNKNOWN_ERROR) from None
        except Exception as error:
            log.exception("admin statement failed: %s", sql)
            raise MysqlError(f"internal error ({type(error).__name__}): {error}", ER_UNKNOWN_ERROR) from None

    async def query(self, expression: exp.Expression, sql: str, attrs: dict[str, str]) -> Any:
        if isinstance(expression, exp.Query):
            return await self._select(expression)
        if isinstance(expression, exp.Insert | exp.Update | exp.Delete) and target_table(expression) == "rules":
            return await self._edit_rules(expression)
        if isinstance(expression, exp.Insert):
            return await self._start(start_from_insert(expression))
        if isinstance(expression, exp.Update):
            readable = MIGRATIONS.column_names()
            try:
                readable = MIGRATIONS.column_names(await self._rows("migrations"))
            except ControlError:
                pass
            return await self._change(change_from_update(expression, readable))
        raise refuse(expression)

    def _show_warnings(self, show: Any) -> Any:
        return [("Warning", ER_UNKNOWN_ERROR, text) for text in self.warnings], ["Level", "Code", "Message"]

    def _finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.warnings = outcome.warnings

    # -- reads ---------------------------------------------------------------

    async def _rows(self, table: str) -> list[Row]:
        control = self.control
        readers: dict[str, Callable[[], Awaitable[list[dict[str, Any]]]]] = {
            "migrations": control.migrations,
            "sidecars": control.sidecars,
            "blockers": control.blockers,
        }
        reader = readers.get(table)
        if reader is None and table in _FLEET_RULE_READERS:
            reader = getattr(self._fleet_rules(), _FLEET_RULE_READERS[table])
        if reader is None:
            method: Callable[[], list[dict[str, Any]]] = getattr(control, table)

            async def read() -> list[dict[str, Any]]:
                return method()

            reader = read
        return list(await self._in_trio(reader))

    async def _select(self, query: exp.Expression) -> Any:
        tables = referenced_tables(query)
        rows = {table.name: await self._rows(table.name) for table in tables}
        result = run_select(query, rows)
        columns = [
            ResultColumn(name=name, type=ColumnType[kind])
            for name, kind in zip(result.columns, result.types, strict=True)
        ]
        return result.rows, columns

    # -- commands ------------------------------------------------------------

    async def _in_trio(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        result: T = await trio_asyncio.trio_as_aio(function)(*args)
        return result

    async def _start(self, start: StartMigration) -> None:
        migration_id = await self._in_trio(
            self.control.start_migration, start.schema, start.table, start.alter, start.options
        )
        self.last_insert_id = migration_id
        self._finish(Outcome(
            affected_rows=1,
            last_insert_id=migration_id,
            info=f"migration {migration_id} requested for {start.schema}.{start.table}; "
            f"follow it with SELECT * FROM migrations WHERE id = {migration_id}",
        ))

    async def _change(self, change: ChangeMigration) -> None:
        done: list[str] = []
        for column, value in change.changes:
            text = f"{column}={describe(value)}"
            try:
                if column == "throttle":
                    assert value is None or isinstance(value, str)
                    await self._in_trio(self.control.throttle, change.migration_id, value)
                elif column == "postponed":
                    await self._in_trio(self.control.postpone, change.migration_id, bool(value))
                else:
                    await self._in_trio(
                        self.control.set_option, change.migration_id, column, option_text(value)
                    )
            except ControlError as error:
                if not done:
                    raise
                # Earlier changes were accepted: say which, so nobody assumes all or none.
                raise ControlError(
                    f"{error} (setting {text}; already accepted for migration "
                    f"{change.migration_id}: {', '.join(done)})"
                ) from None
            done.append(text)
        self._finish(await self._effect(change.migration_id, ", ".join(done)))

    # -- rules ---------------------------------------------------------------

    _NOT_LIVE = "staged, NOT live: APPLY RULES makes the staged rules live (DISCARD RULES drops the changes)"

    async def _edit_rules(self, expression: exp.Expression) -> None:
        control = self.control
        if isinstance(expression, exp.Insert):
            stage = rules_from_insert(expression)

            async def insert() -> list[int]:
                return control.stage_rules([dict(row) for row in stage.rows])

            ids = await self._in_trio(insert)
            what = f"rule{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} added"
            count = len(ids)
        elif isinstance(expression, exp.Update):
            change = rule_change_from_update(expression)

            async def update() -> int:
                return control.change_rule(change.rule_id, dict(change.changes))

            rule_id = await self._in_trio(update)
            what, count = f"rule {rule_id} changed", 1
        else:
            assert isinstance(expression, exp.Delete)
            delete = rule_delete(expression)

            async def remove() -> None:
                control.delete_rule(delete.rule_id)

            await self._in_trio(remove)
            what, count = f"rule {delete.rule_id} deleted", 1
        note = f"{what}: {self._NOT_LIVE}"
        self._finish(Outcome(affected_rows=count, info=note, warnings=(note,)))

    def _fleet_rules(self) -> Any:
        fleet_rules = getattr(self.control.app, "fleet_rules", None)
        if fleet_rules is None:
            raise ControlError(_NO_FLEET)
        return fleet_rules

    async def _rules_verb(self, verb: RulesVerb) -> None:
        control = self.control
        if verb.verb in ("publish", "load_fleet"):
            await self._fleet_verb(verb)
            return
        if verb.verb == "discard":

            async def discard() -> None:
                control.discard_rules()

            await self._in_trio(discard)
            self._finish(Outcome(info="staged rule changes discarded: staged = live"))
            return

        async def apply() -> tuple[int, int]:
            return control.apply_rules()

        try:
            total, active = await self._in_trio(apply)
        except RuleError as error:
            raise MysqlError(
                f"rules not applied, the live rules are unchanged: {error}", ER_WRONG_VALUE_FOR_VAR
            ) from None
        info = f"{total} rules live ({active} active)"
        router = getattr(control.app, "router", None)
        if router is not None and router.fleet_latest is not None:
            note = (f"{info} on this sidecar only: it now diverges from fleet rule version {router.fleet_latest} "
                    "(APPLY RULES TO FLEET publishes to every sidecar; LOAD RULES FROM FLEET goes back)")
            self._finish(Outcome(affected_rows=total, info=note, warnings=(note,)))
            return
        self._finish(Outcome(affected_rows=total, info=info))

    async def _fleet_verb(self, verb: RulesVerb) -> None:
        fleet_rules = self._fleet_rules()
        warnings: tuple[str, ...] = ()
        try:
            if verb.verb == "publish":
                version, rules, problems = await self._in_trio(fleet_rules.publish, verb.note)
                warnings = tuple(problems)
                info = (f"fleet rule version {version} published: {len(rules.specs)} rules ({len(rules)} active), "
                        "live here now; every sidecar loads it within a heartbeat (SELECT * FROM sidecar_rules)")
            else:
                version, rules = await self._in_trio(fleet_rules.load_latest)
                info = f"fleet rule version {version} live here: {len(rules.specs)} rules ({len(rules)} active)"
        except RuleError as error:
            what = "rules not published, nothing changed" if verb.verb == "publish" else "rules unchanged"
            raise MysqlError(f"{what}: {error}", ER_WRONG_VALUE_FOR_VAR) from None
        if warnings:
            info += f"; {len(warnings)} warning(s): SHOW WARNINGS"
        self._finish(Outcome(affected_rows=len(rules.specs), info=info, warnings=warnings))

    async def _run_verb(self, verb: MigrationVerb) -> None:
        control, migration_id = self.control, verb.migration_id
        info: str
        if verb.verb == "cancel":
            await self._in_trio(control.cancel, migration_id)
            info = "cancel requested"
        elif verb.verb == "cut_over":
            await self._in_trio(control.cut_over, migration_id)
            info = "cut-over allowed now (postpone lifted)"
        elif verb.verb == "postpone":
            await self._in_trio(control.postpone, migration_id, True)
            info = "cut-over postponed until CUT OVER MIGRATION"
        elif verb.verb == "throttle":
            await self._in_trio(control.throttle, migration_id, verb.reason)
            info = f"throttled: {verb.reason}"
        else:
            await self._in_trio(control.throttle, migration_id, None)
            info = "admin throttle lifted"
        self._finish(await self._effect(migration_id, info))

    async def _effect(self, migration_id: int, what: str) -> Outcome:
        """Say whether a command is in force now or only recorded for another sidecar.

        The service applies a command at once to a migration this sidecar
        leads; otherwise it leaves it on the migration's row for the leader
        (or for whoever starts it).  An operator must not mistake the second
        for the first: the OK text says which, and a recorded command is a
        warning too.
        """

        async def led_here() -> bool:
            running = getattr(self.control.app.migrations, "running", None)
            return isinstance(running, Mapping) and migration_id in running

        if await self._in_trio(led_here):
            return Outcome(affected_rows=1, info=f"migration {migration_id}: {what}: in force now (led by this sidecar)")
        row: Row = {}
        try:
            row = next((r for r in await self._rows("migrations") if r.get("id") == migration_id), {})
        except ControlError:
            pass
        state, leader = row.get("state"), row.get("leader")
        if state in _FINISHED:
            return Outcome(affected_rows=1, info=f"migration {migration_id}: {what}: it is {state} now")
        if state == "pending" or not leader:
            note = (f"migration {migration_id}: {what}: recorded, not in force yet: the migration has not "
                    "started; it takes effect when a sidecar starts leading it")
        else:
            note = (f"migration {migration_id}: {what}: recorded, not in force yet: sidecar {leader} leads it "
                    "and applies it at its next poll")
        return Outcome(affected_rows=1, info=note, warnings=(note,))

    # -- middleware ----------------------------------------------------------

    async def _last_insert_id_middleware(self, q: Any) -> Any:
        """``SELECT LAST_INSERT_ID()``: the id of this session's last INSERT INTO migrations."""

        def replace(node: exp.Expression) -> exp.Expression:
            if isinstance(node, exp.Anonymous) and str(node.this).upper() == "LAST_INSERT_ID":
                return exp.Literal.number(self.last_insert_id)
            return node

        q.expression = q.expression.transform(replace)
        return await q.next()


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _syntax_message(error: sqlglot.errors.ParseError) -> str:
    if error.errors:
        first = error.errors[0]
        near = f"{first.get('highlight') or ''}{first.get('end_context') or ''}".strip()
        return (
            f"You have an error in your admin SQL syntax: {first.get('description')} "
            f"near '{near[:60]}' at line {first.get('line')}, column {first.get('col')}"
        )
    return f"You have an error in your admin SQL syntax: {_first_line(error)}"
