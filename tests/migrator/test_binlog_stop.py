"""A stopped binlog reader ends: no reconnect after our own KILL, no dump connection left behind."""

from __future__ import annotations

import logging
import random

import pytest
import trio

from migrator.binlog import BinlogStreamer
from migrator.db import ConnectionSettings, gtid_position_sql
from proxy import sandbox
from tests.migrator.conftest import stream_until_done


async def test_the_reader_does_not_reconnect_after_it_is_stopped(
    primary: sandbox.Instance, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    primary.execute(
        f"USE `{database}`",
        "CREATE TABLE t (id INT PRIMARY KEY)",
        "CREATE TABLE marks (id INT AUTO_INCREMENT PRIMARY KEY, hint VARCHAR(32), value VARCHAR(64))",
    )
    start = str(primary.execute(gtid_position_sql(primary.flavor == "mariadb"))[0][0])
    primary.execute(f"USE `{database}`", "INSERT INTO t VALUES (1)", "INSERT INTO marks (hint, value) VALUES ('done', 'x')")
    settings = ConnectionSettings(host=primary.host, port=primary.port, user=primary.user, password=primary.password)
    streamer = BinlogStreamer(settings, database, "t", "marks", ["id"], start,
                              server_id=random.randrange(1 << 20, 1 << 30), mariadb=primary.flavor == "mariadb")
    caplog.set_level(logging.WARNING)
    keys, _ = await stream_until_done(streamer)  # cancels the reader once 'done' arrives
    assert keys == [((1,), False)]
    # The reader thread (abandoned on cancel) meets the KILL in its blocking read. Before,
    # mysql-replication logged "Re-request the connection" and opened a new dump connection,
    # left waiting for the next event.
    await trio.sleep(1.0)
    (dumps,) = primary.execute(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN "
        f"({', '.join(str(i) for i in streamer._thread_ids)})"
    )[0]
    assert dumps == 0
    assert not [r for r in caplog.records if r.name.startswith("pymysqlreplication")]
