"""llama.cpp RPC between peers, carried inside the peer channel.

llama.cpp's RPC protocol has no authentication and no encryption. So no RPC server ever
listens beyond loopback; a split model's bytes travel between peers only as a WebSocket
inside the peers' TLS 1.3 channel (peer/tls.py: both ends must hold the cluster
certificate), opened by a request signed with the cluster key (peer/auth.py: the path is
under /internal/, so an unsigned, replayed or misaddressed opening gets a 401):

    primary's worker --TCP 127.0.0.1:L--> TunnelListener (primary peer)
        --TLS, WebSocket GET /internal/rpc/tunnel--> tunnel_handler (helper peer)
        --TCP 127.0.0.1:R--> llama.cpp RPC server (helper's child process)

Each TCP connection the worker opens gets a WebSocket of its own, so the RPC stream's
order is kept. Bytes are passed on as they come: RPC is many small request/answer
rounds (a graph per token), so a hop must not wait to fill a buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

TUNNEL_PATH = "/internal/rpc/tunnel"
# Bytes read from a socket at once: a weight upload moves tens of MB, a token's round a
# few KB; 256 KiB keeps an upload to few WebSocket frames without holding up small ones.
CHUNK = 256 << 10


async def _tcp_to_ws(reader: asyncio.StreamReader, ws) -> None:
    while data := await reader.read(CHUNK):
        await ws.send_bytes(data)


async def _ws_to_tcp(ws, writer: asyncio.StreamWriter) -> None:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY:
            break
        writer.write(msg.data)
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws) -> None:
    """Both directions until either side ends; then both are closed."""
    try:
        async with asyncio.TaskGroup() as tg:
            up = tg.create_task(_tcp_to_ws(reader, ws))
            down = tg.create_task(_ws_to_tcp(ws, writer))
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            up.cancel()
            down.cancel()
    except* (ConnectionError, OSError, aiohttp.ClientError) as exc:
        log.debug("RPC tunnel ended: %r", exc.exceptions[0])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        await ws.close()


def tunnel_handler(local_rpc: Callable[[], tuple[str, int] | None]):
    """The helper's route: upgrades a signed peer request to a WebSocket and joins it to
    the local RPC server that `local_rpc()` names (None: this peer runs none, 503)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        target = local_rpc()
        if target is None:
            return web.json_response(
                {"error": {"message": "no RPC server on this peer", "code": "no_rpc"}},
                status=503,
            )
        try:
            reader, writer = await asyncio.open_connection(*target)
        except OSError as exc:
            return web.json_response(
                {"error": {"message": f"RPC server unreachable: {exc}", "code": "no_rpc"}},
                status=503,
            )
        _nodelay(writer)
        ws = web.WebSocketResponse(max_msg_size=0, compress=False, autoping=True)
        await ws.prepare(request)
        await _pipe(reader, writer, ws)
        return ws

    return handler


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TunnelListener:
    """The primary's end: a loopback port that the worker takes for a helper's RPC server.

    Every connection accepted is carried to `peer_url` (http://host:port of the helper
    peer; the session turns it into TLS and signs the opening). `start()` binds; `serve()`
    accepts until cancelled, run by its owner's TaskGroup, which owns the pipes too."""

    def __init__(self, session: aiohttp.ClientSession, peer_url: str, host: str = "127.0.0.1"):
        self.session, self.peer_url = session, peer_url.rstrip("/")
        self.host, self.port = host, 0
        self._sock: socket.socket | None = None
        self.connections = 0  # tunnels opened, for status and tests
        self.failures = 0  # openings the helper refused or could not be reached for

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._sock = socket.create_server((self.host, 0), backlog=64)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def serve(self) -> None:
        if self._sock is None:
            self.start()
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    try:
                        conn, _ = await loop.sock_accept(self._sock)
                    except OSError:  # closed
                        return
                    tg.create_task(self._carry(conn))
        finally:
            self.close()

    async def _carry(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader, writer = await asyncio.open_connection(sock=conn)
        try:
            ws = await self.session.ws_connect(
                self.peer_url + TUNNEL_PATH, max_msg_size=0, compress=0, autoping=True
            )
        except (aiohttp.ClientError, OSError) as exc:
            self.failures += 1
            log.warning("RPC tunnel to %s refused: %r", self.peer_url, exc)
            writer.close()
            return
        self.connections += 1
        await _pipe(reader, writer, ws)
