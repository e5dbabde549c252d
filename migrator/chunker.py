"""Keyset chunks over the migration key, sized toward a target time.

Pure: builds predicates and decides the next chunk size; the copier runs them.
Composite keys use the expanded form ``a > x OR (a = x AND b > y)``, which
MariaDB turns into an index range (row-constructor comparisons it may not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from migrator.db import quote

KeyValues = tuple[Any, ...]


def compare(columns: Sequence[str], operator: str, alias: str = "") -> str:
    """SQL for ``(columns) <operator> (%s, …)`` in expanded form; operator in > >= < <=."""
    if operator not in (">", ">=", "<", "<="):
        raise ValueError(operator)
    strict = operator[0]
    prefix = f"{alias}." if alias else ""
    names = [prefix + quote(c) for c in columns]
    terms: list[str] = []
    for index in range(len(names)):
        parts = [f"{names[i]} = %s" for i in range(index)]
        last = operator if index == len(names) - 1 else strict
        parts.append(f"{names[index]} {last} %s")
        terms.append("(" + " AND ".join(parts) + ")")
    return "(" + " OR ".join(terms) + ")"


def compare_args(values: KeyValues) -> list[Any]:
    """Arguments matching :func:`compare`'s placeholders."""
    args: list[Any] = []
    for index in range(len(values)):
        args.extend(values[: index + 1])
    return args


def key_in(columns: Sequence[str], count: int, alias: str = "") -> str:
    """``key IN (…)`` for ``count`` key tuples (args: flattened tuples)."""
    prefix = f"{alias}." if alias else ""
    if len(columns) == 1:
        return f"{prefix}{quote(columns[0])} IN ({', '.join(['%s'] * count)})"
    one = "(" + " AND ".join(f"{prefix}{quote(c)} = %s" for c in columns) + ")"
    return "(" + " OR ".join([one] * count) + ")"


@dataclass(frozen=True)
class Chunk:
    lower: KeyValues | None  # exclusive; None = from the start
    upper: KeyValues  # inclusive


@dataclass
class ChunkSizer:
    """Row count per chunk, sized toward ``target_seconds`` from the measured rate.

    Like pt-online-schema-change's ``--chunk-time``: the next size is the rate
    of the last chunk times the target, so the first few chunks reach the
    target at once instead of doubling toward it.  Steps are bounded (8 times up,
    a quarter down) so that one fast or slow chunk does not swing it wildly, and a
    change within ±20 % is ignored as noise.
    """

    size: int
    target_seconds: float
    minimum: int = 100
    maximum: int = 100_000
    max_growth: float = 8.0
    max_shrink: float = 0.25

    def __post_init__(self) -> None:
        self.size = max(self.minimum, min(self.maximum, self.size))

    def record(self, rows: int, seconds: float) -> int:
        """Feed one finished chunk; return the next size."""
        if rows <= 0:
            return self.size
        wanted = rows * self.target_seconds / seconds if seconds > 0 else self.size * self.max_growth
        factor = max(self.max_shrink, min(self.max_growth, wanted / self.size))
        if 0.8 <= factor <= 1.25:
            return self.size
        if rows < self.size and factor > 1:
            # The chunk came back short (end of table); no evidence for growing.
            return self.size
        self.size = max(self.minimum, min(self.maximum, int(self.size * factor)))
        return self.size
