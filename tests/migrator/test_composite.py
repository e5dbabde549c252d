"""A composite primary key under concurrent DML, repeated cut-overs, and what the checksum catches."""

from __future__ import annotations

import random
import threading
from typing import Any

import pymysql
import pytest
import trio

from migrator.checksum import Checksummer
from migrator.db import connect
from migrator.inspector import plan_migration, read_table
from migrator.runner import ChecksumMismatch, Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import COLUMNS, assert_same, create_pair, make_spec

COMPOSITE = """
CREATE TABLE `{name}` (
  region VARCHAR(8) CHARACTER SET utf8mb4 NOT NULL,
  id INT NOT NULL,
  qty INT NULL,
  note VARCHAR(40) CHARACTER SET utf8mb4 NULL,
  PRIMARY KEY (region, id),
  KEY by_qty (qty)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""
REGIONS = ["eu", "us", "日本", "zz"]


def composite_rows(primary: sandbox.Instance, database: str, table: str) -> list[tuple[Any, ...]]:
    connection = primary.connect(database=database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT CAST(region AS BINARY), id, qty, CAST(note AS BINARY) FROM `{table}` "
                           "ORDER BY region, id")
            return list(cursor.fetchall())
    finally:
        connection.close()


class CompositeWorkload:
    """Inserts, updates, deletes and key changes on t and control in one transaction."""

    def __init__(self, primary: sandbox.Instance, database: str) -> None:
        self.primary, self.database = primary, database
        self.stop = threading.Event()
        self.committed = 0
        self.unexpected: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(2)]

    def __enter__(self) -> CompositeWorkload:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _statement(self, rng: random.Random) -> tuple[str, tuple[Any, ...]]:
        region, key = rng.choice(REGIONS), rng.randrange(1, 3000)
        kind = rng.random()
        if kind < 0.3:
            return "INSERT INTO `{t}` (region, id, qty, note) VALUES (%s, %s, %s, %s)", (region, key, rng.randrange(100), f"n{rng.random()}")
        if kind < 0.55:
            return "UPDATE `{t}` SET qty = qty + 1, note = %s WHERE region = %s AND id = %s", ("ünï", region, key)
        if kind < 0.7:
            return "DELETE FROM `{t}` WHERE region = %s AND id = %s", (region, key)
        if kind < 0.85:
            return "UPDATE `{t}` SET id = %s WHERE region = %s AND id = %s", (rng.randrange(1, 3000), region, key)
        return "UPDATE `{t}` SET region = %s WHERE region = %s AND id = %s", (rng.choice(REGIONS), region, key)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        connection = self.primary.connect(database=self.database, autocommit=False)
        cursor = connection.cursor()
        while not self.stop.is_set():
            sql, args = self._statement(rng)
            try:
                cursor.execute("BEGIN")
                cursor.execute(sql.replace("{t}", "t"), args)
                cursor.execute(sql.replace("{t}", "control"), args)
                cursor.execute("COMMIT")
                self.committed += 1
            except pymysql.err.MySQLError as error:
                cursor.execute("ROLLBACK")
                if error.args[0] not in (1062, 1213):
                    self.unexpected.append(repr(error))
        connection.close()


async def test_composite_primary_key_under_dml(primary: sandbox.Instance, database: str) -> None:
    rng = random.Random(5)
    rows = [(region, key, rng.randrange(100), f"row {key}") for region in REGIONS for key in range(1, 2000, 2)]
    connection = primary.connect(database=database)
    with connection.cursor() as cursor:
        for name in ("t", "control"):
            cursor.execute(COMPOSITE.format(name=name))
            cursor.executemany(f"INSERT INTO `{name}` VALUES (%s, %s, %s, %s)", rows)
    connection.close()
    spec = make_spec(primary, database, "ADD COLUMN flag TINYINT NOT NULL DEFAULT 1, MODIFY note VARCHAR(80)",
                     chunk_size=60, max_chunk_size=60, min_chunk_size=50)
    with CompositeWorkload(primary, database) as workload:
        await trio.sleep(0.2)
        result = await Migration(spec).run()
        await trio.sleep(0.3)
    assert result.phase == Phase.COMPLETE
    assert workload.unexpected == [] and workload.committed > 50
    assert result.rows_copied >= len(rows) // 2
    assert composite_rows(primary, database, "t") == composite_rows(primary, database, "control")
    assert primary.execute(f"SELECT COUNT(*) FROM `{database}`.t WHERE flag <> 1")[0][0] == 0


async def test_repeated_cut_overs_lose_nothing(primary: sandbox.Instance, database: str, workload_factory) -> None:
    create_pair(primary, database, rows=1500, seed=31)
    workload = workload_factory(database, key_space=5000, threads=3)
    workload.start()
    for round_number in range(4):
        alter = "ADD COLUMN extra INT NULL" if round_number % 2 == 0 else "DROP COLUMN extra"
        result = await Migration(make_spec(primary, database, alter, drop_leftovers=True, old_table="drop")).run()
        assert result.phase == Phase.COMPLETE, result
    await trio.sleep(0.3)
    await trio.to_thread.run_sync(workload.finish)
    assert workload.unexpected == []
    assert_same(primary, database, columns=COLUMNS)


# -- the checksum -------------------------------------------------------------------------------


async def checksummer_of_t(connection: Any, primary: sandbox.Instance, database: str) -> Checksummer:
    """The checksum of ``t`` against ``_t_gho`` (both made by the test)."""
    original = await read_table(connection, database, "t")
    ghost = await read_table(connection, database, "_t_gho")
    plan = plan_migration(make_spec(primary, database, "ADD COLUMN z INT"), original, ghost)
    return Checksummer(plan, database, "t", "_t_gho")


async def test_checksum_sees_bytes_not_collations(primary: sandbox.Instance, database: str) -> None:
    """pt-osc's silent ENUM-label loss and separator games must not compare equal."""
    primary.execute(
        f"USE `{database}`",
        "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(10), b VARCHAR(10), e ENUM('alpha','çé',''), n INT NULL)",
        "CREATE TABLE _t_gho LIKE t",
        "INSERT INTO t VALUES (1, 'a#b', 'c', 'çé', NULL), (2, 'x', 'y', 'alpha', 7), (3, 'é', NULL, 'alpha', 1)",
        # the same rows, each with one difference a collation or a naive concatenation would hide
        "INSERT INTO _t_gho VALUES (1, 'a', 'b#c', 'çé', NULL), (2, 'x', 'y', '', 7), (3, 'e', NULL, 'alpha', 1)",
    )
    async with await connect(make_spec(primary, database, "ADD COLUMN z INT").settings) as connection:
        checksummer = await checksummer_of_t(connection, primary, database)
        comparison = await checksummer.compare_table([connection])
        assert len(comparison.mismatches) == 1 and comparison.rows == 3
        assert await checksummer.differing_keys(connection, comparison.mismatches[0]) == [(1,), (2,), (3,)]
        assert await checksummer.compare_keys(connection, [(1,), (2,), (3,)]) != []
        primary.execute(f"USE `{database}`", "DELETE FROM _t_gho", "INSERT INTO _t_gho SELECT * FROM t")
        assert (await checksummer.compare_table([connection, await connect(connection.settings)])).mismatches == []


