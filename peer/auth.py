"""Peer-request authentication: an HMAC from the cluster secret on every peer-to-peer request.

A peer signs `method, path?query, timestamp, nonce, sha256(body), target host:port` with
HMAC-SHA256 under a key derived (HKDF-SHA256) from the cluster secret with its own label, so
the request key and the gossip encryption key never coincide. The receiving peer refuses,
with a 401 JSON error, any request to a peer-only path (/raft/, /gossip/, /internal/) or any
request marked as forwarded by another peer that is unsigned, signed with another key,
altered, too old or too new, replayed, meant for another peer (the target is not this
machine at this port), or signed before this peer started (a capture replayed after a
restart, whose nonce the fresh process cannot remember).

The body's digest travels in a header and is signed, so the signature is checked before
any body byte is read; the body is read afterwards, up to the route's limit, and must
match the digest.

Client requests (/v1/*, /cluster/*, /healthz, /metrics, /) need no signature.

Outgoing: `PeerAuth.client_middleware` on the peer's shared `aiohttp.ClientSession`
signs every request that session sends (aiohttp >= 3.12 client middlewares; the body is
read from the request's bytes payload, which is what `data=bytes`, `data=str` and
`json=` produce). `signed_headers()` is the same signature for any other HTTP client.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.client_middlewares import ClientHandlerType
from aiohttp.payload import BytesPayload
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Aivailable-Timestamp"  # milliseconds since the Unix epoch
NONCE_HEADER = "X-Aivailable-Nonce"  # 32 hex digits, fresh per request
SIGNATURE_HEADER = "X-Aivailable-Signature"  # hex HMAC-SHA256 of the canonical string
# Marks a request one peer forwarded to another (peer/forward.py); it must be signed,
# or any client could tell a peer "serve this locally, it was forwarded".
FORWARDED_HEADER = "X-Aivailable-Forwarded"
DIGEST_HEADER = "X-Aivailable-Content-SHA256"  # hex sha256 of the body, signed
TARGET_HEADER = "X-Aivailable-To"  # host:port the sender addressed, signed

# Paths only peers call: Raft RPCs, gossip push-pull, model transfer and the like.
PEER_PATH_PREFIXES = ("/raft/", "/gossip/", "/internal/")

# HKDF "info" label of the request-signing key. The gossip cipher derives its key from
# the same secret under a different label, so one key never serves two purposes.
REQUEST_KEY_LABEL = b"aivailable v1 peer-request hmac-sha256"
# Prefix of the signed string: names the scheme and its version.
_SCHEME = b"AIVAILABLE-HMAC-SHA256-2"
_NONCE = re.compile(r"[0-9a-f]{16,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_EMPTY_BODY_DIGEST = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class AuthConfig:
    # Largest difference, in seconds, between a request's timestamp and this peer's
    # clock. Lab machines are not always on NTP; 60 s tolerates a drifting clock while
    # keeping the replay cache (which must remember every nonce of the window) small.
    max_skew_s: float = 60.0
    # Nonces remembered for replay detection. At 65536 (about 10 MB) the cache holds a
    # full 2 x 60 s window up to ~500 peer requests/s; beyond that the oldest are
    # dropped and requests older than what was dropped are refused (see NonceCache),
    # so replays stay impossible at any rate.
    nonce_cache_size: int = 65536


class AuthError(Exception):
    """Why a peer request was refused (the message goes into the 401 body)."""


def derive_request_key(secret: bytes) -> bytes:
    """The 32-byte HMAC key for peer requests, from the cluster secret."""
    if len(secret) < 16:
        raise ValueError("the cluster secret must be at least 16 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=REQUEST_KEY_LABEL).derive(
        secret
    )


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY_DIGEST


def canonical_string(
    method: str, path_qs: str, timestamp_ms: int, nonce: str, digest: str, target: str
) -> bytes:
    """What is signed. Other headers are left out on purpose: HTTP stacks rewrite them."""
    return b"\n".join(
        (_SCHEME, method.upper().encode(), path_qs.encode(), str(timestamp_ms).encode(),
         nonce.encode(), digest.encode(), target.lower().encode())
    )  # fmt: skip


def authority(host: str, port: int | None) -> str:
    """host:port as signed: lower case, IPv6 without brackets."""
    return f"{host.strip('[]').lower()}:{port or 80}"


@dataclass(frozen=True)
class Identity:
    """Who this peer is, to refuse requests signed for another: the port it serves on and
    every name of this machine (its addresses, host names, loopback). Another peer on this
    machine has another port; one on another machine has none of these names."""

    port: int
    hosts: frozenset[str]

    def is_me(self, target: str) -> bool:
        host, _, port = target.rpartition(":")
        return port == str(self.port) and host in self.hosts


def machine_identity(port: int, *hosts: str) -> Identity:
    """This peer's Identity: `hosts` (its bind and advertised addresses) plus every name of
    this machine, read locally (interfaces, host name; no DNS lookup)."""
    import ifaddr  # zeroconf's own dependency

    host = socket.gethostname().lower()
    names = {"127.0.0.1", "localhost", "::1", host, f"{host}.local", socket.getfqdn().lower()}
    names |= {h.strip("[]").lower() for h in hosts if h and h not in ("0.0.0.0", "::")}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            names.add((ip.ip if isinstance(ip.ip, str) else ip.ip[0]).lower())
    return Identity(port, frozenset(names))


def requires_signature(path: str, headers: Mapping[str, str]) -> bool:
    return path.startswith(PEER_PATH_PREFIXES) or FORWARDED_HEADER in headers


class NonceCache:
    """Nonces seen within the clock window, bounded in size.

    Entries leave once their timestamp falls out of the window (a replay of them is
    then refused as stale anyway). When the cache is full the oldest entry is dropped
    and its timestamp becomes a floor: any request stamped at or before it is refused,
    since the cache can no longer tell whether it is a replay.
    """

    def __init__(self, size: int, window_ms: int, floor_ms: int = -1):
        """`floor_ms`: requests stamped at or before it are refused (the process start)."""
        self._size = size
        self._window_ms = window_ms
        self._seen: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._floor_ms = floor_ms

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, nonce: str, timestamp_ms: int, now_ms: int) -> None:
        expired = now_ms - self._window_ms
        while self._seen:
            oldest, ts = next(iter(self._seen.items()))
            if ts >= expired:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise AuthError("replayed request (nonce already used)")
        if timestamp_ms <= self._floor_ms:
            raise AuthError(
                "request signed before this peer started or too old for the replay cache "
                "(a replay, or the sender's clock is behind); resend it"
            )
        while len(self._seen) >= self._size:
            _, ts = self._seen.popitem(last=False)
            self._floor_ms = max(self._floor_ms, ts)
        self._seen[nonce] = timestamp_ms


class PeerAuth:
    """Signs outgoing peer requests and checks incoming ones with the cluster key."""

    def __init__(
        self,
        secret: bytes,
        config: AuthConfig | None = None,
        clock: Callable[[], float] = time.time,
        also_accept: tuple[bytes, ...] = (),
        identity: Identity | None = None,
    ):
        """`secret` signs and verifies; `also_accept` are secrets still verified during a
        key rotation (install the new one everywhere, switch, then drop the old).
        `identity`: refuse requests addressed to another peer (None: any target, for tests
        of the signature alone)."""
        self._key = derive_request_key(secret)
        self._keys = (self._key, *(derive_request_key(s) for s in also_accept))
        self._config = config or AuthConfig()
        self._clock = clock
        self._skew_ms = int(self._config.max_skew_s * 1000)
        self._identity = identity
        # Anything signed before this process started is refused: the nonces it used are
        # forgotten with the old process, so it could not be told from a replay.
        started_ms = int(clock() * 1000) - 1
        self._nonces = NonceCache(self._config.nonce_cache_size, self._skew_ms, started_ms)
        # Requests refused, by area ("gossip", "raft", "internal", "forwarded"): a peer
        # with another cluster's key shows up here (the peer exports it in /metrics).
        self.refused: collections.Counter[str] = collections.Counter()

    def _mac(self, method, path_qs, timestamp_ms, nonce, digest, target, key=None) -> str:
        message = canonical_string(method, path_qs, timestamp_ms, nonce, digest, target)
        return hmac.new(key or self._key, message, hashlib.sha256).hexdigest()

    def signed_headers(
        self, method: str, path_qs: str, body: bytes = b"", target: str = ""
    ) -> dict[str, str]:
        """Headers that authenticate one request (path with its query string, raw body, the
        host:port it is sent to)."""
        timestamp_ms = int(self._clock() * 1000)
        nonce = secrets.token_hex(16)
        digest = body_digest(body)
        target = target.lower()
        return {
            TIMESTAMP_HEADER: str(timestamp_ms),
            NONCE_HEADER: nonce,
            DIGEST_HEADER: digest,
            TARGET_HEADER: target,
            SIGNATURE_HEADER: self._mac(method, path_qs, timestamp_ms, nonce, digest, target),
        }

    def verify(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> None:
        """Raises AuthError unless the request is signed with our key, fresh and unseen."""
        self.verify_headers(method, path_qs, headers)
        self.verify_body(headers, body)

    @staticmethod
    def verify_body(headers: Mapping[str, str], body: bytes) -> None:
        if body_digest(body) != headers.get(DIGEST_HEADER, "").lower():
            raise AuthError("bad signature (the body is not the one signed)")

    def verify_headers(self, method: str, path_qs: str, headers: Mapping[str, str]) -> None:
        """The signature over the headers alone (the body's digest among them), before any
        body byte is read. Uses up the nonce once the signature holds."""
        stamp = headers.get(TIMESTAMP_HEADER)
        nonce = headers.get(NONCE_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        digest = headers.get(DIGEST_HEADER, "").lower()
        target = headers.get(TARGET_HEADER, "").lower()
        if not (stamp and nonce and signature and digest):
            raise AuthError("unsigned peer request")
        if not _DIGEST.fullmatch(digest):
            raise AuthError("malformed body digest")
        try:
            timestamp_ms = int(stamp)
        except ValueError:
            raise AuthError("malformed timestamp") from None
        if not _NONCE.fullmatch(nonce):
            raise AuthError("malformed nonce")
        now_ms = int(self._clock() * 1000)
        if abs(now_ms - timestamp_ms) > self._skew_ms:
            raise AuthError(
                f"timestamp is {(now_ms - timestamp_ms) / 1000:+.0f}s off this peer's clock "
                f"(limit {self._config.max_skew_s:.0f}s); check the clocks (NTP)"
            )
        signature = signature.lower()
        if not any(
            hmac.compare_digest(
                self._mac(method, path_qs, timestamp_ms, nonce, digest, target, k), signature
            )
            for k in self._keys
        ):
            raise AuthError("bad signature (another cluster's key, or an altered request)")
        if self._identity is not None and not self._identity.is_me(target):
            raise AuthError(f"request signed for another peer ({target or 'none named'})")
        # Only after the signature holds, so forged requests cannot fill the cache.
        self._nonces.check_and_add(nonce, timestamp_ms, now_ms)

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Server side: refuses unsigned or bad peer requests with a 401 JSON error."""
        if not requires_signature(request.path, request.headers):
            return await handler(request)
        try:
            self.verify_headers(request.method, request.raw_path, request.headers)
            # Signed: now the body may be read (up to the route's limit); it is cached, so
            # the handler reads the same bytes again.
            self.verify_body(request.headers, await request.read())
        except AuthError as exc:
            self.refused[_area(request.path)] += 1
            log.warning(
                "refused peer request %s %s from %s: %s",
                request.method,
                request.path,
                request.remote,
                exc,
            )
            # The OpenAI-style error body every refusal has; peer/ builds it itself, since
            # it knows nothing of aivailable/api.
            body = {
                "error": {
                    "message": f"peer request refused: {exc}",
                    "type": "authentication_error",
                    "param": None,
                    "code": "peer_auth",
                }
            }
            headers = {"WWW-Authenticate": "AIvailable-HMAC-SHA256"}
            return web.json_response(body, status=401, headers=headers)
        return await handler(request)

    async def client_middleware(
        self, request: aiohttp.ClientRequest, handler: ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Client side: signs every request sent through a session built with it."""
        payload = request.body
        if payload == b"" or payload is None:
            body = b""
        elif isinstance(payload, BytesPayload):
            body = await payload.as_bytes()
        else:
            raise TypeError(
                f"cannot sign a streamed request body ({type(payload).__name__}); "
                "send bytes, str or json="
            )
        target = authority(request.url.raw_host or "", request.url.port)
        request.headers.update(
            self.signed_headers(request.method, request.url.raw_path_qs, body, target)
        )
        return await handler(request)


def _area(path: str) -> str:
    for prefix in PEER_PATH_PREFIXES:
        if path.startswith(prefix):
            return prefix.strip("/")
    return "forwarded"


# A peer that vanishes from the network (cable pulled, partition) without closing its
# connections would leave a request on a kept-alive connection waiting for an answer that
# never comes: the kernel retransmits for ~15 minutes. These bound it to ~10 s. Unacked
# data for PEER_TCP_USER_TIMEOUT_MS aborts the connection; an idle one (a request sent,
# the answer not begun, e.g. while queued) is probed after PEER_KEEPALIVE_IDLE_S and aborted
# after PEER_KEEPALIVE_COUNT unanswered probes PEER_KEEPALIVE_INTERVAL_S apart. A live peer
# that is merely slow or stopped still ACKs and answers probes, so it is not cut off; 10 s
# rides out a 30% packet loss (six retransmissions in a row would have to be lost).
PEER_TCP_USER_TIMEOUT_MS = 10_000
PEER_KEEPALIVE_IDLE_S = 5
PEER_KEEPALIVE_INTERVAL_S = 1
PEER_KEEPALIVE_COUNT = 5
# Seconds an idle connection to another peer is kept for reuse: below the peers' own idle
# timeout ([access] idle_timeout_s, 10 s), so a request never goes out on a connection the
# other side is closing. Raft heartbeats keep the busy connections warm anyway.
PEER_KEEPALIVE_S = 5.0


def peer_socket(addr_info: tuple) -> socket.socket:
    """aiohttp's socket_factory for peer connections: TCP keepalive and a user timeout."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", PEER_KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", PEER_KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", PEER_KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", PEER_TCP_USER_TIMEOUT_MS),
    ):
        if hasattr(socket, name):  # Linux has all four; others keep the system's keepalive
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


def make_peer_session(auth: PeerAuth, tls=None, **kwargs) -> aiohttp.ClientSession:
    """The peer's one ClientSession for talking to other peers: every request is signed.

    No connection cap (aiohttp's default is 100 in all), since each forwarded streaming
    request holds a connection for its whole generation; keep-alive reuse keeps the
    forwarding hop from paying a TCP handshake per request. Its sockets notice a peer
    that dropped off the network within ~10 s (see `peer_socket`). With `tls` (the client
    context of peer/tls.py) every request goes over TLS to the same host and port.
    """
    kwargs.setdefault(
        "connector",
        aiohttp.TCPConnector(
            limit=0,
            keepalive_timeout=PEER_KEEPALIVE_S,
            socket_factory=peer_socket,
            ssl=tls if tls is not None else True,
        ),
    )
    middlewares: tuple = (auth.client_middleware,)
    if tls is not None:
        from peer.tls import https_middleware

        middlewares += (https_middleware,)
    return aiohttp.ClientSession(middlewares=middlewares, **kwargs)
