"""One client connection: handshake, terminated auth, and the command loop.

The relay authenticates the client itself, logs into the primary as the same
user, then forwards each command's raw frames and streams the response back
chunk by chunk while a ``ResponseTracker`` watches where it ends.  It keeps
the session facts later features depend on (schema, autocommit, open
transaction, prepared statement ids) exactly, from the server's own status
flags.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from proxy.backends import (
    BackendConnection,
    BackendError,
    BackendUnavailable,
    Credentials,
    Endpoint,
    connect,
)
from proxy.gate import Gate, Waiter
from proxy.netio import (
    Connection,
    ConnectionClosed,
    PrefixedStream,
    RawConnection,
    StreamConnection,
)
from proxy.protocol import auth
from proxy.protocol.constants import (
    NO_RESPONSE,
    RELAYABLE,
    UNSUPPORTED,
    Capability,
    Command,
    ErrorCode,
    Status,
)
from proxy.protocol.framing import Packet, PacketReader, frame
from proxy.protocol.packets import AuthSwitch, Err, Handshake, HandshakeResponse, Ok, auth_more_data
from proxy.protocol.response import ResponseTracker
from proxy.protocol.wire import ProtocolError, Reader
from proxy.users import Account, UserDirectory

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("tidegate.relay")

_connection_ids = itertools.count(1)


class MetricsSink(Protocol):
    def observe_query(self, command: int, ok: bool, seconds: float) -> None: ...
    def client_connected(self) -> None: ...
    def client_disconnected(self) -> None: ...
    def connection_rejected(self, reason: str) -> None: ...
    def auth_failure(self, reason: str) -> None: ...
    def backend_connected(self, backend: str) -> None: ...
    def backend_disconnected(self, backend: str) -> None: ...
    def backend_connect_error(self, backend: str) -> None: ...
    def protocol_error(self, side: str) -> None: ...
    def queue_waiting(self, delta: int) -> None: ...
    def count_bytes(self, client_to_backend: int, backend_to_client: int) -> None: ...
    def gate_held(self, delta: int) -> None: ...
    def gate_hold_finished(self, result: str, seconds: float) -> None: ...


class NullMetrics:
    def observe_query(self, command: int, ok: bool, seconds: float) -> None:
        pass

    def client_connected(self) -> None:
        pass

    def client_disconnected(self) -> None:
        pass

    def connection_rejected(self, reason: str) -> None:
        pass

    def auth_failure(self, reason: str) -> None:
        pass

    def backend_connected(self, backend: str) -> None:
        pass

    def backend_disconnected(self, backend: str) -> None:
        pass

    def backend_connect_error(self, backend: str) -> None:
        pass

    def protocol_error(self, side: str) -> None:
        pass

    def queue_waiting(self, delta: int) -> None:
        pass

    def count_bytes(self, client_to_backend: int, backend_to_client: int) -> None:
        pass

    def gate_held(self, delta: int) -> None:
        pass

    def gate_hold_finished(self, result: str, seconds: float) -> None:
        pass


@dataclass
class Settings:
    max_client_connections: int = 1000
    max_backend_connections: int = 500
    backend_queue_size: int = 1000
    backend_queue_timeout: float = 5.0
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 28800.0
    max_allowed_packet: int = 64 * 1024 * 1024
    shutdown_grace: float = 5.0
    client_tls: ssl.SSLContext | None = None
    client_tls_required: bool = False
    #: longest a statement waits at the gate, whatever happens to the hold
    max_hold_wait: float = 30.0


@dataclass
class PreparedStatement:
    statement_id: int
    sql_bytes: bytes
    params: int
    columns: int

    @property
    def sql(self) -> str:
        return self.sql_bytes.decode("utf-8", "replace")


#: What the gate assumes for a statement it cannot see (an unknown prepared
#: statement id): classify() reports no known tables, i.e. "any table".
UNKNOWN_SQL = b"CALL tidegate_unknown_statement()"
#: A transaction longer than this many statements is treated as touching
#: every table (keeps the per-session list bounded).
MAX_TRACKED_STATEMENTS = 2000


@dataclass
class SessionState:
    """What the relay knows about one client session (read by admin, gate, routing)."""

    connection_id: int
    peer: str
    user: str = ""
    schema: str | None = None
    status: int = Status.AUTOCOMMIT
    capabilities: int = 0
    character_set: int = 0
    attributes: dict[str, str] = field(default_factory=dict)
    prepared: dict[int, PreparedStatement] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)
    #: payload of the command now running (None while idle); decoded on demand
    current_raw: bytes | None = None
    queries: int = 0
    transaction_started: float | None = None
    #: SQL of the statements run in the open transaction (for the cut-over drain)
    txn_statements: list[bytes] = field(default_factory=list)
    #: waiting at the gate right now
    held: bool = False

    def inflight_sql(self) -> bytes | None:
        raw = self.current_raw
        if raw is None:
            return None
        command = raw[0]
        if command == _COM_QUERY or command == _COM_STMT_PREPARE:
            return raw[1:]
        if command == _COM_STMT_EXECUTE:
            statement = self.prepared.get(int.from_bytes(raw[1:5], "little")) if len(raw) >= 5 else None
            return statement.sql_bytes if statement is not None else UNKNOWN_SQL
        if command == _COM_FIELD_LIST:
            table = raw[1:].split(b"\x00", 1)[0].replace(b"`", b"``")
            return b"SELECT * FROM `" + table + b"`"
        return None

    def transaction_sql(self) -> list[bytes]:
        return self.txn_statements

    @property
    def current(self) -> str | None:
        raw = self.current_raw
        if raw is None:
            return None
        if raw[0] == _COM_STMT_EXECUTE and len(raw) >= 5:
            statement = self.prepared.get(int.from_bytes(raw[1:5], "little"))
            return f"EXECUTE {statement.sql if statement else '?'}"
        return raw[1:4097].decode("utf-8", "replace")

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & Status.IN_TRANS)

    @property
    def autocommit(self) -> bool:
        return bool(self.status & Status.AUTOCOMMIT)


class ClientGone(Exception):
    """The client closed or broke its connection."""


class BackendLimiter:
    """Caps backend connections; excess logins wait in a bounded queue."""

    def __init__(self, limit: int, queue_size: int, timeout: float, metrics: MetricsSink) -> None:
        self._limiter = trio.CapacityLimiter(limit)
        self.queue_size = queue_size
        self.timeout = timeout
        self.waiting = 0
        self._metrics = metrics

    @property
    def in_use(self) -> int:
        return int(self._limiter.borrowed_tokens)

    async def acquire(self, owner: object) -> bool:
        try:
            self._limiter.acquire_on_behalf_of_nowait(owner)
            return True
        except trio.WouldBlock:
            pass
        if self.waiting >= self.queue_size:
            return False
        self.waiting += 1
        self._metrics.queue_waiting(1)
        try:
            with trio.move_on_after(self.timeout):
                await self._limiter.acquire_on_behalf_of(owner)
                return True
            return False
        finally:
            self.waiting -= 1
            self._metrics.queue_waiting(-1)

    def release(self, owner: object) -> None:
        try:
            self._limiter.release_on_behalf_of(owner)
        except RuntimeError:
            pass


def _scramble() -> bytes:
    # Printable, NUL-free bytes: some clients treat the scramble as a C string.
    return bytes(secrets.choice(range(33, 127)) for _ in range(20))


def error_packet(code: ErrorCode, message: str, sequence: int) -> bytes:
    return frame(Err.of(code, message).encode(), sequence)[0]


_USE_PREFIX = b"use"
_COM_QUERY = int(Command.QUERY)
_COM_STMT_EXECUTE = int(Command.STMT_EXECUTE)
_COM_STMT_PREPARE = int(Command.STMT_PREPARE)
_COM_FIELD_LIST = int(Command.FIELD_LIST)
#: commands whose statement the gate may need to see
_GATED = frozenset({_COM_STMT_EXECUTE, _COM_STMT_PREPARE, _COM_FIELD_LIST})
_IN_TRANS = int(Status.IN_TRANS)
_MORE_RESULTS = int(Status.MORE_RESULTS_EXISTS)
#: errors after which the server has rolled back the whole transaction
_ROLLS_BACK_TRANSACTION = frozenset({1213})  # ER_LOCK_DEADLOCK


def use_target(sql: bytes) -> str | None:
    """Schema named by a bare ``USE name`` statement, else None."""
    text = sql.strip()
    if len(text) < 5 or text[:3].lower() != _USE_PREFIX or text[3] not in b" \t\r\n`":
        return None
    name = text[3:].strip().rstrip(b";").strip()
    if name.startswith(b"`") and name.endswith(b"`") and len(name) >= 2:
        name = name[1:-1].replace(b"``", b"`")
    elif not name or any(c in name for c in b" \t\r\n;"):
        return None
    return name.decode("utf-8", "replace")


class Relay:
    """Handles one accepted client connection from handshake to close."""

    def __init__(self, proxy: Proxy, client: Connection) -> None:
        self.proxy = proxy
        self.client = client
        self.reader = PacketReader(max_payload=proxy.settings.max_allowed_packet)
        self.session = SessionState(next(_connection_ids), client.peer())
        self.backend: BackendConnection | None = None
        self.scramble = _scramble()
        self.idle_scope: trio.CancelScope | None = None
        self.idle = False
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.credentials: Credentials | None = None
        self.authenticated = False
        self.scope = trio.CancelScope()
        self._waiter: Waiter | None = None
        self.idle_since = 0.0
        self.idle_expired = False

    # -- plumbing --------------------------------------------------------

    async def _read_client_packet(self) -> Packet:
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet
            data = await self.client.receive_some()
            if not data:
                raise ClientGone()
            self.bytes_from_client += len(data)
            self.reader.feed(data)

    async def _send_client(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.client.send_all(data)
        except ConnectionClosed as error:
            raise ClientGone() from error
        self.bytes_to_client += len(data)

    async def _send_error(self, code: ErrorCode, message: str, sequence: int) -> None:
        try:
            await self._send_client(error_packet(code, message, sequence))
        except ClientGone:
            pass

    # -- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        proxy = self.proxy
        try:
            with self.scope:
                # The handshake timeout bounds the client's side of the login;
                # waiting for a backend slot has its own (backend_queue_timeout).
                with trio.fail_after(proxy.settings.handshake_timeout):
                    login = await self._handshake()
                if login is not None:
                    self.authenticated = await self._open_backend(*login)
                if self.authenticated:
                    await self._command_loop()
        except trio.TooSlowError:
            log.info("client %s: handshake timed out", self.session.peer)
            await self._send_error(ErrorCode.HANDSHAKE_ERROR, "tidegate: handshake timed out", 2)
        except ClientGone:
            pass
        except ProtocolError as error:
            proxy.metrics.protocol_error("client")
            log.info("client %s: protocol error: %s", self.session.peer, error)
            code = (
                ErrorCode.NET_PACKET_TOO_LARGE
                if "max_allowed_packet" in str(error)
                else ErrorCode.NET_PACKETS_OUT_OF_ORDER
                if "sequence" in str(error)
                else ErrorCode.HANDSHAKE_ERROR
            )
            await self._send_error(code, f"tidegate: malformed packet: {error}", 0)
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        if self.backend is not None:
            backend, self.backend = self.backend, None
            await backend.aclose(polite=not backend.closed)
            self.proxy.backend_closed(self, backend)
        await self.client.aclose()

    # -- handshake and authentication --------------------------------------

    async def _handshake(self) -> tuple[Credentials, str | None, int] | None:
        proxy = self.proxy
        greeting = proxy.greeting
        offered = int(greeting.capabilities & RELAYABLE) | int(
            Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
        )
        if proxy.settings.client_tls is not None:
            offered |= int(Capability.SSL)
        handshake = Handshake(
            server_version=greeting.server_version,
            connection_id=self.session.connection_id,
            scramble=self.scramble,
            capabilities=offered,
            character_set=greeting.character_set or 45,
            status=int(Status.AUTOCOMMIT),
            auth_plugin=auth.NATIVE,
        )
        await self._send_client(frame(handshake.encode(), 0)[0])
        packet = await self._read_client_packet()
        sequence = packet.last_sequence + 1
        if HandshakeResponse.is_ssl_request(packet.payload):
            if proxy.settings.client_tls is None:
                raise ProtocolError("client asked for TLS, which is not configured")
            await self._start_tls(proxy.settings.client_tls)
            packet = await self._read_client_packet()
            sequence = packet.last_sequence + 1
        elif proxy.settings.client_tls_required:
            await self._send_error(
                ErrorCode.SECURE_TRANSPORT_REQUIRED,
                "tidegate: connections must use TLS (client_tls.required = true)",
                sequence,
            )
            return None
        response = HandshakeResponse.parse(packet.payload)
        session = self.session
        session.capabilities = response.capabilities & offered & ~int(Capability.SSL)
        session.user = response.username
        session.character_set = response.character_set
        session.attributes = response.attributes
        result = await self._authenticate(
            response.username, response.auth_plugin or auth.NATIVE, response.auth_response, sequence
        )
        if result is None:
            return None
        credentials, sequence = result
        return credentials, response.database, sequence

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        client = self.client
        if not isinstance(client, RawConnection):
            raise ProtocolError("TLS requested twice")
        transport: trio.abc.Stream = client.detach_stream()
        if self.reader.pending():
            transport = PrefixedStream(self.reader.take_pending(), transport)
        stream = trio.SSLStream(transport, context, server_side=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as error:
            raise ClientGone() from error
        self.client = StreamConnection(stream, client.peer())

    @property
    def tls(self) -> bool:
        return isinstance(self.client, StreamConnection)

    async def _authenticate(
        self, username: str, plugin: str, token: bytes, sequence: int
    ) -> tuple[Credentials, int] | None:
        """Check the client's proof; returns backend credentials and next sequence."""
        proxy = self.proxy
        account = await proxy.users.lookup(username)
        stage1: bytes | None = None
        password: str | None = None
        if account is not None and not account.terminable:
            proxy.metrics.auth_failure("unsupported_plugin")
            await self._send_error(
                ErrorCode.NOT_SUPPORTED_AUTH_MODE,
                f"tidegate: user '{username}' uses auth plugin '{account.plugin}', which the "
                "proxy cannot terminate; use mysql_native_password or configure the user",
                sequence,
            )
            return None
        if account is not None:
            if plugin == auth.CACHING_SHA2:
                result = await self._caching_sha2(account, token, sequence)
                if result is not None:
                    stage1, password, sequence = result
            else:
                if plugin != auth.NATIVE:
                    # Ask the client for a native scramble response instead.
                    switch = AuthSwitch(auth.NATIVE, self.scramble + b"\x00")
                    await self._send_client(frame(switch.encode(), sequence)[0])
                    packet = await self._read_client_packet()
                    token, sequence = packet.payload, packet.last_sequence + 1
                stage1 = account.verify_native(token, self.scramble)
        if stage1 is None and account is not None and account.source == "backend":
            # The password may have changed in the database: reload once and retry.
            if await proxy.users.refresh() and plugin == auth.NATIVE:
                account = proxy.users.get(username)
                if account is not None:
                    stage1 = account.verify_native(token, self.scramble)
        if stage1 is None or account is None:
            proxy.metrics.auth_failure("unknown_user" if account is None else "bad_password")
            log.info("client %s: access denied for user %r", self.session.peer, username)
            await self._send_error(
                ErrorCode.ACCESS_DENIED,
                f"Access denied for user '{username}'@'{self.session.peer.rsplit(':', 1)[0]}' "
                f"(using password: {'YES' if token else 'NO'})",
                sequence,
            )
            return None
        if password is None:
            password = account.password
        return Credentials(username, stage1, password), sequence

    async def _caching_sha2(
        self, account: Account, token: bytes, sequence: int
    ) -> tuple[bytes | None, str | None, int] | None:
        if not token and account.empty_password:
            return b"", "", sequence
        if account.sha2_digest is not None and auth.caching_sha2_verify(
            token, self.scramble, account.sha2_digest
        ):
            await self._send_client(frame(auth_more_data(auth.FAST_AUTH_SUCCESS), sequence)[0])
            return account.stage1, account.password, sequence + 1
        await self._send_client(frame(auth_more_data(auth.PERFORM_FULL_AUTH), sequence)[0])
        packet = await self._read_client_packet()
        sequence = packet.last_sequence + 1
        if self.tls:
            password = packet.payload.rstrip(b"\x00").decode("utf-8", "replace")
        else:
            if packet.payload != auth.REQUEST_PUBLIC_KEY:
                return None
            key = self.proxy.rsa_key()
            await self._send_client(frame(auth_more_data(key.public_pem), sequence)[0])
            packet = await self._read_client_packet()
            sequence = packet.last_sequence + 1
            plain = key.decrypt(packet.payload)
            if plain is None:
                return None
            password = auth.xor_password(plain, self.scramble).rstrip(b"\x00").decode("utf-8", "replace")
        stage1 = account.verify_clear(password)
        if stage1 is None:
            return None
        return stage1, password, sequence

    async def _open_backend(self, credentials: Credentials, database: str | None, sequence: int) -> bool:
        proxy = self.proxy
        session = self.session
        try:
            backend = await proxy.open_backend(self, credentials, database)
        except BackendError as error:
            await self._send_client(frame(error.err.encode(), sequence)[0])
            return False
        except BackendUnavailable as error:
            log.warning("client %s: %s", session.peer, error)
            await self._send_error(ErrorCode.CONNECTION_ERROR, f"tidegate: {error}", sequence)
            return False
        if self.backend is not None:
            old = self.backend
            await old.aclose()
            proxy.backend_closed(self, old)
        self.backend = backend
        self.credentials = credentials
        session.user = credentials.user
        session.schema = database
        session.status = backend.status or int(Status.AUTOCOMMIT)
        session.prepared.clear()
        session.transaction_started = None
        ok = Ok(status=session.status)
        await self._send_client(frame(ok.encode(), sequence)[0])
        return True

    # -- commands --------------------------------------------------------

    async def _command_loop(self) -> None:
        proxy = self.proxy
        idle_timeout = proxy.settings.idle_timeout
        # One scope for the connection's life, cancelled by the proxy's idle
        # watchdog (or by shutdown) only while the session waits for a command.
        # Moving a deadline per command would cost more than the relay itself.
        with trio.CancelScope() as scope:
            self.idle_scope = scope
            await self._commands(scope, idle_timeout)
        self.idle_scope = None
        if scope.cancelled_caught and self.idle_expired and not proxy.draining:
            log.info("client %s: idle for %ss, closing", self.session.peer, idle_timeout)
            await self._send_error(
                ErrorCode.NET_READ_INTERRUPTED,
                f"tidegate: connection idle for more than {idle_timeout:g}s",
                0,
            )

    async def _commands(self, scope: trio.CancelScope, idle_timeout: float) -> None:
        proxy = self.proxy
        session = self.session
        metrics = proxy.metrics
        gate = proxy.gate
        reader = self.reader
        counter = 0
        counted_in = counted_out = 0
        current_time = trio.current_time
        while True:
            packet = reader.next_packet()
            if packet is None:
                if proxy.draining and not session.in_transaction:
                    return
                self.idle_since = current_time()
                self.idle = True
                packet = await self._read_client_packet()
                self.idle = False
            counter += 1
            if counter & 63 == 0:
                await trio.lowlevel.checkpoint()
            payload = packet.payload
            if packet.sequence != 0 or not payload:
                raise ProtocolError(f"command packet with sequence {packet.sequence}")
            command = payload[0]
            started = time.perf_counter()
            if command == _COM_QUERY:
                session.current_raw = payload
                if gate.holds:
                    await self._admit()
                ok = await self._relay_command(packet, command)
                if ok:
                    head = payload[1:4]
                    if head == b"USE" or head == b"use" or head.lower() == b"use" or payload[1:2].isspace():
                        target = use_target(payload[1:])
                        if target is not None:
                            session.schema = target
            elif command in NO_RESPONSE:
                if command == Command.QUIT:
                    return
                await self._forward(packet)
                if command == Command.STMT_CLOSE and len(payload) >= 5:
                    session.prepared.pop(int.from_bytes(payload[1:5], "little"), None)
                continue
            elif command in UNSUPPORTED or command > Command.RESET_CONNECTION:
                await self._send_error(
                    ErrorCode.UNKNOWN_COM_ERROR,
                    f"tidegate: command 0x{command:02x} is not supported through the proxy",
                    1,
                )
                metrics.observe_query(command, False, time.perf_counter() - started)
                continue
            elif command == Command.CHANGE_USER:
                session.current_raw = None
                ok = await self._change_user(payload)
            else:
                session.current_raw = payload if command in _GATED else None
                if gate.holds and session.current_raw is not None:
                    await self._admit()
                ok = await self._relay_command(packet, command)
                if ok:
                    if command == Command.INIT_DB:
                        session.schema = payload[1:].decode("utf-8", "replace")
                    elif command == Command.RESET_CONNECTION:
                        session.prepared.clear()
            if session.status & _IN_TRANS:
                statements = session.txn_statements
                if len(statements) < MAX_TRACKED_STATEMENTS:
                    sql = session.inflight_sql()
                    if sql is not None:
                        statements.append(sql)
                elif statements[-1] is not UNKNOWN_SQL:
                    statements.append(UNKNOWN_SQL)
            elif session.txn_statements:
                session.txn_statements = []
            session.current_raw = None
            if gate.holds:
                gate.notify()
            session.queries += 1
            metrics.observe_query(command, ok, time.perf_counter() - started)
            metrics.count_bytes(
                self.bytes_from_client - counted_in, self.bytes_to_client - counted_out
            )
            counted_in, counted_out = self.bytes_from_client, self.bytes_to_client

    async def _admit(self) -> None:
        """Wait at the gate while a cut-over holds a table this statement touches."""
        session = self.session
        gate = self.proxy.gate
        sql = session.inflight_sql()
        if sql is None:
            return
        tables = gate.classifier.classify(sql).resolved(session.schema)
        session.held = True
        try:
            self._waiter = await gate.admit(session, tables, self.proxy.settings.max_hold_wait)
        finally:
            session.held = False

    async def _forward(self, packet: Packet) -> None:
        backend = self.backend
        assert backend is not None
        try:
            await backend.send_all(packet.raw)
        except ConnectionClosed:
            await self._backend_lost(1, "while sending")

    async def _backend_lost(self, sequence: int, when: str) -> None:
        backend = self.backend
        name = backend.endpoint.name if backend else "?"
        self.proxy.metrics.protocol_error("backend")
        log.warning("client %s: lost backend %s %s", self.session.peer, name, when)
        await self._send_error(
            ErrorCode.SERVER_LOST,
            f"tidegate: lost connection to backend {name} {when}; the session's state is gone",
            sequence,
        )
        raise ClientGone()

    async def _relay_command(self, packet: Packet, command: int) -> bool:
        """Forward one command and stream its response; returns success."""
        backend = self.backend
        assert backend is not None
        session = self.session
        try:
            await backend.send_all(packet.raw)
        except ConnectionClosed:
            await self._backend_lost(1, "while sending the command")
        if self._waiter is not None:
            self._waiter.sent.set()  # the next held statement may go now
            self._waiter = None
        tracker = ResponseTracker(command, session.capabilities)
        receive = backend.receive_some
        send = self._send_client
        while True:
            try:
                data = await receive()
            except ConnectionClosed:
                data = b""
            if not data:
                await self._backend_lost(tracker.last_sequence + 1, "mid-response")
            try:
                end = tracker.feed(data)
            except ProtocolError as error:
                self.proxy.metrics.protocol_error("backend")
                log.error("backend %s sent malformed response: %s", backend.endpoint.name, error)
                await self._backend_lost(tracker.last_sequence + 1, f"(malformed response: {error})")
            if end < 0:
                await send(data)
                continue
            if end != len(data):
                log.warning("backend sent %d unexpected bytes after a response", len(data) - end)
                data = data[:end]
            await send(data)
            if tracker.infile_requested:
                await self._relay_infile()
                tracker.resume_after_infile()
                continue
            break
        if tracker.status_known:
            session.status = tracker.status & ~_MORE_RESULTS
        if tracker.error_code in _ROLLS_BACK_TRANSACTION:
            # The server rolled the whole transaction back; an ERR carries no
            # status flags to say so.
            session.status &= ~_IN_TRANS
        if session.status & _IN_TRANS:
            if session.transaction_started is None:
                session.transaction_started = time.time()
        else:
            session.transaction_started = None
        if tracker.prepared is not None:
            statement, columns, params = tracker.prepared
            session.prepared[statement] = PreparedStatement(statement, packet.payload[1:], params, columns)
        return tracker.error_code == 0

    async def _relay_infile(self) -> None:
        """LOCAL INFILE: forward the client's file packets until the empty one."""
        backend = self.backend
        assert backend is not None
        while True:
            packet = await self._read_client_packet()
            try:
                await backend.send_all(packet.raw)
            except ConnectionClosed:
                await self._backend_lost(packet.last_sequence + 1, "during LOCAL INFILE")
            if not packet.payload:
                return

    async def _change_user(self, payload: bytes) -> bool:
        session = self.session
        reader = Reader(payload, 1)
        user = reader.nul_bytes().decode("utf-8", "replace")
        if session.capabilities & Capability.SECURE_CONNECTION:
            token = reader.fixed(reader.u8())
        else:
            token = reader.nul_bytes()
        database = reader.nul_bytes().decode("utf-8", "replace") if not reader.at_end() else ""
        plugin = auth.NATIVE
        if reader.remaining() >= 2:
            character_set = reader.u16()
            session.character_set = character_set & 0xFF
            if session.capabilities & Capability.PLUGIN_AUTH and not reader.at_end():
                plugin = reader.nul_bytes().decode("ascii", "replace") or auth.NATIVE
        result = await self._authenticate(user, plugin, token, 1)
        if result is None:
            # Like the server: a failed change of user leaves the connection
            # usable with a reset session (variables, transaction, statements).
            await self._reset_backend_session()
            return False
        credentials, sequence = result
        old = self.backend
        if old is not None:
            # Free its connection slot first: the new login takes its own.
            self.backend = None
            await old.aclose()
            self.proxy.backend_closed(self, old)
        if not await self._open_backend(credentials, database or None, sequence):
            raise ClientGone()  # the ERR went out; without a backend the session ends
        return True

    async def _reset_backend_session(self) -> None:
        backend = self.backend
        if backend is None:
            return
        try:
            await backend.send_all(frame(bytes((Command.RESET_CONNECTION,)), 0)[0])
            tracker = ResponseTracker(Command.RESET_CONNECTION, self.session.capabilities)
            while True:
                data = await backend.receive_some()
                if not data or tracker.feed(data) >= 0:
                    break
        except ConnectionClosed:
            await self._backend_lost(2, "while resetting the session")
        session = self.session
        session.prepared.clear()
        session.txn_statements = []
        if tracker.status_known:
            session.status = tracker.status


