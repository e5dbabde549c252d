"""Fixtures for the codec tests that need real server bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from mysql_capture import VARIANTS, Capture, collect_corpus, open_connection

from proxy import sandbox
from proxy.backends import BackendConnection
from proxy.netio import open_tcp
from proxy.protocol.framing import PacketReader


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


@pytest.fixture(scope="session")
def corpus(primary: sandbox.Instance) -> list[Capture]:
    """Real responses to mutate (captured once per session, before any test's
    trio loop runs, hence the blocking ``trio.run``)."""
    name = "codec_corpus"
    primary.execute(f"DROP DATABASE IF EXISTS `{name}`", f"CREATE DATABASE `{name}`")
    try:
        return trio.run(collect_corpus, primary.port, name)
    finally:
        primary.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(scope="session")
def greeting(primary: sandbox.Instance) -> bytes:
    """The primary's raw handshake payload."""

    async def read() -> bytes:
        connection = await open_tcp("127.0.0.1", primary.port)
        try:
            reader = PacketReader()
            while (packet := reader.next_packet()) is None:
                reader.feed(await connection.receive_some())
            return packet.payload
        finally:
            await connection.aclose()

    return trio.run(read)
