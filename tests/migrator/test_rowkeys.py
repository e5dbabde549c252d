"""The fast key reader against mysql-replication's own decoding, over the same real binlog."""

from __future__ import annotations

import random
from typing import Any

from migrator.binlog import BinlogStreamer
from migrator.db import ConnectionSettings, gtid_position_sql
from proxy import sandbox
from tests.migrator.conftest import stream_until_done

#: every column type whose size the reader must know, around an integer composite key
WIDE = """
CREATE TABLE w (
  a BIGINT UNSIGNED NOT NULL, b SMALLINT NOT NULL,
  t1 TINYINT NULL, t2 MEDIUMINT UNSIGNED NULL, t3 INT NULL,
  c1 CHAR(10) CHARACTER SET latin1 NULL, c2 CHAR(100) CHARACTER SET utf8mb4 NULL,
  v1 VARCHAR(20) NULL, v2 VARCHAR(300) CHARACTER SET utf8mb4 NULL,
  d1 DECIMAL(30,10) NULL, d2 DECIMAL(5,0) NULL, d3 DECIMAL(19,9) NULL,
  f1 FLOAT NULL, f2 DOUBLE NULL, y YEAR NULL, dte DATE NULL,
  tm0 TIME NULL, tm3 TIME(3) NULL, dt0 DATETIME NULL, dt6 DATETIME(6) NULL,
  ts0 TIMESTAMP NULL DEFAULT NULL, ts2 TIMESTAMP(2) NULL DEFAULT NULL,
  e ENUM('x','y','z') NULL, s SET('p','q','r') NULL, bt BIT(13) NULL,
  bn BINARY(4) NULL, vb VARBINARY(400) NULL, tt TINYTEXT NULL, tx TEXT NULL,
  mb MEDIUMBLOB NULL, lb LONGBLOB NULL, j JSON NULL, g POINT NULL,
  PRIMARY KEY (a, b)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""
CHANGELOG = "CREATE TABLE marks (id INT PRIMARY KEY, hint VARCHAR(32), value VARCHAR(64))"


def row(rng: random.Random, a: int, b: int) -> tuple[Any, ...]:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.2 else value

    return (
        a, b, maybe(rng.randrange(-128, 128)), maybe(rng.randrange(0, 2**24)), maybe(rng.randrange(-2**31, 2**31)),
        maybe("c" * rng.randrange(11)), maybe("ü" * rng.randrange(101)), maybe("v" * rng.randrange(21)),
        maybe("é日" * rng.randrange(151)), maybe(f"{rng.randrange(-10**19, 10**19)}.{rng.randrange(10**10):010d}"),
        maybe(rng.randrange(-99999, 99999)), maybe(f"{rng.randrange(-10**9, 10**9)}.5"),
        maybe(rng.uniform(-1e6, 1e6)), maybe(rng.uniform(-1e300, 1e300)), maybe(rng.randrange(1901, 2155)),
        maybe(f"{rng.randrange(1000, 9999)}-0{rng.randrange(1, 10)}-1{rng.randrange(0, 10)}"),
        maybe(f"{rng.randrange(-838, 838)}:59:59"), maybe(f"12:34:56.{rng.randrange(1000):03d}"),
        maybe("2020-02-29 23:59:59"), maybe(f"1999-12-31 23:59:59.{rng.randrange(10**6):06d}"),
        maybe("2021-01-01 00:00:01"), maybe(f"2022-06-30 12:00:00.{rng.randrange(100):02d}"),
        maybe(rng.choice("xyz")), maybe(",".join(rng.sample("pqr", rng.randrange(1, 4)))),
        maybe(rng.randrange(2**13)), maybe(rng.randbytes(rng.randrange(5))), maybe(rng.randbytes(rng.randrange(401))),
        maybe("t" * rng.randrange(256)), maybe("x" * rng.randrange(3000)), maybe(rng.randbytes(rng.randrange(70000))),
        maybe(rng.randbytes(rng.randrange(300))), maybe('{"k": [1, 2, {"z": "ü"}]}'), None,
    )


async def keys_from_binlog(primary: sandbox.Instance, database: str, start: str, fast: bool,
                           table: str = "w", key: tuple[str, ...] = ("a", "b")) -> tuple[list[Any], Any]:
    settings = ConnectionSettings(host=primary.host, port=primary.port, user=primary.user, password=primary.password)
    streamer = BinlogStreamer(settings, database, table, "marks", list(key), start,
                              server_id=random.randrange(1 << 20, 1 << 30), mariadb=primary.flavor == "mariadb")
    streamer._fast_keys = fast
    keys, _ = await stream_until_done(streamer)
    return keys, streamer._reader_cache


async def test_fast_keys_equal_mysql_replication_decoding(primary: sandbox.Instance, database: str) -> None:
    primary.execute(f"USE `{database}`", WIDE, CHANGELOG)
    start = str(primary.execute(gtid_position_sql(primary.flavor == "mariadb"))[0][0])
    rng = random.Random(77)
    connection = primary.connect(database=database)
    placeholders = ", ".join(["%s"] * 33)
    with connection.cursor() as cursor:
        cursor.execute("SET SESSION sql_mode = ''")
        for index in range(300):
            cursor.execute(f"REPLACE INTO w VALUES ({placeholders})", row(rng, rng.randrange(2**64), index - 150))
        cursor.executemany(f"INSERT IGNORE INTO w VALUES ({placeholders})",
                           [row(rng, 2**63 + i, -32768 + i) for i in range(50)])  # one multi-row event
        cursor.execute("UPDATE w SET tx = REPEAT('u', 5000), j = NULL WHERE b % 3 = 0")
        cursor.execute("UPDATE w SET b = b + 1000 WHERE b BETWEEN -20 AND 20")  # key changes
        cursor.execute("DELETE FROM w WHERE b % 7 = 1")
        cursor.execute("INSERT INTO marks VALUES (1, 'done', 'x')")
    connection.close()
    fast, cache = await keys_from_binlog(primary, database, start, fast=True)
    slow, _ = await keys_from_binlog(primary, database, start, fast=False)
    assert cache is not None and cache[1] is not None  # the fast reader was used
    assert len(slow) > 500
    assert fast == slow


#: string keys of every kind the reader decodes, around the same wide columns
STRING_KEYED = """
CREATE TABLE s (
  name VARCHAR(64) CHARACTER SET utf8mb4 NOT NULL, code CHAR(8) CHARACTER SET latin1 NOT NULL,
  uid BINARY(16) NOT NULL, tag VARBINARY(300) NOT NULL, wide VARCHAR(300) CHARACTER SET utf8mb4 NOT NULL,
  n INT NULL, txt TEXT NULL, d DECIMAL(12,3) NULL, dt DATETIME(6) NULL, blb BLOB NULL,
  PRIMARY KEY (name, code, uid, tag, wide)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""


async def test_fast_string_keys_equal_mysql_replication_decoding(primary: sandbox.Instance, database: str) -> None:
    primary.execute(f"USE `{database}`", STRING_KEYED, CHANGELOG)
    start = str(primary.execute(gtid_position_sql(primary.flavor == "mariadb"))[0][0])
    rng = random.Random(78)
    names = ["plain", "naïve", "日本語", "emoji 🐬", "trailing  ", "", "Ωmega", "tab\tline"]

    def key() -> tuple[Any, ...]:
        return (rng.choice(names) + str(rng.randrange(50)), rng.choice(["a", "é", "x y", "", "ÿ"]) * rng.randrange(3),
                rng.randbytes(14) + rng.choice([b"", b"\x00", b"\x00\x00", b" "]).ljust(2, b"\x00")[:2],
                rng.randbytes(rng.randrange(300)), "w" * rng.randrange(300))

    connection = primary.connect(database=database)
    with connection.cursor() as cursor:
        for _ in range(300):
            cursor.execute("REPLACE INTO s VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                           (*key(), rng.randrange(10**6), "t" * rng.randrange(2000), "1.5",
                            "2020-01-01 00:00:00.5", rng.randbytes(rng.randrange(3000))))
        cursor.executemany("INSERT IGNORE INTO s (name, code, uid, tag, wide) VALUES (%s, %s, %s, %s, %s)",
                           [key() for _ in range(40)])  # one multi-row event
        cursor.execute("UPDATE s SET txt = REPEAT('u', 500) WHERE n % 3 = 0")
        cursor.execute("UPDATE s SET name = CONCAT(name, '→') WHERE n % 5 = 0")  # key changes
        cursor.execute("DELETE FROM s WHERE n % 7 = 1")
        cursor.execute("INSERT INTO marks VALUES (1, 'done', 'x')")
    connection.close()
    fast, cache = await keys_from_binlog(primary, database, start, fast=True, table="s",
                                         key=("name", "code", "uid", "tag", "wide"))
    slow, _ = await keys_from_binlog(primary, database, start, fast=False, table="s",
                                     key=("name", "code", "uid", "tag", "wide"))
    assert cache is not None and cache[1] is not None  # the fast reader was used
    assert len(slow) > 400
    assert {type(v) for k, _ in slow for v in k} == {str, bytes}
    assert fast == slow
