"""The proxy's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz`` and ``/status``.

Served by the trio event loop itself, through h11 (a sans-I/O HTTP/1.1
library): if the loop is stuck, ``/healthz`` stops answering, which is the
point of a liveness probe.  ``prometheus_client.start_http_server`` runs in a
thread and would keep answering.

Each connection is its own task in the server's handler nursery, so a slow
client only ever delays itself.  Reading a request (including the keep-alive
wait before it) has a deadline, writing a response has one, the request
head and body have size caps, and the number of open connections is capped:
a connection over the cap gets ``503`` and is closed.

Routes (``GET`` and ``HEAD``): ``/metrics`` (Prometheus text), ``/healthz``
(200 ``ok``: the loop answered), ``/readyz`` (200, or 503 with the reason),
``/status`` (JSON from the :class:`HealthSource`).  Other paths get 404,
other methods 405, malformed requests 400 (431 for an oversized head) and
the connection is closed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from proxy.metrics import Metrics

__all__ = ["HealthSource", "HttpServer", "serve_http"]

log = logging.getLogger("tidegate.http")

Headers = Sequence[tuple[str, str]]


class HealthSource(Protocol):
    """What the HTTP endpoint asks the application."""

    async def ready(self) -> tuple[bool, str]:
        """(True, detail) when the proxy should receive traffic, else (False, reason)."""
        ...

    def status(self) -> dict[str, object]:
        """A JSON-serialisable snapshot for ``/status``."""
        ...


class _Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: Headers = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def _text(status: int, text: str | None = None, headers: Headers = ()) -> _Response:
    body = (text if text is not None else HTTPStatus(status).phrase.lower()) + "\n"
    return _Response(status, body.encode(), headers=headers)


class _Close(Exception):
    """End this connection now (timeout, or the peer broke the protocol)."""


class HttpServer:
    """Serves the routes over any trio stream; :meth:`serve` adds the TCP listener."""

    def __init__(
        self,
        metrics: Metrics,
        health: HealthSource,
        *,
        max_connections: int = 64,
        read_timeout: float = 10.0,
        write_timeout: float = 10.0,
        ready_timeout: float = 5.0,
        max_head_size: int = 16 * 1024,
        max_body_size: int = 64 * 1024,
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._ready_timeout = ready_timeout
        self._max_head_size = max_head_size
        self._max_body_size = max_body_size
        self._linger = 1.0  # how long closing waits for the peer to read our last response
        self._receive_size = 16 * 1024
        self.open_connections = 0
        self._refusing = 0
        self._routes: dict[str, Callable[[], Awaitable[_Response]]] = {
            "/metrics": self._metrics_page,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/status": self._status,
        }

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0 picks a free port) and report the bound port via ``started``."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("http listening on %s:%d", host, bound)
        task_status.started(bound)
        await trio.serve_listeners(self.handle_connection, listeners)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it closes, misbehaves or idles out.  Never raises."""
        if self.open_connections >= self._max_connections:
            await self._refuse(stream)
            return
        self.open_connections += 1
        try:
            await self._converse(stream)
        except (_Close, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("http: unexpected error on a connection")
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        """Over the cap: a short 503, itself capped so a flood cannot pile up tasks."""
        if self._refusing >= self._max_connections:
            await trio.aclose_forcefully(stream)
            return
        self._refusing += 1
        log.warning("http: %d connections open, refusing another", self.open_connections)
        try:
            with trio.move_on_after(self._linger):
                connection = h11.Connection(h11.SERVER)
                response = _text(503, "too many connections", [("Connection", "close")])
                await self._send(connection, stream, response)
                await self._close_gently(stream)
        except (_Close, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    # ---------------------------------------------------------------- connection loop

    async def _converse(self, stream: trio.abc.Stream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head_size)
        while True:
            try:
                request = await self._read_request(connection, stream)
            except h11.RemoteProtocolError as exc:
                log.debug("http: bad request: %s", exc)
                status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
                await self._finish(connection, stream, _text(status))
                return
            if request is None:
                return
            if isinstance(request, _Response):  # refused while reading (timeout, too large)
                await self._finish(connection, stream, request)
                return
            response = await self._route(request)
            await self._send(connection, stream, response, head=request.method == b"HEAD")
            if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                connection.start_next_cycle()
            else:
                await self._close_gently(stream)
                return

    async def _read_request(
        self, connection: h11.Connection, stream: trio.abc.Stream
    ) -> h11.Request | _Response | None:
        """The next whole request (body read and discarded); None when the client has gone."""
        head_size = len(connection.trailing_data[0])  # pipelined bytes already buffered
        started = head_size > 0
        request: h11.Request | None = None
        body_size = 0
        with trio.move_on_after(self._read_timeout):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(self._receive_size)
                    started = started or bool(data)
                    # h11 caps only a head still incomplete after a read, so a big
                    # head arriving whole in the last read would pass: count it
                    # ourselves.  (A body in that read counts too; only requests
                    # we would refuse anyway carry one.)
                    head_size += len(data)
                    if request is None and head_size > self._max_head_size:
                        return _text(431)
                    connection.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body_size += len(event.data)
                    if body_size > self._max_body_size:
                        return _text(413)
                elif isinstance(event, h11.EndOfMessage):
                    return request
                elif isinstance(event, h11.ConnectionClosed):
                    return None
                else:  # PAUSED cannot happen: we answer before reading on
                    raise _Close()
        # Read deadline passed.  An idle keep-alive connection just closes;
        # one that sent part of a request is told why.
        if not started:
            return None
        return _text(408)

    async def _route(self, request: h11.Request) -> _Response:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        page = self._routes.get(path)
        if page is None:
            return _text(404)
        if request.method not in (b"GET", b"HEAD"):
            return _text(405, headers=[("Allow", "GET, HEAD")])
        try:
            return await page()
        except Exception:
            log.exception("http: %s failed", path)
            return _text(500)

    async def _send(
        self,
        connection: h11.Connection,
        stream: trio.abc.Stream,
        response: _Response,
        *,
        head: bool = False,
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            *response.headers,
        ]
        data = connection.send(
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=HTTPStatus(response.status).phrase,
            )
        )
        if response.body and not head:
            data += connection.send(h11.Data(data=response.body))
        data += connection.send(h11.EndOfMessage())
        with trio.move_on_after(self._write_timeout) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise _Close()

    async def _finish(
        self, connection: h11.Connection, stream: trio.abc.Stream, response: _Response
    ) -> None:
        """Send a last response (if h11 still allows one) and close."""
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            if not any(name.lower() == "connection" for name, _ in response.headers):
                response.headers = [*response.headers, ("Connection", "close")]
            await self._send(connection, stream, response)
        await self._close_gently(stream)

    async def _close_gently(self, stream: trio.abc.Stream) -> None:
        """Half-close, then drain briefly: closing with unread input would reset the
        connection, and the peer could lose the response we just sent."""
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            return
        with trio.move_on_after(self._linger):
            await stream.send_eof()
            drained = 0
            while drained < self._max_body_size:
                data = await stream.receive_some(self._receive_size)
                if not data:
                    break
                drained += len(data)

    # ---------------------------------------------------------------- pages

    async def _metrics_page(self) -> _Response:
        body, content_type = self._metrics.render()
        return _Response(200, body, content_type)

    async def _healthz(self) -> _Response:
        return _text(200, "ok")

    async def _readyz(self) -> _Response:
        ready, reason = False, "readiness check timed out"
        with trio.move_on_after(self._ready_timeout):
            try:
                ready, reason = await self._health.ready()
            except Exception as exc:
                log.exception("http: readiness check failed")
                ready, reason = False, f"readiness check failed: {type(exc).__name__}"
        if ready:
            return _text(200, reason or "ready")
        return _text(503, reason or "not ready")

    async def _status(self) -> _Response:
        body = json.dumps(self._health.status(), indent=2, default=str) + "\n"
        return _Response(200, body.encode(), "application/json")


async def serve_http(
    host: str,
    port: int,
    metrics: Metrics,
    health: HealthSource,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    max_connections: int = 64,
    read_timeout: float = 10.0,
) -> None:
    """Run the HTTP endpoint until cancelled; ``task_status.started(port)`` once bound."""
    server = HttpServer(metrics, health, max_connections=max_connections, read_timeout=read_timeout)
    await server.serve(host, port, task_status=task_status)
