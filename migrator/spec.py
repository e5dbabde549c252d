"""The requested change, validated before anything touches the server.

A :class:`MigrationSpec` is immutable: the connection, the table, the ALTER
clause and every tuning knob.  ``parse_alter`` reads just enough of the ALTER
text to know about column renames and forbidden clauses; the real effect of
the change is observed on the ghost table by the inspector, not guessed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from migrator.db import ConnectionSettings


class SpecError(ValueError):
    """The request itself is invalid (before any server is consulted)."""


class OldTablePolicy(StrEnum):
    KEEP = "keep"  # rename to _<t>_del and leave it
    DROP = "drop"  # drop it after a successful cut-over


@dataclass(frozen=True)
class LoadThreshold:
    """``Threads_running=25``: a global status variable and its limit."""

    variable: str
    limit: float

    @classmethod
    def parse_list(cls, text: str) -> tuple[LoadThreshold, ...]:
        out: list[LoadThreshold] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
                raise SpecError(f"bad load threshold {part!r}; expected Variable=number")
            try:
                out.append(cls(name.strip(), float(value)))
            except ValueError as error:
                raise SpecError(f"bad load threshold {part!r}: {value!r} is not a number") from error
        return tuple(out)


@dataclass(frozen=True)
class AlterFacts:
    """What the ALTER text says about columns (renames) — parsed, not executed."""

    clause: str
    renames: dict[str, str] = field(default_factory=dict)  # old name -> new name


_IDENT = r"(?:`(?:[^`]|``)+`|[A-Za-z0-9_$]+)"
_CHANGE = re.compile(rf"\bCHANGE\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?({_IDENT})\s+({_IDENT})", re.I)
_RENAME_COLUMN = re.compile(
    rf"\bRENAME\s+COLUMN\s+(?:IF\s+EXISTS\s+)?({_IDENT})\s+TO\s+({_IDENT})", re.I
)
_RENAME_TABLE = re.compile(r"\bRENAME\s+(?:TO|AS)\b|\bRENAME\s+(?!COLUMN|INDEX|KEY)" + _IDENT, re.I)
_LEADING_ALTER = re.compile(rf"^\s*ALTER\s+(?:ONLINE\s+|IGNORE\s+)*TABLE\s+{_IDENT}(?:\.{_IDENT})?\s*", re.I)
_FORBIDDEN = re.compile(r"\b(ALGORITHM|LOCK)\s*=", re.I)


def _unquote(ident: str) -> str:
    if ident.startswith("`"):
        return ident[1:-1].replace("``", "`")
    return ident


def _strip_literals(text: str) -> str:
    """Blank out quoted strings and comments so keywords inside them do not count."""
    return re.sub(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"|/\*.*?\*/|--[^\n]*|#[^\n]*", "''", text, flags=re.S)


def parse_alter(text: str) -> AlterFacts:
    clause = _LEADING_ALTER.sub("", text.strip()).rstrip().rstrip(";").strip()
    if not clause:
        raise SpecError("--alter is empty; give the ALTER clause, e.g. \"ADD COLUMN c INT\"")
    bare = _strip_literals(clause)
    if ";" in bare:
        raise SpecError("--alter must be a single ALTER clause (found ';')")
    if _RENAME_TABLE.search(bare):
        raise SpecError("--alter may not rename the table itself; the migrator owns the final rename")
    if _FORBIDDEN.search(bare):
        raise SpecError("--alter may not set ALGORITHM= or LOCK=; the migrator chooses them")
    renames: dict[str, str] = {}
    for pattern in (_CHANGE, _RENAME_COLUMN):
        for match in pattern.finditer(bare):
            old, new = _unquote(match.group(1)), _unquote(match.group(2))
            if old.lower() != new.lower():
                renames[old] = new
    return AlterFacts(clause=clause, renames=renames)


@dataclass(frozen=True)
class MigrationSpec:
    connection: ConnectionSettings
    database: str
    table: str
    alter: str
    execute: bool = False
    chunk_size: int = 1000
    chunk_time: float = 0.1
    min_chunk_size: int = 100
    max_chunk_size: int = 100_000
    max_load: tuple[LoadThreshold, ...] = ()
    critical_load: tuple[LoadThreshold, ...] = ()
    critical_load_hibernate_seconds: float = 0.0  # 0: abort on critical load
    max_lag_millis: int = 1500
    replicas: tuple[ConnectionSettings, ...] = ()
    throttle_flag_file: Path | None = None
    postpone_cut_over_flag_file: Path | None = None
    panic_flag_file: Path | None = None
    cut_over_lock_timeout_seconds: float = 3.0
    cut_over_max_attempts: int = 60
    default_retries: int = 60
    exact_rowcount: bool = False
    attempt_instant_ddl: bool = True
    #: build the ghost's plain secondary indexes after the copy (sorted, once) instead of row by row
    defer_secondary_indexes: bool = True
    checksum: bool = True
    resume: bool = False
    old_table: OldTablePolicy = OldTablePolicy.KEEP
    drop_leftovers: bool = False
    approve_renamed_columns: bool = False
    approve_lossy_changes: bool = False
    state_schema: str = "_tidegate"
    status_interval: float = 5.0
    heartbeat_interval: float = 0.1
    flag_poll_interval: float = 0.25
    checkpoint_interval: float = 1.0  # seconds between copy checkpoints (a resume re-copies at most this)
    checksum_workers: int = 1  # sessions comparing ranges in the same snapshot
    copy_sessions: int = 1  # sessions copying consecutive chunks at once
    checksum_chunk_time: float = 0.25  # target seconds per compared range
    #: verify copied ranges behind the copy this often (seconds; 0: only after the copy)
    checksum_behind_copy_interval: float = 0.5
    #: with secondary indexes built after the copy: the share of the table (by the row
    #: estimate) verified while they are built, not behind the copy (0: all behind the copy)
    checksum_during_index_build: float = 0.0
    checksum_repair_rounds: int = 2  # re-sync + re-compare rounds for ranges hit by the commit-visibility race
    checksum_repair_limit: int = 1000  # more differing keys than this fails at once
    converge_keys: int = 500  # re-verify changed keys in fresh snapshots until at most this many are left
    converge_rounds: int = 3

    def __post_init__(self) -> None:
        for name, value in (("--database", self.database), ("--table", self.table)):
            if not value:
                raise SpecError(f"{name} is required")
            if "`" in value or "\x00" in value:
                raise SpecError(f"{name} {value!r} contains a forbidden character")
        if len(self.table) > 58:
            raise SpecError("--table name too long for _<table>_gho helper tables (max 58 chars)")
        if self.chunk_size < 1 or self.min_chunk_size < 1 or self.max_chunk_size < self.min_chunk_size:
            raise SpecError("chunk sizes must be positive and min <= max")
        if self.chunk_time <= 0:
            raise SpecError("--chunk-time must be positive")
        if self.cut_over_lock_timeout_seconds <= 0:
            raise SpecError("--cut-over-lock-timeout-seconds must be positive")
        if self.copy_sessions < 1 or self.copy_sessions > 8:
            raise SpecError("--copy-sessions must be between 1 and 8")
        if self.checksum_workers < 1 or self.checksum_workers > 16:
            raise SpecError("--checksum-workers must be between 1 and 16")
        if self.checksum_behind_copy_interval < 0:
            raise SpecError("--checksum-behind-copy-interval must be 0 (off) or positive")
        if not 0 <= self.checksum_during_index_build <= 1:
            raise SpecError("--checksum-during-index-build must be a share between 0 and 1")
        if self.checkpoint_interval <= 0 or self.checksum_chunk_time <= 0:
            raise SpecError("intervals must be positive")
        if self.default_retries < 0:
            raise SpecError("--default-retries must be >= 0")
        parse_alter(self.alter)  # raises SpecError

    @property
    def alter_facts(self) -> AlterFacts:
        return parse_alter(self.alter)

    @property
    def ghost_table(self) -> str:
        return f"_{self.table}_gho"

    @property
    def changelog_table(self) -> str:
        return f"_{self.table}_ghc"

    @property
    def old_table_name(self) -> str:
        return f"_{self.table}_del"

    def trigger_names(self) -> tuple[str, str, str]:
        base = f"_{self.table}"[:50]
        return (f"{base}_tg_ins", f"{base}_tg_upd", f"{base}_tg_del")

    @property
    def settings(self) -> ConnectionSettings:
        return self.connection.with_database(self.database)
