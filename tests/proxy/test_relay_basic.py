"""Smoke: pymysql through the proxy behaves like pymysql direct."""

from __future__ import annotations

import pymysql
import pytest

from proxy import sandbox
from tests.proxy.conftest import RunningProxy


def _connect(running: RunningProxy, **kwargs: object) -> pymysql.connections.Connection:  # type: ignore[type-arg]
    options: dict[str, object] = {"host": running.host, "port": running.port, "user": "app",
                                  "password": "app-secret", "autocommit": True, "charset": "utf8mb4"}
    options.update(kwargs)
    return pymysql.connect(**options)


def test_select_through_proxy(tidegate: RunningProxy, primary: sandbox.Instance, database: str) -> None:
    connection = _connect(tidegate, database=database)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(20))")
        cursor.execute("INSERT INTO t VALUES (1, 'a'), (2, NULL), (3, 'ü')")
        cursor.execute("SELECT * FROM t ORDER BY id")
        assert cursor.fetchall() == ((1, "a"), (2, None), (3, "ü"))
        cursor.execute("SELECT CURRENT_USER()")
        assert cursor.fetchone()[0].startswith("app@")
    connection.close()


def test_wrong_password_is_1045(tidegate: RunningProxy) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        _connect(tidegate, password="nope")
    assert info.value.args[0] == 1045
