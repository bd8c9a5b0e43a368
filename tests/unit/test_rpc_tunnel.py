"""peer/rpc_tunnel.py over real loopback sockets, a TCP echo server standing in for
llama.cpp's RPC server: bytes cross both ways in order; between the two peers a sniffing
relay sees only TLS records (no payload byte in clear); a tunnel opened without the
cluster key gets a 401, a raw TCP client or a stranger's TLS gets nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl

import aiohttp
import pytest
from aiohttp import web

from peer.auth import PeerAuth
from peer.rpc_tunnel import TUNNEL_PATH, TunnelListener, TunnelRefused, open_tunnel, tunnel_handler
from peer.tls import DualSite, peer_contexts, write_credentials

SECRET = b"t" * 32
MARK = b"PROMPT-IN-CLEAR:the capital of France"


@contextlib.asynccontextmanager
async def echo_server():
    """Stands in for the RPC server: echoes every byte back."""

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def sniffing_relay(target_port: int, seen: list[tuple[int, bytes]]):
    """A passive middlebox between the peers: passes bytes on and keeps a copy, tagged by
    the stream (one connection's one direction) it travelled."""

    async def relay(reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)

        async def copy(r, w):
            while data := await r.read(1 << 16):
                seen.append((id(r), data))
                w.write(data)
                await w.drain()
            w.close()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(copy(reader, up_w))
            tg.create_task(copy(up_r, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def helper_peer(tmp_path, rpc_port):
    """The helper's side: DualSite (plain HTTP and peer TLS on one port), signed routes."""
    tls_server, _ = peer_contexts(*write_credentials(SECRET, tmp_path / "helper"))
    auth = PeerAuth(SECRET)
    app = web.Application(middlewares=[auth.middleware])
    app.router.add_get(TUNNEL_PATH, tunnel_handler(lambda: ("127.0.0.1", rpc_port)))
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = DualSite(runner, "127.0.0.1", port, tls_server, 5.0)
    await site.start()
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(site.serve())
        try:
            yield port
        finally:
            serving.cancel()
            await site.stop()
            await runner.cleanup()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload))
    writer.close()
    return got


async def test_bytes_cross_the_tunnel_in_order_and_only_as_tls(tmp_path):
    seen: list[tuple[int, bytes]] = []
    _, tls_client = peer_contexts(*write_credentials(SECRET, tmp_path / "primary"))
    payload = MARK + os.urandom(3 << 20) + MARK
    async with (
        echo_server() as rpc_port,
        helper_peer(tmp_path, rpc_port) as helper_port,
        sniffing_relay(helper_port, seen) as relay_port,
        asyncio.TaskGroup() as tg,
    ):
        tunnel = TunnelListener(PeerAuth(SECRET), tls_client, f"127.0.0.1:{relay_port}")
        tunnel.start()
        serving = tg.create_task(tunnel.serve())
        assert await roundtrip(tunnel.port, payload) == payload
        assert await roundtrip(tunnel.port, b"second connection") == b"second connection"
        assert tunnel.connections == 2
        serving.cancel()
    wire = b"".join(data for _, data in seen)
    assert len(wire) > 2 * len(payload)  # both directions went through the relay
    assert MARK not in wire and payload[100:200] not in wire
    # Even the opening (the signed request, its 101) is encrypted: every stream is TLS
    # records from its first byte to its last. (Searching the ciphertext for b"101" found
    # it by chance in about a third of the runs: 6 MiB of random bytes.)
    streams: dict[int, bytes] = {}
    for key, data in seen:
        streams[key] = streams.get(key, b"") + data
    assert len(streams) == 4  # two connections, both directions
    for stream in streams.values():
        assert tls_records(stream) > 0


def tls_records(stream: bytes) -> int:
    """How many TLS records `stream` is, exactly; fails on anything else (RFC 8446 5.1:
    type 20-23, legacy version 3.x, at most 2^14 + 256 bytes of payload)."""
    at = count = 0
    while at < len(stream):
        kind, major, length = stream[at], stream[at + 1], int.from_bytes(stream[at + 3 : at + 5])
        assert kind in (20, 21, 22, 23) and major == 3 and length <= (1 << 14) + 256, at
        at += 5 + length
        count += 1
    assert at == len(stream)
    return count


async def test_a_tunnel_without_the_cluster_key_is_refused(tmp_path):
    other = b"o" * 32
    _, wrong_tls = peer_contexts(*write_credentials(other, tmp_path / "stranger"))
    _, right_tls = peer_contexts(*write_credentials(SECRET, tmp_path / "primary"))
    async with echo_server() as rpc_port, helper_peer(tmp_path, rpc_port) as port:
        # right TLS, a request signed with another key: 401 before any RPC byte
        with pytest.raises(TunnelRefused, match="401"):
            await open_tunnel(PeerAuth(other), right_tls, "127.0.0.1", port)
        # plain HTTP, unsigned: 401 too
        url = f"http://127.0.0.1:{port}{TUNNEL_PATH}"
        async with aiohttp.ClientSession() as plain, plain.get(url) as answer:
            assert answer.status == 401
        # another cluster's certificate: no TLS session at all
        with pytest.raises((ssl.SSLError, OSError, TunnelRefused)):
            await open_tunnel(PeerAuth(other), wrong_tls, "127.0.0.1", port)
        # the right key, without asking for the tunnel: 426, nothing joined
        signed = aiohttp.ClientSession(middlewares=(PeerAuth(SECRET).client_middleware,))
        async with signed as session, session.get(url) as answer:
            assert answer.status == 426
        # raw TCP speaking RPC (a HELLO): an HTTP 400, never an RPC answer
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert not answer or answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))


async def test_a_helper_without_an_rpc_server_answers_503(tmp_path):
    _, tls_client = peer_contexts(*write_credentials(SECRET, tmp_path / "primary"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    async with helper_peer(tmp_path, closed_port) as port:
        with pytest.raises(TunnelRefused, match="503"):
            await open_tunnel(PeerAuth(SECRET), tls_client, "127.0.0.1", port)


async def test_only_the_allowed_processes_may_use_a_tunnel(tmp_path):
    """The listener is on loopback: another local process must not ride the peer's keys."""
    _, tls_client = peer_contexts(*write_credentials(SECRET, tmp_path / "primary"))
    allowed: set[int] = {os.getpid()}
    async with (
        echo_server() as rpc_port,
        helper_peer(tmp_path, rpc_port) as helper_port,
        asyncio.TaskGroup() as tg,
    ):
        tunnel = TunnelListener(
            PeerAuth(SECRET), tls_client, f"127.0.0.1:{helper_port}", allowed_pids=lambda: allowed
        )
        tunnel.start()
        serving = tg.create_task(tunnel.serve())
        assert await roundtrip(tunnel.port, b"from the worker") == b"from the worker"
        allowed = {os.getpid() + 100000}  # some other process: this one is refused now
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
        writer.write(b"hello?")
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()
        assert tunnel.refused == 1 and tunnel.connections == 1
        serving.cancel()
