"""peer/upstream.py, the forwarding hop's HTTP/1.1 client, against real sockets on loopback:
aiohttp servers where a well-behaved peer is meant, raw asyncio servers for the misbehaving
ones (a kept-alive connection closed under it, an answer cut off or malformed, a silent
host)."""

import asyncio
import contextlib

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.local_peers import free_port
from peer.auth import PeerAuth
from peer.tls import peer_contexts, write_credentials
from peer.upstream import (
    MAX_HEAD_BYTES,
    READ_HIGH_WATER,
    Unreachable,
    UpstreamError,
    UpstreamPool,
)

SECRET = b"k" * 32


async def read_all(answer) -> bytes:
    parts = []
    while chunk := await answer.readany():
        parts.append(chunk)
    return b"".join(parts)


@contextlib.asynccontextmanager
async def raw_server(handle):
    """A bare TCP server on loopback running `handle(reader, writer)` per connection."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def test_a_signed_request_is_answered_and_its_connection_kept_for_the_next():
    auth = PeerAuth(SECRET)
    connections = set()

    async def echo(request: web.Request) -> web.StreamResponse:
        connections.add(id(request.transport))
        body = await request.read()
        auth.verify(request.method, request.raw_path, request.headers, body)  # raises if not
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; x=1"})
        await response.prepare(request)
        for part in (b"data: 1\n\n", body, b"data: [DONE]\n\n"):
            await response.write(part)
        return response

    app = web.Application()
    app.router.add_post("/v1/echo", echo)
    async with TestServer(app) as server, UpstreamPool(auth) as pool:
        addr = f"127.0.0.1:{server.port}"
        for i in range(3):
            answer = await pool.request("POST", addr, "/v1/echo?x=1", {"X-A": "b"}, b"hi%d" % i)
            assert (answer.status, answer.reason, answer.content_type) == (
                200,
                "OK",
                "text/event-stream",
            )
            assert await read_all(answer) == b"data: 1\n\nhi%d" % i + b"data: [DONE]\n\n"
            answer.close()
        assert len(connections) == 1  # kept alive, reused


async def test_a_kept_alive_connection_the_other_side_closed_is_replaced_unseen():
    """The peer closes each connection after answering, without saying so: the next request
    finds it dead before any byte of an answer, and goes out again on a new one."""
    served = []

    async def answer_once(reader, writer):
        served.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with raw_server(answer_once) as addr, UpstreamPool() as pool:
        for _ in range(3):
            answer = await pool.request("POST", addr, "/v1/x", {}, b"{}")
            assert await read_all(answer) == b"ok"
            answer.close()
            await asyncio.sleep(0.2)  # the server has closed it by now
    assert len(served) == 3


async def test_a_refused_connection_is_unreachable_and_a_silent_one_times_out(tmp_path):
    async with UpstreamPool() as pool:
        with pytest.raises(Unreachable):
            await pool.request("POST", f"127.0.0.1:{free_port()}", "/v1/x", {}, b"")

    async def silent(reader, writer):
        await asyncio.sleep(5)

    # TLS to a host that accepts TCP but never answers the handshake: no connection within
    # the limit, which says nothing about whether the host is down.
    _, tls_client = peer_contexts(*write_credentials(SECRET, tmp_path))
    async with raw_server(silent) as addr, UpstreamPool(tls=tls_client) as pool:
        with pytest.raises(UpstreamError) as caught:
            await pool.request("POST", addr, "/v1/x", {}, b"", connect_timeout_s=0.3)
        assert not isinstance(caught.value, Unreachable)


async def test_an_answer_cut_off_gives_what_came_then_unreachable():
    async def cut(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # as kill -9 leaves it

    async with raw_server(cut) as addr, UpstreamPool() as pool:
        answer = await pool.request("POST", addr, "/v1/x", {}, b"{}")
        assert await answer.readany() == b"hello"
        with pytest.raises(Unreachable):
            await answer.readany()
        answer.close()


async def test_a_malformed_or_oversized_answer_is_an_error_not_evidence_of_a_dead_host():
    answers = iter(
        [
            b"HTTP/1.1 banana\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n",
        ]
    )

    async def bad(reader, writer):
        await read_request(reader)
        writer.write(next(answers))
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_server(bad) as addr, UpstreamPool() as pool:
        for _ in range(2):
            with pytest.raises(UpstreamError) as caught:
                await pool.request("POST", addr, "/v1/x", {}, b"{}")
            assert not isinstance(caught.value, Unreachable)


async def test_a_body_that_ends_with_its_connection_is_read_whole():
    async def http10(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with raw_server(http10) as addr, UpstreamPool() as pool:
        answer = await pool.request("POST", addr, "/v1/x", {}, b"{}")
        assert await read_all(answer) == b"all of it"
        answer.close()


async def test_a_slow_reader_makes_the_replica_wait_instead_of_filling_memory():
    size = 64 << 20
    written = [0]

    async def flood(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * (1 << 20)
        for _ in range(size >> 20):
            writer.write(chunk)
            await writer.drain()  # waits while the client takes no more bytes
            written[0] += len(chunk)

    async with raw_server(flood) as addr, UpstreamPool() as pool:
        answer = await pool.request("POST", addr, "/v1/x", {}, b"{}")
        await asyncio.sleep(1.0)  # not reading: without backpressure all 64 MiB arrive
        assert written[0] < size // 2  # held back by TCP: the socket buffers, no more
        assert len(await read_all(answer)) == size
        answer.close()


async def test_closing_an_answer_mid_way_drops_its_connection():
    closed = asyncio.Event()

    async def endless(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"1\r\na\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
                if reader.at_eof():
                    break
        closed.set()

    async with raw_server(endless) as addr, UpstreamPool() as pool:
        answer = await pool.request("POST", addr, "/v1/x", {}, b"{}")
        assert await answer.readany()
        answer.close()
        await asyncio.wait_for(closed.wait(), 5)
        with pytest.raises(UpstreamError):
            await answer.readany()


async def test_a_header_with_a_line_break_is_refused_before_sending():
    async with UpstreamPool() as pool:
        with pytest.raises(ValueError):
            await pool.request("POST", f"127.0.0.1:{free_port()}", "/", {"X": "a\r\nB: c"}, b"")


async def test_a_connection_is_reused_after_an_answer_closed_unread_while_reading_paused():
    """An answer whose last bytes paused reading (over the high-water mark, unread) ends;
    closed, its connection goes back to the pool reading again, or the next answer on it
    would never be read."""
    payloads = [b"x" * (READ_HIGH_WATER + 1000), b"second"]  # over the mark only at its end
    connections = []

    async def answer(reader, writer):
        connections.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError):
            while payloads:
                await read_request(reader)
                payload = payloads.pop(0)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
                writer.write(payload)
                await writer.drain()

    async with raw_server(answer) as addr, UpstreamPool() as pool:
        first = await pool.request("POST", addr, "/v1/x", {}, b"{}")
        await asyncio.sleep(0.3)  # all of it arrives, unread
        first.close()
        second = await asyncio.wait_for(pool.request("POST", addr, "/v1/x", {}, b"{}"), 5)
        assert await asyncio.wait_for(read_all(second), 5) == b"second"
        second.close()
    assert len(connections) == 1  # the first one, reused
