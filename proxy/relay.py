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
import math
import re
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
from proxy.classify import Facts, Kind
from proxy.config import Limits
from proxy.events import trace_id_of
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
from proxy.routing import NO_DECISION, Decision, RuleSet, is_set_names
from proxy.users import Account, UserDirectory

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.router import Router

log = logging.getLogger("tidegate.relay")

#: Session ids the proxy hands out (the handshake's thread id).  They start at
#: 2^30 so they never collide with a backend's thread ids, which is what lets
#: ``KILL <id>`` be translated safely (see Relay._translate_kill).
PROXY_ID_BASE = 1 << 30
_connection_ids = itertools.count(PROXY_ID_BASE)
_KILL = re.compile(
    rb"\s*KILL\s+((?:HARD\s+|SOFT\s+)?(?:CONNECTION\s+|QUERY\s+)?(?:ID\s+)?)(\d+)\s*;?\s*$", re.IGNORECASE
)
_COM_PROCESS_KILL = 0x0C
_USE_ANYWHERE = re.compile(rb"(?:\A|(?<=\x03)|;)\s*use\s", re.IGNORECASE)
_DB_DROPPED = int(Status.DB_DROPPED)


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
    def traced_statement(self, outcome: str) -> None: ...


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

    def traced_statement(self, outcome: str) -> None:
        pass


@dataclass(frozen=True)
class Settings(Limits):
    """The configuration's ``[limits]`` plus what the relay needs from elsewhere in it."""

    client_tls: ssl.SSLContext | None = None
    client_tls_required: bool = False
    #: longest a statement waits at the gate, whatever happens to the hold
    max_hold_wait: float = 30.0
    #: comment tags carrying a trace id (``events.trace_tags``); statements with one are counted
    trace_tags: tuple[str, ...] = ("traceparent",)


@dataclass
class PreparedStatement:
    statement_id: int
    sql_bytes: bytes
    params: int
    columns: int
    #: classified once, at prepare, while routing is active (None otherwise)
    facts: Facts | None = None

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

    def try_acquire(self, owner: object) -> bool:
        """A slot now or never (replica connections: the primary is the fallback)."""
        try:
            self._limiter.acquire_on_behalf_of_nowait(owner)
            return True
        except trio.WouldBlock:
            return False

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


_PRIMARY_STATUS = int(Status.IN_TRANS | Status.AUTOCOMMIT)
_AUTOCOMMIT = int(Status.AUTOCOMMIT)
#: statements a replica may answer (SHOW, EXPLAIN, ... stay on the primary)
_REPLICA_KEYWORDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})
#: statements about the previous statement go where it went
_ABOUT_LAST = re.compile(
    rb"\s*(?:SHOW\s+(?:COUNT\s*\(\s*\*\s*\)\s+)?(?:WARNINGS|ERRORS)|SELECT\s+@@(?:SESSION\.)?(?:warning|error)_count\s*;?\s*$)",
    re.I,
)
#: after a replica connection fails, the session tries again this much later
REPLICA_RETRY = 5.0


class _ReplicaLost(Exception):
    """The replica connection died before any of its answer reached the client."""


@dataclass(eq=False)
class ReplicaLink:
    """A session's connection to one replica, with the session state replayed on it."""

    name: str
    connection: BackendConnection
    schema: str | None
    #: the SET NAMES statement last replayed (None: the handshake's character set)
    names: bytes | None = None


#: a long statement is searched for a trace tag only this far from either end
#: (sqlcommenter appends its comment; tagging libraries prepend theirs)
_TRACE_WINDOW = 1024


def _traced(payload: bytes, match: bytes | Callable[[bytes], re.Match[bytes] | None]) -> bool:
    """A trace tag in the head or the tail of a statement (the middle is data)."""
    parts = (payload,) if len(payload) <= _TRACE_WINDOW * 2 else (
        payload[:_TRACE_WINDOW], payload[-_TRACE_WINDOW:])
    if isinstance(match, bytes):
        return any(match in part for part in parts)
    return any(match(part) is not None for part in parts)


