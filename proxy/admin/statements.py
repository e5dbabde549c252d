"""Admin statements that change something, parsed into commands.

Pure code: SQL text or a sqlglot expression in, a command dataclass (or an
``AdminError`` saying what is wrong) out.  The session dispatches commands to
``proxy.control``; nothing here talks to the proxy.

The grammar (docs/admin.md has examples)::

    INSERT INTO migrations (schema_name, table_name, alter_statement[, options][, <knob>...])
        VALUES ('db', 't', 'ADD COLUMN c INT'[, 'chunk_size=2000,postpone=1'][, ...])
    UPDATE migrations SET <knob> = <value>[, ...] WHERE id = <n>
    CANCEL MIGRATION <n>
    CUT OVER MIGRATION <n>
    POSTPONE MIGRATION <n>
    THROTTLE MIGRATION <n> ['<reason>']
    UNTHROTTLE MIGRATION <n>

    INSERT INTO rules (id, <setting>...) VALUES (...)[, (...)]   -- staged
    UPDATE rules SET <setting> = <value>[, ...] WHERE id = <n>     -- staged
    DELETE FROM rules WHERE id = <n>                               -- staged
    APPLY RULES | LOAD RULES TO RUNTIME                            -- staged -> live
    DISCARD RULES                                                  -- staged := live
    APPLY RULES TO FLEET ['<note>']          -- staged -> published version -> live everywhere
    LOAD RULES FROM FLEET                    -- the newest published version -> live here
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from proxy.admin.tables import (
    ER_BAD_FIELD_ERROR,
    ER_NONUPDATEABLE_COLUMN,
    ER_NOT_SUPPORTED_YET,
    ER_PARSE_ERROR,
    ER_TABLE_NOT_UPDATABLE,
    ER_UPDATE_WITHOUT_KEY,
    ER_WRONG_VALUE_COUNT,
    ER_WRONG_VALUE_FOR_VAR,
    MIGRATIONS,
    RULES,
    SETTINGS,
    AdminError,
    table_named,
)
from proxy.routing import FIELDS as RULE_FIELDS

ER_NO_DEFAULT_FOR_FIELD = 1364

Value = str | int | bool | None


@dataclass(frozen=True)
class StartMigration:
    schema: str
    table: str
    alter: str
    options: dict[str, str]


@dataclass(frozen=True)
class ChangeMigration:
    """``UPDATE migrations SET ... WHERE id = n``: applied in the order written."""

    migration_id: int
    changes: tuple[tuple[str, Value], ...]


@dataclass(frozen=True)
class MigrationVerb:
    migration_id: int
    #: cancel, cut_over, postpone, throttle or unthrottle
    verb: str
    reason: str | None = None


# ----------------------------------------------------------------------------- verbs

_VERBS = {
    "CANCEL": "cancel",
    "CUT OVER": "cut_over",
    "POSTPONE": "postpone",
    "THROTTLE": "throttle",
    "UNTHROTTLE": "unthrottle",
}
_VERB_START = re.compile(r"\s*(CANCEL|CUT\s+OVER|POSTPONE|THROTTLE|UNTHROTTLE)\b(.*)", re.I | re.S)
_VERB_REST = re.compile(
    r"\s+MIGRATION\s+(\d+)(?:\s+('(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"))?\s*;?\s*",
    re.I | re.S,
)
DEFAULT_THROTTLE_REASON = "throttled from the admin port"


def usage(verb: str) -> str:
    reason = " ['<reason>']" if verb == "THROTTLE" else ""
    return f"{verb} MIGRATION <id>{reason}"


def parse_verb(sql: str) -> MigrationVerb | None:
    """A migration verb statement, or None if ``sql`` is not one."""
    start = _VERB_START.fullmatch(sql)
    if start is None:
        return None
    keyword = re.sub(r"\s+", " ", start.group(1).upper())
    rest = _VERB_REST.fullmatch(start.group(2))
    if rest is None:
        raise AdminError(ER_PARSE_ERROR, f"syntax: {usage(keyword)}")
    literal = rest.group(2)
    if literal is not None and keyword != "THROTTLE":
        raise AdminError(ER_PARSE_ERROR, f"syntax: {usage(keyword)} (only THROTTLE takes a reason)")
    verb = _VERBS[keyword]
    reason = None
    if verb == "throttle":
        reason = _unquote(literal) if literal is not None else DEFAULT_THROTTLE_REASON
        if not reason.strip():
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, "the throttle reason cannot be empty")
    return MigrationVerb(int(rest.group(1)), verb, reason)


def _unquote(literal: str) -> str:
    quote = literal[0]
    body = literal[1:-1].replace(quote * 2, quote)
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "0": "\0"}.get(m.group(1), m.group(1)), body)


# ----------------------------------------------------------------------------- knobs

_LOAD = re.compile(r"\s*\w+\s*=\s*\d+(\.\d+)?\s*(,\s*\w+\s*=\s*\d+(\.\d+)?\s*)*")
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: writable column → option name the migration service takes at start
_START_KNOBS = {
    "chunk_size": "chunk_size",
    "max_load": "max_load",
    "critical_load": "critical_load",
    "max_lag_millis": "max_lag_millis",
    "postponed": "postpone",
}
WRITABLE = tuple(column.name for column in MIGRATIONS.writable)


def knob_value(column: str, value: Value) -> Value:
    """Check a value for a writable column; the service gets it in this form."""
    if column == "throttle":
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, "throttle takes a reason string (or NULL to unthrottle)")
        return value
    if value is None:
        raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"{column} cannot be NULL")
    if column == "postponed":
        flag = _integer(column, value)
        if flag not in (0, 1):
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"postponed takes 0 or 1, not {value!r}")
        return bool(flag)
    if column in ("chunk_size", "max_lag_millis"):
        number = _integer(column, value)
        if number < (1 if column == "chunk_size" else 0):
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"{column} must be {'positive' if column == 'chunk_size' else 'zero or more'}, not {number}")
        return number
    if column in ("max_load", "critical_load"):
        if not isinstance(value, str) or not (value == "" or _LOAD.fullmatch(value)):
            raise AdminError(
                ER_WRONG_VALUE_FOR_VAR,
                f"{column} takes 'Status_variable=N[,Status_variable=N...]' "
                f"(e.g. 'Threads_running=25') or '' for none, not {value!r}",
            )
        return value.replace(" ", "")
    raise AdminError(ER_BAD_FIELD_ERROR, f"Unknown column '{column}'")


def _integer(column: str, value: Value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"{column} takes an integer, not {value!r}")


def option_text(value: Value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def parse_options(text: str) -> dict[str, str]:
    """``'chunk_size=2000,postpone=1'`` → dict.  A value with commas is double-quoted
    (``max_load="Threads_running=25,Threads_connected=500"``); a JSON object works too."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            loaded = json.loads(text)
        except ValueError as error:
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"options: invalid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, "options: a JSON options value must be an object")
        pairs = [(str(k), option_text(v) if not isinstance(v, float) else repr(v)) for k, v in loaded.items()]
    else:
        pairs = []
        for item in _split_options(text):
            name, equals, value = item.partition("=")
            if not equals:
                raise AdminError(
                    ER_WRONG_VALUE_FOR_VAR,
                    f"options: expected name=value pairs separated by commas, got {item.strip()!r}",
                )
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            pairs.append((name.strip(), value))
    options: dict[str, str] = {}
    for name, value in pairs:
        if not _OPTION_NAME.fullmatch(name):
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"options: {name!r} is not an option name")
        name = name.lower()
        if name in options:
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"options: {name} given twice")
        options[name] = value
    return options


