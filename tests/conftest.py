"""Shared fixtures: one throwaway MariaDB primary and replica per test session.

Tests get a fresh database name from ``database`` so they never see each
other's tables.  The servers live in a temp dir and are stopped by pid at the
end of the session; a server already on 3306 is never touched.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from proxy import sandbox

_counter = itertools.count()


@pytest.fixture(scope="session")
def mariadb_sandbox() -> Iterator[sandbox.Sandbox]:
    sandbox.ensure_installed()
    box = sandbox.Sandbox(keep=bool(os.environ.get("TIDEGATE_KEEP_DB")))
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="session")
def primary(mariadb_sandbox: sandbox.Sandbox) -> sandbox.Instance:
    return mariadb_sandbox.start_primary()


@pytest.fixture(scope="session")
def replica(mariadb_sandbox: sandbox.Sandbox, primary: sandbox.Instance) -> sandbox.Instance:
    return mariadb_sandbox.start_replica(primary)


def _fresh_schema(instance: sandbox.Instance) -> Iterator[str]:
    name = f"t{os.getpid()}_{next(_counter)}"
    instance.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        instance.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def database(primary: sandbox.Instance) -> Iterator[str]:
    """A fresh, empty schema on the primary, dropped afterwards."""
    yield from _fresh_schema(primary)


# -- MySQL 8+ (fetched from Debian sid when no MySQL server is installed) --------


@pytest.fixture(scope="session")
def mysql_sandbox() -> Iterator[sandbox.MysqlSandbox]:
    from proxy import mysqldist

    # Like MariaDB's ensure_installed(): a missing server is an error
    # (MysqlUnavailable says what to do), not a silent skip.
    dist = mysqldist.ensure_mysql()
    box = sandbox.MysqlSandbox(keep=bool(os.environ.get("TIDEGATE_KEEP_DB")), dist=dist)
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="session")
def mysql_primary(mysql_sandbox: sandbox.MysqlSandbox) -> sandbox.Instance:
    return mysql_sandbox.start_primary()


@pytest.fixture
def mysql_database(mysql_primary: sandbox.Instance) -> Iterator[str]:
    """A fresh, empty schema on the MySQL primary, dropped afterwards."""
    yield from _fresh_schema(mysql_primary)
