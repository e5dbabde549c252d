"""Preflight refusals, dry run and the instant path, against the real server."""

from __future__ import annotations

import pytest

from migrator.inspector import Refusal
from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import make_spec


def setup(primary: sandbox.Instance, database: str, *statements: str) -> None:
    primary.execute(f"USE `{database}`", *statements)


async def refused(primary: sandbox.Instance, database: str, alter: str, **options: object) -> Refusal:
    with pytest.raises(Refusal) as info:
        await Migration(make_spec(primary, database, alter, **options)).run()
    return info.value


async def test_no_unique_key(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (a INT, b INT, KEY (a))")
    assert (await refused(primary, database, "ADD COLUMN c INT")).reason == "no-unique-key"


async def test_nullable_unique_key_is_not_enough(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (a INT NULL, UNIQUE KEY (a))")
    assert (await refused(primary, database, "ADD COLUMN c INT")).reason == "no-unique-key"


async def test_change_drops_the_only_key(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT NOT NULL PRIMARY KEY, a INT)")
    refusal = await refused(primary, database, "DROP PRIMARY KEY, ADD KEY (id)")
    assert refusal.reason == "no-shared-unique-key"
    assert primary.execute(f"SHOW TABLES FROM `{database}`") == [("t",)]


async def test_triggers(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY, a INT)",
          "CREATE TRIGGER t_bi BEFORE INSERT ON t FOR EACH ROW SET NEW.a = 1")
    assert (await refused(primary, database, "ADD COLUMN c INT")).reason == "triggers"


async def test_foreign_keys(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE p (id INT PRIMARY KEY)",
          "CREATE TABLE t (id INT PRIMARY KEY, p INT, FOREIGN KEY (p) REFERENCES p (id))")
    assert (await refused(primary, database, "ADD COLUMN c INT")).reason == "foreign-keys"
    # ... and as the parent
    assert (await refused(primary, database, "ADD COLUMN c INT", table="p")).reason == "foreign-keys"


async def test_foreign_keys_from_other_schemas(primary: sandbox.Instance, database: str) -> None:
    """A child in another schema is found too: through InnoDB's dictionary for plain
    names, through the information_schema scan for names that need encoding."""
    other, odd = f"{database}_child", f"{database}-odd"
    setup(primary, database, "CREATE TABLE q (id INT PRIMARY KEY)")
    primary.execute(f"CREATE DATABASE `{other}`", f"CREATE DATABASE `{odd}`")
    try:
        primary.execute(f"CREATE TABLE `{other}`.c (id INT PRIMARY KEY, q INT, "
                        f"FOREIGN KEY (q) REFERENCES `{database}`.q (id))",
                        f"CREATE TABLE `{odd}`.p (id INT PRIMARY KEY)",
                        f"CREATE TABLE `{database}`.r (id INT PRIMARY KEY, p INT, "
                        f"FOREIGN KEY (p) REFERENCES `{odd}`.p (id))")
        assert (await refused(primary, database, "ADD COLUMN c INT", table="q")).reason == "foreign-keys"
        assert (await refused(primary, odd, "ADD COLUMN c INT", table="p")).reason == "foreign-keys"
    finally:
        primary.execute(f"DROP DATABASE `{other}`", f"DROP TABLE `{database}`.r", f"DROP DATABASE `{odd}`")


async def test_rename_needs_approval(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY, a INT)", "INSERT INTO t VALUES (1, 10), (2, 20)")
    assert (await refused(primary, database, "CHANGE COLUMN a b INT")).reason == "renamed-columns"
    result = await Migration(make_spec(primary, database, "CHANGE COLUMN a b INT", approve_renamed_columns=True)).run()
    assert result.phase == Phase.COMPLETE
    assert primary.execute(f"SELECT id, b FROM `{database}`.t ORDER BY id") == [(1, 10), (2, 20)]


async def test_lossy_change_needs_approval(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(20), n BIGINT)", "INSERT INTO t VALUES (1, 'abc', 5)")
    assert (await refused(primary, database, "MODIFY a VARCHAR(5)")).reason == "lossy-change"
    assert (await refused(primary, database, "MODIFY n INT")).reason == "lossy-change"
    assert (await refused(primary, database, "MODIFY a VARCHAR(20) NOT NULL")).reason == "lossy-change"
    # widening is fine without approval
    result = await Migration(make_spec(primary, database, "MODIFY n BIGINT UNSIGNED NULL, MODIFY a VARCHAR(40)",
                                       approve_lossy_changes=True)).run()
    assert result.phase == Phase.COMPLETE


async def test_widening_needs_no_approval(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(20), n INT, d DECIMAL(5,2))",
          "INSERT INTO t VALUES (1, 'abc', 5, 1.5), (2, NULL, NULL, NULL)")
    result = await Migration(make_spec(primary, database, "MODIFY a VARCHAR(40), MODIFY n BIGINT, MODIFY d DECIMAL(8,3)")).run()
    assert result.phase == Phase.COMPLETE
    assert primary.execute(f"SELECT a, n, d FROM `{database}`.t ORDER BY id")[0][1] == 5


