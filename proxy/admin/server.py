"""The admin port's listener: mysql-mimic on asyncio, run inside trio.

``serve_admin`` opens a trio-asyncio loop for its lifetime, listens with
``asyncio.start_server`` and drives each client through mysql-mimic's
``Connection`` (subclassed where mysql-mimic is too lenient for an admin
port: a refused login ends the connection, handshakes have a deadline, OK
packets carry the insert id and an info text).  On cancellation it stops
listening, cancels the client tasks and waits a bounded time for them.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import socket
from collections.abc import AsyncGenerator
from hashlib import sha1
from typing import Any

import trio
import trio_asyncio
from mysql_mimic import packets, utils
from mysql_mimic.auth import (
    AuthInfo,
    Forbidden,
    IdentityProvider,
    NativePasswordAuthPlugin,
    Success,
    User,
)
from mysql_mimic.connection import Connection
from mysql_mimic.constants import DEFAULT_SERVER_CAPABILITIES, KillKind
from mysql_mimic.control import LocalControl
from mysql_mimic.errors import MysqlError
from mysql_mimic.stream import ConnectionClosed, MysqlStream
from mysql_mimic.types import Capabilities, str_len
from mysql_mimic.variables import SYSTEM_VARIABLES, GlobalVariables

from proxy.admin.session import AdminSession
from proxy.admin.tables import SQLSTATES
from proxy.config import AdminConfig
from proxy.control import Control

log = logging.getLogger("tidegate.admin")

ER_CON_COUNT_ERROR = 1040
ER_HANDSHAKE_ERROR = 1043
ER_ACCESS_DENIED_ERROR = 1045
ER_HOST_NOT_PRIVILEGED = 1130
ER_CONNECTION_KILLED = 1927

VERSION = "8.0.29-tidegate-admin"
VERSION_COMMENT = "tidegate admin port"
#: admin clients at once; more get error 1040
MAX_CONNECTIONS = 32
#: a client has this long to log in
HANDSHAKE_TIMEOUT = 10.0
#: on shutdown, client tasks get this long to finish after being cancelled
CLOSE_TIMEOUT = 2.0


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class _Ignore(logging.Filter):
    """mysql-mimic logs every ERR it sends at ERROR level; bad admin input is not a server error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(record.msg, MysqlError)


# ----------------------------------------------------------------------------- auth


class AdminPasswordPlugin(NativePasswordAuthPlugin):  # type: ignore[misc]
    """mysql_native_password that accepts only the admin user."""

    def __init__(self, admin_user: str) -> None:
        self.admin_user = admin_user

    async def auth(self, auth_info: AuthInfo | None = None) -> AsyncGenerator[Any, AuthInfo]:
        if auth_info and auth_info.handshake_plugin_name == self.name and auth_info.handshake_auth_data:
            nonce = auth_info.handshake_auth_data.rstrip(b"\x00")
        else:
            nonce = utils.nonce(20)
            auth_info = yield nonce + b"\x00"
        assert auth_info is not None
        if self.accepts(auth_info.user, auth_info.data, nonce):
            yield Success(auth_info.user.name)
        else:
            using = "YES" if auth_info.data else "NO"
            yield Forbidden(
                f"Access denied for user '{auth_info.username}' to the tidegate admin port "
                f"(using password: {using})"
            )

    def accepts(self, user: User, scramble: bytes, nonce: bytes) -> bool:
        if user.name != self.admin_user:
            return False
        if not user.auth_string:
            return not scramble
        stored = bytes.fromhex(user.auth_string)
        if len(scramble) != len(stored):
            return False
        candidate = utils.xor(scramble, sha1(nonce + stored).digest())
        return hmac.compare_digest(sha1(candidate).digest(), stored)


class AdminIdentity(IdentityProvider):  # type: ignore[misc]
    def __init__(self, config: AdminConfig) -> None:
        self.config = config
        self.plugin = AdminPasswordPlugin(config.user)
        password = config.password
        self.auth_string = NativePasswordAuthPlugin.create_auth_string(password) if password else None

    def get_plugins(self) -> list[Any]:
        return [self.plugin]

    async def get_user(self, username: str) -> User:
        # Every name gets a user record so an unknown name and a wrong password
        # get the same answer; the plugin accepts only the admin user.
        return User(
            name=username,
            auth_string=self.auth_string if username == self.config.user else None,
            auth_plugin=self.plugin.name,
        )


# ----------------------------------------------------------------------------- connection


