"""The edge of every peer: body limits, API-key checks, per-key limits (aiohttp adapters).

Order (server.py): body limits, then the peer-signature check (peer/auth.py), then API keys.
Every check here runs on the headers alone; a body is read only once the caller is known,
and never beyond its route's limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from aivailable.access.config import AccessConfig
from aivailable.access.errors import AccessError as ApiError
from aivailable.access.limits import RateLimiter
from aivailable.access.policy import allowed, area, presented_key
from aivailable.cluster.keys import AccessState, KeyRecord
from peer.auth import requires_signature

# request[KEY_RECORD]: the caller's KeyRecord, once checked.
KEY_RECORD = web.RequestKey("api_key", KeyRecord)


def invalid_key(message: str) -> ApiError:
    return ApiError(401, message, type="invalid_request_error", code="invalid_api_key")


def forbidden(message: str, code: str = "insufficient_permissions") -> ApiError:
    return ApiError(403, message, type="permission_error", code=code)


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
            raise ApiError(
                413,
                f"request body of {length} bytes exceeds this route's {limit}",
                code="too_large",
            )
        request._client_max_size = limit  # aiohttp's read() refuses beyond it (413)
        return await handler(request)

    return middleware


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the handler answers with its own 400


def _tokens_used(response: web.StreamResponse, asked: dict | None) -> int:
    """Tokens a finished request used: the usage of a JSON answer; for a stream (whose
    usage the entry peer does not see) its max_tokens, the most it could have used."""
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        usage = (_json(response.body) or {}).get("usage") if response.status == 200 else None
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            return usage["total_tokens"]
        return 0
    if isinstance(asked, dict):
        for field in ("max_completion_tokens", "max_tokens"):
            if isinstance(asked.get(field), int):
                return asked[field]
    return 0


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
            raise ApiError(
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
        except ApiError as exc:
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
        asked = None
        if request.method == "POST" and request.can_read_body and (record.models or record.tpm):
            asked = _json(await request.read())  # cached for the handler; route-limited
            model = asked.get("model") if isinstance(asked, dict) else None
            if isinstance(model, str) and not record.may_use(model):
                raise forbidden(f"this key may not use the model '{model}'", "model_not_allowed")
        card = request.path.removeprefix("/v1/models/")
        if card != request.path and not record.may_use(card):
            raise forbidden(f"this key may not use the model '{card}'", "model_not_allowed")
        wait = self.limiter.admit(record, self._clock())
        if wait is not None:
            raise ApiError(
                429,
                f"rate limit of key {record.id} reached ({record.rpm or '-'} requests, "
                f"{record.tpm or '-'} tokens per minute); retry in {wait:.0f} s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                retry_after=wait,
            )
        response = await handler(request)
        if request.path == "/v1/models" and record.models:
            _only_models(response, record)
        self.limiter.spent(record, _tokens_used(response, asked), self._clock())
        return response


def _only_models(response: web.StreamResponse, record: KeyRecord) -> None:
    """A model-scoped key lists only its models."""
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return
    listing = _json(response.body)
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        listing["data"] = [
            m for m in listing["data"] if isinstance(m, dict) and record.may_use(m.get("id", ""))
        ]
        response.body = json.dumps(listing).encode()


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
