"""TLS between peers, both sides authenticated through the cluster secret.

Every peer derives the same Ed25519 key from the cluster secret (HKDF, its own label) and
the same self-signed certificate from it (Ed25519 signatures are deterministic, so the
bytes are equal everywhere). That certificate is each side's identity and its only trust
anchor: a peer without the secret cannot present it, so it cannot complete a handshake with
a peer, and a peer never talks TLS to anything that lacks it. No CA, no files to copy.

One port serves both: `DualSite` looks at a connection's first byte; 0x16 opens a TLS
handshake (a peer), anything else is plain HTTP (clients, health checks). With TLS for
clients too (`--tls-cert`, `--tls-key`), a TLS handshake is a client's unless it names
PEER_SNI, which peers always send; then the cluster certificate answers. Peer requests
are HMAC-signed either way (peer/auth.py), so a client posing as a peer gains nothing. Peers reach each
other with `http://host:port` URLs everywhere; `make_peer_session(..., tls=...)` turns them
into TLS connections, kept alive and reused like before.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import socket
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.client_middlewares import ClientHandlerType
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

# HKDF label of the TLS key: the gossip cipher and request HMAC use other labels.
TLS_KEY_LABEL = b"aivailable v1 peer-tls ed25519"
TLS_HANDSHAKE = 0x16  # first byte of a TLS record carrying a ClientHello
# The server name peers send, so a port with TLS for clients still answers them with the
# cluster certificate (.invalid: a name that can never be a real host).
PEER_SNI = "aivailable-peer.invalid"
# Connections waiting for their first byte at once; more are closed at once. Each real
# client sends its first byte within milliseconds, so only a flood fills this.
MAX_UNSORTED = 1024


def peer_credentials(secret: bytes) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM), the same on every peer with this secret."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=TLS_KEY_LABEL).derive(secret)
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    tag = hashlib.sha256(public).hexdigest()[:16]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aivailable cluster {tag}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int(tag, 16))
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2120, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_credentials(secret: bytes, directory: Path) -> tuple[Path, Path]:
    """The credentials as files (ssl loads a key only from a file), readable by us alone."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_pem, key_pem = peer_credentials(secret)
    paths = directory / "peer.crt", directory / "peer.key"
    for path, data in zip(paths, (cert_pem, key_pem), strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return paths


def peer_contexts(cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3, each side must show the cluster certificate.
    Peers are addressed by IP, so the pinned certificate replaces the host name check."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=cert)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return server, client


def client_tls_context(cert: Path, key: Path, peers: ssl.SSLContext) -> ssl.SSLContext:
    """The server context with TLS for clients: the operator's certificate, and the peers'
    context for handshakes that name PEER_SNI."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # what browsers and curl all speak
    ctx.load_cert_chain(cert, key)

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if server_name == PEER_SNI:
            sslobj.context = peers

    ctx.sni_callback = pick
    return ctx


async def https_middleware(
    request: aiohttp.ClientRequest, handler: ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client side: a peer URL `http://host:port/...` goes over TLS to the same port."""
    if request.url.scheme == "http":
        request.url = request.url.with_scheme("https")
        request.server_hostname = PEER_SNI
    return await handler(request)


class DualSite(web.BaseSite):
    """Plain HTTP and peer TLS on one port, told apart by the first byte.

    `start()` binds; `serve()` accepts, run by the peer's TaskGroup (which owns the tasks
    that sort new connections). `first_byte_timeout_s` bounds how long a new connection
    may stay silent; once sorted, the aiohttp handler's own idle timeout takes over."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        first_byte_timeout_s: float,
        backlog: int = 1024,
    ):
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._tls = host, port, tls
        self._timeout = first_byte_timeout_s
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self.unsorted = 0  # connections accepted, first byte not seen yet
        self.refused_tls = 0  # TLS handshakes that failed: strangers (no cluster secret)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port} (peers: TLS)"

    async def start(self) -> None:
        await super().start()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._sock = socket.create_server(
            (self._host, self._port), family=family, backlog=self._backlog
        )
        self._sock.setblocking(False)
        self._server = self._sock  # type: ignore[assignment]  # what BaseSite.stop() closes

    async def stop(self) -> None:
        # End the accept loop (and the sorting of new connections) before the socket closes
        # under it, then close it.
        if self._accepting is not None and not self._accepting.done():
            self._accepting.cancel()
            await asyncio.wait([self._accepting])
        await super().stop()

    async def serve(self) -> None:
        """Accept until stop() or cancellation."""
        assert self._sock is not None, "start() first"
        self._accepting = asyncio.current_task()
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    conn, _ = await loop.sock_accept(self._sock)
                except OSError:  # closed by stop()
                    return
                if self.unsorted >= MAX_UNSORTED:
                    conn.close()
                    continue
                self.unsorted += 1
                tg.create_task(self._sort(conn))

    async def _sort(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        handed_over = False
        try:
            conn.setblocking(False)
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                async with asyncio.timeout(self._timeout):
                    await readable
                first = conn.recv(1, socket.MSG_PEEK)
            except (TimeoutError, OSError):
                return
            finally:
                loop.remove_reader(conn.fileno())
                self.unsorted -= 1
            if not first:
                return
            tls = self._tls if first[0] == TLS_HANDSHAKE else None
            try:
                await loop.connect_accepted_socket(
                    self._runner.server,  # type: ignore[arg-type]
                    conn,
                    ssl=tls,
                    ssl_handshake_timeout=self._timeout if tls else None,
                )
                handed_over = True
            except (OSError, ssl.SSLError) as exc:  # a stranger's handshake, a reset
                self.refused_tls += tls is not None
                log.debug("connection dropped before serving: %r", exc)
        finally:
            if not handed_over:
                with contextlib.suppress(OSError):
                    conn.close()