@pytest.mark.parametrize("charsets", ["utf8mb4", "mixed"])
async def test_checksum_without_casts_flags_or_a_last_length_still_parses_one_way(
    primary: sandbox.Instance, database: str, charsets: str
) -> None:
    """NOT NULL columns carry no NULL flag, the last string no length; one charset, no casts."""
    second = "latin1" if charsets == "mixed" else "utf8mb4"
    primary.execute(
        f"USE `{database}`",
        "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(10) CHARACTER SET utf8mb4 NOT NULL, "
        f"b VARCHAR(10) CHARACTER SET {second} NOT NULL, n INT NOT NULL, c CHAR(5) CHARACTER SET {second} NOT NULL)",
        "CREATE TABLE _t_gho LIKE t",
        "INSERT INTO t VALUES (1, 'a#', 'b', 1, 'z'), (2, 'q', '1#2', 3, 'z'), (3, 'ü', 'x', 5, 'a#b'), (4, 's', 't', 6, 'u')",
        "INSERT INTO _t_gho VALUES (1, 'a', '#b', 1, 'z'), (2, 'q', '1', 2, '3#z'), (3, 'ü', 'x#a', 5, 'b'), (4, 's', 't', 6, 'u')",
    )
    async with await connect(make_spec(primary, database, "ADD COLUMN z INT").settings) as connection:
        checksummer = await checksummer_of_t(connection, primary, database)
        assert ("CAST(" in checksummer.original_aggregate) == (charsets == "mixed")
        assert "ISNULL" not in checksummer.original_aggregate
        comparison = await checksummer.compare_table([connection])
        assert comparison.rows == 4
        assert await checksummer.differing_keys(connection, comparison.mismatches[0]) == [(1,), (2,), (3,)]
        primary.execute(f"USE `{database}`", "DELETE FROM _t_gho", "INSERT INTO _t_gho SELECT * FROM t")
        assert (await checksummer.compare_table([connection])).mismatches == []


