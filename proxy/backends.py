"""Backend endpoints and the proxy's own async MySQL client.

``connect`` opens a connection to a backend and logs in as a given user with
the credentials the proxy holds for it (the stage-1 hash recovered from the
client, or a clear password).  ``BackendConnection.query`` runs a text query
for the proxy's own needs (loading users, probes); relayed client traffic
never goes through it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.netio import Connection, ConnectionClosed, RawConnection, StreamConnection, open_tcp
from proxy.protocol import auth
from proxy.protocol.constants import RELAYABLE, UTF8MB4_GENERAL_CI, Capability, Command, ErrorCode
from proxy.protocol.framing import Packet, PacketReader, frame
from proxy.protocol.packets import (
    AuthSwitch,
    Column,
    Err,
    Handshake,
    HandshakeResponse,
    Ok,
    parse_text_row,
    ssl_request,
)
from proxy.protocol.wire import ProtocolError


class BackendError(Exception):
    """The backend answered with an ERR we should pass on to the client."""

    def __init__(self, err: Err) -> None:
        super().__init__(f"({err.code}) {err.message}")
        self.err = err


class BackendUnavailable(Exception):
    """The backend could not be reached or spoke nonsense."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    host: str
    port: int
    role: str = "primary"
    tls: ssl.SSLContext | None = None
    server_name: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    user: str
    stage1: bytes | None = None  # SHA1(password); enough for mysql_native_password
    password: str | None = None

    @classmethod
    def from_password(cls, user: str, password: str) -> Credentials:
        return cls(user, auth.native_stage1(password) if password else b"", password)

    def native_token(self, scramble: bytes) -> bytes:
        if self.stage1 is None:
            if self.password is None:
                return b""
            return auth.native_token(auth.native_stage1(self.password), scramble)
        return auth.native_token(self.stage1, scramble) if self.stage1 else b""


# The proxy's own connections: none of the flags that change SQL semantics
# (NO_SCHEMA, IGNORE_SPACE, FOUND_ROWS, ODBC) or packet shapes.
DEFAULT_CLIENT_CAPABILITIES = int(
    RELAYABLE
    & ~Capability.CONNECT_WITH_DB
    & ~Capability.NO_SCHEMA
    & ~Capability.IGNORE_SPACE
    & ~Capability.FOUND_ROWS
    & ~Capability.ODBC
    & ~Capability.INTERACTIVE
    & ~Capability.DEPRECATE_EOF
    & ~Capability.SESSION_TRACK
    & ~Capability.LOCAL_FILES
)


@dataclass
class QueryResult:
    columns: list[Column] = field(default_factory=list)
    rows: list[tuple[bytes | None, ...]] = field(default_factory=list)
    ok: Ok | None = None

    def text_rows(self) -> list[tuple[str | None, ...]]:
        return [tuple(None if v is None else v.decode("utf-8", "replace") for v in r) for r in self.rows]

    def dicts(self) -> list[dict[str, str | None]]:
        names = [c.name for c in self.columns]
        return [dict(zip(names, row, strict=True)) for row in self.text_rows()]


