"""Read-only questions to the server: schema, binlog settings, privileges, keys.

Nothing here writes.  ``plan_migration`` compares the original table with the
ghost table (created by the runner with the change applied) and either returns
a :class:`Plan` or raises :class:`Refusal` saying why and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pymysql

from migrator.db import Connection, gtid_position_sql, is_mariadb, qualified, version_tuple
from migrator.spec import MigrationSpec


class Refusal(Exception):
    """Preflight says no.  ``reason`` is a stable code; the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Column:
    name: str
    column_type: str  # full COLUMN_TYPE, e.g. "int(10) unsigned"
    data_type: str  # DATA_TYPE, e.g. "int"
    nullable: bool
    charset: str | None
    generated: bool

    @property
    def textual(self) -> bool:
        return self.charset is not None


@dataclass(frozen=True)
class Key:
    name: str
    columns: tuple[str, ...]
    unique: bool
    primary: bool
    prefixed: bool  # some column uses only a prefix: not usable as a migration key


@dataclass(frozen=True)
class TableSchema:
    schema: str
    name: str
    columns: tuple[Column, ...]
    keys: tuple[Key, ...]
    charset: str
    create_sql: str
    triggers: tuple[str, ...] = ()
    foreign_keys: tuple[str, ...] = ()

    def column(self, name: str) -> Column | None:
        lowered = name.lower()
        for column in self.columns:
            if column.name.lower() == lowered:
                return column
        return None

    def unique_keys(self) -> list[Key]:
        """PRIMARY first, then non-null full unique keys, in index order."""
        keys = [k for k in self.keys if k.unique and not k.prefixed]
        usable = [
            k for k in keys
            if k.primary or all(not (c := self.column(n)) or not c.nullable for n in k.columns)
        ]
        return sorted(usable, key=lambda k: not k.primary)


@dataclass(frozen=True)
class ServerFacts:
    version: str
    mariadb: bool
    log_bin: bool
    binlog_format: str
    binlog_row_image: str
    binlog_row_metadata: str | None
    gtid_binlog_pos: str
    server_id: int
    read_only: bool
    gtid_mode: str = "ON"


@dataclass(frozen=True)
class ColumnChange:
    source: str
    target: str
    old_type: str
    new_type: str
    lossy: bool
    why: str = ""


@dataclass(frozen=True)
class Plan:
    """What the migration will do.  Printed by the dry run."""

    source_columns: tuple[str, ...]  # expressions read from the original, in order
    target_columns: tuple[str, ...]  # ghost columns written, same order
    key_columns: tuple[str, ...]  # names in the original
    ghost_key_columns: tuple[str, ...]  # same columns in the ghost
    key_name: str
    dropped: tuple[str, ...]
    added: tuple[str, ...]
    renamed: dict[str, str]
    changes: tuple[ColumnChange, ...]
    # per shared column: (orig column, ghost column) compared by the checksum
    compared: tuple[tuple[Column, Column], ...] = field(default_factory=tuple)

    def describe(self) -> list[str]:
        lines = [f"migration key: {self.key_name} ({', '.join(self.key_columns)})"]
        for source, target in zip(self.source_columns, self.target_columns, strict=True):
            arrow = "=" if source == target else "->"
            lines.append(f"  column {source} {arrow} {target}")
        for name in self.added:
            lines.append(f"  column (new) {name}")
        for name in self.dropped:
            lines.append(f"  column {name} dropped")
        for change in self.changes:
            tag = "LOSSY" if change.lossy else "widening"
            lines.append(
                f"  type {change.source}: {change.old_type} -> {change.new_type} ({tag}{': ' + change.why if change.why else ''})"
            )
        return lines


async def server_facts(connection: Connection) -> ServerFacts:
    rows = await connection.query(
        "SELECT @@version, @@log_bin, @@binlog_format, @@binlog_row_image, "
        "@@binlog_row_metadata, @@server_id, @@read_only"
    )
    version, log_bin, binlog_format, row_image, metadata, server_id, read_only = rows[0]
    mariadb = is_mariadb(str(version))
    (gtid,) = (await connection.query(gtid_position_sql(mariadb)))[0]
    # every MariaDB transaction has a GTID; MySQL may run without them
    gtid_mode = "ON" if mariadb else (await connection.query("SELECT @@GLOBAL.gtid_mode"))[0][0]
    return ServerFacts(
        version=str(version),
        mariadb=mariadb,
        log_bin=bool(int(log_bin)),
        binlog_format=str(binlog_format).upper(),
        binlog_row_image=str(row_image).upper(),
        binlog_row_metadata=str(metadata).upper() if metadata else None,
        gtid_binlog_pos=str(gtid or ""),
        server_id=int(server_id),
        read_only=bool(int(read_only)),
        gtid_mode=str(gtid_mode).upper(),
    )


