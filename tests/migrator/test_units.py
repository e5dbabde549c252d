"""Pure parts of the migrator: chunk sizing, the throttler on a mock clock, applier batching."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from migrator.applier import Applier
from migrator.binlog import BinlogItem, GtidPosition
from migrator.chunker import ChunkSizer
from migrator.db import DatabaseError
from migrator.inspector import Plan, Refusal, ServerFacts, check_binlog
from migrator.spec import LoadThreshold
from migrator.throttler import CriticalLoad, Throttle

# -- chunk sizing ------------------------------------------------------------------------


def test_chunk_size_jumps_to_the_target_rate() -> None:
    sizer = ChunkSizer(1000, 0.5, minimum=100, maximum=100_000)
    # 1000 rows in 20 ms = 50k rows/s: a 0.5 s chunk is 25k rows, but one step grows at most 8x
    assert sizer.record(1000, 0.02) == 8000
    assert sizer.record(8000, 0.16) == 25_000
    assert sizer.record(25_000, 0.52) == 25_000  # within noise: unchanged


def test_chunk_size_is_bounded() -> None:
    sizer = ChunkSizer(50_000, 0.5, minimum=100, maximum=60_000)
    assert sizer.record(50_000, 0.1) == 60_000  # the maximum
    assert sizer.record(60_000, 30.0) == 15_000  # a quarter at most per step
    assert sizer.record(15_000, 30.0) == 3750
    sizer = ChunkSizer(200, 0.5, minimum=100)
    assert sizer.record(200, 50.0) == 100  # never below the minimum


def test_short_chunk_does_not_grow() -> None:
    sizer = ChunkSizer(1000, 0.5)
    assert sizer.record(10, 0.001) == 1000  # the end of the table, not a fast server
    assert sizer.record(0, 0.0) == 1000


# -- throttler on a mock clock ----------------------------------------------------------------


class FakeStatus:
    """Answers the throttler's GLOBAL_STATUS query from a dict; counts queries."""

    def __init__(self, **values: float) -> None:
        self.values = dict(values)
        self.queries = 0

    async def query(self, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        await trio.lowlevel.checkpoint()
        self.queries += 1
        return [(name.upper(), str(value)) for name, value in self.values.items()]


def throttle(status: FakeStatus, **options: Any) -> Throttle:
    return Throttle(status, interval=0.25, **options)  # type: ignore[arg-type]


async def test_max_load_throttles_until_it_drops(autojump_clock: trio.testing.MockClock) -> None:
    status = FakeStatus(threads_running=30)
    gate = throttle(status, max_load=LoadThreshold.parse_list("Threads_running=25"))
    released_at: list[float] = []

    async def copier() -> None:
        await gate.wait_until_clear()
        released_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(gate.run)
        assert gate.reason is not None and "max load Threads_running=30" in gate.reason
        nursery.start_soon(copier)
        await trio.sleep(10)
        assert not released_at  # still above the threshold after 10 s
        status.values["threads_running"] = 3
        await trio.sleep(0.3)  # next check (interval 0.25 s)
        assert released_at and 10 <= released_at[0] <= 10.3
        assert gate.reason is None
        nursery.cancel_scope.cancel()
    assert status.queries >= 40  # it kept polling every 0.25 s


async def test_critical_load_aborts(autojump_clock: trio.testing.MockClock) -> None:
    status = FakeStatus(threads_running=10)
    gate = throttle(status, critical_load=LoadThreshold.parse_list("Threads_running=50"))
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(gate.run)
            await trio.sleep(5)
            status.values["threads_running"] = 80
            await trio.sleep(5)
    leaf = info.value.exceptions[0]
    assert isinstance(leaf, CriticalLoad) and "Threads_running=80 >= 50" in str(leaf)
    assert 5 <= trio.current_time() <= 5.3  # aborted at the first check above the threshold


async def test_critical_load_hibernates(autojump_clock: trio.testing.MockClock) -> None:
    status = FakeStatus(threads_running=80)
    gate = throttle(status, critical_load=LoadThreshold.parse_list("Threads_running=50"),
                    critical_load_hibernate_seconds=30)
    reasons: list[tuple[float, str | None]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        await trio.sleep(1)
        reasons.append((trio.current_time(), gate.reason))
        status.values["threads_running"] = 2
        await trio.sleep(20)
        reasons.append((trio.current_time(), gate.reason))  # still hibernating (30 s)
        await trio.sleep(10)
        reasons.append((trio.current_time(), gate.reason))  # rechecked: clear
        nursery.cancel_scope.cancel()
    assert reasons[0][1] is not None and "hibernating" in reasons[0][1]
    assert reasons[1][1] is not None and "hibernating" in reasons[1][1]
    assert reasons[2][1] is None


async def test_flag_file_and_manual_throttle(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    flag = tmp_path / "throttle"
    gate = Throttle(None, flag_file=flag, interval=0.25)
    async with trio.open_nursery() as nursery:
        await nursery.start(gate.run)
        assert gate.reason is None
        flag.touch()
        await trio.sleep(0.3)
        assert gate.reason is not None and "flag file" in gate.reason
        flag.unlink()
        await trio.sleep(0.3)
        assert gate.reason is None
        gate.set_manual("peak hours")
        assert gate.reason == "peak hours"
        with trio.move_on_after(5):
            await gate.wait_until_clear()
        assert trio.current_time() >= 5.6  # it waited the whole 5 s
        gate.set_manual(None)
        await gate.wait_until_clear()
        nursery.cancel_scope.cancel()


async def test_binlog_lag_throttles(autojump_clock: trio.testing.MockClock) -> None:
    lag = [0.0]
    gate = Throttle(None, binlog_lag=lambda: lag[0], max_lag_millis=500, interval=0.25)
    async with trio.open_nursery() as nursery:
        await nursery.start(gate.run)
        lag[0] = 3.0
        await trio.sleep(0.3)
        assert gate.reason is not None and "binlog lag 3000ms" in gate.reason
        lag[0] = 0.1
        await trio.sleep(0.3)
        assert gate.reason is None
        nursery.cancel_scope.cancel()


# -- applier batching ------------------------------------------------------------------------

PLAN = Plan(("id", "v"), ("id", "v"), ("id",), ("id",), "PRIMARY", (), (), {}, ())


class FakeWriter:
    def __init__(self, fail_first: bool = False) -> None:
        self.hops: list[int] = []
        self.fail_first = fail_first

    async def execute_many(self, statements: Sequence[tuple[str, Any]]) -> list[Any]:
        await trio.lowlevel.checkpoint()
        if self.fail_first:
            self.fail_first = False
            raise DatabaseError(1213, "deadlock")
        self.hops.append(sum(len(args) for _, args in statements))
        return []


async def test_applier_batches_keys_per_hop_and_tracks_the_position() -> None:
    applier = Applier(PLAN, "s", "t", "_t_gho", batch_size=500, hop_keys=5000)
    item = BinlogItem(keys=[((k,), k % 7 == 0) for k in range(12_000)], gtid="0-1-42", transactions=3)
    applier.receive(item)
    assert applier.applied_gtid is None  # received, not applied yet
    writer = FakeWriter()
    assert await applier.flush(writer) == 12_000  # type: ignore[arg-type]
    assert writer.hops == [5000, 5000, 2000]  # three thread hops, not 24
    assert applier.applied_gtid == "0-1-42" and not applier.pending


async def test_applier_puts_keys_back_on_failure() -> None:
    applier = Applier(PLAN, "s", "t", "_t_gho")
    applier.receive(BinlogItem(keys=[((1,), False), ((2,), True)], gtid="0-1-7", transactions=1))
    writer = FakeWriter(fail_first=True)
    with pytest.raises(DatabaseError):
        await applier.flush(writer)  # type: ignore[arg-type]
    assert set(applier.pending) == {(1,), (2,)} and applier.applied_gtid is None
    assert await applier.flush(writer) == 2  # type: ignore[arg-type]
    assert applier.applied_gtid == "0-1-7"


async def test_paused_applier_only_flushes_when_forced() -> None:
    applier = Applier(PLAN, "s", "t", "_t_gho")
    applier.receive(BinlogItem(keys=[((1,), False)], gtid="0-1-8", transactions=1))
    await applier.pause()
    writer = FakeWriter()
    assert await applier.flush(writer) == 0  # type: ignore[arg-type]
    assert await applier.flush(writer, force=True) == 1  # type: ignore[arg-type]


async def test_upserts_ahead_of_the_copy_are_left_to_it_and_deletes_always_run() -> None:
    """Keys in (watermark, upper] are upserted by the copy itself later; nothing else is skipped."""
    applier = Applier(PLAN, "s", "t", "_t_gho")
    keys = [((5,), False), ((10,), False), ((11,), False), ((50,), False), ((51,), False),
            ((30,), True), ((80,), False)]
    applier.receive(BinlogItem(keys=keys, gtid="0-1-9", transactions=1))
    applier.ahead_of_copy = ((10,), (50,))
    writer = FakeWriter()
    # kept: 5 and 10 (copied already), 30 (a delete), 51 and 80 (past the copy's upper bound)
    assert await applier.flush(writer) == 5  # type: ignore[arg-type]
    assert applier.left_to_copy == 2 and applier.applied_gtid == "0-1-9"
    applier.receive(BinlogItem(keys=[((1,), False), ((2,), True)], gtid="0-1-10", transactions=1))
    applier.ahead_of_copy = (None, (50,))  # nothing copied yet: every upsert up to 50 waits for the copy
    assert await applier.flush(writer) == 1  # type: ignore[arg-type]
    applier.ahead_of_copy = None
    applier.receive(BinlogItem(keys=[((20,), False)], gtid="0-1-11", transactions=1))
    assert await applier.flush(writer) == 1  # type: ignore[arg-type]
    assert applier.left_to_copy == 3


# -- server checks and binlog positions ----------------------------------------------------


def _facts(**changes: Any) -> ServerFacts:
    facts = ServerFacts(version="8.0.36", mariadb=False, log_bin=True, binlog_format="ROW",
                        binlog_row_image="FULL", binlog_row_metadata="FULL", gtid_binlog_pos="",
                        server_id=1, read_only=False, gtid_mode="ON")
    return dataclasses.replace(facts, **changes)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"version": "8.0.12-log"}, "unsupported-server"),
    ({"version": "8.0.16"}, "unsupported-server"),
    ({"version": "5.7.44"}, "unsupported-server"),
    ({"gtid_mode": "OFF_PERMISSIVE"}, "gtid-mode"),
    ({"binlog_row_metadata": "MINIMAL"}, "binlog-row-metadata"),
    ({"binlog_format": "MIXED"}, "binlog-format"),
    ({"read_only": True}, "read-only"),
])
def test_server_refusals(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(Refusal) as refused:
        check_binlog(_facts(**changes))
    assert refused.value.reason == reason


def test_supported_servers_pass() -> None:
    check_binlog(_facts())
    check_binlog(_facts(version="9.7.4"))
    check_binlog(_facts(version="10.11.19-MariaDB-0+deb12u1", mariadb=True))


def test_mysql_gtid_set_grows_by_each_transaction() -> None:
    uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
    position = GtidPosition(f"{uuid.upper()}:1-5:7,\nabc:1-3", mariadb=False)
    assert str(position) == f"{uuid}:1-5:7,abc:1-3"
    position.add(f"{uuid}:6")  # fills the gap: one interval
    position.add("abc:4")
    position.add("def:1")
    assert str(position) == f"{uuid}:1-7,abc:1-4,def:1"
    tagged = GtidPosition(f"{uuid}:1-3:blue:1-2", mariadb=False)
    tagged.add(f"{uuid}:blue:3")
    assert str(tagged) == f"{uuid}:1-3,{uuid}:blue:1-3"
    assert str(GtidPosition("", mariadb=False)) == ""


def test_mariadb_position_keeps_the_last_gtid_per_domain() -> None:
    position = GtidPosition("0-1-5,1-2-3", mariadb=True)
    position.add("0-1-6")
    position.add("2-1-1")
    assert str(position) == "0-1-6,1-2-3,2-1-1"


def test_status_line_names_a_long_step() -> None:
    from migrator.runner import Progress

    line = Progress(phase="verifying", rows_copied=10, rows_estimate=10,
                    activity="building secondary indexes k_1 for 40s").line()
    assert line.startswith("[verifying]") and "building secondary indexes k_1 for 40s" in line
    assert "building" not in Progress(phase="copying").line()