async def test_leftovers(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY)", "CREATE TABLE _t_gho (id INT PRIMARY KEY)")
    assert (await refused(primary, database, "ADD COLUMN c INT")).reason == "leftover-tables"
    result = await Migration(make_spec(primary, database, "ADD COLUMN c INT", drop_leftovers=True)).run()
    assert result.phase == Phase.COMPLETE


async def test_binlog_row_metadata(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY)")
    primary.execute("SET GLOBAL binlog_row_metadata = 'MINIMAL'")
    try:
        assert (await refused(primary, database, "ADD COLUMN c INT")).reason == "binlog-row-metadata"
    finally:
        primary.execute("SET GLOBAL binlog_row_metadata = 'FULL'")


async def test_missing_privileges(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY)")
    primary.execute("CREATE USER IF NOT EXISTS 'weak'@'%' IDENTIFIED BY 'weak'",
                    f"GRANT SELECT, INSERT ON `{database}`.* TO 'weak'@'%'")
    try:
        spec = make_spec(primary, database, "ADD COLUMN c INT")
        from dataclasses import replace

        spec = replace(spec, connection=replace(spec.connection, user="weak", password="weak"))
        with pytest.raises(Refusal) as info:
            await Migration(spec).run()
        assert info.value.reason == "privileges"
        assert "REPLICATION SLAVE" in info.value.message
    finally:
        primary.execute("DROP USER 'weak'@'%'")


async def test_dry_run_changes_nothing(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY, a INT)")
    lines: list[str] = []
    result = await Migration(make_spec(primary, database, "ADD COLUMN c INT", execute=False), output=lines.append).run()
    assert result.message == "dry run"
    assert any("column (new) c" in line for line in lines)
    assert any("migration key: PRIMARY" in line for line in lines)
    assert primary.execute(f"SHOW TABLES FROM `{database}`") == [("t",)]
    assert len(primary.execute(f"SHOW COLUMNS FROM `{database}`.t")) == 2


async def test_instant_path(primary: sandbox.Instance, database: str) -> None:
    setup(primary, database, "CREATE TABLE t (id INT PRIMARY KEY, a INT)", "INSERT INTO t VALUES (1, 1)")
    result = await Migration(make_spec(primary, database, "ADD COLUMN c INT NOT NULL DEFAULT 7", attempt_instant_ddl=True)).run()
    assert result.phase == Phase.COMPLETE and result.instant
    assert primary.execute(f"SELECT id, a, c FROM `{database}`.t") == [(1, 1, 7)]
    assert primary.execute(f"SHOW TABLES FROM `{database}`") == [("t",)]
    # not instant-able: falls back to the ghost copy
    result = await Migration(make_spec(primary, database, "MODIFY a BIGINT", attempt_instant_ddl=True)).run()
    assert result.phase == Phase.COMPLETE and not result.instant