#: MySQL 8.0.13 renames write-locked tables (the standalone cut-over); 8.0.17 has
#: CAST(… AS DOUBLE) (the checksum of a FLOAT widened to DOUBLE).
MYSQL_MINIMUM = (8, 0, 17)


def check_binlog(facts: ServerFacts) -> None:
    if not facts.mariadb and version_tuple(facts.version) < MYSQL_MINIMUM:
        raise Refusal(
            "unsupported-server",
            f"server {facts.version} is too old: MySQL 8.0.17 or later (RENAME TABLE under "
            "LOCK TABLES for the atomic cut-over, CAST AS DOUBLE for the checksum) is needed",
        )
    if facts.read_only:
        raise Refusal("read-only", "the server is read_only; point --host/--dsn at the primary")
    if not facts.log_bin:
        raise Refusal("binlog-off", "binary logging is off; start the server with --log-bin")
    if facts.binlog_format != "ROW":
        raise Refusal(
            "binlog-format",
            f"binlog_format is {facts.binlog_format}; set it to ROW "
            "(SET GLOBAL binlog_format=ROW, and in the server config)",
        )
    if facts.binlog_row_image != "FULL":
        raise Refusal(
            "binlog-row-image",
            f"binlog_row_image is {facts.binlog_row_image}; set it to FULL",
        )
    if facts.binlog_row_metadata != "FULL":
        raise Refusal(
            "binlog-row-metadata",
            f"binlog_row_metadata is {facts.binlog_row_metadata}; it must be FULL so the "
            "binlog carries column names and signedness (SET GLOBAL binlog_row_metadata=FULL)",
        )
    if facts.gtid_mode != "ON":
        raise Refusal(
            "gtid-mode",
            f"gtid_mode is {facts.gtid_mode}; the binlog reader starts and resumes from GTIDs: "
            "set enforce_gtid_consistency=ON and gtid_mode=ON (stepping through "
            "OFF_PERMISSIVE and ON_PERMISSIVE)",
        )


def required_global(mariadb: bool) -> tuple[str, ...]:
    """Global privileges for reading the binlog: MariaDB 10.5 split REPLICATION CLIENT."""
    return ("REPLICATION SLAVE", "BINLOG MONITOR") if mariadb else ("REPLICATION SLAVE", "REPLICATION CLIENT")