class BackendConnection:
    """One logged-in connection to a backend."""

    def __init__(
        self,
        endpoint: Endpoint,
        connection: Connection,
        handshake: Handshake,
        capabilities: int,
        status: int,
        reader: PacketReader,
    ) -> None:
        self.endpoint = endpoint
        self.connection = connection
        self.handshake = handshake
        self.capabilities = capabilities
        self.status = status
        self.reader = reader
        self.closed = False

    @property
    def connection_id(self) -> int:
        return self.handshake.connection_id

    async def receive_some(self) -> bytes:
        return await self.connection.receive_some()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.connection.send_all(data)

    async def _read_packet(self) -> Packet:
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet
            data = await self.connection.receive_some()
            if not data:
                raise BackendUnavailable(f"{self.endpoint.name}: connection closed")
            self.reader.feed(data)

    async def query(self, sql: str) -> QueryResult:
        """Run one text-protocol statement (no multi-statements) and collect it."""
        payload = bytes((Command.QUERY,)) + sql.encode("utf-8")
        data, _ = frame(payload, 0)
        await self.connection.send_all(data)
        result = QueryResult()
        packet = await self._read_packet()
        first = packet.first
        if first == 0xFF:
            raise BackendError(Err.parse(packet.payload))
        if first == 0x00:
            result.ok = Ok.parse(packet.payload, self.capabilities)
            self.status = result.ok.status
            return result
        from proxy.protocol.wire import Reader

        count = Reader(packet.payload).lenenc_int()
        for _ in range(count):
            result.columns.append(Column.parse((await self._read_packet()).payload))
        deprecate_eof = bool(self.capabilities & Capability.DEPRECATE_EOF)
        if not deprecate_eof:
            await self._read_packet()  # EOF after columns
        while True:
            packet = await self._read_packet()
            first = packet.first
            size = len(packet.payload)
            if first == 0xFE and (size < 9 or (deprecate_eof and size < 0xFFFFFF)):
                if deprecate_eof:
                    self.status = Ok.parse(packet.payload, self.capabilities).status
                break
            if first == 0xFF:
                raise BackendError(Err.parse(packet.payload))
            result.rows.append(parse_text_row(packet.payload, count))
        return result

    async def ping(self) -> None:
        await self.connection.send_all(frame(bytes((Command.PING,)), 0)[0])
        packet = await self._read_packet()
        if packet.first == 0xFF:
            raise BackendError(Err.parse(packet.payload))

    async def aclose(self, *, polite: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if polite:
            with trio.move_on_after(0.5):
                try:
                    await self.connection.send_all(frame(bytes((Command.QUIT,)), 0)[0])
                except (ConnectionClosed, OSError):
                    pass
        await self.connection.aclose()


async def read_handshake(connection: Connection, reader: PacketReader) -> Handshake:
    while True:
        packet = reader.next_packet()
        if packet is not None:
            if packet.first == 0xFF:
                raise BackendError(Err.parse(packet.payload))
            return Handshake.parse(packet.payload)
        data = await connection.receive_some()
        if not data:
            raise BackendUnavailable("connection closed before the handshake")
        reader.feed(data)


async def connect(
    endpoint: Endpoint,
    credentials: Credentials,
    *,
    database: str | None = None,
    client_capabilities: int = DEFAULT_CLIENT_CAPABILITIES,
    character_set: int = UTF8MB4_GENERAL_CI,
    attributes: dict[str, str] | None = None,
    timeout: float = 5.0,
    max_packet: int = 1 << 30,
) -> BackendConnection:
    """Open and log in.  Raises BackendError (forwardable ERR) or BackendUnavailable."""
    connection: Connection | None = None
    try:
        with trio.fail_after(timeout):
            try:
                raw = await open_tcp(endpoint.host, endpoint.port)
            except OSError as error:
                raise BackendUnavailable(
                    f"cannot connect to backend {endpoint.name} at {endpoint.address}: {error}"
                ) from error
            connection = raw
            reader = PacketReader()
            handshake = await read_handshake(connection, reader)
            wanted = client_capabilities | (
                Capability.PROTOCOL_41
                | Capability.SECURE_CONNECTION
                | Capability.PLUGIN_AUTH
                | Capability.LONG_PASSWORD
            )
            if database:
                wanted |= Capability.CONNECT_WITH_DB
            else:
                wanted &= ~Capability.CONNECT_WITH_DB
            capabilities = int(wanted & (handshake.capabilities | Capability.LONG_PASSWORD))
            capabilities &= ~int(Capability.SSL)
            if not capabilities & Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA:
                capabilities &= ~0
            sequence = 1
            if endpoint.tls is not None:
                if not handshake.capabilities & Capability.SSL:
                    raise BackendUnavailable(f"backend {endpoint.name} does not offer TLS")
                capabilities |= int(Capability.SSL)
                await connection.send_all(
                    frame(ssl_request(capabilities, max_packet, character_set), sequence)[0]
                )
                sequence += 1
                tls_stream = trio.SSLStream(
                    raw.detach_stream(),
                    endpoint.tls,
                    server_hostname=endpoint.server_name or endpoint.host,
                )
                try:
                    await tls_stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as error:
                    raise BackendUnavailable(
                        f"TLS handshake with backend {endpoint.name} failed: {error}"
                    ) from error
                connection = StreamConnection(tls_stream, endpoint.address)
            plugin = auth.NATIVE
            token = credentials.native_token(handshake.scramble)
            if handshake.auth_plugin == auth.CACHING_SHA2 and credentials.password is not None:
                plugin = auth.CACHING_SHA2
                token = auth.caching_sha2_token(credentials.password, handshake.scramble)
            response = HandshakeResponse(
                capabilities,
                max_packet,
                character_set,
                credentials.user,
                token,
                database,
                plugin,
                attributes or {},
            )
            await connection.send_all(frame(response.encode(), sequence)[0])
            backend = BackendConnection(endpoint, connection, handshake, capabilities, 0, reader)
            status = await _finish_login(backend, credentials, tls=endpoint.tls is not None)
            backend.status = status
            return backend
    except trio.TooSlowError as error:
        if connection is not None:
            await connection.aclose()
        raise BackendUnavailable(
            f"backend {endpoint.name} at {endpoint.address} did not answer within {timeout:g}s"
        ) from error
    except (BackendError, BackendUnavailable, ProtocolError, ConnectionClosed) as error:
        if connection is not None:
            await connection.aclose()
        if isinstance(error, BackendError | BackendUnavailable):
            raise
        raise BackendUnavailable(f"backend {endpoint.name}: {error}") from error


async def _finish_login(backend: BackendConnection, credentials: Credentials, *, tls: bool) -> int:
    """Answer auth switches / more-data until OK or ERR; returns status flags."""
    for _ in range(5):
        packet = await backend._read_packet()
        first = packet.first
        sequence = (packet.last_sequence + 1) & 0xFF
        if first == 0x00:
            return Ok.parse(packet.payload, backend.capabilities).status
        if first == 0xFF:
            raise BackendError(Err.parse(packet.payload))
        if first == 0xFE:
            switch = AuthSwitch.parse(packet.payload)
            if switch.plugin == auth.NATIVE:
                data = credentials.native_token(switch.data)
            elif switch.plugin == auth.CLEAR and credentials.password is not None and tls:
                data = credentials.password.encode("utf-8") + b"\x00"
            elif switch.plugin == auth.CACHING_SHA2 and credentials.password is not None:
                data = auth.caching_sha2_token(credentials.password, switch.data)
            else:
                raise BackendError(
                    Err.of(
                        ErrorCode.NOT_SUPPORTED_AUTH_MODE,
                        f"tidegate cannot log into the backend as '{credentials.user}': "
                        f"its account uses auth plugin '{switch.plugin}'; use "
                        "mysql_native_password or configure the user's clear password",
                    )
                )
            await backend.send_all(frame(data, sequence)[0])
            continue
        if first == 0x01:  # AuthMoreData (caching_sha2_password)
            status = packet.payload[1:2]
            if status == auth.FAST_AUTH_SUCCESS:
                continue
            if status == auth.PERFORM_FULL_AUTH and credentials.password is not None and tls:
                await backend.send_all(
                    frame(credentials.password.encode("utf-8") + b"\x00", sequence)[0]
                )
                continue
            raise BackendError(
                Err.of(
                    ErrorCode.NOT_SUPPORTED_AUTH_MODE,
                    f"backend requires full caching_sha2_password authentication for "
                    f"'{credentials.user}'; configure its clear password and backend TLS",
                )
            )
        raise ProtocolError(f"unexpected packet 0x{first:02x} during backend login")
    raise ProtocolError("backend login did not finish")


async def probe_handshake(endpoint: Endpoint, timeout: float = 5.0) -> Handshake:
    """Read a backend's greeting without logging in (version, capabilities)."""
    with trio.fail_after(timeout):
        try:
            connection = await open_tcp(endpoint.host, endpoint.port)
        except OSError as error:
            raise BackendUnavailable(f"cannot connect to {endpoint.address}: {error}") from error
        try:
            return await read_handshake(connection, PacketReader())
        finally:
            await connection.aclose()


def make_client_tls_context(ca: str | None, cert: str | None, key: str | None, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca) if verify else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context


def as_raw(connection: Any) -> RawConnection | None:
    return connection if isinstance(connection, RawConnection) else None
