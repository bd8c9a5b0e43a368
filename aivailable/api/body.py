"""The one safe way to read a JSON request body (DESIGN.md rule 7: errors at the edge).

Bounded in bytes and in nesting depth; every bad body is a clean 4xx, never a 500:
a body over the byte limit is 413, anything else wrong (not JSON, not UTF-8, NaN or
Infinity, an integer over Python's 4300 digits, nesting deeper than the limit, even
100,000 deep, which would make json.loads raise RecursionError) is 400.

    from aivailable.api.body import read_json, read_body, parse_json
    body = await read_json(request)      # the parsed value (check its type yourself)
    raw = await read_body(request)       # the bytes, when they travel on (forwarding)
    body = parse_json(raw)               # ... and the same checks on them
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from aivailable.api.errors import ApiError, bad_request

# Bytes in one API request body. A 128k-token prompt is about half a MiB of text; 8 MiB
# leaves room for long conversations and tool schemas while one request cannot make the
# peer hold much (the app's own client_max_size is larger, for Raft snapshots).
MAX_BODY_BYTES = 8 << 20
# Nesting depth of a JSON body. Chat requests nest about 5 deep and JSON schemas for
# tools or response_format rarely 20; 64 is generous and far below Python's recursion limit.
MAX_DEPTH = 64


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def read_body(request: web.Request, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The body's bytes, refused with 413 beyond `max_bytes` (before reading, when the
    client declared its length)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    try:
        raw = await request.read()  # cached: a middleware may have read it already
    except web.HTTPRequestEntityTooLarge:  # a chunked body past the app's own limit
        raise too_large(max_bytes) from None
    if len(raw) > max_bytes:
        raise too_large(max_bytes)
    return raw


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `raw`, or a 400 ApiError saying what is wrong with it."""
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise bad_request(f"the JSON body is nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise bad_request(f"the request body is not valid JSON: {str(exc)[:200]}") from None
    if depth_exceeds(value, max_depth):
        raise bad_request(f"the JSON body is nested more than {max_depth} levels deep")
    return value


async def read_json(
    request: web.Request, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    return parse_json(await read_body(request, max_bytes), max_depth)


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers in `value` nest deeper than `limit` (a scalar is depth 0, `[]`
    depth 1). Iterative, so no depth can overflow the stack."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        container, depth = stack.pop()
        if depth > limit:
            return True
        children = container.values() if isinstance(container, dict) else container
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
