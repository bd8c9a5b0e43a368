"""The edge of every peer: body limits, API-key checks, per-key limits (aiohttp adapters).

Order (server.py): body limits, then the peer-signature check (peer/auth.py), then API keys.
Every check here runs on the headers alone; a body is read only once the caller is known,
and never beyond its route's limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from aivailable.access.config import AccessConfig
from aivailable.access.errors import AccessError
from aivailable.access.limits import RateLimiter
from aivailable.access.policy import allowed, area, presented_key
from aivailable.cluster.keys import AccessState, KeyRecord
from peer.auth import requires_signature

# request[KEY_RECORD]: the caller's KeyRecord, once checked.
KEY_RECORD = web.RequestKey("api_key", KeyRecord)
# request[RESERVED_TOKENS]: the tokens `admit` reserved for it, until `charge`.
RESERVED_TOKENS = web.RequestKey("reserved_tokens", int)


def invalid_key(message: str) -> AccessError:
    return AccessError(401, message, type="invalid_request_error", code="invalid_api_key")


def forbidden(message: str, code: str = "insufficient_permissions") -> AccessError:
    return AccessError(403, message, type="permission_error", code=code)


def body_limits(config: AccessConfig, raft_body_bytes: int):
    """Middleware: a route's body limit, enforced on Content-Length before anything is read
    and on the bytes read for a chunked body."""

    def limit_for(path: str) -> int:
        if path.startswith("/raft/"):
            return raft_body_bytes  # snapshots travel in one request
        if path.startswith(("/gossip/", "/internal/")):
            return config.max_peer_body_bytes
        return config.max_body_bytes

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        limit = limit_for(request.path)
        length = request.content_length
        if length is not None and length > limit:
            raise AccessError(
                413,
                f"request body of {length} bytes exceeds this route's {limit}",
                code="too_large",
            )
        request._client_max_size = limit  # aiohttp's read() refuses beyond it (413)
        return await handler(request)

    return middleware


class AccessGuard:
    """API-key enforcement. `access()` is the replicated key set (ClusterState.access)."""

    def __init__(
        self,
        enabled: bool,
        access: Callable[[], AccessState],
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
        caught_up: Callable[[], bool] = lambda: True,
    ):
        self.enabled = enabled
        self._access = access
        self.limiter = limiter
        self._clock = clock
        # Whether this peer's replicated state is current (cluster/node.py's caught_up): a
        # peer just restarted replays its log, and until then an unknown key may be one its
        # copy has not reached yet, which deserves "try again", not "your key is wrong".
        self._caught_up = caught_up

    def identify(self, request: web.Request) -> KeyRecord:
        """The caller's live key, from the headers alone; 401 without one."""
        secret = presented_key(request.headers)
        if secret is None:
            raise invalid_key(
                "this peer requires an API key: send 'Authorization: Bearer KEY' "
                "(the admin key of a new cluster is in its data dir, admin.key)"
            )
        record = self._access().lookup(secret, int(self._clock() * 1000))
        if record is None and not self._caught_up():
            raise AccessError(
                503,
                "this peer is catching up with the cluster and does not know this key yet; "
                "try again shortly",
                type="server_error",
                code="catching_up",
                retry_after=1.0,
            )
        if record is None:
            raise invalid_key("incorrect, revoked or expired API key")
        return record

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        # Peer requests carry the cluster's signature instead (checked before this).
        if not self.enabled or requires_signature(request.path, request.headers):
            return await handler(request)
        needed = area(request.method, request.path)
        if needed == "open":
            return await handler(request)
        try:
            record = self.identify(request)
        except AccessError as exc:
            response = exc.response()
            response.headers["WWW-Authenticate"] = 'Bearer realm="aivailable"'
            return response
        if not allowed(record.role, needed):
            raise forbidden(f"a {record.role} key may not use {request.method} {request.path}")
        request[KEY_RECORD] = record
        if needed != "user":
            return await handler(request)
        return await self._inference(request, handler, record)

    async def _inference(self, request: web.Request, handler, record: KeyRecord):
        """Requests per minute, from the headers alone; the model and tokens are decided by
        `admit` once the route has parsed its body into the typed request."""
        wait = self.limiter.admit(record, self._clock())
        if wait is not None:
            raise _rate_limited(record, wait)
        return await handler(request)

    # --- the gate of aivailable/api/inference.py: decisions from the typed request ---------

    def admit(self, request: web.Request, parsed) -> None:
        """May this caller run `parsed` (its `model`, its `max_tokens` bound)? Reserves the
        bound against the key's tpm until `charge` says what the request really cost."""
        record = request.get(KEY_RECORD)
        if record is None:
            return  # auth off, or a peer's signed request (its entry peer decided)
        if not record.may_use(parsed.model):
            raise forbidden(f"this key may not use the model '{parsed.model}'", "model_not_allowed")
        wait = self.limiter.reserve(record, parsed.max_tokens, self._clock())
        if wait is not None:
            raise _rate_limited(record, wait)
        request[RESERVED_TOKENS] = parsed.max_tokens

    def charge(self, request: web.Request, parsed, usage) -> None:
        """The engine's counts (`usage`: peer.usage.Usage), or the reserved bound when no
        engine said (a host that died mid-answer): the most it could have cost."""
        record = request.get(KEY_RECORD)
        reserved = request.pop(RESERVED_TOKENS, None)
        if record is None or reserved is None:
            return
        spent = usage.total if usage is not None else reserved
        self.limiter.settle(record, reserved, spent, self._clock())

    def visible(self, request: web.Request, model: str) -> bool:
        record = request.get(KEY_RECORD)
        return record is None or record.may_use(model)


def _rate_limited(record: KeyRecord, wait: float) -> AccessError:
    return AccessError(
        429,
        f"rate limit of key {record.id} reached ({record.rpm or '-'} requests, "
        f"{record.tpm or '-'} tokens per minute); retry in {wait:.0f} s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after=wait,
    )


class UsageGossip:
    """Wraps the peer's Gossip: each payload this peer sets carries its per-key use, and each
    read of the members hands the others' use to the limiter. Everything else passes through."""

    def __init__(self, gossip: Any, limiter: RateLimiter, me: str, clock=time.time):
        self._gossip = gossip
        self._limiter = limiter
        self._me = me
        self._clock = clock

    def set_payload(self, payload: dict) -> None:
        self._gossip.set_payload({**payload, "use": self._limiter.local_use(self._clock())})

    def members(self) -> list:
        members = self._gossip.members()
        self._limiter.set_remote(
            (m.id, (m.payload or {}).get("use"))
            for m in members
            if m.id != self._me and m.state in ("alive", "suspect")
        )
        return members

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gossip, name)


def usage_metrics(registry, limiter: RateLimiter, access: Callable[[], AccessState]):
    """Per-key use on this peer since it started, as gauges read at scrape time; returns
    the refresh to call then. Labelled by key id (never the secret) and name."""
    from prometheus_client import Gauge

    requests = Gauge(
        "aivailable_api_key_requests",
        "Requests admitted per API key by this peer since it started",
        ["key", "name"],
        registry=registry,
    )
    tokens = Gauge(
        "aivailable_api_key_tokens",
        "Tokens counted per API key by this peer since it started",
        ["key", "name"],
        registry=registry,
    )

    def refresh() -> None:
        keys = access().keys
        limiter.forget(keys)
        requests.clear()
        tokens.clear()
        for key_id, record in keys.items():
            requests.labels(key_id, record.name).set(limiter.requests[key_id])
            tokens.labels(key_id, record.name).set(limiter.tokens[key_id])

    return refresh
