"""Limits, timeouts, bad input and failures: a MySQL error and a closed socket,
never a crash, a hang, or harm to other clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pymysql
import pytest

from proxy import sandbox
from proxy.protocol.constants import Capability
from proxy.protocol.framing import PacketReader, frame
from proxy.protocol.packets import Err, HandshakeResponse
from tests.proxy.conftest import RunningProxy, start_proxy

APP = {"user": "app", "password": "app-secret", "autocommit": True, "charset": "utf8mb4"}


def connect(running: RunningProxy, **kwargs: object) -> pymysql.connections.Connection:  # type: ignore[type-arg]
    options: dict[str, object] = {"host": running.host, "port": running.port, **APP}
    options.update(kwargs)
    return pymysql.connect(**options)


def read_packet(sock: socket.socket, timeout: float = 5.0) -> bytes | None:
    """Next packet payload, or None when the peer closed."""
    sock.settimeout(timeout)
    reader = PacketReader()
    while True:
        packet = reader.next_packet()
        if packet is not None:
            return packet.payload
        data = sock.recv(65536)
        if not data:
            return None
        reader.feed(data)


def assert_closed(sock: socket.socket, timeout: float = 5.0) -> None:
    sock.settimeout(timeout)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return
        if not data:
            return


def app_backend_connections(primary: sandbox.Instance) -> int:
    rows = primary.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app'")
    return int(rows[0][0])


@pytest.fixture
def limited(primary: sandbox.Instance, app_user: tuple[str, str]) -> Iterator[RunningProxy]:
    running = start_proxy(
        [
            "--backend", primary.dsn(),
            "--max-client-connections", "3",
            "--max-backend-connections", "2",
            "--backend-queue-timeout", "0.5",
            "--handshake-timeout", "0.5",
            "--max-allowed-packet", "1048576",
            "--no-migrations-enabled",
        ]
    )
    yield running
    running.stop()


@pytest.fixture
def short_idle(primary: sandbox.Instance, app_user: tuple[str, str]) -> Iterator[RunningProxy]:
    running = start_proxy(["--backend", primary.dsn(), "--idle-timeout", "1", "--no-migrations-enabled"])
    yield running
    running.stop()


def test_max_client_connections_is_error_1040(limited: RunningProxy) -> None:
    held = [connect(limited), connect(limited)]
    # The third client is admitted (3 allowed) but the backend cap (2) makes it wait, then fail.
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(limited)
    assert info.value.args[0] == 1040
    assert "backend connections" in info.value.args[1]
    assert 0.4 < time.monotonic() - started < 5
    # A fourth socket over max_client_connections (3 open incl. a handshaking one) gets 1040 at once.
    waiting = socket.create_connection((limited.host, limited.port))
    read_packet(waiting)  # greeting: that is client number 3
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(limited)
    assert info.value.args[0] == 1040
    assert "Too many connections" in info.value.args[1]
    waiting.close()
    for connection in held:
        connection.close()


def test_backend_queue_admits_when_a_slot_frees(limited: RunningProxy) -> None:
    first, second = connect(limited), connect(limited)
    threading.Timer(0.2, first.close).start()
    third = connect(limited)  # waits for first to close, then gets its backend slot
    with third.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    third.close()
    second.close()


def test_handshake_timeout_closes_silent_clients(limited: RunningProxy) -> None:
    sock = socket.create_connection((limited.host, limited.port))
    assert read_packet(sock) is not None  # greeting
    started = time.monotonic()
    payload = read_packet(sock, timeout=5)
    assert payload is not None and payload[0] == 0xFF
    assert Err.parse(payload).code == 1043
    assert_closed(sock)
    assert time.monotonic() - started < 3
    sock.close()


def test_idle_timeout_closes_idle_sessions(short_idle: RunningProxy) -> None:
    connection = connect(short_idle)
    time.sleep(1.6)
    with pytest.raises(pymysql.err.OperationalError):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    connection.close()


def test_packet_over_max_allowed_packet_is_1153(limited: RunningProxy) -> None:
    connection = connect(limited)
    with pytest.raises(pymysql.err.OperationalError) as info:
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s", ("x" * 2_000_000,))
    assert info.value.args[0] == 1153, info.value.args  # the proxy drains the rest before it closes
    other = connect(limited)
    with other.cursor() as cursor:
        cursor.execute("SELECT 2")
        assert cursor.fetchone() == (2,)
    other.close()


def test_garbage_handshake_response_gets_error_and_close(tidegate: RunningProxy) -> None:
    sock = socket.create_connection((tidegate.host, tidegate.port))
    read_packet(sock)
    sock.sendall(frame(b"\x00\x00", 1)[0])  # truncated HandshakeResponse41
    payload = read_packet(sock)
    assert payload is not None and payload[0] == 0xFF
    assert_closed(sock)
    sock.close()
    check = connect(tidegate)
    check.ping()
    check.close()


def _login_raw(running: RunningProxy) -> socket.socket:
    from proxy.protocol import auth
    from proxy.protocol.packets import Handshake

    sock = socket.create_connection((running.host, running.port))
    greeting = Handshake.parse(read_packet(sock) or b"")
    capabilities = int(
        Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
        | Capability.LONG_PASSWORD | Capability.TRANSACTIONS | Capability.MULTI_RESULTS
    )
    token = auth.native_token(auth.native_stage1("app-secret"), greeting.scramble)
    response = HandshakeResponse(capabilities, 1 << 24, 45, "app", token, None, auth.NATIVE)
    sock.sendall(frame(response.encode(), 1)[0])
    ok = read_packet(sock)
    assert ok is not None and ok[0] == 0x00, ok
    return sock


def test_command_with_wrong_sequence_id_is_1156(tidegate: RunningProxy) -> None:
    sock = _login_raw(tidegate)
    sock.sendall(frame(b"\x03SELECT 1", 5)[0])
    payload = read_packet(sock)
    assert payload is not None and Err.parse(payload).code == 1156
    assert_closed(sock)
    sock.close()


def test_unsupported_command_is_refused_and_session_continues(tidegate: RunningProxy) -> None:
    sock = _login_raw(tidegate)
    sock.sendall(frame(b"\x12\x00\x00\x00\x00", 0)[0])  # COM_BINLOG_DUMP
    payload = read_packet(sock)
    assert payload is not None and Err.parse(payload).code == 1047
    sock.sendall(frame(b"\x0e", 0)[0])  # COM_PING still works
    payload = read_packet(sock)
    assert payload is not None and payload[0] == 0x00
    sock.close()


def test_client_vanishing_mid_result_frees_the_backend(
    tidegate: RunningProxy, primary: sandbox.Instance
) -> None:
    before = app_backend_connections(primary)
    sock = _login_raw(tidegate)
    sock.sendall(frame(b"\x03SELECT REPEAT('x', 1000) FROM seq_1_to_200000", 0)[0])
    sock.recv(1000)
    sock.close()
    deadline = time.monotonic() + 10
    while app_backend_connections(primary) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app_backend_connections(primary) == before
    other = connect(tidegate)
    other.ping()
    other.close()


def test_backend_killed_mid_transaction_is_an_error_not_a_hang(
    tidegate: RunningProxy, primary: sandbox.Instance, database: str
) -> None:
    connection = connect(tidegate, database=database, read_timeout=10)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id INT PRIMARY KEY)")
        cursor.execute("BEGIN")
        cursor.execute("INSERT INTO t VALUES (1)")
        cursor.execute("SELECT CONNECTION_ID()")
        (backend_id,) = cursor.fetchone()
    primary.execute(f"KILL {backend_id}")
    with pytest.raises(pymysql.err.OperationalError) as info:
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO t VALUES (2)")
    assert info.value.args[0] in (2013, 1927, 2006)
    connection.close()
    assert primary.execute(f"SELECT COUNT(*) FROM `{database}`.t") == [(0,)]


def test_backend_killed_mid_query(tidegate: RunningProxy, primary: sandbox.Instance) -> None:
    connection = connect(tidegate, read_timeout=10)
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        (backend_id,) = cursor.fetchone()
    threading.Timer(0.3, lambda: primary.execute(f"KILL {backend_id}")).start()
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as info:
        with connection.cursor() as cursor:
            cursor.execute("SELECT SLEEP(5)")
            cursor.fetchall()
            cursor.execute("SELECT 1")
    assert info.value.args[0] in (2013, 1927, 2006)
    assert time.monotonic() - started < 4.5
    connection.close()


def test_backend_down_at_connect_is_2003(app_user: tuple[str, str]) -> None:
    port = sandbox.free_port()
    running = start_proxy(
        ["--backend", f"mysql://root:root@127.0.0.1:{port}", "--user", "app:app-secret", "--connect-timeout", "1"]
    )
    try:
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(running)
        assert info.value.args[0] == 2003
        assert f"127.0.0.1:{port}" in info.value.args[1]
    finally:
        running.stop()


def test_sigterm_lets_open_transactions_finish(primary: sandbox.Instance, app_user: tuple[str, str], database: str) -> None:
    listen, http = sandbox.free_port(), sandbox.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--backend", primary.dsn(),
         "--listen", f"127.0.0.1:{listen}", "--http-listen", f"127.0.0.1:{http}", "--shutdown-grace", "5"],
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "sidecar never became ready"
            time.sleep(0.1)
        busy = pymysql.connect(host="127.0.0.1", port=listen, database=database, **APP)
        idle = pymysql.connect(host="127.0.0.1", port=listen, database=database, **APP)
        with busy.cursor() as cursor:
            cursor.execute("CREATE TABLE t (id INT PRIMARY KEY)")
            cursor.execute("BEGIN")
            cursor.execute("INSERT INTO t VALUES (1)")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # New connections are refused while draining.
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(host="127.0.0.1", port=listen, connect_timeout=2, **APP)
        # The open transaction still completes.
        with busy.cursor() as cursor:
            cursor.execute("INSERT INTO t VALUES (2)")
            cursor.execute("COMMIT")
        assert process.wait(10) == 0
        assert primary.execute(f"SELECT COUNT(*) FROM `{database}`.t") == [(2,)]
        busy.close()
        idle.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