class RSAKey:
    """Key pair for caching_sha2_password full authentication without TLS."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def decrypt(self, data: bytes) -> bytes | None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            return self._key.decrypt(
                data,
                padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
            )
        except ValueError:
            return None


class Proxy:
    """The listener side: accepts clients, enforces limits, owns all relays."""

    def __init__(
        self,
        settings: Settings,
        primary: Endpoint,
        users: UserDirectory,
        greeting: Handshake,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.settings = settings
        self.primary = primary
        self.users = users
        self.greeting = greeting
        self.metrics: MetricsSink = metrics or NullMetrics()
        self.relays: dict[int, Relay] = {}
        self.draining = False
        self.backend_limiter = BackendLimiter(
            settings.max_backend_connections,
            settings.backend_queue_size,
            settings.backend_queue_timeout,
            self.metrics,
        )
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        self.listening: list[tuple[str, int]] = []
        self._rsa: RSAKey | None = None
        self._listeners: list[trio.SocketListener] = []
        self._on_close: list[Callable[[Relay], None]] = []
        self.gate = Gate(
            lambda: [relay.session for relay in self.relays.values()],
            metrics=self.metrics,
        )

    def rsa_key(self) -> RSAKey:
        if self._rsa is None:
            self._rsa = RSAKey()
        return self._rsa

    async def open_backend(
        self, relay: Relay, credentials: Credentials, database: str | None
    ) -> BackendConnection:
        if not await self.backend_limiter.acquire(relay):
            raise BackendError(
                Err.of(
                    ErrorCode.CON_COUNT_ERROR,
                    "tidegate: too many backend connections "
                    f"({self.settings.max_backend_connections} in use, waited "
                    f"{self.settings.backend_queue_timeout:g}s)",
                )
            )
        endpoint = self.primary
        session = relay.session
        attributes = dict(session.attributes)
        attributes["_tidegate_client"] = session.peer
        try:
            backend = await connect(
                endpoint,
                credentials,
                database=database,
                client_capabilities=session.capabilities,
                character_set=session.character_set or 45,
                attributes=attributes,
                timeout=self.settings.connect_timeout,
            )
        except BackendUnavailable:
            self.backend_limiter.release(relay)
            self.metrics.backend_connect_error(endpoint.name)
            raise
        except BaseException:
            self.backend_limiter.release(relay)
            raise
        self.metrics.backend_connected(endpoint.name)
        return backend

    def backend_closed(self, relay: Relay, backend: BackendConnection) -> None:
        self.backend_limiter.release(relay)
        self.metrics.backend_disconnected(backend.endpoint.name)

    def byte_totals(self) -> tuple[int, int]:
        incoming = self.closed_bytes_in + sum(r.bytes_from_client for r in self.relays.values())
        outgoing = self.closed_bytes_out + sum(r.bytes_to_client for r in self.relays.values())
        return incoming, outgoing

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
        self._listeners = listeners
        self.listening = [tuple(listener.socket.getsockname()[:2]) for listener in listeners]
        async with trio.open_nursery() as handlers:
            handlers.start_soon(self._idle_watchdog)
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept_loop, listener, handlers)
                task_status.started(self.listening)
            # acceptors end when the listeners close (shutdown); handlers drain

    async def _idle_watchdog(self) -> None:
        """Closes sessions idle longer than idle_timeout (checked every second)."""
        timeout = self.settings.idle_timeout
        interval = min(1.0, max(timeout / 4, 0.05))
        while self.listening or not self.draining:
            await trio.sleep(interval)
            now = trio.current_time()
            for relay in list(self.relays.values()):
                if relay.idle and relay.idle_scope is not None and now - relay.idle_since > timeout:
                    relay.idle_expired = True
                    relay.idle_scope.cancel()
            if self.draining and not self.relays:
                return

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        sock = listener.socket
        while True:
            try:
                trio_socket, _ = await sock.accept()
            except (trio.ClosedResourceError, OSError) as error:
                if self.draining:
                    return
                if isinstance(error, OSError) and error.errno in (24, 23, 105, 12):  # EMFILE etc.
                    log.error("accept failed: %s", error)
                    await trio.sleep(0.1)
                    continue
                return
            raw = trio_socket.detach()
            import socket as stdlib_socket

            connection = RawConnection(stdlib_socket.socket(fileno=raw))
            handlers.start_soon(self._handle, connection)

    async def _handle(self, connection: RawConnection) -> None:
        metrics = self.metrics
        if len(self.relays) >= self.settings.max_client_connections:
            metrics.connection_rejected("max_client_connections")
            try:
                await connection.send_all(
                    error_packet(
                        ErrorCode.CON_COUNT_ERROR,
                        f"Too many connections (tidegate max_client_connections="
                        f"{self.settings.max_client_connections})",
                        0,
                    )
                )
            except ConnectionClosed:
                pass
            await connection.aclose()
            return
        if self.draining:
            metrics.connection_rejected("shutting_down")
            try:
                await connection.send_all(
                    error_packet(ErrorCode.SERVER_SHUTDOWN, "tidegate is shutting down", 0)
                )
            except ConnectionClosed:
                pass
            await connection.aclose()
            return
        relay = Relay(self, connection)
        self.relays[relay.session.connection_id] = relay
        metrics.client_connected()
        try:
            await relay.run()
        except Exception:
            log.exception("client %s: unexpected error", relay.session.peer)
        finally:
            del self.relays[relay.session.connection_id]
            if self.gate.holds:
                self.gate.notify()
            self.closed_bytes_in += relay.bytes_from_client
            self.closed_bytes_out += relay.bytes_to_client
            metrics.client_disconnected()
            for callback in self._on_close:
                callback(relay)

    def begin_shutdown(self) -> None:
        """Stop accepting; idle sessions close now, busy ones after their transaction."""
        self.draining = True
        for listener in self._listeners:
            sock = listener.socket
            trio.lowlevel.notify_closing(sock)
            sock.close()
        for relay in list(self.relays.values()):
            if not relay.authenticated:
                relay.scope.cancel()
            elif relay.idle and not relay.session.in_transaction and relay.idle_scope is not None:
                relay.idle_scope.cancel()