REQUIRED_ON_SCHEMA = ("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "LOCK TABLES", "TRIGGER")


async def check_privileges(connection: Connection, schema: str, state_schema: str) -> None:
    """Refuse when the current user lacks a privilege the migration needs."""
    rows = await connection.query(
        "SELECT PRIVILEGE_TYPE, 'global', '' FROM information_schema.USER_PRIVILEGES "
        "WHERE GRANTEE = CONCAT(\"'\", SUBSTRING_INDEX(CURRENT_USER(), '@', 1), \"'@'\", "
        "SUBSTRING_INDEX(CURRENT_USER(), '@', -1), \"'\") "
        "UNION ALL SELECT PRIVILEGE_TYPE, 'schema', TABLE_SCHEMA FROM information_schema.SCHEMA_PRIVILEGES "
        "WHERE GRANTEE = CONCAT(\"'\", SUBSTRING_INDEX(CURRENT_USER(), '@', 1), \"'@'\", "
        "SUBSTRING_INDEX(CURRENT_USER(), '@', -1), \"'\")"
    )
    global_privileges = {str(r[0]).upper() for r in rows if r[1] == "global"}
    schema_privileges: dict[str, set[str]] = {}
    for privilege, scope, name in rows:
        if scope == "schema":
            schema_privileges.setdefault(_unescape_schema_pattern(str(name)), set()).add(str(privilege).upper())

    def has(privilege: str, on_schema: str | None) -> bool:
        if privilege in global_privileges or "ALL PRIVILEGES" in global_privileges:
            return True
        if on_schema is None:
            return False
        for pattern, granted in schema_privileges.items():
            if _schema_matches(pattern, on_schema) and (privilege in granted or "ALL PRIVILEGES" in granted):
                return True
        return False

    missing = [p for p in required_global(connection.mariadb) if not has(p, None)]
    missing += [f"{p} ON `{schema}`.*" for p in REQUIRED_ON_SCHEMA if not has(p, schema)]
    missing += [
        f"{p} ON `{state_schema}`.*"
        for p in ("SELECT", "INSERT", "UPDATE", "CREATE")
        if not has(p, state_schema)
    ]
    if missing:
        raise Refusal(
            "privileges",
            "the migration user lacks: " + ", ".join(missing)
            + ". Grant them (GRANT ... TO the user) and run again.",
        )


def _unescape_schema_pattern(pattern: str) -> str:
    return pattern


def _schema_matches(pattern: str, schema: str) -> bool:
    regex = ""
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            regex += re.escape(pattern[index + 1])
            index += 2
            continue
        regex += ".*" if char == "%" else "." if char == "_" else re.escape(char)
        index += 1
    return re.fullmatch(regex, schema, flags=re.I) is not None


async def table_exists(connection: Connection, schema: str, table: str) -> bool:
    rows = await connection.query(
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (schema, table),
    )
    return bool(rows)


async def table_comment(connection: Connection, schema: str, table: str) -> str | None:
    rows = await connection.query(
        "SELECT TABLE_COMMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (schema, table),
    )
    return str(rows[0][0]) if rows else None


async def read_table(connection: Connection, schema: str, table: str) -> TableSchema:
    def work(cursor: Any) -> TableSchema:
        cursor.execute(
            "SELECT TABLE_COLLATION, TABLE_TYPE FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (schema, table),
        )
        found = cursor.fetchall()
        if not found:
            raise Refusal("no-such-table", f"table `{schema}`.`{table}` does not exist")
        collation, table_type = found[0]
        if str(table_type).upper() != "BASE TABLE":
            raise Refusal("not-a-table", f"`{schema}`.`{table}` is a {table_type}, not a base table")
        cursor.execute(
            "SELECT CHARACTER_SET_NAME FROM information_schema.COLLATIONS WHERE COLLATION_NAME = %s",
            (collation,),
        )
        charset_rows = cursor.fetchall()
        charset = str(charset_rows[0][0]) if charset_rows else "utf8mb4"
        cursor.execute(
            "SELECT COLUMN_NAME, COLUMN_TYPE, DATA_TYPE, IS_NULLABLE, CHARACTER_SET_NAME, "
            "EXTRA, GENERATION_EXPRESSION FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (schema, table),
        )
        columns = tuple(
            Column(
                name=str(name),
                column_type=str(column_type).lower(),
                data_type=str(data_type).lower(),
                nullable=str(nullable).upper() == "YES",
                charset=str(cs) if cs else None,
                generated=bool(expr) or "GENERATED" in str(extra).upper() or "VIRTUAL" in str(extra).upper(),
            )
            for name, column_type, data_type, nullable, cs, extra, expr in cursor.fetchall()
        )
        cursor.execute(
            "SELECT INDEX_NAME, NON_UNIQUE, COLUMN_NAME, SUB_PART FROM information_schema.STATISTICS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY INDEX_NAME, SEQ_IN_INDEX",
            (schema, table),
        )
        grouped: dict[str, list[tuple[int, str, Any]]] = {}
        for index_name, non_unique, column_name, sub_part in cursor.fetchall():
            grouped.setdefault(str(index_name), []).append((int(non_unique), str(column_name), sub_part))
        keys = tuple(
            Key(
                name=name,
                columns=tuple(c for _, c, _ in parts),
                unique=parts[0][0] == 0,
                primary=name == "PRIMARY",
                prefixed=any(sub is not None for _, _, sub in parts),
            )
            for name, parts in grouped.items()
        )
        cursor.execute(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS "
            "WHERE EVENT_OBJECT_SCHEMA = %s AND EVENT_OBJECT_TABLE = %s",
            (schema, table),
        )
        triggers = tuple(str(r[0]) for r in cursor.fetchall())
        foreign_keys = _foreign_keys(cursor, schema, table)
        cursor.execute(f"SHOW CREATE TABLE {qualified(schema, table)}")
        create_sql = str(cursor.fetchall()[0][1])
        return TableSchema(
            schema=schema,
            name=table,
            columns=columns,
            keys=keys,
            charset=charset,
            create_sql=create_sql,
            triggers=triggers,
            foreign_keys=foreign_keys,
        )

    return await connection.run(work)


async def estimate_rows(connection: Connection, schema: str, table: str, exact: bool) -> int:
    if exact:
        rows = await connection.query(f"SELECT COUNT(*) FROM {qualified(schema, table)}")
    else:
        rows = await connection.query(
            "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (schema, table),
        )
    return int(rows[0][0] or 0) if rows else 0


def check_table(original: TableSchema) -> None:
    if original.triggers:
        raise Refusal(
            "triggers",
            f"`{original.name}` has triggers ({', '.join(original.triggers)}); the migrator "
            "does not carry triggers to the new table. Drop them for the migration and recreate after.",
        )
    if original.foreign_keys:
        raise Refusal(
            "foreign-keys",
            f"`{original.name}` takes part in foreign keys ({', '.join(original.foreign_keys)}); "
            "a rename would leave children pointing at the old table. Drop the constraints first.",
        )
    if not original.unique_keys():
        raise Refusal(
            "no-unique-key",
            f"`{original.name}` has no PRIMARY KEY or NOT NULL UNIQUE key; add one first "
            "(the migrator copies and applies changes by that key)",
        )


# -- type widening -------------------------------------------------------------

_INT_RANK = {"tinyint": 1, "smallint": 2, "mediumint": 3, "int": 4, "integer": 4, "bigint": 5}
_TEXT_RANK = {"tinytext": 255, "text": 65535, "mediumtext": 16777215, "longtext": 4294967295}
_BLOB_RANK = {"tinyblob": 255, "blob": 65535, "mediumblob": 16777215, "longblob": 4294967295}
_CHARSET_BYTES = {"ascii": 1, "latin1": 1, "utf8mb3": 3, "utf8": 3, "utf8mb4": 4}
_CHARSET_SUPERSETS = {"ascii": {"latin1", "utf8mb3", "utf8", "utf8mb4"}, "utf8mb3": {"utf8mb4"}, "utf8": {"utf8mb4"}, "latin1": {"utf8mb4", "utf8mb3", "utf8"}}


def _length(column_type: str) -> int | None:
    match = re.search(r"\((\d+)\)", column_type)
    return int(match.group(1)) if match else None


def _decimal(column_type: str) -> tuple[int, int] | None:
    match = re.search(r"\((\d+)\s*,\s*(\d+)\)", column_type)
    if match:
        return int(match.group(1)), int(match.group(2))
    length = _length(column_type)
    return (length, 0) if length is not None else (10, 0)


def _enum_values(column_type: str) -> list[str]:
    return re.findall(r"'((?:[^']|'')*)'", column_type)


def _charset_ok(old: Column, new: Column) -> bool:
    if old.charset == new.charset or (old.charset is None and new.charset is None):
        return True
    if old.charset is None or new.charset is None:
        return False
    return new.charset in _CHARSET_SUPERSETS.get(old.charset, set())


def classify_change(old: Column, new: Column) -> tuple[bool, str]:
    """(lossy, why) for a column kept by the change."""
    if old.nullable and not new.nullable:
        return True, "NULL values are not allowed any more"
    if old.column_type == new.column_type:
        return (False, "") if _charset_ok(old, new) else (True, f"charset {old.charset} -> {new.charset}")
    o, n = old.data_type, new.data_type
    if o in _INT_RANK and n in _INT_RANK:
        old_unsigned, new_unsigned = "unsigned" in old.column_type, "unsigned" in new.column_type
        if old_unsigned == new_unsigned and _INT_RANK[n] >= _INT_RANK[o]:
            return False, ""
        if old_unsigned and not new_unsigned and _INT_RANK[n] > _INT_RANK[o]:
            return False, ""
        return True, "integer range shrinks or changes sign"
    if o in ("varchar", "char") and n in ("varchar", "char", *_TEXT_RANK):
        if not _charset_ok(old, new):
            return True, f"charset {old.charset} -> {new.charset}"
        old_len = _length(old.column_type) or 0
        new_len = _length(new.column_type) if n in ("varchar", "char") else _TEXT_RANK[n] // _CHARSET_BYTES.get(new.charset or "utf8mb4", 4)
        if o == "varchar" and n == "char":
            return True, "VARCHAR -> CHAR strips trailing spaces"
        return (False, "") if (new_len or 0) >= old_len else (True, "shorter")
    if o in _TEXT_RANK and n in _TEXT_RANK:
        if not _charset_ok(old, new):
            return True, f"charset {old.charset} -> {new.charset}"
        return (False, "") if _TEXT_RANK[n] >= _TEXT_RANK[o] else (True, "shorter")
    if o in ("varbinary", "binary") and n in ("varbinary", *_BLOB_RANK):
        return (False, "") if (_length(new.column_type) or 1 << 32) >= (_length(old.column_type) or 0) else (True, "shorter")
    if o in _BLOB_RANK and n in _BLOB_RANK:
        return (False, "") if _BLOB_RANK[n] >= _BLOB_RANK[o] else (True, "shorter")
    if o == "decimal" and n == "decimal":
        (op, os_), (np_, ns) = _decimal(old.column_type) or (10, 0), _decimal(new.column_type) or (10, 0)
        return (False, "") if ns >= os_ and np_ - ns >= op - os_ else (True, "precision shrinks")
    if o == "float" and n == "double":
        return False, ""
    if o in ("enum", "set") and n == o:
        old_values, new_values = _enum_values(old.column_type), _enum_values(new.column_type)
        if new_values[: len(old_values)] == old_values and _charset_ok(old, new):
            return False, ""
        return True, "labels removed or reordered"
    if o == n and o in ("datetime", "timestamp", "time"):
        return (False, "") if (_length(new.column_type) or 0) >= (_length(old.column_type) or 0) else (True, "fractional seconds shrink")
    return True, f"{old.column_type} -> {new.column_type} may not hold every value"


def plan_migration(spec: MigrationSpec, original: TableSchema, ghost: TableSchema) -> Plan:
    """Map columns and pick the migration key; refuse unsafe changes."""
    facts = spec.alter_facts
    renames = {old.lower(): new for old, new in facts.renames.items()}
    if renames and not spec.approve_renamed_columns:
        listing = ", ".join(f"{old} -> {new}" for old, new in facts.renames.items())
        raise Refusal(
            "renamed-columns",
            f"the change renames columns ({listing}); data will be copied from the old name to "
            "the new one. If that is what you want, pass --approve-renamed-columns.",
        )
    sources: list[str] = []
    targets: list[str] = []
    compared: list[tuple[Column, Column]] = []
    changes: list[ColumnChange] = []
    dropped: list[str] = []
    mapped_targets: set[str] = set()
    for column in original.columns:
        target_name = renames.get(column.name.lower(), column.name)
        target = ghost.column(target_name)
        if target is None:
            dropped.append(column.name)
            continue
        if target.generated:
            mapped_targets.add(target.name.lower())
            continue
        sources.append(column.name)
        targets.append(target.name)
        mapped_targets.add(target.name.lower())
        lossy, why = classify_change(column, target)
        if column.column_type != target.column_type or column.nullable != target.nullable or lossy:
            changes.append(ColumnChange(column.name, target.name, column.column_type, target.column_type, lossy, why))
        if not lossy and not column.generated:
            compared.append((column, target))
    added = [c.name for c in ghost.columns if c.name.lower() not in mapped_targets]
    lossy_changes = [c for c in changes if c.lossy]
    if lossy_changes and not spec.approve_lossy_changes:
        listing = "; ".join(f"{c.source}: {c.old_type} -> {c.new_type} ({c.why})" for c in lossy_changes)
        raise Refusal(
            "lossy-change",
            f"the change may lose data: {listing}. If every existing value fits, pass "
            "--approve-lossy-changes (the copy runs in strict mode and fails on a value that does not fit).",
        )
    if not sources:
        raise Refusal("no-shared-columns", "the old and new table share no columns")
    ghost_unique = {tuple(c.lower() for c in k.columns): k for k in ghost.unique_keys()}
    changed_sources = {c.source.lower() for c in changes}
    for key in original.unique_keys():
        if any(ghost.column(renames.get(c.lower(), c)) is None for c in key.columns):
            continue
        ghost_columns = tuple(renames.get(c.lower(), c) for c in key.columns)
        if tuple(c.lower() for c in ghost_columns) not in ghost_unique:
            continue
        if any(c.lower() in changed_sources for c in key.columns):
            continue
        if any((col := original.column(c)) is not None and col.generated for c in key.columns):
            continue
        # Canonical spelling of the names as the tables have them.
        key_columns = tuple(original.column(c).name for c in key.columns)  # type: ignore[union-attr]
        ghost_key = tuple(ghost.column(c).name for c in ghost_columns)  # type: ignore[union-attr]
        return Plan(
            source_columns=tuple(sources),
            target_columns=tuple(targets),
            key_columns=key_columns,
            ghost_key_columns=ghost_key,
            key_name=key.name,
            dropped=tuple(dropped),
            added=tuple(added),
            renamed=dict(facts.renames),
            changes=tuple(changes),
            compared=tuple(compared),
        )
    raise Refusal(
        "no-shared-unique-key",
        "the old and new table share no PRIMARY KEY or NOT NULL UNIQUE key over unchanged "
        "columns; keep one such key unchanged through the migration",
    )


_PLAIN_KEY_LINE = re.compile(r"^\s*(KEY `((?:[^`]|``)+)` \(.*?),?$")


def plain_secondary_keys(create_table: str) -> list[tuple[str, str]]:
    """``(name, definition)`` of each plain (non-unique, B-tree) secondary index.

    Taken from ``SHOW CREATE TABLE`` as the server prints them (prefix
    lengths, order, comments, IGNORED/INVISIBLE), so that adding a definition
    back gives the same index.  UNIQUE keys are not plain: the ghost needs
    them while rows arrive.  FULLTEXT and SPATIAL keys are not either.
    """
    keys: list[tuple[str, str]] = []
    for line in create_table.splitlines():
        match = _PLAIN_KEY_LINE.match(line)
        if match:
            keys.append((match.group(2).replace("``", "`"), match.group(1)))
    return keys


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+")


def _foreign_keys(cursor: Any, schema: str, table: str) -> tuple[str, ...]:
    """Names of the foreign keys on ``schema.table`` and of those that reference it.

    Without opening every table on the server: the table's own constraints by
    information_schema's schema/table lookup, the referencing ones from
    InnoDB's dictionary (``INNODB_SYS_FOREIGN``, names as ``db/table``).  An
    information_schema query that must consider every schema opens every
    table and view definition (slow with many tables; and the scan is where
    MariaDB 10.11.19 crashed in our tests).  Only where that dictionary table
    cannot be read (no PROCESS privilege) or the names need filename encoding
    is the full scan used.
    """
    cursor.execute(
        "SELECT CONSTRAINT_NAME FROM information_schema.REFERENTIAL_CONSTRAINTS "
        "WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s",
        (schema, table),
    )
    names = [str(r[0]) for r in cursor.fetchall()]
    referencing: list[str] | None = None
    if _PLAIN_NAME.fullmatch(schema) and _PLAIN_NAME.fullmatch(table):
        try:
            cursor.execute(
                "SELECT ID FROM information_schema.INNODB_SYS_FOREIGN WHERE REF_NAME = %s AND FOR_NAME <> %s",
                (f"{schema}/{table}", f"{schema}/{table}"),
            )
            referencing = [str(r[0]).split("/", 1)[-1] for r in cursor.fetchall()]
        except pymysql.err.MySQLError:
            referencing = None
    if referencing is None:
        cursor.execute(
            "SELECT CONSTRAINT_NAME FROM information_schema.REFERENTIAL_CONSTRAINTS "
            "WHERE UNIQUE_CONSTRAINT_SCHEMA = %s AND REFERENCED_TABLE_NAME = %s "
            "AND NOT (CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s)",
            (schema, table, schema, table),
        )
        referencing = [str(r[0]) for r in cursor.fetchall()]
    return tuple(dict.fromkeys([*names, *referencing]))
