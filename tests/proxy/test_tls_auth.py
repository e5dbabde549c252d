"""TLS on both sides and the authentication paths of terminated auth."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from proxy import sandbox
from tests.proxy.conftest import RunningProxy, start_proxy

APP = {"user": "app", "password": "app-secret"}


@pytest.fixture(scope="module")
def certificates(mariadb_sandbox: sandbox.Sandbox) -> tuple[Path, Path, Path]:
    return mariadb_sandbox.tls_files()


@pytest.fixture(scope="module")
def tls_primary(mariadb_sandbox: sandbox.Sandbox) -> Iterator[sandbox.Instance]:
    """A primary that offers TLS (the shared one does not)."""
    instance = mariadb_sandbox.start_primary("tls-primary", server_id=11, tls=True)
    instance.execute("CREATE USER 'app'@'%' IDENTIFIED BY 'app-secret'", "GRANT ALL ON *.* TO 'app'@'%'")
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def tls_proxy(
    tls_primary: sandbox.Instance, certificates: tuple[Path, Path, Path]
) -> Iterator[RunningProxy]:
    ca, cert, key = certificates
    running = start_proxy(
        [
            "--backend", f"{tls_primary.dsn()}?ssl-ca={ca}",
            "--client-tls-cert", str(cert),
            "--client-tls-key", str(key),
        ]
    )
    yield running
    running.stop()


def _status(cursor: object, name: str) -> str:
    cursor.execute(f"SHOW SESSION STATUS LIKE '{name}'")  # type: ignore[attr-defined]
    row = cursor.fetchone()  # type: ignore[attr-defined]
    return str(row[1]) if row else ""


def test_backend_leg_uses_verified_tls(tls_proxy: RunningProxy) -> None:
    connection = pymysql.connect(host=tls_proxy.host, port=tls_proxy.port, **APP)
    with connection.cursor() as cursor:
        # What the server reports is about the proxy->server connection.
        assert _status(cursor, "Ssl_cipher") != ""
    connection.close()


def test_client_leg_tls_upgrade(tls_proxy: RunningProxy, certificates: tuple[Path, Path, Path]) -> None:
    ca = str(certificates[0])
    connection = pymysql.connect(
        host="127.0.0.1", port=tls_proxy.port, ssl={"ca": ca, "check_hostname": True}, **APP
    )
    assert isinstance(connection._sock, ssl.SSLSocket)  # type: ignore[attr-defined]
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    connection.close()


def test_backend_tls_with_wrong_ca_fails_clearly(tls_primary: sandbox.Instance, tmp_path: Path) -> None:
    other_ca, _, _ = sandbox.make_certificates(tmp_path)
    running = start_proxy(["--backend", f"{tls_primary.dsn()}?ssl-ca={other_ca}", "--user", "app:app-secret"])
    try:
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(host=running.host, port=running.port, **APP)
        assert info.value.args[0] == 2003
        assert "TLS" in info.value.args[1]
    finally:
        running.stop()


def test_client_tls_required_refuses_plaintext(
    primary: sandbox.Instance, app_user: tuple[str, str], certificates: tuple[Path, Path, Path]
) -> None:
    ca, cert, key = certificates
    running = start_proxy(
        ["--backend", primary.dsn(), "--client-tls-cert", str(cert), "--client-tls-key", str(key),
         "--client-tls-required"]
    )
    try:
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(host=running.host, port=running.port, ssl_disabled=True, **APP)
        assert info.value.args[0] == 3159
        connection = pymysql.connect(host=running.host, port=running.port, ssl={"ca": str(ca)}, **APP)
        connection.close()
    finally:
        running.stop()


def test_caching_sha2_full_then_fast_auth(
    tls_proxy: RunningProxy, certificates: tuple[Path, Path, Path]
) -> None:
    """A MySQL 8-style client insisting on caching_sha2_password gets in, and
    the proxy still logs into MariaDB with mysql_native_password as that user."""
    options: dict[str, object] = {
        "host": "127.0.0.1", "port": tls_proxy.port, "auth_plugin": "caching_sha2_password",
        "use_pure": True, "ssl_ca": str(certificates[0]), **APP,
    }
    for _ in range(2):  # the second login can use the fast path
        connection = mysql.connector.connect(**options)
        cursor = connection.cursor()
        cursor.execute("SELECT CURRENT_USER()")
        assert cursor.fetchone()[0] == "app@%"
        connection.close()


def test_caching_sha2_wrong_password(tls_proxy: RunningProxy, certificates: tuple[Path, Path, Path]) -> None:
    with pytest.raises(mysql.connector.Error) as info:
        mysql.connector.connect(
            host="127.0.0.1", port=tls_proxy.port, user="app", password="wrong",
            auth_plugin="caching_sha2_password", ssl_ca=str(certificates[0]), use_pure=True,
        )
    assert info.value.errno == 1045


def test_configured_user_with_native_hash(primary: sandbox.Instance, app_user: tuple[str, str]) -> None:
    from proxy.protocol.auth import native_hash_text

    running = start_proxy(
        ["--backend", primary.dsn(), "--no-load-users-from-backend",
         "--user-hash", f"app:{native_hash_text('app-secret')}"]
    )
    try:
        connection = pymysql.connect(host=running.host, port=running.port, **APP)
        connection.close()
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(host=running.host, port=running.port, user="root", password="root")
        assert info.value.args[0] == 1045  # not configured, and loading from the backend is off
    finally:
        running.stop()


def test_password_changed_in_database_is_picked_up(tidegate: RunningProxy, primary: sandbox.Instance) -> None:
    primary.execute("CREATE USER 'rotating'@'%' IDENTIFIED BY 'one'", "GRANT USAGE ON *.* TO 'rotating'@'%'")
    try:
        pymysql.connect(host=tidegate.host, port=tidegate.port, user="rotating", password="one").close()
        primary.execute("ALTER USER 'rotating'@'%' IDENTIFIED BY 'two'")
        pymysql.connect(host=tidegate.host, port=tidegate.port, user="rotating", password="two").close()
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(host=tidegate.host, port=tidegate.port, user="rotating", password="one")
    finally:
        primary.execute("DROP USER 'rotating'@'%'")


def test_grants_are_enforced_by_the_database(tidegate: RunningProxy, primary: sandbox.Instance, database: str) -> None:
    primary.execute("CREATE USER 'narrow'@'%' IDENTIFIED BY 'pw'", "GRANT USAGE ON *.* TO 'narrow'@'%'")
    try:
        connection = pymysql.connect(host=tidegate.host, port=tidegate.port, user="narrow", password="pw")
        with pytest.raises(pymysql.err.OperationalError) as info:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE TABLE `{database}`.nope (id INT)")
        assert info.value.args[0] == 1142  # CREATE command denied: the server's own answer
        connection.close()
    finally:
        primary.execute("DROP USER 'narrow'@'%'")


def test_caching_sha2_cleartext_over_plaintext_is_refused(
    tls_proxy: RunningProxy, tls_primary: sandbox.Instance
) -> None:
    """Like MySQL, the proxy never accepts a clear password on an unencrypted link
    (a user whose digest is not cached yet, so the fast path cannot apply)."""
    tls_primary.execute("CREATE USER 'fresh'@'%' IDENTIFIED BY 'pw'")
    with pytest.raises(mysql.connector.Error) as info:
        mysql.connector.connect(
            host="127.0.0.1", port=tls_proxy.port, auth_plugin="caching_sha2_password",
            use_pure=True, ssl_disabled=True, user="fresh", password="pw",
        )
    assert info.value.errno == 1045


def test_caching_sha2_rsa_key_exchange(tls_proxy: RunningProxy) -> None:
    """Full caching_sha2 authentication without TLS: public key request, RSA-OAEP."""
    import socket

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    from proxy.protocol import auth
    from proxy.protocol.constants import Capability
    from proxy.protocol.framing import PacketReader, frame
    from proxy.protocol.packets import Handshake, HandshakeResponse

    sock = socket.create_connection((tls_proxy.host, tls_proxy.port))
    reader = PacketReader()

    def read() -> tuple[int, bytes]:
        while True:
            packet = reader.next_packet()
            if packet is not None:
                return packet.last_sequence, packet.payload
            reader.feed(sock.recv(65536))

    _, payload = read()
    greeting = Handshake.parse(payload)
    capabilities = int(Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
                       | Capability.LONG_PASSWORD)
    token = auth.caching_sha2_token("app-secret", greeting.scramble)
    sock.sendall(frame(HandshakeResponse(capabilities, 1 << 24, 45, "app", token, None,
                                         auth.CACHING_SHA2).encode(), 1)[0])
    sequence, payload = read()
    if payload == b"\x01\x03":  # fast path (digest cached by an earlier login)
        sequence, payload = read()
    else:
        assert payload == b"\x01\x04"  # perform full authentication
        sock.sendall(frame(auth.REQUEST_PUBLIC_KEY, sequence + 1)[0])
        sequence, payload = read()
        assert payload[:1] == b"\x01" and b"PUBLIC KEY" in payload
        key = serialization.load_pem_public_key(payload[1:])
        secret = auth.xor_password(b"app-secret\x00", greeting.scramble)
        encrypted = key.encrypt(  # type: ignore[union-attr]
            secret, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        )
        sock.sendall(frame(encrypted, sequence + 1)[0])
        sequence, payload = read()
    assert payload[0] == 0x00, payload
    sock.sendall(frame(b"\x03SELECT CURRENT_USER()", 0)[0])
    _, payload = read()
    assert payload == b"\x01"  # one column follows
    sock.close()
