"""The forwarding hop's HTTP/1.1 client: kept-alive connections to other peers, requests
signed as every peer request is (peer/auth.py), answers parsed by llhttp (httptools).

Why not the peer's aiohttp session, which all other peer traffic uses: on the hop its client
machinery was the largest part of what forwarding adds before the first token (about 230 us
of the ~1.1 ms, bench/forward.py on this project's 2-core machine; a bare client on the same
socket waits 0.35 ms where aiohttp's waits 0.6 ms). This client does only what the hop
needs: one request at a time per connection, a pool of idle connections per host, bytes
bodies, answers streamed with backpressure, and errors that say whether the host looked
down (`Unreachable`: gossip should hear of it) or merely failed (`UpstreamError`).

    pool = UpstreamPool(auth, tls_client)              # one per peer, closed with it
    answer = await pool.request("POST", "10.0.0.7:8000", "/v1/chat/completions", headers, body)
    while chunk := await answer.readany(): ...
    answer.close()                                     # back to the pool, or dropped
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import httptools

from peer.auth import PEER_KEEPALIVE_S, PeerAuth, authority, peer_socket
from peer.tls import PEER_SNI

# Bytes of an answer held for a client that reads slower than the replica writes before the
# replica is made to wait (TCP backpressure); aiohttp's own default is 2 x 64 KiB.
READ_HIGH_WATER = 256 * 1024
# An answer's head: a peer's is a dozen short lines. Bounded, like every buffer here.
MAX_HEAD_BYTES = 64 * 1024


class UpstreamError(Exception):
    """The replica's answer could not be had: it timed out connecting, or answered badly."""


class Unreachable(UpstreamError):
    """Refused, reset, or cut off before its answer ended: evidence the host is down."""


