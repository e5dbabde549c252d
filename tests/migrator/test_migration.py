"""Ghost migrations against the real server, under concurrent random DML."""

from __future__ import annotations

import re

import trio

from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import COLUMNS, assert_same, copying, create_pair, make_spec


async def test_add_column_under_random_dml(primary: sandbox.Instance, database: str, workload_factory) -> None:
    create_pair(primary, database, rows=4000)
    workload = workload_factory(database, key_space=13000)
    workload.start()
    await trio.sleep(0.3)
    # the whole table checked after the copy (the other tests verify behind it)
    spec = make_spec(primary, database, "ADD COLUMN extra VARCHAR(10) NOT NULL DEFAULT 'x'",
                     checksum_behind_copy_interval=0)
    lines: list[str] = []
    result = await Migration(spec, output=lines.append).run()
    await trio.sleep(0.3)  # writes keep landing on the new table after the swap
    await trio.to_thread.run_sync(workload.finish)
    assert result.phase == Phase.COMPLETE
    assert workload.unexpected == []
    assert workload.committed > 50
    assert_same(primary, database, columns=COLUMNS)
    extra = primary.execute(f"SELECT COUNT(*) FROM `{database}`.t WHERE extra <> 'x'")
    assert extra[0][0] == 0
    assert not any("verified behind" in line for line in lines)


async def test_checksum_behind_the_copy_under_random_dml(
    primary: sandbox.Instance, database: str, workload_factory, tmp_path
) -> None:
    """Ranges are verified in snapshots while the copy runs; a row that differs
    there is re-checked (and repaired) later instead of failing the migration."""
    create_pair(primary, database, rows=6000, seed=51)  # keys 3, 6, ..., 18000
    throttle = tmp_path / "throttle"
    throttle.touch()
    workload = workload_factory(database, key_space=19000, threads=2, rate=200)
    workload.start()
    lines: list[str] = []
    spec = make_spec(primary, database, "ADD COLUMN extra INT NOT NULL DEFAULT 5", throttle_flag_file=throttle,
                     chunk_size=100, min_chunk_size=50, max_chunk_size=100, checksum_behind_copy_interval=0.05)
    migration = Migration(spec, output=lines.append)
    async with copying(migration) as outcome:
        # A stray ghost row in the first range (key 1 is not in the original, and no
        # statement of the workload touches it): the snapshot behind the copy sees it.
        primary.execute(f"INSERT INTO `{database}`._t_gho (id, name, extra) VALUES (1, 'stray', 5)")
        throttle.unlink()
    await trio.to_thread.run_sync(workload.finish)
    result = outcome[0]
    assert result.phase == Phase.COMPLETE, lines  # type: ignore[attr-defined]
    behind = [line for line in lines if line.startswith("checksum behind the copy:")]
    assert behind, lines
    found = re.match(r"checksum behind the copy: (\d+) rows in \d+ ranges in (\d+) snapshots, (\d+) keys changed "
                     r"meanwhile compared again .*; (\d+) keys to re-check", behind[0])
    assert found is not None, behind
    rows, snapshots, changed, recheck = (int(value) for value in found.groups())
    # the workload's changes between two snapshots were compared again in the later one
    assert rows > 0 and snapshots >= 2 and changed > 0 and recheck >= 1, behind
    assert workload.unexpected == []
    assert_same(primary, database, columns=COLUMNS)
    assert not primary.execute(f"SELECT 1 FROM `{database}`.t WHERE id = 1")