def _trace_matchers(
    tags: tuple[str, ...],
) -> tuple[bytes | None, Callable[[bytes], re.Match[bytes] | None] | None]:
    """A substring for one trace tag, a regex search for several."""
    if not tags:
        return None, None
    if len(tags) == 1:
        return tags[0].encode(), None
    return None, re.compile(b"|".join(re.escape(tag.encode()) for tag in tags)).search


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
        # Routing state (used only while proxy.routing is set).
        self.replica: ReplicaLink | None = None
        #: owns the replica connection's backend slot (the relay itself owns the primary's)
        self.replica_slot = object()
        #: why the session's reads stay on the primary (session state), or None
        self.pinned: str | None = None
        self._names: bytes | None = None
        self._wrote_at = -math.inf
        self._last_on_replica = False
        self._replica_retry_at = -math.inf
        self._mask_key: tuple[RuleSet, str | None, str, int] | None = None
        #: session.queries as the router last saw it (a gap: statements it did not see)
        self._tracked = 0
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
            # the reply to the client's packet: a command is sequence 0 (reply 1),
            # the handshake response 1 (reply 2); a client reads sequence 0 as "server lost"
            await self._send_error(code, f"tidegate: malformed packet: {error}", 1 if self.authenticated else 2)
            await self._drain_client()
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _drain_client(self, seconds: float = 1.0, limit: int = 64 << 20) -> None:
        """Read and drop what the client is still sending before the close.

        After a protocol error (an oversized packet, most often) the client may
        still be writing the rest of it; a socket closed with unread data is
        reset, and the client would see a broken pipe (2006) instead of the
        error just sent.  Bounded in time and bytes.
        """
        received = 0
        with trio.move_on_after(seconds):
            while received < limit:
                try:
                    data = await self.client.receive_some()
                except ConnectionClosed:
                    return
                if not data:
                    return
                received += len(data)

    async def _close(self) -> None:
        if self.replica is not None:
            await self._close_replica(polite=False)
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
        # Statements carrying a trace context are counted: one substring test
        # per COM_QUERY (0.1-0.2 µs for a short statement on the 2-core test
        # machine; events.trace_tags = [] turns it off), nothing more.
        trace_needle, trace_search = _trace_matchers(proxy.settings.trace_tags)
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
            if (command == _COM_QUERY and payload[1:2] in b"Kk \t\r\n") or command == _COM_PROCESS_KILL:
                translated = self._translate_kill(command, payload)
                if translated is not None:
                    payload = translated
                    packet = Packet(0, payload, frame(payload, 0)[0], 0)
            if command == _COM_QUERY:
                session.current_raw = payload
                if trace_needle is not None and (
                    trace_needle in payload if len(payload) <= _TRACE_WINDOW * 2 else _traced(payload, trace_needle)
                ):
                    metrics.traced_statement("seen")
                elif trace_search is not None and _traced(payload, trace_search):
                    metrics.traced_statement("seen")
                routing = proxy.routing
                if routing is not None:
                    ok = await self._routed_query(routing, packet, payload)
                else:
                    if gate.holds:
                        await self._admit()
                    ok = await self._relay_command(packet, command)
                if session.status & _DB_DROPPED:
                    session.schema = None  # the current schema was dropped
                if ok:
                    head = payload[1:4]
                    if head == b"USE" or head == b"use" or head.lower() == b"use" or payload[1:2].isspace():
                        target = use_target(payload[1:])
                        if target is not None:
                            session.schema = target
                if b";" in payload and _USE_ANYWHERE.search(payload, 1):
                    await self._refresh_schema()  # a USE inside a multi-statement batch
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
                routing = proxy.routing
                if routing is not None:
                    ok = await self._routed_command(routing, packet, command, payload)
                else:
                    if gate.holds and session.current_raw is not None:
                        await self._admit()
                    ok = await self._relay_command(packet, command)
                if ok:
                    if command == Command.INIT_DB:
                        session.schema = payload[1:].decode("utf-8", "replace")
                    elif command == Command.RESET_CONNECTION:
                        session.prepared.clear()
                        if self.replica is not None or self.pinned is not None or self._names is not None:
                            await self._forget_routing_state()
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

    # -- routing (only while proxy.routing is set) ---------------------------

    async def _routed_query(self, routing: Router, packet: Packet, payload: bytes) -> bool:
        """COM_QUERY with routing on: rules, backpressure, the gate, then the chosen backend.

        The gate admits the statement as it will be sent (after rewrites), and
        whichever backend it then goes to: a hold applies everywhere.
        """
        session = self.session
        sql = payload[1:]
        facts = routing.classifier.classify(sql)
        if session.queries != self._tracked and self.pinned is None:
            # Statements ran while routing was off: their effect on the session is unknown.
            await self._pin("statements ran while routing was off")
        self._tracked = session.queries + 1
        decision: Decision = NO_DECISION
        rules = routing.rules
        if rules.rules:
            decision = rules.decide(sql, facts, session.schema, self._rule_mask(rules), session.attributes)
            if decision is not NO_DECISION:
                rules.count(decision)
                if decision.reject is not None:
                    self._traced_event("rejected", facts, reason=decision.reject, rule=decision.rules[-1])
                    await self._send_client(error_packet(
                        ErrorCode.NOT_ALLOWED_COMMAND,
                        f"tidegate: {decision.reject} (rule {decision.rules[-1]})",
                        1,
                    ))
                    return False
                if decision.sql is not None:
                    payload = b"\x03" + decision.sql
                    raw, following = frame(payload, 0)
                    packet = Packet(0, payload, raw, (following - 1) & 0xFF)
                    session.current_raw = payload
        if routing.pressure_possible and facts.kind is Kind.WRITE and not await self._backpressure(routing, facts):
            return False
        if self.proxy.gate.holds:
            await self._admit()
        link = await self._choose(routing, decision, facts, sql)
        mirror = decision.mirror
        # Reads only: a write copied to a replica would make it diverge.
        if mirror is not None and facts.kind is Kind.READ and not facts.multi and self.credentials is not None:
            routing.mirror_statement(mirror, self.credentials, session.schema, payload[1:])
        if link is not None:
            try:
                ok = await self._relay_command(packet, _COM_QUERY, link.connection)
            except _ReplicaLost:
                log.warning("client %s: replica %s lost before answering; retrying on the primary",
                            session.peer, link.name)
                await self._close_replica(polite=False)
            else:
                routing.routed[link.name] += 1
                self._last_on_replica = True
                return ok
        self._last_on_replica = False
        ok = await self._relay_command(packet, _COM_QUERY)
        routing.routed[routing.primary_name] += 1
        kind = facts.kind
        if kind is not Kind.READ or facts.primary_only:
            if kind is Kind.WRITE or kind is Kind.DDL:
                self._wrote_at = trio.current_time()
            if self.pinned is None:
                reason = routing.session_effect(sql, facts)
                if reason is not None:
                    await self._pin(reason)
                elif ok and facts.keyword == "SET" and is_set_names(sql.decode("utf-8", "replace")):
                    self._names = sql
        return ok

    async def _routed_command(self, routing: Router, packet: Packet, command: int, payload: bytes) -> bool:
        """Other commands with routing on: all on the primary; backpressure for prepared writes."""
        session = self.session
        self._tracked = session.queries + 1
        if command == _COM_STMT_EXECUTE:
            self._last_on_replica = False
            statement = session.prepared.get(int.from_bytes(payload[1:5], "little")) if len(payload) >= 5 else None
            if statement is not None:
                facts = statement.facts
                if facts is None:
                    facts = statement.facts = routing.classifier.classify(statement.sql_bytes)
                if facts.kind is not Kind.READ:
                    self._wrote_at = trio.current_time()
                if routing.pressure_possible and facts.kind is Kind.WRITE and not await self._backpressure(
                    routing, facts
                ):
                    return False
        elif command == _COM_STMT_PREPARE:
            self._last_on_replica = False
        if self.proxy.gate.holds and session.current_raw is not None:
            await self._admit()
        ok = await self._relay_command(packet, command)
        routing.routed[routing.primary_name] += 1
        if ok and command == _COM_STMT_PREPARE:
            sql = payload[1:]
            facts = routing.classifier.classify(sql)
            for prepared in session.prepared.values():
                if prepared.facts is None and prepared.sql_bytes == sql:
                    prepared.facts = facts
            if self.pinned is None and facts.kind is not Kind.READ:
                reason = routing.session_effect(sql, facts)
                if reason is not None:
                    await self._pin(f"prepared {reason}")
        return ok

    async def _backpressure(self, routing: Router, facts: Facts) -> bool:
        """Wait while lag is over its limit; False after sending the 1637 error."""
        session = self.session
        tables = facts.resolved(session.schema)
        priority = routing.priority_of(facts, session.attributes)
        if routing.pressure(tables, priority) is None:
            return True
        # Not in flight while it waits: a cut-over drain must not wait for it.
        raw, session.current_raw = session.current_raw, None
        try:
            rejection = await routing.admit_write(tables, priority)
        finally:
            session.current_raw = raw
        if rejection is None:
            return True
        self._traced_event("rejected", facts, reason=rejection.message(),
                           tables=sorted(tables) if tables is not None else None)
        await self._send_client(error_packet(ErrorCode.TOO_MANY_CONCURRENT_TRXS, rejection.message(), 1))
        return False

    async def _choose(self, routing: Router, decision: Decision, facts: Facts, sql: bytes) -> ReplicaLink | None:
        """The replica link for this statement, or None for the primary."""
        if self._last_on_replica and self.replica is not None and _ABOUT_LAST.match(sql):
            return self.replica  # SHOW WARNINGS and the like: where the last statement ran
        route = decision.route
        if route is None:
            if not routing.split:
                return None
        elif route == "primary" or route == routing.primary_name:
            return None
        session = self.session
        if (
            facts.kind is not Kind.READ
            or facts.primary_only
            or facts.keyword not in _REPLICA_KEYWORDS
            or facts.tables is None
            or session.status & _PRIMARY_STATUS != _AUTOCOMMIT
            or self.pinned is not None
            or trio.current_time() - self._wrote_at < routing.read_your_writes
        ):
            return None
        link = self.replica
        name = routing.replica_for(route, link.name if link is not None else None)
        if name is None:
            return None
        if link is None or link.name != name or link.connection.closed:
            link = await self._open_replica(routing, name)
            if link is None:
                return None
        if (link.schema != session.schema or link.names != self._names) and not await self._sync_replica(link):
            return None
        return link

    async def _open_replica(self, routing: Router, name: str) -> ReplicaLink | None:
        if self.replica is not None:
            await self._close_replica()
        now = trio.current_time()
        if now < self._replica_retry_at or self.credentials is None:
            return None
        connection = await self.proxy.open_replica(self, routing.endpoints[name], self.credentials)
        if connection is None:
            self._replica_retry_at = now + REPLICA_RETRY
            return None
        self.replica = ReplicaLink(name, connection, self.session.schema)
        return self.replica

    async def _sync_replica(self, link: ReplicaLink) -> bool:
        """Replay the schema and SET NAMES on the replica; False: use the primary."""
        session = self.session
        connection = link.connection
        try:
            if link.schema != session.schema:
                if session.schema is None:
                    return False  # a connection cannot leave its schema
                await connection.query("USE `" + session.schema.replace("`", "``") + "`")
                link.schema = session.schema
            if link.names != self._names:
                if self._names is None:
                    return False
                await connection.query(self._names.decode("utf-8", "surrogateescape"))
                link.names = self._names
        except BackendError as error:
            log.info("client %s: cannot prepare replica %s: %s", session.peer, link.name, error)
            return False
        except (BackendUnavailable, ConnectionClosed, ProtocolError, OSError) as error:
            log.info("client %s: replica %s connection failed: %s", session.peer, link.name, error)
            await self._close_replica(polite=False)
            return False
        return True

    async def _close_replica(self, *, polite: bool = True) -> None:
        link, self.replica = self.replica, None
        self._last_on_replica = False
        if link is not None:
            with trio.CancelScope(shield=True):
                await link.connection.aclose(polite=polite and not link.connection.closed)
            self.proxy.replica_closed(self, link.connection)

    async def _pin(self, reason: str) -> None:
        self.pinned = reason
        log.debug("client %s: reads stay on the primary (%s)", self.session.peer, reason)
        if self.replica is not None:
            await self._close_replica()

    async def _forget_routing_state(self) -> None:
        """After COM_CHANGE_USER / COM_RESET_CONNECTION: the session starts over."""
        if self.replica is not None:
            await self._close_replica()
        self.pinned = None
        self._names = None
        self._wrote_at = -math.inf
        self._tracked = self.session.queries + 1

    def _rule_mask(self, rules: RuleSet) -> int:
        """Rules whose user/schema/attribute matchers accept this session (cached)."""
        session = self.session
        key = self._mask_key
        if key is not None and key[0] is rules and key[1] == session.schema and key[2] == session.user:
            return key[3]
        mask = rules.session_mask(session.user, session.schema, session.attributes)
        self._mask_key = (rules, session.schema, session.user, mask)
        return mask

    async def _refresh_schema(self) -> None:
        """Ask the backend which schema is current (rare: multi-statement USE)."""
        backend = self.backend
        if backend is None:
            return
        try:
            result = await backend.query("SELECT DATABASE()")
        except (BackendError, BackendUnavailable, ConnectionClosed, ProtocolError) as error:
            log.info("client %s: could not read the current schema: %s", self.session.peer, error)
            return
        rows = result.text_rows()
        if rows:
            self.session.schema = rows[0][0]

    def _translate_kill(self, command: int, payload: bytes) -> bytes | None:
        """``KILL [QUERY] <id>`` / COM_PROCESS_KILL naming one of *our* session ids
        (the thread id clients got from our handshake) → that session's backend
        connection id.  Other ids pass unchanged; the server checks privileges."""
        if command == _COM_PROCESS_KILL:
            if len(payload) < 5:
                return None
            target = int.from_bytes(payload[1:5], "little")
            backend_id = self._backend_id_of(target)
            return None if backend_id is None else bytes((command,)) + backend_id.to_bytes(4, "little")
        match = _KILL.match(payload, 1)
        if match is None:
            return None
        backend_id = self._backend_id_of(int(match.group(2)))
        if backend_id is None:
            return None
        return bytes((command,)) + b"KILL " + match.group(1) + str(backend_id).encode()

    def _backend_id_of(self, session_id: int) -> int | None:
        if session_id < PROXY_ID_BASE:
            return None
        relay = self.proxy.relays.get(session_id)
        if relay is None or relay.backend is None:
            return None
        return relay.backend.connection_id

    async def _admit(self) -> None:
        """Wait at the gate while a cut-over holds a table this statement touches."""
        session = self.session
        gate = self.proxy.gate
        sql = session.inflight_sql()
        if sql is None:
            return
        facts = gate.classifier.classify(sql)
        tables = facts.reach(session.schema)  # stored functions that reach a held table count too
        session.held = True
        try:
            self._waiter = await gate.admit(session, tables, self.proxy.settings.max_hold_wait)
        finally:
            session.held = False
        if self._waiter is not None and facts.tags:
            waited = round(trio.current_time() - self._waiter.arrived, 6)
            self._traced_event("held", facts, tables=sorted(tables) if tables is not None else None,
                               waited_seconds=waited)

    def _traced_event(self, outcome: str, facts: Facts, **fields: object) -> None:
        """A held or rejected statement that carries a trace id: counted and logged with it,
        so an application's slow or failed request lines up with what held or refused it."""
        trace_id = trace_id_of(facts.tags, self.proxy.settings.trace_tags) if facts.tags else None
        if trace_id is None:
            return
        session = self.session
        self.proxy.metrics.traced_statement(outcome)
        self.proxy.gate.events.emit(f"statement.{outcome}", trace_id=trace_id, session=session.connection_id,
                                    user=session.user, client=session.peer, **fields)

    async def _forward(self, packet: Packet) -> None:
        backend = self.backend
        assert backend is not None
        try:
            await backend.send_all(packet.raw)
        except ConnectionClosed:
            await self._backend_lost(1, "while sending")

    async def _backend_lost(self, sequence: int, when: str, backend: BackendConnection | None = None) -> None:
        backend = backend or self.backend
        name = backend.endpoint.name if backend else "?"
        self.proxy.metrics.protocol_error("backend")
        log.warning("client %s: lost backend %s %s", self.session.peer, name, when)
        await self._send_error(
            ErrorCode.SERVER_LOST,
            f"tidegate: lost connection to backend {name} {when}; the session's state is gone",
            sequence,
        )
        raise ClientGone()

    async def _relay_command(
        self, packet: Packet, command: int, replica: BackendConnection | None = None
    ) -> bool:
        """Forward one command and stream its response; returns success.

        With ``replica`` the command goes there instead of the primary; the
        session's state (status flags, prepared statements) is the primary's
        and stays untouched.  A replica that dies before any of its answer
        reached the client raises ``_ReplicaLost`` (the caller retries on the
        primary).
        """
        backend = self.backend if replica is None else replica
        assert backend is not None
        session = self.session
        try:
            await backend.send_all(packet.raw)
        except ConnectionClosed:
            if replica is not None:
                raise _ReplicaLost() from None
            await self._backend_lost(1, "while sending the command")
        if self._waiter is not None:
            self._waiter.sent.set()  # the next held statement may go now
            self._waiter = None
        tracker = ResponseTracker(command, session.capabilities)
        receive = backend.receive_some
        send = self._send_client
        forwarded = False
        while True:
            try:
                data = await receive()
            except ConnectionClosed:
                data = b""
            if not data:
                if replica is not None and not forwarded:
                    raise _ReplicaLost()
                await self._backend_lost(tracker.last_sequence + 1, "mid-response", backend)
            try:
                end = tracker.feed(data)
            except ProtocolError as error:
                self.proxy.metrics.protocol_error("backend")
                log.error("backend %s sent malformed response: %s", backend.endpoint.name, error)
                await self._backend_lost(tracker.last_sequence + 1, f"(malformed response: {error})", backend)
            if end < 0:
                await send(data)
                forwarded = True
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
        if replica is not None:
            return tracker.error_code == 0
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
            await self._forget_routing_state()
            return False
        credentials, sequence = result
        if self.replica is not None or self.pinned is not None or self._names is not None:
            await self._forget_routing_state()
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
        #: the router while it has work to do (rules, read/write split,
        #: backpressure), else None: the relay's hot path checks only this
        self.routing: Router | None = None
        #: open client-session connections per backend name
        self.backend_counts: dict[str, int] = {}

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
        self._count(endpoint.name, 1)
        return backend

    def backend_closed(self, relay: Relay, backend: BackendConnection) -> None:
        self.backend_limiter.release(relay)
        self.metrics.backend_disconnected(backend.endpoint.name)
        self._count(backend.endpoint.name, -1)

    def _count(self, name: str, delta: int) -> None:
        self.backend_counts[name] = self.backend_counts.get(name, 0) + delta

    async def open_replica(
        self, relay: Relay, endpoint: Endpoint, credentials: Credentials
    ) -> BackendConnection | None:
        """A replica connection for a session, logged in as its user; None: use the primary.

        It takes a backend slot only if one is free right now (never queues:
        the primary is there).
        """
        session = relay.session
        slot = relay.replica_slot
        if not self.backend_limiter.try_acquire(slot):
            return None
        attributes = dict(session.attributes)
        attributes["_tidegate_client"] = session.peer
        try:
            backend = await connect(
                endpoint,
                credentials,
                database=session.schema,
                client_capabilities=session.capabilities,
                character_set=session.character_set or 45,
                attributes=attributes,
                timeout=self.settings.connect_timeout,
            )
        except (BackendError, BackendUnavailable) as error:
            self.backend_limiter.release(slot)
            self.metrics.backend_connect_error(endpoint.name)
            log.warning("client %s: replica %s: %s; reads go to the primary", session.peer, endpoint.name, error)
            return None
        except BaseException:
            self.backend_limiter.release(slot)
            raise
        self.metrics.backend_connected(endpoint.name)
        self._count(endpoint.name, 1)
        return backend

    def replica_closed(self, relay: Relay, backend: BackendConnection) -> None:
        self.backend_limiter.release(relay.replica_slot)
        self.metrics.backend_disconnected(backend.endpoint.name)
        self._count(backend.endpoint.name, -1)

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
