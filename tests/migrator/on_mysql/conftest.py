"""The migrator's tests again, against MySQL (8.0.17+; the sandbox brings 9.7 from Debian sid).

Every test module here imports test functions written for MariaDB; this
``primary`` makes them (and ``database``, ``workload_factory``, which ask for
``primary``) run on a MySQL primary instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy import sandbox


@pytest.fixture(scope="session")
def primary(mysql_primary: sandbox.Instance) -> sandbox.Instance:
    return mysql_primary


@pytest.fixture(scope="session")
def replica(mysql_sandbox: sandbox.MysqlSandbox, mysql_primary: sandbox.Instance) -> Iterator[sandbox.Instance]:
    # its own name: tests/test_sandbox_mysql.py starts (and stops) a "replica" of its own
    instance = mysql_sandbox.start_replica(mysql_primary, name="migrator-replica", server_id=3)
    yield instance
    instance.stop()
