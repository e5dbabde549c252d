"""Ghost migrations against the real server, under concurrent random DML."""

from __future__ import annotations

import trio

from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import COLUMNS, assert_same, create_pair, make_spec


async def test_add_column_under_random_dml(primary: sandbox.Instance, database: str, workload_factory) -> None:
    create_pair(primary, database, rows=4000)
    workload = workload_factory(database, key_space=13000)
    workload.start()
    await trio.sleep(0.3)
    spec = make_spec(primary, database, "ADD COLUMN extra VARCHAR(10) NOT NULL DEFAULT 'x'")
    result = await Migration(spec).run()
    await trio.sleep(0.3)  # writes keep landing on the new table after the swap
    await trio.to_thread.run_sync(workload.finish)
    assert result.phase == Phase.COMPLETE
    assert workload.unexpected == []
    assert workload.committed > 50
    assert_same(primary, database, columns=COLUMNS)
    extra = primary.execute(f"SELECT COUNT(*) FROM `{database}`.t WHERE extra <> 'x'")
    assert extra[0][0] == 0