async def test_checksum_repairs_a_stray_row_and_refuses_a_broken_ghost(
    primary: sandbox.Instance, database: str, tmp_path: Any
) -> None:
    create_pair(primary, database, rows=800, seed=41)
    throttle = tmp_path / "throttle"

    async def migrate_with_damage(alter: str, damage: str, **options: Any) -> tuple[Any, list[str]]:
        throttle.touch()
        lines: list[str] = []
        migration = Migration(make_spec(primary, database, alter, throttle_flag_file=throttle,
                                        drop_leftovers=True, **options), output=lines.append)
        outcome: list[Any] = []

        async def run() -> None:
            try:
                outcome.append(await migration.run())
            except ChecksumMismatch as error:
                outcome.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            with trio.fail_after(60):
                while migration.progress().phase != "copying":
                    await trio.sleep(0.02)
            # Rows with keys past the copy's upper bound: neither the copy nor the
            # binlog (the ghost is not followed) ever touches them; only the checksum can.
            primary.execute(f"USE `{database}`", damage)
            throttle.unlink()
        return outcome[0], lines

    # One stray row (what the commit-visibility race leaves behind): re-synced, then swapped.
    result, lines = await migrate_with_damage(
        "ADD COLUMN extra INT NULL", "INSERT INTO _t_gho (id, name) VALUES (1000000, 'stray')")
    assert any("ranges differ (1 keys)" in line and "re-syncing" in line for line in lines), lines
    assert result.phase == Phase.COMPLETE
    assert_same(primary, database)
    # Systematic damage (more keys than the repair limit): no cut-over, and a report.
    error, _ = await migrate_with_damage(
        "ADD COLUMN extra2 INT NULL",
        "INSERT INTO _t_gho (id) SELECT id + 1000000 FROM t WHERE id < 200", checksum_repair_limit=20)
    assert isinstance(error, ChecksumMismatch), error
    assert "ranges differ" in str(error) and "keys" in str(error)
    assert len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 16  # not swapped
    assert_same(primary, database)


@pytest.mark.parametrize("key", ["id", "composite"])
async def test_differing_keys_narrows_a_large_range_on_the_server(
    primary: sandbox.Instance, database: str, key: str
) -> None:
    """Changed, missing and extra rows are all found when the range is cut into parts first.

    Extra ghost rows sit where the original has no key at all (past its last
    key and in a gap), so parts cut at the original's keys cannot split them.
    """
    columns = "id INT NOT NULL, v VARCHAR(20) NOT NULL" if key == "id" else \
        "g INT NOT NULL, id INT NOT NULL, v VARCHAR(20) NOT NULL"
    primary_key = "id" if key == "id" else "g, id"
    select = "SELECT seq, CONCAT('v', seq) FROM seq_1_to_5000 WHERE seq NOT BETWEEN 2000 AND 2600" if key == "id" \
        else "SELECT seq % 3, seq, CONCAT('v', seq) FROM seq_1_to_5000 WHERE seq NOT BETWEEN 2000 AND 2600"
    primary.execute(
        f"USE `{database}`",
        f"CREATE TABLE t ({columns}, PRIMARY KEY ({primary_key}))",
        "CREATE TABLE _t_gho LIKE t",
        f"INSERT INTO t {select}",
        "INSERT INTO _t_gho SELECT * FROM t",
        "UPDATE _t_gho SET v = 'stale' WHERE id IN (17, 1999, 4321)",
        "DELETE FROM _t_gho WHERE id IN (3, 2601)",
        # ghost-only rows: in the original's gap and past its last key
        *(("INSERT INTO _t_gho SELECT seq, 'extra' FROM seq_2100_to_2400",
           "INSERT INTO _t_gho VALUES (9000, 'extra')") if key == "id" else
          ("INSERT INTO _t_gho SELECT 1, seq, 'extra' FROM seq_2100_to_2400",
           "INSERT INTO _t_gho VALUES (5, 9000, 'extra')")),
    )
    async with await connect(make_spec(primary, database, "ADD COLUMN z INT").settings) as connection:
        checksummer = await checksummer_of_t(connection, primary, database)
        comparison = await checksummer.compare_table([connection], chunk_rows=100_000, max_chunk_rows=100_000)
        assert len(comparison.mismatches) == 1
        narrowed = await checksummer.differing_keys(connection, comparison.mismatches[0], row_limit=50, fanout=4)
        whole = await checksummer.differing_keys(connection, comparison.mismatches[0], row_limit=100_000)
    ids = {17, 1999, 4321, 3, 2601, 9000, *range(2100, 2401)}
    expected = sorted(((i,) if key == "id" else (5 if i == 9000 else 1 if 2100 <= i <= 2400 else i % 3, i))
                      for i in ids)
    assert sorted(narrowed) == sorted(whole) == expected