def _split_options(text: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise AdminError(ER_WRONG_VALUE_FOR_VAR, "options: unbalanced double quote")
    items.append("".join(current))
    return [item for item in items if item.strip()]


# ----------------------------------------------------------------------------- values


def literal_value(node: exp.Expression, column: str) -> Value:
    """A constant from a VALUES row or a SET; anything computed is refused."""
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Literal):
        if node.is_string:
            return str(node.this)
        text = str(node.this)
        if re.fullmatch(r"\d+", text):
            return int(text)
        return text
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
        text = str(node.this.this)
        return -int(text) if text.isdigit() else "-" + text
    raise AdminError(
        ER_WRONG_VALUE_FOR_VAR,
        f"{column}: expected a constant (string, number or NULL), got {node.sql('mysql')}",
    )


# ----------------------------------------------------------------------------- INSERT

_INSERT_REQUIRED = ("schema_name", "table_name", "alter_statement")
_INSERT_POSITIONAL = (*_INSERT_REQUIRED, "options")
_INSERT_COLUMNS = (*_INSERT_POSITIONAL, *_START_KNOBS)


def _read_only_table(table: str, verb: str) -> AdminError:
    if table == SETTINGS.name:
        return AdminError(
            ER_TABLE_NOT_UPDATABLE,
            "settings are read-only on the admin port: they show the configuration in force; "
            "change the configuration file, environment or flags and restart",
        )
    return AdminError(
        ER_TABLE_NOT_UPDATABLE,
        f"The target table {table} of the {verb} is not updatable: {table} shows live state "
        "(only migrations and rules take INSERT and UPDATE)",
    )


