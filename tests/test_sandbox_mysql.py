"""The MySQL 8+ test-database fixture: a GTID primary set up like the MariaDB one."""

from __future__ import annotations

import os
import re

import pymysql
import pytest

from proxy import sandbox


def test_server_is_mysql_8_or_later(mysql_primary: sandbox.Instance) -> None:
    ((version, comment),) = mysql_primary.execute("SELECT VERSION(), @@version_comment")
    assert "mariadb" not in f"{version} {comment}".lower()
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    assert (major, minor) >= (8, 0)
    assert mysql_primary.flavor == "mysql"
    assert mysql_primary.port != 3306


def test_primary_is_configured_for_online_schema_change(mysql_primary: sandbox.Instance) -> None:
    rows = mysql_primary.execute(
        "SELECT @@log_bin, @@gtid_mode, @@enforce_gtid_consistency, @@binlog_format, "
        "@@binlog_row_image, @@binlog_row_metadata, @@port"
    )
    assert rows[0] == (1, "ON", "ON", "ROW", "FULL", "FULL", mysql_primary.port)


def test_database_fixture_gives_a_fresh_schema(
    mysql_primary: sandbox.Instance, mysql_database: str
) -> None:
    mysql_primary.execute(
        f"CREATE TABLE `{mysql_database}`.t (id INT PRIMARY KEY, v VARCHAR(8))",
        f"INSERT INTO `{mysql_database}`.t VALUES (1, 'a'), (2, 'b')",
    )
    assert mysql_primary.execute(f"SELECT COUNT(*) FROM `{mysql_database}`.t") == [(2,)]


def test_new_caching_sha2_user_connects_over_tcp(
    mysql_primary: sandbox.Instance, mysql_database: str
) -> None:
    user = f"u_{mysql_database}"
    mysql_primary.execute(
        f"CREATE USER '{user}'@'%' IDENTIFIED WITH caching_sha2_password BY 'pw-{user}'",
        f"GRANT ALL ON `{mysql_database}`.* TO '{user}'@'%'",
    )
    try:
        # The first login is a full authentication (RSA key exchange, no TLS),
        # the second one hits the server's cache (fast auth).
        for _ in range(2):
            connection = mysql_primary.connect(
                user=user, password=f"pw-{user}", database=mysql_database
            )
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT CURRENT_USER(), DATABASE()")
                    assert cursor.fetchone() == (f"{user}@%", mysql_database)
            finally:
                connection.close()
        with pytest.raises(pymysql.err.OperationalError):
            mysql_primary.connect(user=user, password="wrong")
        ((plugin,),) = mysql_primary.execute(f"SELECT plugin FROM mysql.user WHERE user = '{user}'")
        assert plugin == "caching_sha2_password"
    finally:
        mysql_primary.execute(f"DROP USER IF EXISTS '{user}'@'%'")


def test_stop_removes_the_process(mysql_sandbox: sandbox.MysqlSandbox) -> None:
    instance = mysql_sandbox.start_primary("short-lived", server_id=9)
    assert instance.flavor == "mysql"
    assert instance.execute("SELECT @@server_id") == [(9,)]
    pid = instance.pid
    assert pid is not None
    instance.stop()
    assert instance.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_replica_follows_primary_by_gtid(
    mysql_sandbox: sandbox.MysqlSandbox, mysql_primary: sandbox.Instance, mysql_database: str
) -> None:
    replica = mysql_sandbox.start_replica(mysql_primary, name="replica", server_id=2)
    try:
        mysql_primary.execute(
            f"CREATE TABLE `{mysql_database}`.t (id INT PRIMARY KEY)",
            f"INSERT INTO `{mysql_database}`.t VALUES (1), (2)",
        )
        sandbox.wait_replica_caught_up(mysql_primary, replica)
        assert replica.execute(f"SELECT COUNT(*) FROM `{mysql_database}`.t") == [(2,)]
        assert replica.execute("SELECT @@server_id, @@read_only, @@gtid_mode") == [(2, 1, "ON")]
    finally:
        replica.stop()
