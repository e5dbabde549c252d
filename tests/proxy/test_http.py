"""HTTP endpoint: routes, keep-alive, bad input, timeouts and connection limits.

Most tests use real TCP on 127.0.0.1 (port 0); the timeout tests drive
``HttpServer.handle_connection`` over memory streams with trio's autojump
clock, so they take no wall time.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http import HttpServer, serve_http
from proxy.metrics import Metrics


class FakeHealth:
    def __init__(self) -> None:
        self.is_ready = False
        self.reason = "primary unreachable"
        self.failure: Exception | None = None
        self.hang = False
        self.calls = 0

    async def ready(self) -> tuple[bool, str]:
        self.calls += 1
        if self.hang:
            await trio.sleep_forever()
        if self.failure is not None:
            raise self.failure
        return self.is_ready, self.reason

    def status(self) -> dict[str, object]:
        return {"clients": 3, "backends": [{"name": "primary", "up": True}]}


@dataclass
class Server:
    port: int
    health: FakeHealth
    metrics: Metrics


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """A keep-alive HTTP/1.1 client made of h11 and one TCP stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.connection = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Reply:
        if self.connection.our_state is h11.DONE:
            self.connection.start_next_cycle()
        all_headers = [("Host", "test"), *(headers or [])]
        if body:
            all_headers.append(("Content-Length", str(len(body))))
        data = self.connection.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += self.connection.send(h11.Data(data=body))
        data += self.connection.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.read_reply()

    async def read_reply(self) -> Reply:
        status, headers, chunks = 0, {}, []
        with trio.fail_after(5):
            while True:
                event = self.connection.next_event()
                if event is h11.NEED_DATA:
                    self.connection.receive_data(bytes(await self.stream.receive_some()))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return Reply(status, headers, b"".join(chunks))
                else:
                    raise AssertionError(f"unexpected {event!r}")


async def read_all(stream: trio.abc.Stream, timeout: float = 5.0) -> bytes:
    """Everything until the server closes."""
    chunks = []
    with trio.fail_after(timeout):
        while data := await stream.receive_some():
            chunks.append(bytes(data))
    return b"".join(chunks)


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    health = FakeHealth()
    metrics = Metrics(process_metrics=False)
    port = await nursery.start(
        partial(serve_http, "127.0.0.1", 0, metrics, health, max_connections=3, read_timeout=5.0)
    )
    return Server(port, health, metrics)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        yield Client(stream)


# --------------------------------------------------------------------------- routes


async def test_healthz(client: Client) -> None:
    reply = await client.request("GET", "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert reply.headers["content-type"].startswith("text/plain")


async def test_metrics(server: Server, client: Client) -> None:
    server.metrics.observe_query(0x03, True, 0.001)
    reply = await client.request("GET", "/metrics?name[]=x")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"tidegate_up 1.0" in reply.body
    assert b'tidegate_queries_total{command="query",result="ok"} 1.0' in reply.body


async def test_readyz_flips(server: Server, client: Client) -> None:
    reply = await client.request("GET", "/readyz")
    assert (reply.status, reply.body) == (503, b"primary unreachable\n")
    server.health.is_ready, server.health.reason = True, ""
    reply = await client.request("GET", "/readyz")
    assert (reply.status, reply.body) == (200, b"ready\n")
    server.health.is_ready = False
    server.health.reason = "shutting down"
    assert (await client.request("GET", "/readyz")).body == b"shutting down\n"


async def test_readyz_when_the_check_raises(server: Server, client: Client) -> None:
    server.health.failure = RuntimeError("boom")
    reply = await client.request("GET", "/readyz")
    assert (reply.status, reply.body) == (503, b"readiness check failed: RuntimeError\n")


async def test_status_is_json(client: Client) -> None:
    reply = await client.request("GET", "/status")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body) == FakeHealth().status()


async def test_unknown_path_and_wrong_method(client: Client) -> None:
    reply = await client.request("GET", "/nope")
    assert (reply.status, reply.body) == (404, b"not found\n")
    reply = await client.request("POST", "/metrics", body=b"x=1")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    # Neither closed the connection.
    assert (await client.request("GET", "/healthz")).status == 200


async def test_head_has_headers_but_no_body(client: Client) -> None:
    reply = await client.request("HEAD", "/healthz")
    assert (reply.status, reply.body, reply.headers["content-length"]) == (200, b"", "3")
    assert (await client.request("GET", "/healthz")).body == b"ok\n"


# --------------------------------------------------------------------------- connections