def start_from_insert(statement: exp.Insert) -> StartMigration:
    target = statement.this
    names: list[str] | None = None
    if isinstance(target, exp.Schema):
        names = [identifier.name for identifier in target.expressions]
        target = target.this
    if not isinstance(target, exp.Table):
        raise AdminError(ER_NOT_SUPPORTED_YET, "INSERT needs a table: INSERT INTO migrations (...) VALUES (...)")
    table = table_named(target.name, target.db or None)
    if table is not MIGRATIONS:
        raise _read_only_table(table.name, "INSERT")
    if statement.args.get("conflict") or statement.args.get("overwrite"):
        raise AdminError(ER_NOT_SUPPORTED_YET, "INSERT INTO migrations takes no ON DUPLICATE KEY / REPLACE")
    source = statement.expression
    if not isinstance(source, exp.Values):
        raise AdminError(ER_NOT_SUPPORTED_YET, "INSERT INTO migrations takes VALUES (...), not a query")
    if len(source.expressions) != 1:
        raise AdminError(
            ER_NOT_SUPPORTED_YET,
            f"INSERT INTO migrations starts one migration per statement ({len(source.expressions)} rows given)",
        )
    row = source.expressions[0]
    values = list(row.expressions) if isinstance(row, exp.Tuple) else [row]
    if names is None:
        if len(values) not in (3, 4):
            raise AdminError(
                ER_WRONG_VALUE_COUNT,
                "Column count doesn't match value count at row 1: without a column list, give "
                "(schema_name, table_name, alter_statement[, options])",
            )
        names = list(_INSERT_POSITIONAL[: len(values)])
    elif len(names) != len(values):
        raise AdminError(ER_WRONG_VALUE_COUNT, "Column count doesn't match value count at row 1")
    given: dict[str, Value] = {}
    for raw_name, node in zip(names, values, strict=True):
        name = raw_name.lower()
        if name not in _INSERT_COLUMNS:
            if name in MIGRATIONS.column_names() or name in WRITABLE:
                raise AdminError(
                    ER_NONUPDATEABLE_COLUMN,
                    f"Column '{raw_name}' cannot be set by INSERT: it is set by the migration "
                    f"(insertable: {', '.join(_INSERT_COLUMNS)})",
                )
            raise AdminError(
                ER_BAD_FIELD_ERROR,
                f"Unknown column '{raw_name}' in INSERT INTO migrations; "
                f"insertable columns: {', '.join(_INSERT_COLUMNS)}",
            )
        if name in given:
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"Column '{name}' given twice")
        given[name] = literal_value(node, name)
    texts: dict[str, str] = {}
    for name in _INSERT_REQUIRED:
        value = given.get(name)
        if value is None:
            raise AdminError(ER_NO_DEFAULT_FOR_FIELD, f"Field '{name}' doesn't have a default value: "
                             "INSERT INTO migrations needs schema_name, table_name and alter_statement")
        if not isinstance(value, str) or not value.strip():
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"{name} takes a non-empty string")
        texts[name] = value.strip()
    raw_options = given.get("options")
    if raw_options is not None and not isinstance(raw_options, str):
        raise AdminError(ER_WRONG_VALUE_FOR_VAR, "options takes a string like 'chunk_size=2000,postpone=1'")
    options = parse_options(raw_options or "")
    for column, option in _START_KNOBS.items():
        if column in given:
            if option in options:
                raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"{option} given both as a column and in options")
            options[option] = option_text(knob_value(column, given[column]))
    return StartMigration(texts["schema_name"], texts["table_name"], texts["alter_statement"], options)


# ----------------------------------------------------------------------------- UPDATE


