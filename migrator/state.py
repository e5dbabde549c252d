"""Migration phase (enum + legal transitions) and checkpoints, kept in ``_tidegate``.

One owner: :class:`MigrationState` is the only thing that changes a
migration's phase.  Every transition is checked against ``TRANSITIONS``,
logged, counted, and written to the database so that another process can
resume (``--resume``) or observe it.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from migrator.db import Connection, quote

log = logging.getLogger("tidegate.migrator.state")


class Phase(StrEnum):
    PENDING = "pending"
    VALIDATING = "validating"
    COPYING = "copying"
    VERIFYING = "verifying"
    READY = "ready"
    POSTPONED = "postponed"
    CUTTING_OVER = "cutting_over"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMPLETE, Phase.FAILED, Phase.CANCELLED)


_ENDINGS = (Phase.FAILED, Phase.CANCELLED)
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.VALIDATING, *_ENDINGS}),
    Phase.VALIDATING: frozenset({Phase.COPYING, Phase.COMPLETE, *_ENDINGS}),
    Phase.COPYING: frozenset({Phase.VERIFYING, *_ENDINGS}),
    Phase.VERIFYING: frozenset({Phase.READY, Phase.COPYING, *_ENDINGS}),
    Phase.READY: frozenset({Phase.POSTPONED, Phase.CUTTING_OVER, Phase.VERIFYING, *_ENDINGS}),
    Phase.POSTPONED: frozenset({Phase.READY, *_ENDINGS}),
    Phase.CUTTING_OVER: frozenset({Phase.COMPLETE, Phase.READY, *_ENDINGS}),
    Phase.COMPLETE: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
}

#: Where a resumed process re-enters the story.
RESUMABLE = frozenset({Phase.VALIDATING, Phase.COPYING, Phase.VERIFYING, Phase.READY, Phase.POSTPONED, Phase.CUTTING_OVER})

#: Process-wide transition counts, for metrics.
transition_counts: Counter[tuple[str, str]] = Counter()


class IllegalTransition(RuntimeError):
    pass


def check_transition(current: Phase, target: Phase) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal migration transition {current.value} -> {target.value}")


# -- key values in checkpoints -----------------------------------------------------


def encode_key(values: tuple[Any, ...] | None) -> str | None:
    if values is None:
        return None
    return json.dumps([_encode_value(v) for v in values])


def decode_key(text: str | None) -> tuple[Any, ...] | None:
    if text is None:
        return None
    return tuple(_decode_value(v) for v in json.loads(text))


def _encode_value(value: Any) -> list[Any]:
    if value is None:
        return ["n", None]
    if isinstance(value, bool):
        return ["i", int(value)]
    if isinstance(value, int):
        return ["i", value]
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, bytes | bytearray):
        return ["b", base64.b64encode(bytes(value)).decode()]
    if isinstance(value, decimal.Decimal):
        return ["d", str(value)]
    if isinstance(value, float):
        return ["f", repr(value)]
    if isinstance(value, dt.datetime):
        return ["dt", value.isoformat()]
    if isinstance(value, dt.date):
        return ["da", value.isoformat()]
    if isinstance(value, dt.timedelta):
        return ["td", value.total_seconds()]
    raise TypeError(f"cannot checkpoint a key value of type {type(value).__name__}")


def _decode_value(item: list[Any]) -> Any:
    tag, value = item
    decoders: dict[str, Any] = {
        "n": lambda v: None,
        "i": int,
        "s": str,
        "b": lambda v: base64.b64decode(v),
        "d": decimal.Decimal,
        "f": float,
        "dt": dt.datetime.fromisoformat,
        "da": dt.date.fromisoformat,
        "td": lambda v: dt.timedelta(seconds=v),
    }
    return decoders[tag](value)


# -- persistence ---------------------------------------------------------------------


def schema_statements(state_schema: str) -> list[str]:
    s = quote(state_schema)
    return [
        f"CREATE DATABASE IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.migrations (
            id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            schema_name VARCHAR(64) NOT NULL,
            table_name VARCHAR(64) NOT NULL,
            alter_text TEXT NOT NULL,
            phase VARCHAR(32) NOT NULL,
            options JSON NULL,
            copy_watermark TEXT NULL,
            copy_upper TEXT NULL,
            binlog_gtid VARCHAR(1024) NULL,
            rows_copied BIGINT UNSIGNED NOT NULL DEFAULT 0,
            rows_estimate BIGINT UNSIGNED NOT NULL DEFAULT 0,
            cut_over_attempts INT UNSIGNED NOT NULL DEFAULT 0,
            message TEXT NULL,
            created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
            updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
            KEY by_table (schema_name, table_name, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
        f"""CREATE TABLE IF NOT EXISTS {s}.transitions (
            id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            migration_id BIGINT UNSIGNED NOT NULL,
            from_phase VARCHAR(32) NOT NULL,
            to_phase VARCHAR(32) NOT NULL,
            message TEXT NULL,
            at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
            KEY by_migration (migration_id, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
        f"""CREATE TABLE IF NOT EXISTS {s}.schema_versions (
            id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            schema_name VARCHAR(64) NOT NULL,
            table_name VARCHAR(64) NOT NULL,
            version_hash CHAR(64) NOT NULL,
            definition MEDIUMTEXT NOT NULL,
            alter_text TEXT NULL,
            migration_id BIGINT UNSIGNED NULL,
            applied_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
            KEY by_table (schema_name, table_name, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    ]


@dataclass
class Checkpoint:
    copy_watermark: tuple[Any, ...] | None = None  # last key copied (inclusive)
    copy_upper: tuple[Any, ...] | None = None  # last key the copy must reach
    binlog_gtid: str | None = None  # every change up to here is in the ghost
    rows_copied: int = 0


@dataclass
class MigrationRecord:
    id: int
    schema_name: str
    table_name: str
    alter_text: str
    phase: Phase
    checkpoint: Checkpoint
    rows_estimate: int
    message: str | None
    #: the migration's options as recorded when it started
    options: dict[str, Any] = field(default_factory=dict)


class MigrationState:
    """The one owner of a migration's phase and checkpoint."""

    def __init__(self, connection: Connection, state_schema: str, record: MigrationRecord) -> None:
        self._connection = connection
        self._schema = quote(state_schema)
        self.record = record
        self.listeners: list[Any] = []

    @property
    def phase(self) -> Phase:
        return self.record.phase

    @property
    def id(self) -> int:
        return self.record.id

    @classmethod
    async def ensure_schema(cls, connection: Connection, state_schema: str) -> None:
        await connection.execute_many([(sql, None) for sql in schema_statements(state_schema)])

    @classmethod
    async def create(
        cls, connection: Connection, state_schema: str, schema: str, table: str, alter: str, options: dict[str, Any]
    ) -> MigrationState:
        s = quote(state_schema)

        def work(cursor: Any) -> int:
            cursor.execute(
                f"INSERT INTO {s}.migrations (schema_name, table_name, alter_text, phase, options) "
                "VALUES (%s, %s, %s, %s, %s)",
                (schema, table, alter, Phase.PENDING.value, json.dumps(options, default=str)),
            )
            return int(cursor.lastrowid)

        migration_id = await connection.run(work)
        record = MigrationRecord(migration_id, schema, table, alter, Phase.PENDING, Checkpoint(), 0, None, dict(options))
        return cls(connection, state_schema, record)

    @classmethod
    async def latest(cls, connection: Connection, state_schema: str, schema: str, table: str) -> MigrationState | None:
        s = quote(state_schema)
        rows = await connection.query(
            f"SELECT id, alter_text, phase, copy_watermark, copy_upper, binlog_gtid, rows_copied, "
            f"rows_estimate, message, options FROM {s}.migrations WHERE schema_name = %s AND table_name = %s "
            "ORDER BY id DESC LIMIT 1",
            (schema, table),
        )
        if not rows:
            return None
        mid, alter, phase, watermark, upper, gtid, copied, estimate, message, options = rows[0]
        try:
            recorded = json.loads(options) if options else {}
        except ValueError:
            recorded = {}
        record = MigrationRecord(
            int(mid), schema, table, str(alter), Phase(str(phase)),
            Checkpoint(decode_key(watermark), decode_key(upper), gtid, int(copied)),
            int(estimate), message, recorded if isinstance(recorded, dict) else {},
        )
        return cls(connection, state_schema, record)

    async def transition(self, target: Phase, message: str | None = None) -> None:
        current = self.record.phase
        check_transition(current, target)
        await self._connection.execute_many(
            [
                (
                    f"UPDATE {self._schema}.migrations SET phase = %s, message = COALESCE(%s, message) WHERE id = %s",
                    (target.value, message, self.record.id),
                ),
                (
                    f"INSERT INTO {self._schema}.transitions (migration_id, from_phase, to_phase, message) "
                    "VALUES (%s, %s, %s, %s)",
                    (self.record.id, current.value, target.value, message),
                ),
            ]
        )
        self.record.phase = target
        if message is not None:
            self.record.message = message
        transition_counts[(current.value, target.value)] += 1
        log.info("migration %d: %s -> %s%s", self.record.id, current.value, target.value, f" ({message})" if message else "")
        for listener in self.listeners:
            listener(current, target, message)

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        await self._connection.execute(
            f"UPDATE {self._schema}.migrations SET copy_watermark = %s, copy_upper = %s, "
            "binlog_gtid = %s, rows_copied = %s WHERE id = %s",
            (
                encode_key(checkpoint.copy_watermark),
                encode_key(checkpoint.copy_upper),
                checkpoint.binlog_gtid,
                checkpoint.rows_copied,
                self.record.id,
            ),
        )
        self.record.checkpoint = checkpoint

    async def save_estimate(self, rows: int) -> None:
        await self._connection.execute(
            f"UPDATE {self._schema}.migrations SET rows_estimate = %s WHERE id = %s", (rows, self.record.id)
        )
        self.record.rows_estimate = rows

    async def count_cut_over_attempt(self) -> None:
        await self._connection.execute(
            f"UPDATE {self._schema}.migrations SET cut_over_attempts = cut_over_attempts + 1 WHERE id = %s",
            (self.record.id,),
        )


# -- schema versions ---------------------------------------------------------------


def normalize_definition(create_sql: str) -> str:
    """SHOW CREATE TABLE without the parts that change on their own."""
    import re

    text = re.sub(r"\s+AUTO_INCREMENT=\d+", "", create_sql)
    lines = text.splitlines()
    if lines:
        lines[0] = re.sub(r"CREATE TABLE `[^`]*`", "CREATE TABLE `t`", lines[0])
    return "\n".join(lines)


def definition_hash(create_sql: str) -> str:
    return hashlib.sha256(normalize_definition(create_sql).encode()).hexdigest()


async def record_schema_version(
    connection: Connection, state_schema: str, schema: str, table: str, create_sql: str, alter: str | None, migration_id: int | None
) -> str:
    version = definition_hash(create_sql)
    await connection.execute(
        f"INSERT INTO {quote(state_schema)}.schema_versions "
        "(schema_name, table_name, version_hash, definition, alter_text, migration_id) VALUES (%s, %s, %s, %s, %s, %s)",
        (schema, table, version, normalize_definition(create_sql), alter, migration_id),
    )
    return version
