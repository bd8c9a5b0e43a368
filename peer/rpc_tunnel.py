"""llama.cpp RPC between peers, carried inside the peer channel.

llama.cpp's RPC protocol has no authentication and no encryption. So no RPC server ever
listens beyond loopback; a split model's bytes travel between peers only inside the peers'
TLS 1.3 channel (peer/tls.py: both ends must hold the cluster certificate), on a
connection opened by an HTTP/1.1 upgrade request signed with the cluster key
(peer/auth.py: the path is under /internal/, so an unsigned, replayed or misaddressed
opening gets a 401 before anything is joined):

    primary's worker --TCP 127.0.0.1:L--> TunnelListener (primary peer)
        --TLS: GET /internal/rpc/tunnel, 101, then raw bytes-->
        tunnel_handler (helper peer) --TCP 127.0.0.1:R--> llama.cpp RPC server

Each TCP connection the worker opens gets a connection of its own, so the RPC stream's
order is kept. After the 101 answer the bytes go through as they are, without framing:
RPC is many small request/answer rounds (a graph per token), each paying every hop's
cost, so a hop must add as little as it can (a WebSocket's frames and masks cost about a
fifth of the tokens per second here; bench/split.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable

from aiohttp import web

from peer.auth import PeerAuth, authority, peer_socket
from peer.tls import PEER_SNI

log = logging.getLogger(__name__)

TUNNEL_PATH = "/internal/rpc/tunnel"
# Names the tunnelled protocol and its version, asked for in TUNNEL_HEADER and answered in
# the 101's Upgrade. Not an HTTP Upgrade request: aiohttp's parser switches protocols only
# for websocket; the handler takes the connection over itself (as aiohttp's WebSocket
# support does), before the 101 leaves, so no byte after it is read as HTTP.
UPGRADE = "aivailable-rpc/1"
TUNNEL_HEADER = "X-Aivailable-Tunnel"
MAX_HEAD_BYTES = 16 << 10


class TunnelRefused(Exception):
    """The helper peer did not open the tunnel (its status line says why)."""


class _Forward(asyncio.Protocol):
    """One direction of a pipe, at the protocol level: what arrives on this connection is
    written to `to` from within the callback, with no task to wake per message (a hop's
    cost, paid on each of the many small rounds of a token). Backpressure: when this
    connection's own send buffer fills, `to` stops being read until it drains."""

    def __init__(self, to: asyncio.BaseTransport | None = None):
        self.to = to
        self.transport: asyncio.BaseTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.to is not None and not self.to.is_closing():
            self.to.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # closes this side; connection_lost closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        if self.to is not None:
            self.to.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self.to is not None:
            self.to.pause_reading()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        if self.to is not None and not self.to.is_closing():
            self.to.resume_reading()  # type: ignore[attr-defined]


