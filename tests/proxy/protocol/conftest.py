"""Fixtures for the codec tests that need real server bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mysql_capture import VARIANTS, open_connection

from proxy import sandbox
from proxy.backends import BackendConnection


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def connection(
    primary: sandbox.Instance, database: str, variant: str
) -> AsyncIterator[BackendConnection]:
    """A raw, logged-in connection to the test primary, using ``database``,
    in each capability variant (EOF packets, DEPRECATE_EOF, + SESSION_TRACK)."""
    backend = await open_connection(primary.port, database, VARIANTS[variant])
    try:
        yield backend
    finally:
        await backend.aclose()