async def test_a_key_changed_after_its_range_was_verified_is_compared_again(
    primary: sandbox.Instance, database: str, tmp_path
) -> None:
    """The tracked keys span one snapshot interval: a key changed after its range was
    verified behind the copy is compared again in the next snapshot.  Here its ghost
    row is then damaged behind the applier's back (the stale read a binlog event can
    cause), so only that second comparison can find and repair it."""
    create_pair(primary, database, rows=20000, seed=52)  # keys 3, 6, ..., 60000
    key = 3  # in the first range
    throttle = tmp_path / "throttle"
    throttle.touch()
    lines: list[str] = []
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL", throttle_flag_file=throttle,
                     chunk_size=100, min_chunk_size=50, max_chunk_size=100, checksum_behind_copy_interval=0.05,
                     flag_poll_interval=0.01)
    migration = Migration(spec, output=lines.append)
    async with copying(migration) as outcome:
        with trio.fail_after(60):
            throttle.unlink()
            while migration._behind is None or migration._behind.verified_upto is None:
                await trio.sleep(0.002)
            throttle.touch()  # the copy stops at its next chunk; the applier goes on
            behind = migration._behind
            assert behind is not None
            while migration._throttle is None or migration._throttle.reason is None:
                await trio.sleep(0.002)
            # the chunk and the snapshot in flight when the flag was seen are done
            seen = -1
            while behind.snapshots != seen or behind.busy:
                seen = behind.snapshots
                await trio.sleep(0.2)
            assert migration.progress().phase == "copying", lines
            for table in ("t", "control"):
                primary.execute(f"UPDATE `{database}`.{table} SET name = 'changed' WHERE id = {key}")
            while primary.execute(f"SELECT name FROM `{database}`._t_gho WHERE id = {key}")[0][0] != "changed":
                await trio.sleep(0.01)
            primary.execute(f"UPDATE `{database}`._t_gho SET name = 'damaged' WHERE id = {key}")
            assert behind.snapshots == seen  # no snapshot between the change and the damage
            throttle.unlink()
    result = outcome[0]
    assert result.phase == Phase.COMPLETE, lines  # type: ignore[attr-defined]
    reports = [line for line in lines if line.startswith("checksum behind the copy:")]
    assert reports and re.search(r"; ([1-9]\d*) keys to re-check", reports[0]), (reports, lines)
    assert_same(primary, database, columns=COLUMNS)


def show_create(primary: sandbox.Instance, database: str, table: str) -> str:
    return str(primary.execute(f"SHOW CREATE TABLE `{database}`.`{table}`")[0][1])


async def test_secondary_indexes_built_after_the_copy_give_the_exact_definition(
    primary: sandbox.Instance, database: str, workload_factory
) -> None:
    """Plain keys leave the ghost for the copy and come back, under DML, exactly as the
    server itself would have defined the changed table; UNIQUE keys stay throughout."""
    create_pair(primary, database, rows=3000, seed=9)
    primary.execute(
        f"USE `{database}`",
        "ALTER TABLE t ADD KEY `by name` (name(5), n DESC) COMMENT 'prefix, desc', ADD UNIQUE KEY u_ts (id, ts)",
    )
    alter = "ADD COLUMN extra INT NULL, ADD KEY by_extra (extra, u)"
    primary.execute(f"USE `{database}`", "CREATE TABLE expected LIKE t", f"ALTER TABLE expected {alter}")
    expected = show_create(primary, database, "expected").replace("`expected`", "`t`", 1)
    workload = workload_factory(database, key_space=10000, threads=2, rate=100)
    workload.start()
    lines: list[str] = []
    result = await Migration(make_spec(primary, database, alter), output=lines.append).run()
    await trio.to_thread.run_sync(workload.finish)
    assert result.phase == Phase.COMPLETE
    assert "secondary indexes built: by_n, by name, by_extra" in "\n".join(lines)
    assert show_create(primary, database, "t") == expected
    assert workload.unexpected == []
    assert_same(primary, database, columns=COLUMNS)


