"""CORS for browser clients of the API, for the origins the config lists and no others.

Off by default (`cors_origins` empty): a page on any site could otherwise make a visitor's
browser use a peer on their machine or LAN. With origins listed, a preflight (`OPTIONS` with
`Access-Control-Request-Method`) from one of them gets 204 with what it may send, and every
response to one of them says it may read it; `*` allows any origin. No cookies are involved
(clients send API keys as headers), so credentials are never allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web

from aivailable.api.errors import ApiError
from aivailable.api.request_id import request_key

CORS_ORIGIN_KEY = request_key("cors_origin")  # an allowed Origin the response must name
ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
# What a browser script may read besides the simple headers: tracing and retry hints.
EXPOSE_HEADERS = "X-Request-Id, X-Aivailable-Replica, Retry-After"
# Seconds a browser may cache a preflight's answer: fewer preflights, and a config change
# still reaches browsers within minutes.
MAX_AGE_S = 600
# Request headers a preflight may ask for: header names only (the openai SDK sends many
# x-stainless-* ones), at most 2 KiB of them, so the echo can carry nothing else.
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")


def cors_middleware(origins: Iterable[str]):
    allowed = frozenset(o.rstrip("/") for o in origins)
    any_origin = "*" in allowed

    def allows(origin: str | None) -> bool:
        return origin is not None and (any_origin or origin in allowed)

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allows(origin):
                return ApiError(403, f"CORS: the origin {origin!r} is not allowed").response()
            headers = {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Max-Age": str(MAX_AGE_S),
                "Vary": "Origin",
            }
            asked = request.headers.get("Access-Control-Request-Headers", "").strip()
            if asked and len(asked) <= 2048 and _HEADER_LIST.match(asked):
                headers["Access-Control-Allow-Headers"] = asked
            return web.Response(status=204, headers=headers)
        if not allows(origin):
            return await handler(request)
        request[CORS_ORIGIN_KEY] = origin
        response = await handler(request)
        if not response.prepared:
            _add_headers(response, origin)
        return response

    return middleware


def _add_headers(response: web.StreamResponse, origin: str) -> None:
    if "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        response.headers.add("Vary", "Origin")


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the CORS headers on a response a handler streams."""
    origin = request.get(CORS_ORIGIN_KEY)
    if origin is not None:
        _add_headers(response, origin)