def change_from_update(statement: exp.Update, readable: list[str]) -> ChangeMigration:
    """``readable``: the migrations columns SELECT shows now (to tell read-only from unknown)."""
    target = statement.this
    if not isinstance(target, exp.Table):
        raise AdminError(ER_NOT_SUPPORTED_YET, "UPDATE takes one table: UPDATE migrations SET ... WHERE id = <n>")
    table = table_named(target.name, target.db or None)
    if table is not MIGRATIONS:
        raise _read_only_table(table.name, "UPDATE")
    for unsupported in ("from", "joins", "order", "limit", "returning"):
        if statement.args.get(unsupported):
            raise AdminError(ER_NOT_SUPPORTED_YET, "UPDATE migrations takes only SET ... WHERE id = <n>")
    changes: list[tuple[str, Value]] = []
    for assignment in statement.expressions:
        if not isinstance(assignment, exp.EQ) or not isinstance(assignment.this, exp.Column):
            raise AdminError(ER_PARSE_ERROR, f"expected column = value, got {assignment.sql('mysql')}")
        name = assignment.this.name.lower()
        if name not in WRITABLE:
            if name in {column.lower() for column in readable}:
                raise AdminError(
                    ER_NONUPDATEABLE_COLUMN,
                    f"Column '{assignment.this.name}' is read-only; writable columns: {', '.join(WRITABLE)} "
                    "(and CANCEL / CUT OVER MIGRATION <id>)",
                )
            raise AdminError(
                ER_BAD_FIELD_ERROR,
                f"Unknown column '{assignment.this.name}' in table migrations; writable columns: "
                f"{', '.join(WRITABLE)}",
            )
        if any(name == done for done, _ in changes):
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"Column '{name}' set twice")
        changes.append((name, knob_value(name, literal_value(assignment.expression, name))))
    return ChangeMigration(_where_id(statement), tuple(changes))


def _where_id(statement: exp.Update) -> int:
    where = statement.args.get("where")
    condition = where.this if isinstance(where, exp.Where) else None
    while isinstance(condition, exp.Paren):
        condition = condition.this
    if isinstance(condition, exp.EQ):
        for column, value in ((condition.this, condition.expression), (condition.expression, condition.this)):
            if (
                isinstance(column, exp.Column)
                and column.name.lower() == "id"
                and isinstance(value, exp.Literal)
                and not value.is_string
                and str(value.this).isdigit()
            ):
                return int(str(value.this))
    raise AdminError(
        ER_UPDATE_WITHOUT_KEY,
        "UPDATE migrations needs WHERE id = <n>: one migration at a time, by id "
        "(SELECT id, table_name, phase FROM migrations)",
    )


def refuse(statement: exp.Expression) -> AdminError:
    """The error for any statement the admin port does not run."""
    if isinstance(statement, exp.Delete):
        target = statement.this
        name = target.name if isinstance(target, exp.Table) else ""
        if name.lower() == MIGRATIONS.name:
            return AdminError(ER_NOT_SUPPORTED_YET, "DELETE FROM migrations is not supported: "
                              "stop a migration with CANCEL MIGRATION <id>")
        if name.lower() == RULES.name:
            return AdminError(ER_NOT_SUPPORTED_YET, "DELETE FROM rules takes WHERE id = <n>")
        if name:
            table = table_named(name, target.db or None)
            return _read_only_table(table.name, "DELETE")
    kind = statement.key.upper() if statement.key else type(statement).__name__.upper()
    if isinstance(statement, exp.Command):
        kind = str(statement.this).upper()
    return AdminError(
        ER_NOT_SUPPORTED_YET,
        f"{kind} is not supported on the admin port: it takes SELECT/SHOW on its tables, "
        "INSERT INTO migrations, UPDATE migrations ... WHERE id = <n>, "
        "CANCEL | CUT OVER | POSTPONE | THROTTLE | UNTHROTTLE MIGRATION <id>, "
        "INSERT/UPDATE/DELETE on rules, APPLY | DISCARD RULES, APPLY RULES TO FLEET and "
        "LOAD RULES FROM FLEET (see docs/admin.md)",
    )