async def test_keep_alive_serves_several_requests_on_one_connection(client: Client) -> None:
    first = await client.request("GET", "/healthz")
    second = await client.request("GET", "/status")
    assert (first.status, second.status) == (200, 200)
    assert "connection" not in first.headers


async def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await read_all(stream)
    assert re.findall(rb"HTTP/1\.1 (\d+) ", data) == [b"200", b"404", b"503"]


async def test_http_1_0_is_answered_then_closed(server: Server) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        data = await read_all(stream)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    ("garbage", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), b"400"),  # TLS
    ],
)
async def test_malformed_request_gets_400_and_close(
    server: Server, garbage: bytes, status: bytes
) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(garbage)
        data = await read_all(stream)  # returns only because the server closed
    assert data.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"\r\nconnection: close\r\n" in data.lower()


async def test_oversized_body_gets_413(client: Client) -> None:
    reply = await client.request("POST", "/healthz", body=b"x" * 70_000)
    assert reply.status == 413
    assert reply.headers["connection"] == "close"


async def test_a_slow_client_does_not_block_others(server: Server) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as slow:
        await slow.send_all(b"GET /healthz HTTP/1.1\r\nHo")  # and then nothing
        server.health.hang = True  # a /readyz that never returns must not block either
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stuck:
            await stuck.send_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as other:
                with trio.fail_after(2):  # the read timeout is 5 s: blocked would be slower
                    reply = await Client(other).request("GET", "/healthz")
                assert reply.status == 200


async def test_connections_over_the_cap_are_refused(server: Server) -> None:
    streams = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(3)]
    for stream in streams:  # a request each, so the server has surely accepted all three
        assert (await Client(stream).request("GET", "/healthz")).status == 200
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as extra:
        data = await read_all(extra)
    assert data.startswith(b"HTTP/1.1 503 ") and data.endswith(b"too many connections\n")

    await streams.pop().aclose()
    with trio.fail_after(5):
        while True:  # the server notices the close asynchronously
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as again:
                reply = await Client(again).request("GET", "/healthz")
            if reply.status == 200:
                break
            await trio.sleep(0.01)
    for stream in streams:
        await stream.aclose()


# --------------------------------------------------------------------------- timeouts (mock clock)


def memory_server(health: FakeHealth | None = None) -> HttpServer:
    return HttpServer(
        Metrics(process_metrics=False),
        health or FakeHealth(),
        read_timeout=10.0,
        ready_timeout=3.0,
    )


async def test_idle_keep_alive_connection_closes_silently(autojump_clock: trio.abc.Clock) -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory_server().handle_connection, server_stream)
        reply = await Client(client_stream).request("GET", "/healthz")
        assert reply.status == 200
        start = trio.current_time()
        assert await read_all(client_stream, timeout=60) == b""
        assert trio.current_time() - start == pytest.approx(10.0)


async def test_half_sent_request_gets_408(autojump_clock: trio.abc.Clock) -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory_server().handle_connection, server_stream)
        start = trio.current_time()
        await client_stream.send_all(b"GET /healthz HTTP/1.1\r\nHost")
        data = await read_all(client_stream, timeout=60)
        assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert trio.current_time() - start >= 10.0


async def test_drip_fed_request_is_bounded_by_one_deadline(autojump_clock: trio.abc.Clock) -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory_server().handle_connection, server_stream)
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100:
                await client_stream.send_all(bytes([byte]))
                await trio.sleep(1)
        assert trio.current_time() - start < 13


async def test_hanging_readiness_check_times_out(autojump_clock: trio.abc.Clock) -> None:
    health = FakeHealth()
    health.hang = True
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory_server(health).handle_connection, server_stream)
        start = trio.current_time()
        reply = await Client(client_stream).request("GET", "/readyz")
        assert (reply.status, reply.body) == (503, b"readiness check timed out\n")
        assert trio.current_time() - start == pytest.approx(3.0)
        await client_stream.aclose()


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_any_input_gets_an_answer_or_a_close_never_a_crash(data: bytes, byte_by_byte: bool) -> None:
    async def main() -> bytes:
        server_stream, client_stream = trio.testing.memory_stream_pair()
        http = memory_server()
        received = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.handle_connection, server_stream)
            pieces = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
            for piece in pieces:
                await client_stream.send_all(piece)
            await client_stream.send_eof()
            while chunk := await client_stream.receive_some():
                received += bytes(chunk)
        return received

    received = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert received == b"" or received.startswith(b"HTTP/1.1 ")