class UpstreamResponse:
    """One answer: its status line and headers at once, its body as it comes."""

    def __init__(self, conn: _Connection):
        self._conn = conn
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._done = False  # the whole body arrived
        self._error: UpstreamError | None = None
        self._closed = False

    @property
    def content_type(self) -> str:
        """The media type alone, lower case (aiohttp's default when there is none)."""
        for name, value in self.headers:
            if name.lower() == "content-type":
                return value.partition(";")[0].strip().lower()
        return "application/octet-stream"

    async def readany(self) -> bytes:
        """What has arrived since the last call, waiting for something; b"" at the end.
        Raises UpstreamError (Unreachable when the connection was cut) once the bytes that
        did arrive are read."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered > READ_HIGH_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    def close(self) -> None:
        """Done with it: a finished answer's connection goes back to the pool; one still
        coming is dropped, which tells the replica to stop (its handler is cancelled)."""
        if self._closed:
            return
        self._closed = True
        if self._done and self._error is None:
            self._conn.finished()
        else:
            self._conn.abort()
            self.fail(UpstreamError("the answer was closed before it ended"))

    # ---- fed by the connection

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER:
            self._conn.pause()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        if not self._done and self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One kept-alive connection; httptools calls the `on_*` methods as it parses."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]):
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: UpstreamResponse | None = None
        self._head: asyncio.Future | None = None  # set when the status and headers are in
        self._head_bytes = 0
        self._framed = False  # the body's end is known (a length, or chunked)
        self.closed = False
        self.received = False  # any byte of an answer on this connection yet
        self.idle_since = 0.0
        self._keep = False  # HTTP lets this connection carry another request
        self._paused = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Tokens are small writes: never hold one back waiting for an ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(UpstreamError(f"a malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        answer = self._answer
        if answer is None:
            return
        if self._head is None and not self._framed and exc is None:
            answer.finish()  # a body that ends with its connection, as HTTP/1.0 allows
        else:
            self._fail(Unreachable(f"the connection closed mid-answer ({exc or 'EOF'})"))

    # ---- httptools callbacks

    def on_status(self, status: bytes) -> None:
        self._count(status)
        assert self._answer is not None
        self._answer.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(name + value)
        assert self._answer is not None
        self._answer.headers.append(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        )
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        assert self._answer is not None and self._head is not None
        self._answer.status = self._parser.get_status_code()
        if self._answer.status in (204, 304):
            self._framed = True  # no body, whatever the headers say
        head, self._head = self._head, None
        if not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self._answer is not None
        self._answer.feed(body)

    def on_message_complete(self) -> None:
        answer, self._answer = self._answer, None
        self._keep = self._parser.should_keep_alive()
        if answer is not None:
            answer.finish()

    # ---- for the pool and the answer

    async def send(self, head: bytes, body: bytes) -> UpstreamResponse:
        assert self.transport is not None
        answer = self._answer = UpstreamResponse(self)
        self._head = asyncio.get_running_loop().create_future()
        self._head_bytes, self._framed, self._keep = 0, False, False
        self.transport.writelines((head, body))
        try:
            await self._head
        except BaseException:  # cancelled (a timeout, the client left) or failed
            self.abort()
            raise
        return answer

    def finished(self) -> None:
        """The answer ended and was closed: reuse the connection when HTTP allows."""
        if self._keep and not self.closed:
            self.resume()  # its last bytes may have paused reading, unread
            self._pool.idle(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._pool.forget(self)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _count(self, data: bytes) -> None:
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise UpstreamError(f"an answer's head is over {MAX_HEAD_BYTES} bytes")

    def _broken(self, error: UpstreamError) -> None:
        self._fail(error)
        self.abort()

    def _fail(self, error: UpstreamError) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        if self._answer is not None:
            self._answer.fail(error)


class UpstreamPool:
    """Connections to other peers, kept for reuse. With `auth` every request is signed for
    the peer it goes to; with `tls` (peer/tls.py's client context) it goes over TLS."""

    def __init__(
        self,
        auth: PeerAuth | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive_s: float = PEER_KEEPALIVE_S,
    ):
        self._auth = auth
        self._tls = tls
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()

    async def request(
        self,
        method: str,
        addr: str,
        path_qs: str,
        headers: dict[str, str],
        body: bytes,
        connect_timeout_s: float = 2.0,
    ) -> UpstreamResponse:
        """Send one request to `addr` ("host:port") and wait for its status and headers."""
        host, _, port_text = addr.rpartition(":")
        key = (host.strip("[]"), int(port_text))
        head = self._head(method, addr, key, path_qs, headers, body)
        conn = self._reuse(key)
        if conn is not None:
            try:
                return await conn.send(head, body)
            except Unreachable:
                if conn.received:
                    raise
                # A kept-alive connection the other side closed just then, before it
                # answered a byte: once more on a new one (browsers do the same), signed
                # anew, since the other side may have seen the first nonce.
                head = self._head(method, addr, key, path_qs, headers, body)
        conn = await self._connect(key, connect_timeout_s)
        return await conn.send(head, body)

    async def close(self) -> None:
        for conn in list(self._open):
            conn.abort()

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- for the connections

    def idle(self, conn: _Connection) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    # ---- inside

    def _reuse(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            # Past keepalive_s the other side may be closing it (its idle timeout is longer).
            if not conn.closed and now - conn.idle_since < self._keepalive_s:
                conn.received = False
                return conn
            conn.abort()
        return None

    async def _connect(self, key: tuple[str, int], timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = key
        try:
            async with asyncio.timeout(timeout_s):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                error: OSError | None = None
                for info in infos:
                    sock = peer_socket(info)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, info[4])
                    except OSError as exc:
                        sock.close()
                        error = exc
                        continue
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self, key),
                        sock=sock,
                        ssl=self._tls,
                        server_hostname=PEER_SNI if self._tls is not None else None,
                    )
                    self._open.add(conn)
                    return conn
                raise Unreachable(f"cannot connect to {host}:{port}: {error!r}")
        except TimeoutError:
            raise UpstreamError(f"no connection to {host}:{port} within {timeout_s:g}s") from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS with {host}:{port} failed: {exc}") from None
        except OSError as exc:  # refused, reset, no route, a name that does not resolve
            raise Unreachable(f"cannot connect to {host}:{port}: {exc!r}") from None

    def _head(
        self,
        method: str,
        addr: str,
        key: tuple[str, int],
        path_qs: str,
        headers: dict[str, str],
        body: bytes,
    ) -> bytes:
        lines = [f"{method} {path_qs} HTTP/1.1", f"Host: {addr}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if self._auth is not None:
            signed = self._auth.signed_headers(method, path_qs, body, authority(*key))
            lines += [f"{name}: {value}" for name, value in signed.items()]
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError("a header name or value holds a line break")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape")
