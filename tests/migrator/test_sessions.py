"""Migrator sessions: TLS when the server offers it, one TLS context for all of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from migrator import db
from proxy import sandbox


@pytest.fixture(scope="module")
def tls_server(mariadb_sandbox: sandbox.Sandbox) -> Iterator[sandbox.Instance]:
    instance = mariadb_sandbox.start_primary("migrator-tls", server_id=21, tls=True)
    yield instance
    instance.stop()


async def test_sessions_use_tls_when_offered_and_share_one_context(tls_server: sandbox.Instance) -> None:
    settings = db.ConnectionSettings(host="127.0.0.1", port=tls_server.port, user="root", password="root")
    first, second = await db.connect(settings), await db.connect(settings)
    try:
        for session in (first, second):
            rows = await session.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            assert rows[0][1], "the session did not negotiate TLS"
        assert first._raw.ctx is second._raw.ctx  # built once, not per connection
    finally:
        await first.close()
        await second.close()


async def test_sessions_connect_without_tls_when_not_offered(primary: sandbox.Instance) -> None:
    settings = db.ConnectionSettings(host="127.0.0.1", port=primary.port, user="root", password="root")
    session = await db.connect(settings)
    try:
        assert (await session.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'"))[0][1] == ""
    finally:
        await session.close()
