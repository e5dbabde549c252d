"""The test-database fixture itself: a binlogged primary and a GTID replica."""

from __future__ import annotations

import pytest

from proxy import sandbox


def test_primary_is_configured_for_online_schema_change(primary: sandbox.Instance) -> None:
    rows = primary.execute(
        "SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata, @@port"
    )
    assert rows[0] == (1, "ROW", "FULL", "FULL", primary.port)
    assert primary.port != 3306


def test_replica_follows_primary(
    primary: sandbox.Instance, replica: sandbox.Instance, database: str
) -> None:
    primary.execute(f"CREATE TABLE `{database}`.t (id INT PRIMARY KEY)", f"INSERT INTO `{database}`.t VALUES (1),(2)")
    sandbox.wait_replica_caught_up(primary, replica)
    assert replica.execute(f"SELECT COUNT(*) FROM `{database}`.t") == [(2,)]
    assert replica.execute("SELECT @@server_id, @@read_only") == [(2, 1)]


def test_a_running_instance_name_is_not_reused(mariadb_sandbox: sandbox.Sandbox, primary: sandbox.Instance) -> None:
    """A second instance under a running one's name would delete its directory under it."""
    with pytest.raises(sandbox.SandboxError, match="'primary' is already running"):
        mariadb_sandbox.start_primary("primary", server_id=99)
    assert primary.execute("SELECT 1") == [(1,)]  # the running one is untouched


def test_server_options_come_last_and_win() -> None:
    """The migration benchmark sizes the buffer pool through them; the default 256M must not win."""
    with sandbox.Sandbox(server_options=("--innodb-buffer-pool-size=384M",)) as box:
        instance = box.start_primary()
        assert instance.execute("SELECT @@innodb_buffer_pool_size") == [(384 * 1024 * 1024,)]
