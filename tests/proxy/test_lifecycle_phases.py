"""The lifecycle sees every phase the migration entered, however short (no database needed)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from migrator.hooks import HookSettings
from proxy.events import EventLog
from proxy.lifecycle import Lifecycle


@dataclass(frozen=True)
class _Progress:
    phase: str
    phases: tuple[str, ...] = ()
    rows_copied: int = 0
    rows_estimate: int = 0
    throttle_reason: str | None = None
    postponed: bool = False


def _lifecycle(tmp_path: Path) -> tuple[Lifecycle, EventLog]:
    events = EventLog()
    hooks = HookSettings(targets={"row_copy_complete": f"echo copied >> {tmp_path / 'hooks.log'}"})
    lifecycle = Lifecycle(request_id=7, schema="s", table="t", alter="ADD x INT", leader="me", db=None,  # type: ignore[arg-type]
                          state_schema="_tidegate", service_user="svc", events=events, hooks=hooks)
    return lifecycle, events


def _phases(events: EventLog) -> list[tuple[Any, Any]]:
    return [(e["previous"], e["phase"]) for e in events.tail() if e["event"] == "migration.phase"]


def test_a_copy_shorter_than_the_sampling_is_not_missed(tmp_path: Path) -> None:
    lifecycle, events = _lifecycle(tmp_path)
    before = _Progress("pending", ("pending",))
    # validating, copying and verifying all happened between two looks
    after = _Progress("verifying", ("pending", "validating", "copying", "verifying"), rows_copied=50)
    lifecycle._compare(before, after)
    assert _phases(events) == [("pending", "validating"), ("validating", "copying"), ("copying", "verifying")]
    assert lifecycle.hooks._pending == 1  # row_copy_complete queued, once


def test_without_a_phase_history_the_phase_itself_is_compared(tmp_path: Path) -> None:
    lifecycle, events = _lifecycle(tmp_path)
    lifecycle._compare(_Progress("copying"), _Progress("verifying"))
    lifecycle._compare(_Progress("verifying"), _Progress("verifying"))
    assert _phases(events) == [("copying", "verifying")]
    assert lifecycle.hooks._pending == 1


def test_each_step_is_reported_once_over_successive_looks(tmp_path: Path) -> None:
    lifecycle, events = _lifecycle(tmp_path)
    first = _Progress("copying", ("pending", "validating", "copying"))
    second = replace(first, phase="ready", phases=(*first.phases, "verifying", "ready"))
    lifecycle._compare(_Progress("pending", ("pending",)), first)
    lifecycle._compare(first, second)
    lifecycle._compare(second, second)
    assert _phases(events) == [("pending", "validating"), ("validating", "copying"), ("copying", "verifying"),
                               ("verifying", "ready")]