def describe(value: Any) -> str:
    """A value as an OK packet's info text shows it."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class StageRules:
    rows: tuple[dict[str, Value], ...]


@dataclass(frozen=True)
class ChangeRule:
    rule_id: int
    changes: dict[str, Value]


@dataclass(frozen=True)
class DeleteRule:
    rule_id: int


@dataclass(frozen=True)
class RulesVerb:
    verb: str  # apply, discard, publish (APPLY RULES TO FLEET) or load_fleet (LOAD RULES FROM FLEET)
    note: str | None = None


_RULES_VERB = re.compile(
    r"\s*(?:(APPLY)\s+RULES|(DISCARD)\s+RULES|LOAD\s+(?:MYSQL\s+QUERY\s+)?RULES\s+TO\s+RUNTIME)\s*;?\s*",
    re.I,
)
_FLEET_VERB = re.compile(r"\s*(APPLY\s+RULES\s+TO|LOAD\s+RULES\s+FROM)\s+FLEET\b(.*)", re.I | re.S)
_FLEET_NOTE = re.compile(r"\s*(?:('(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"))?\s*;?\s*", re.S)


def parse_rules_verb(sql: str) -> RulesVerb | None:
    fleet = _FLEET_VERB.fullmatch(sql)
    if fleet is not None:
        publish = fleet.group(1).upper().startswith("APPLY")
        rest = _FLEET_NOTE.fullmatch(fleet.group(2))
        if rest is None or (rest.group(1) is not None and not publish):
            raise AdminError(ER_PARSE_ERROR, "syntax: APPLY RULES TO FLEET ['<note>'] | LOAD RULES FROM FLEET")
        note = _unquote(rest.group(1)).strip() if rest.group(1) is not None else None
        return RulesVerb("publish" if publish else "load_fleet", note or None)
    match = _RULES_VERB.fullmatch(sql)
    if match is None:
        return None
    return RulesVerb("discard" if match.group(2) else "apply")


def target_table(statement: exp.Expression) -> str | None:
    """Lower-case name of the table an INSERT/UPDATE/DELETE writes to, if plain."""
    target = statement.this
    if isinstance(target, exp.Schema):
        target = target.this
    return target.name.lower() if isinstance(target, exp.Table) else None


_RULE_WRITABLE = tuple(name for name in RULE_FIELDS)


def _rule_column(raw_name: str) -> str:
    name = raw_name.lower()
    if name not in _RULE_WRITABLE:
        if name in RULES.column_names():
            raise AdminError(ER_NONUPDATEABLE_COLUMN, f"Column '{raw_name}' is shown, not set; rules take: "
                             f"{', '.join(_RULE_WRITABLE)}")
        raise AdminError(ER_BAD_FIELD_ERROR, f"Unknown column '{raw_name}' in table rules; rules take: "
                         f"{', '.join(_RULE_WRITABLE)}")
    return name


def rules_from_insert(statement: exp.Insert) -> StageRules:
    target = statement.this
    if not isinstance(target, exp.Schema):
        raise AdminError(ER_WRONG_VALUE_COUNT, "INSERT INTO rules needs a column list: "
                         "INSERT INTO rules (id, match, route) VALUES (10, '^SELECT', 'replica')")
    names = [_rule_column(identifier.name) for identifier in target.expressions]
    if len(set(names)) != len(names):
        raise AdminError(ER_WRONG_VALUE_FOR_VAR, "a column is given twice")
    if "id" not in names:
        raise AdminError(ER_NO_DEFAULT_FOR_FIELD, "Field 'id' doesn't have a default value: every rule needs an id "
                         "(rules run in ascending id order)")
    if statement.args.get("conflict") or statement.args.get("overwrite"):
        raise AdminError(ER_NOT_SUPPORTED_YET, "INSERT INTO rules takes no ON DUPLICATE KEY / REPLACE")
    source = statement.expression
    if not isinstance(source, exp.Values):
        raise AdminError(ER_NOT_SUPPORTED_YET, "INSERT INTO rules takes VALUES (...), not a query")
    rows = []
    for number, row in enumerate(source.expressions, start=1):
        values = list(row.expressions) if isinstance(row, exp.Tuple) else [row]
        if len(values) != len(names):
            raise AdminError(ER_WRONG_VALUE_COUNT, f"Column count doesn't match value count at row {number}")
        rows.append({name: literal_value(node, name) for name, node in zip(names, values, strict=True)})
    return StageRules(tuple(rows))


def _rule_id(statement: exp.Update | exp.Delete, verb: str) -> int:
    try:
        return _where_id(statement)  # type: ignore[arg-type]
    except AdminError:
        raise AdminError(ER_UPDATE_WITHOUT_KEY, f"{verb} rules needs WHERE id = <n>: one rule at a time") from None


def rule_change_from_update(statement: exp.Update) -> ChangeRule:
    for unsupported in ("from", "joins", "order", "limit", "returning"):
        if statement.args.get(unsupported):
            raise AdminError(ER_NOT_SUPPORTED_YET, "UPDATE rules takes only SET ... WHERE id = <n>")
    changes: dict[str, Value] = {}
    for assignment in statement.expressions:
        if not isinstance(assignment, exp.EQ) or not isinstance(assignment.this, exp.Column):
            raise AdminError(ER_PARSE_ERROR, f"expected column = value, got {assignment.sql('mysql')}")
        name = _rule_column(assignment.this.name)
        if name in changes:
            raise AdminError(ER_WRONG_VALUE_FOR_VAR, f"Column '{name}' set twice")
        changes[name] = literal_value(assignment.expression, name)
    return ChangeRule(_rule_id(statement, "UPDATE"), changes)


def rule_delete(statement: exp.Delete) -> DeleteRule:
    return DeleteRule(_rule_id(statement, "DELETE"))