class AdminConnection(Connection):  # type: ignore[misc]
    session: AdminSession

    async def _start(self) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await self.connection_phase()
        except (ConnectionClosed, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            return
        except Exception as error:  # a malformed handshake: say so and hang up
            log.info("admin handshake failed: %s", error)
            await self.stream.write(self.error(msg=f"bad handshake: {error}", code=ER_HANDSHAKE_ERROR))
            return
        if self.session.username is None:
            return  # refused: mysql-mimic has sent the ERR; do not go on to commands
        await self.session.init(self)
        try:
            await self.command_phase()
        except asyncio.CancelledError:
            if self._kill != KillKind.CONNECTION:
                raise
            await self.stream.write(self.error(msg="Connection was killed", code=ER_CONNECTION_KILLED))
        finally:
            await self.session.close()

    async def handle_change_user(self, data: bytes) -> None:
        self.session.username = None
        await super().handle_change_user(data)
        if self.session.username is None:
            self.stream.writer.close()  # refused: the next read ends the command loop

    async def handle_query(self, data: bytes) -> None:
        com_query = packets.parse_com_query(
            capabilities=self.capabilities, client_charset=self.client_charset, data=data
        )
        result_set = await self.query(com_query.sql, com_query.query_attrs)
        if result_set:
            await self.write_text_resultset(result_set)
            return
        outcome = self.session.outcome
        if outcome is None:
            await self.stream.write(self.ok())
            return
        await self.stream.write(
            self.ok(
                affected_rows=outcome.affected_rows,
                last_insert_id=outcome.last_insert_id,
                warnings=len(outcome.warnings),
            )
            # Length-encoded, as MySQL and MariaDB servers send it (libmariadb requires it).
            + str_len(outcome.info.encode())
        )

    def error(self, **kwargs: Any) -> bytes:
        code = int(kwargs.get("code", 1105))
        message = str(kwargs.get("msg", ""))
        header = b"\xff" + code.to_bytes(2, "little")
        if Capabilities.CLIENT_PROTOCOL_41 in self.capabilities or not self.capabilities:
            header += b"#" + SQLSTATES.get(code, _SQLSTATES.get(code, "HY000")).encode()
        return header + message.encode("utf-8", "replace")


_SQLSTATES = {
    ER_CON_COUNT_ERROR: "08004",
    ER_HANDSHAKE_ERROR: "08S01",
    ER_ACCESS_DENIED_ERROR: "28000",
    1046: "3D000",
    1047: "08S01",
    ER_CONNECTION_KILLED: "70100",
}


# ----------------------------------------------------------------------------- server


class AdminServer:
    def __init__(self, control: Control, config: AdminConfig) -> None:
        self.control = control
        self.config = config
        self.identity = AdminIdentity(config)
        self.variables = GlobalVariables(
            {
                **SYSTEM_VARIABLES,
                "version": (str, VERSION, False),
                "version_comment": (str, VERSION_COMMENT, False),
            }
        )
        self.registry = LocalControl()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.refused = 0
        self._ids = itertools.count(1)

    async def start(self, listener: socket.socket) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._client, sock=listener)
        address = listener.getsockname()
        return str(address[0]), int(address[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        stream = MysqlStream(reader, writer)
        try:
            peer = writer.get_extra_info("peername")
            host = str(peer[0]) if peer else ""
            if not self.config.allow_remote and not is_loopback(host):
                self.refused += 1
                log.warning("admin connection from %s refused: not a loopback address", host)
                await stream.write(_early_error(
                    ER_HOST_NOT_PRIVILEGED,
                    f"Host '{host}' is not allowed to connect to the tidegate admin port "
                    "(set admin.allow_remote and admin.password to allow it)",
                ))
                return
            if len(self.tasks) > MAX_CONNECTIONS:
                await stream.write(_early_error(ER_CON_COUNT_ERROR, "Too many admin connections"))
                return
            session = AdminSession(self.control, self.variables)
            connection = AdminConnection(
                stream=stream,
                session=session,
                control=self.registry,
                identity_provider=self.identity,
                server_capabilities=DEFAULT_SERVER_CAPABILITIES,
            )
            connection.connection_id = await self.registry.add(connection)
            try:
                await connection.start()
            finally:
                await self.registry.remove(connection.connection_id)
        except (ConnectionClosed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by close() or KILL: end normally.  A client task that ends
            # cancelled makes asyncio's stream callback raise, and trio-asyncio
            # turns that into a crash of the whole loop.
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            self.tasks.discard(task)
            writer.close()


def listening_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, protocol)
    except OSError as error:
        raise OSError(error.errno, f"admin port {host}:{port}: {error.strerror}") from error
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(64)
        listener.setblocking(False)
    except OSError as error:
        listener.close()
        raise OSError(error.errno, f"admin port {host}:{port}: {error.strerror} (see admin.listen)") from error
    return listener


def _early_error(code: int, message: str) -> bytes:
    """An ERR sent instead of the greeting (the client has not said what it speaks)."""
    return b"\xff" + code.to_bytes(2, "little") + message.encode()


async def serve_admin(
    control: Control,
    config: AdminConfig,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin SQL port until cancelled; ``task_status.started((host, port))``."""
    logging.getLogger("mysql_mimic.connection").addFilter(_IGNORE)
    listener = listening_socket(*config.listen)  # here, so a bind error is a plain OSError
    with listener:
        async with trio_asyncio.open_loop():
            server = AdminServer(control, config)
            address = await trio_asyncio.aio_as_trio(server.start)(listener)
            log.info("admin port listening on %s:%d", *address)
            try:
                task_status.started(address)
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT + 1) as scope:
                    scope.shield = True
                    await trio_asyncio.aio_as_trio(server.close)()


_IGNORE = _Ignore()
