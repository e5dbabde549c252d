"""The binlog connection drops other tables' events before decoding, and nothing of ours."""

from __future__ import annotations

import random
from typing import Any

from migrator.binlog import BinlogStreamer
from migrator.db import ConnectionSettings, gtid_position_sql
from proxy import sandbox
from tests.migrator.conftest import stream_until_done


async def _stream(primary: sandbox.Instance, database: str, start: str, prefilter: bool) -> tuple[list[Any], list[Any], int]:
    settings = ConnectionSettings(host=primary.host, port=primary.port, user=primary.user, password=primary.password)
    streamer = BinlogStreamer(settings, database, "t", "marks", ["id"], start,
                              server_id=random.randrange(1 << 20, 1 << 30), mariadb=primary.flavor == "mariadb",
                              ghost_table="_t_gho")
    streamer.prefilter = prefilter
    keys, changelog = await stream_until_done(streamer)
    return keys, changelog, streamer.events_skipped


async def test_other_tables_are_dropped_before_decoding_and_ours_arrive_whole(
    primary: sandbox.Instance, database: str
) -> None:
    primary.execute(
        f"USE `{database}`",
        "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(200))",
        "CREATE TABLE _t_gho (id INT PRIMARY KEY, v VARCHAR(200), extra INT)",
        "CREATE TABLE other (id INT PRIMARY KEY, v VARCHAR(200))",
        "CREATE TABLE marks (id INT AUTO_INCREMENT PRIMARY KEY, hint VARCHAR(32), value VARCHAR(64))",
    )
    start = str(primary.execute(gtid_position_sql(primary.flavor == "mariadb"))[0][0])
    connection = primary.connect(database=database, autocommit=False)
    with connection.cursor() as cursor:
        cursor.executemany("INSERT INTO t VALUES (%s, %s)", [(i, "x" * 150) for i in range(2000)])
        connection.commit()
        # the copy's kind of statement: many rows events of the ghost, between ours
        cursor.execute("INSERT INTO _t_gho (id, v) SELECT id, v FROM t")
        cursor.execute("UPDATE t SET v = 'changed' WHERE id % 10 = 0")
        connection.commit()
        for index in range(50):  # mixed transactions: ghost, other, ours, changelog
            cursor.execute("REPLACE INTO _t_gho (id, v) SELECT id, v FROM t WHERE id = %s", (index,))
            cursor.execute("INSERT INTO other VALUES (%s, 'o')", (index,))
            cursor.execute("DELETE FROM t WHERE id = %s", (1000 + index,))
            cursor.execute("INSERT INTO marks (hint, value) VALUES ('heartbeat', %s)", (str(index),))
            connection.commit()
        cursor.execute("UPDATE t SET id = id + 5000 WHERE id BETWEEN 1 AND 5")  # key changes
        cursor.execute("INSERT INTO marks (hint, value) VALUES ('done', 'x')")
        connection.commit()
    connection.close()
    fast_keys, fast_changelog, skipped = await _stream(primary, database, start, prefilter=True)
    slow_keys, slow_changelog, not_skipped = await _stream(primary, database, start, prefilter=False)
    assert len(slow_keys) == 2000 + 200 + 50 + 10
    assert fast_keys == slow_keys
    assert fast_changelog == slow_changelog and len(fast_changelog) == 51
    assert not_skipped == 0
    assert skipped > 100  # the ghost's and the other table's table maps and rows events
