"""A migration run in-process (as the sidecar runs it) leaves no connection behind on the server."""

from __future__ import annotations

import trio

from migrator.runner import Migration
from migrator.state import Phase
from proxy import sandbox
from tests.migrator.conftest import create_pair, make_spec


def _client_sessions(primary: sandbox.Instance) -> list[tuple[int, str]]:
    rows = primary.execute(
        "SELECT ID, COMMAND FROM information_schema.PROCESSLIST "
        "WHERE ID <> CONNECTION_ID() AND USER NOT IN ('system user', 'event_scheduler') AND COMMAND <> 'Daemon'"
    )
    return sorted((int(row[0]), str(row[1])) for row in rows)


async def test_a_finished_migration_leaves_no_session_on_the_server(primary: sandbox.Instance, database: str) -> None:
    create_pair(primary, database, rows=2000)
    before = _client_sessions(primary)
    lines: list[str] = []
    result = await Migration(make_spec(primary, database, "ADD COLUMN extra INT NULL"), output=lines.append).run()
    assert result.phase == Phase.COMPLETE
    # the binlog reader's thread ends on its own after the KILL (test_binlog_stop.py)
    with trio.move_on_after(5):
        while _client_sessions(primary) != before:
            await trio.sleep(0.1)
    assert _client_sessions(primary) == before
