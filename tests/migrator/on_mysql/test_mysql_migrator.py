"""Concurrent DML, cut-over under a conflicting lock, no deadlock victim at the cut-over,
postpone, panic, kill -9 and resume, refusals, the instant path, throttling on load
and on a replica's lag, the binlog key reader and its pre-filter — on MySQL.

MySQL's standalone cut-over renames inside the session that holds the write
locks (``CutOver.attempt_atomic``); everything else is the same code as on
MariaDB, so the same tests must pass.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from migrator.cutover import CutOver
from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import assert_same, create_pair, make_spec
from tests.migrator.test_binlog_prefilter import (  # noqa: F401
    test_other_tables_are_dropped_before_decoding_and_ours_arrive_whole,
)
from tests.migrator.test_composite import (  # noqa: F401
    test_checksum_repairs_a_stray_row_and_refuses_a_broken_ghost,
    test_checksum_sees_bytes_not_collations,
    test_checksum_without_casts_flags_or_a_last_length_still_parses_one_way,
    test_composite_primary_key_under_dml,
    test_repeated_cut_overs_lose_nothing,
)
from tests.migrator.test_control import (  # noqa: F401
    test_conflicting_lock_then_retry,
    test_kill9_during_copy_and_cut_over_then_resume,
    test_panic_flag_cancels,
    test_postpone_flag_file,
    test_schema_version_drift,
)
from tests.migrator.test_cutover_quiet import (  # noqa: F401
    test_a_transaction_that_read_the_table_is_not_a_deadlock_victim,
)
from tests.migrator.test_migration import (  # noqa: F401
    test_add_column_under_random_dml,
    test_checksum_behind_the_copy_under_random_dml,
    test_secondary_indexes_built_after_the_copy_give_the_exact_definition,
    test_two_copy_sessions_under_random_dml,
)
from tests.migrator.test_refusals import (  # noqa: F401
    test_binlog_row_metadata,
    test_change_drops_the_only_key,
    test_dry_run_changes_nothing,
    test_foreign_keys,
    test_foreign_keys_from_other_schemas,
    test_instant_path,
    test_leftovers,
    test_lossy_change_needs_approval,
    test_missing_privileges,
    test_no_unique_key,
    test_nullable_unique_key_is_not_enough,
    test_rename_needs_approval,
    test_triggers,
    test_widening_needs_no_approval,
)
from tests.migrator.test_rowkeys import (  # noqa: F401
    test_fast_keys_equal_mysql_replication_decoding,
    test_fast_string_keys_equal_mysql_replication_decoding,
)
from tests.migrator.test_throttling import (  # noqa: F401
    test_critical_load_aborts_and_leaves_the_original_alone,
    test_max_load_pauses_the_copy_until_the_load_drops,
    test_replica_lag_pauses_the_copy,
)


async def test_the_cut_over_renames_inside_the_write_lock(
    primary: sandbox.Instance, database: str, workload_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite above really runs on MySQL, through the MySQL cut-over."""
    (version,) = primary.execute("SELECT @@version")[0]
    assert primary.flavor == "mysql" and "mariadb" not in str(version).lower()
    attempts: list[str] = []
    atomic = CutOver.attempt_atomic

    async def counted(self: CutOver, *args: Any) -> Any:
        result = await atomic(self, *args)
        attempts.append(result.outcome.value)
        return result

    monkeypatch.setattr(CutOver, "attempt_atomic", counted)
    create_pair(primary, database, rows=3000, seed=5)
    workload = workload_factory(database, threads=2, rate=100)
    workload.start()
    result = await Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL")).run()
    await trio.to_thread.run_sync(workload.finish)
    assert result.phase == Phase.COMPLETE
    assert attempts and attempts[-1] == "done"
    assert workload.unexpected == []
    assert_same(primary, database)
    tables = {r[0] for r in primary.execute(f"SHOW TABLES FROM `{database}`")}
    assert "_t_gho" not in tables and "t" in tables
