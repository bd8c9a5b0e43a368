"""Request ids and the access log: one id follows a request across every peer it crosses.

Every response carries `X-Request-Id`: the client's own when it sent a sane one (so a
caller's tracing id survives), else a new one. Handlers find it with `request_id(request)`;
the forwarder sends it on to the replica, which keeps it; each peer writes it in its access
log line (logger `aivailable.access`), with the W3C trace id (peer/trace.py) beside it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from aiohttp import web

from peer import trace
from peer.forward import (
    REPLICA_HEADER,
    REQUEST_ID_HEADER,
    REQUEST_ID_KEY,
    TRACEPARENT_KEY,
    request_key,
)

__all__ = ["REQUEST_ID_HEADER", "REQUEST_ID_KEY", "request_id", "request_key"]
# What a client may choose: the characters of UUIDs, ULIDs, hex and base64 ids, bounded, so
# an id can never break a log line or a header.
SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# Peer traffic (Raft heartbeats, gossip, model copies) and polled endpoints would flood the
# log at INFO: their lines are DEBUG.
QUIET_PREFIXES = ("/raft/", "/gossip/", "/internal/", "/healthz", "/metrics")

access_log = logging.getLogger("aivailable.access")


def request_id(request: web.Request) -> str | None:
    return request.get(REQUEST_ID_KEY)


@web.middleware
async def request_id_middleware(request: web.Request, handler) -> web.StreamResponse:
    rid = request.headers.get(REQUEST_ID_HEADER, "")
    # Kept on the request, not written into a clone of its headers: a clone cost a
    # forwarded request a tenth of the hop.
    request[REQUEST_ID_KEY] = rid if SANE_ID.match(rid) else uuid.uuid4().hex
    # The trace a client (or the peer before us) is in, else a new one: logged on every peer.
    request[TRACEPARENT_KEY] = trace.accepted_or_new(request.headers.get(trace.TRACEPARENT_HEADER))
    started = time.monotonic()
    status, response = 500, None
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID_KEY]
        return response
    except web.HTTPException as exc:  # only what the error middleware lets through (3xx)
        status = exc.status
        exc.headers[REQUEST_ID_HEADER] = request[REQUEST_ID_KEY]
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's number for it)
        raise
    finally:
        quiet = request.path.startswith(QUIET_PREFIXES)
        access_log.log(
            logging.DEBUG if quiet else logging.INFO,
            '%s "%s %s" %d %.1fms rid=%s trace=%s%s',
            request.remote,
            request.method,
            request.path,
            status,
            (time.monotonic() - started) * 1000,
            request[REQUEST_ID_KEY],
            trace.trace_id(request.get(TRACEPARENT_KEY)),
            f" replica={response.headers[REPLICA_HEADER]}"
            if response is not None and REPLICA_HEADER in response.headers
            else "",
        )


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the id on a response a handler streams (headers go out early)."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