async def test_changes_ahead_of_the_copy_are_left_to_it_under_random_dml(
    primary: sandbox.Instance, database: str, workload_factory
) -> None:
    """Upserts of keys the copy has not reached are not applied (the copy reads them later);
    deletes, key changes and keys past the copy's upper bound still are: the data stays exact.
    Without the checksum, which would otherwise find and repair a key skipped wrongly."""
    create_pair(primary, database, rows=10000, seed=31)  # keys 3, 6, … 30000
    workload = workload_factory(database, key_space=40000, threads=2, rate=150)
    workload.start()  # not waited for: its inserts past 30000 must come after the copy's upper bound is read
    lines: list[str] = []
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL", chunk_size=50, min_chunk_size=50,
                     max_chunk_size=50, chunk_time=0.02, checksum=False)
    result = await Migration(spec, output=lines.append).run()
    await trio.to_thread.run_sync(workload.finish)
    assert result.phase == Phase.COMPLETE
    copied = next(line for line in lines if line.startswith("copy done"))
    left = re.search(r"(\d+) changed keys left to the copy", copied)
    assert left is not None and int(left.group(1)) > 0, copied
    assert workload.unexpected == []
    assert_same(primary, database, columns=COLUMNS)


async def test_two_copy_sessions_under_random_dml(primary: sandbox.Instance, database: str, workload_factory) -> None:
    """Consecutive chunks copied at once on two sessions; the applier runs between pairs only."""
    create_pair(primary, database, rows=5000, seed=23)
    workload = workload_factory(database, key_space=16000, threads=2, rate=150)
    workload.start()
    lines: list[str] = []
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL", copy_sessions=2,
                     chunk_size=100, min_chunk_size=50, max_chunk_size=100)
    result = await Migration(spec, output=lines.append).run()
    await trio.to_thread.run_sync(workload.finish)
    assert result.phase == Phase.COMPLETE
    copied = next(line for line in lines if line.startswith("copy done"))
    assert int(re.search(r"in (\d+) chunks", copied).group(1)) >= 50  # type: ignore[union-attr]
    assert workload.unexpected == []
    assert_same(primary, database, columns=COLUMNS)


async def test_the_last_share_is_verified_while_the_indexes_are_built(
    primary: sandbox.Instance, database: str, workload_factory
) -> None:
    """With secondary indexes built after the copy, the snapshots behind the copy stop at
    half of it here; the rest is compared in a snapshot taken while the server builds the
    index.  That snapshot must not lock the ghost: it would wait for the build (and report
    no overlap), or time out."""
    create_pair(primary, database, rows=2000, seed=61)  # keys 3 … 6000, random rows
    for table in ("t", "control"):  # 200,000 more rows, so that building by_n takes a while
        primary.execute(f"INSERT INTO `{database}`.{table} (id, name, n) "
                        f"SELECT 10000 + seq, 'filler', seq MOD 977 FROM `{database}`.seq_1_to_200000")
    primary.execute(f"ANALYZE TABLE `{database}`.t")
    workload = workload_factory(database, key_space=7000, threads=2, rate=100)
    workload.start()
    lines: list[str] = []
    spec = make_spec(primary, database, "ADD COLUMN extra INT NULL", chunk_size=5000, max_chunk_size=5000,
                     chunk_time=0.05, checksum_during_index_build=0.5)
    result = await Migration(spec, output=lines.append).run()
    await trio.to_thread.run_sync(workload.finish)
    assert result.phase == Phase.COMPLETE, lines
    behind = [line for line in lines if line.startswith("checksum behind the copy:")]
    found = re.match(r"checksum behind the copy: (\d+) rows", behind[0]) if behind else None
    assert found is not None, lines
    # the snapshots behind the copy stopped at half of it (plus a chunk or two)
    assert 0 < int(found.group(1)) <= 0.5 * 202000 + 2 * 5000, behind
    after = [line for line in lines if line.startswith("checksum: ") and " rows in " in line]
    assert after and "in a snapshot taken while the secondary indexes were built" in after[0], lines
    rows = int(after[0].split()[1])
    assert rows >= 0.5 * 202000 - 5000, after  # what was not verified behind the copy
    assert "secondary indexes built: by_n" in "\n".join(lines)
    assert workload.unexpected == []
    assert_same(primary, database, columns=COLUMNS)