def _nodelay(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Feed:
    """The helper's side of a taken-over aiohttp connection: aiohttp hands every byte
    after the request to a payload parser (as it does for WebSockets); this one writes
    them straight to the RPC server's connection."""

    def __init__(self, to: asyncio.Transport):
        self.to = to

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not self.to.is_closing():
            self.to.write(data)
        return False, b""

    def feed_eof(self) -> None:
        self.to.close()


def tunnel_handler(local_rpc: Callable[[], tuple[str, int] | None]):
    """The helper's route: upgrades a signed peer request to a raw byte stream joined to
    the local RPC server that `local_rpc()` names (None: this peer runs none, 503)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get(TUNNEL_HEADER, "").lower() != UPGRADE:
            return _error(426, f"expected {TUNNEL_HEADER}: {UPGRADE}", "upgrade_required")
        target = local_rpc()
        if target is None:
            return _error(503, "no RPC server on this peer", "no_rpc")
        assert request.transport is not None
        loop = asyncio.get_running_loop()
        try:
            rpc, answers = await loop.create_connection(
                lambda: _Forward(request.transport), *target
            )
        except OSError as exc:
            return _error(503, f"RPC server unreachable: {exc}", "no_rpc")
        _nodelay(rpc.get_extra_info("socket"))
        # from here on every byte of this connection is the tunnel's
        request.protocol.set_parser(_Feed(rpc))  # type: ignore[arg-type]
        response = web.StreamResponse(
            status=101, headers={"Upgrade": UPGRADE, "Connection": "Upgrade"}
        )
        await response.prepare(request)
        try:
            await answers.closed  # the RPC server hung up, or the peer did (feed_eof)
        finally:
            rpc.close()
            request.transport.close()
        return response

    return handler


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": code}}, status=status)


async def open_tunnel(
    auth: PeerAuth, tls: ssl.SSLContext | None, host: str, port: int, timeout_s: float = 10
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The primary's side: TLS to the helper peer, the signed upgrade, its 101 read."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    sock = peer_socket(infos[0])
    sock.setblocking(False)
    async with asyncio.timeout(timeout_s):
        await loop.sock_connect(sock, infos[0][4])
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=tls, server_hostname=PEER_SNI if tls is not None else None
        )
        _nodelay(writer.get_extra_info("socket"))
        target = authority(host, port)
        head = [
            f"GET {TUNNEL_PATH} HTTP/1.1",
            f"Host: {target}",
            f"{TUNNEL_HEADER}: {UPGRADE}",
            *(f"{k}: {v}" for k, v in auth.signed_headers("GET", TUNNEL_PATH, b"", target).items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            answer = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            writer.close()
            raise TunnelRefused("the helper peer closed before answering") from exc
    status = answer.split(b"\r\n", 1)[0]
    if len(answer) > MAX_HEAD_BYTES or b" 101 " not in status + b" ":
        writer.close()
        raise TunnelRefused(status.decode("latin-1", errors="replace"))
    return reader, writer


def connecting_pid_in(conn: socket.socket, pids: set[int]) -> bool:
    """Whether the loopback client at the other end of `conn` is one of `pids` (Linux:
    its socket's inode from /proc/net/tcp, looked for among those processes' fds)."""
    try:
        host, port = conn.getpeername()[:2]
        mine = conn.getsockname()[1]
        theirs = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
        with open("/proc/net/tcp") as fh:
            inode = next(
                f[9]
                for f in (line.split() for line in fh.readlines()[1:])
                if f[1] == theirs and f[2].endswith(f":{mine:04X}")
            )
    except (OSError, StopIteration, ValueError):
        return False
    wanted = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                    return True
    return False


class TunnelListener:
    """The primary's end: a loopback port that the worker takes for a helper's RPC server.

    Every connection accepted is carried to the helper peer at `peer_addr` (host:port)
    through open_tunnel. `start()` binds; `serve()` accepts until cancelled, run by its
    owner's TaskGroup, which owns the pipes too.

    The port is on loopback, so any local process could dial it and reach the helper with
    this peer's credentials: with `allowed_pids` (the model workers), a connection from any
    other process is closed unanswered."""

    def __init__(
        self,
        auth: PeerAuth,
        tls: ssl.SSLContext | None,
        peer_addr: str,
        host: str = "127.0.0.1",
        allowed_pids: Callable[[], set[int]] | None = None,
    ):
        self.auth, self.tls, self.peer_addr = auth, tls, peer_addr
        self.allowed_pids = allowed_pids
        self.refused = 0  # local connections from other processes
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
        if self.allowed_pids is not None and not connecting_pid_in(conn, self.allowed_pids()):
            self.refused += 1
            log.warning(
                "RPC tunnel to %s: a connection from another process refused", self.peer_addr
            )
            conn.close()
            return
        _nodelay(conn)
        host, _, port = self.peer_addr.rpartition(":")
        try:
            reader, writer = await open_tunnel(self.auth, self.tls, host, int(port))
        except (OSError, TimeoutError, ssl.SSLError, TunnelRefused) as exc:
            self.failures += 1
            log.warning("RPC tunnel to %s refused: %r", self.peer_addr, exc)
            conn.close()
            return
        self.connections += 1
        loop = asyncio.get_running_loop()
        remote = writer.transport
        # the worker's bytes waited in the kernel meanwhile; now both sides forward
        local, _ = await loop.connect_accepted_socket(lambda: _Forward(remote), sock=conn)
        back = _Forward(local)
        back.connection_made(remote)
        remote.set_protocol(back)
        leftover = bytes(reader._buffer)  # after the 101, if the helper sent any
        if leftover:
            local.write(leftover)
        try:
            await back.closed
        finally:
            local.close()
            remote.close()
