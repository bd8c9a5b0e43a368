"""Forwarding: any peer answers /v1/* for a model it does not serve by proxying to a replica.

Two halves, as everywhere in this project:
- pure replica choice (peer/availability.py: `order_replicas`, `summarize_availability`):
  which ready replica to try first, and what to tell the client when there is none;
- the thin asyncio adapter here (`Forwarder`): sends the same request to that replica over
  the peer's `UpstreamPool` (peer/upstream.py: kept-alive connections, every request signed),
  streams the answer back chunk by chunk, retries once elsewhere when nothing has been sent
  yet, and closes the upstream request when the client goes away.

A forwarded request carries `X-Aivailable-Forwarded: <origin node>`; the receiving peer
serves it locally or answers 503/404, never forwards it again, so there are no loops.

A host that dies is left quickly: a replica gossip declares dead (or suspect, while another
can take the request) is abandoned while waiting for its first byte, as is one silent past
`first_byte_timeout_s`; a refused or reset connection is reported to membership as a
suspicion at once. Errors are this module's own (`ForwardError`); aivailable/api turns them
into HTTP responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from peer import resume
from peer.affinity import prefix_key
from peer.auth import FORWARDED_HEADER
from peer.availability import (
    AFFINITY_ROUTINGS,
    ROUTINGS,
    ForwardError,
    ModelAvailability,
    Replica,
    order_replicas,
)
from peer.trace import TRACEPARENT_HEADER
from peer.upstream import Unreachable, UpstreamError, UpstreamPool, UpstreamResponse
from peer.usage import USAGE_TRAILER_HEADER, TrailerSplitter, Usage
from peer.watch import Watch, Watches

log = logging.getLogger(__name__)

# FORWARDED_HEADER (peer/auth.py) is set on the upstream request to the origin node's id;
# its presence means "serve locally only", and peers accept it only when signed.
# Set on the response to the client: which node served the request.
REPLICA_HEADER = "X-Aivailable-Replica"
# The id that follows a request across peers (aivailable/api/request_id.py sets it on the
# request under REQUEST_ID_KEY); the forwarder passes it on to the replica in this header.
REQUEST_ID_HEADER = "X-Request-Id"


def request_key(name: str, kind: type = str):
    """A typed request-storage key (aiohttp >= 3.14 warns about plain strings), else a string."""
    make = getattr(web, "RequestKey", None)
    return make(name, kind) if make is not None else f"aivailable.{name}"


REQUEST_ID_KEY = request_key("request_id")
# The conversation's prefix key (peer/affinity.py), computed once per request; "" for none.
AFFINITY_KEY = request_key("affinity_key")
# The W3C traceparent to send on the next hop (peer/trace.py): the client's, or the span this
# peer is in; set by aivailable/api/request_id.py and, when spans are exported, tracing.py.
TRACEPARENT_KEY = request_key("traceparent")
# What the hosts of a forwarded answer said it cost (peer/usage.py), summed over a resume;
# absent when no host said (one died mid-answer). The entry peer charges the caller from it.
FORWARDED_USAGE_KEY = request_key("forwarded_usage", Usage)
# On a host's refusal that is about the request itself, not the host's instance (a stored
# response it does not have): relayed as it is, never retried on another replica.
FINAL_HEADER = "X-Aivailable-Final"
_FINAL_LOWER = FINAL_HEADER.lower()

# Hop-by-hop headers (RFC 9110 7.6.1) and those the two HTTP stacks set themselves.
_NOT_PASSED_UPSTREAM = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Expect",
        REQUEST_ID_HEADER,  # set from the request's own id instead (it may have replaced it)
    )
)
_TRAILER_LOWER = USAGE_TRAILER_HEADER.lower()


def _has_trailer(upstream: UpstreamResponse) -> bool:
    return any(name.lower() == _TRAILER_LOWER for name, _ in upstream.headers)


def _note_usage(request: web.Request, usage: Usage | None) -> None:
    if usage is not None:
        request[FORWARDED_USAGE_KEY] = request.get(FORWARDED_USAGE_KEY, Usage()) + usage


_NOT_PASSED_DOWNSTREAM = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Date",
        "Server",
    )
)
# The peer-auth headers (peer/auth.py) are the session's to set, never a client's.
_PEER_HEADER_PREFIX = "x-aivailable-"


# ---------------------------------------------------------------- the asyncio adapter


class HeadersWithFirstChunk(web.StreamResponse):
    """Sends its headers together with the first chunk: one segment and one wake-up
    for the client instead of two, which is most of a hop's cost on a busy machine. For
    streams whose first chunk follows `prepare` at once (a relay, an SSE answer)."""

    _send_headers_immediately = False  # aiohttp's own switch (web.Response sets it too)


@dataclass(frozen=True)
class ForwardConfig:
    # Seconds to open a TCP connection to a replica. On a LAN a live peer accepts within
    # milliseconds; 2 s lets a dead one be skipped for the next replica well inside a
    # client's patience, and tolerates a peer busy for a moment (GC, a model loading).
    connect_timeout_s: float = 2.0
    # Seconds for the whole forwarded request, queueing included. A little above the
    # serving peer's own request_timeout_s (300 s), so its clearer 504 arrives first.
    request_timeout_s: float = 310.0
    # Seconds to wait for a replica's first byte while another replica could take the
    # request instead. A stopped (SIGSTOP) or cut-off host sends nothing and gossip may
    # take seconds to call it suspect; a live one starts answering (headers, or the first
    # token) within a prompt's processing time, which is well under this on a LAN GPU. The
    # last replica tried waits up to request_timeout_s, as nothing else could serve.
    first_byte_timeout_s: float = 10.0
    # Seconds of silence tolerated once the answer is streaming. A token takes well under
    # a second even on old GPUs; 60 s rides out a replica stopped (SIGSTOP) for a while
    # without leaving a client hanging behind a dead one until request_timeout_s. A host
    # gossip declares dead is left at once.
    stall_timeout_s: float = 60.0
    # Seconds between checks of gossip's view of the host being waited on: a host declared
    # dead is abandoned within this time. A dict lookup per in-flight request.
    member_check_s: float = 0.1
    # Replicas tried per request: the best, then one more (the "retry once").
    # More would multiply load during an overload for little gain.
    max_attempts: int = 2
    # Upstream statuses that mean "try another replica" when nothing has reached the
    # client yet: 503 (that instance is loading, failed or stopping), 429 (its queue is
    # full, which is exactly when another replica should take the request) and 404 (the
    # model has just left that node; gossip had not said so yet).
    retry_statuses: tuple[int, ...] = (404, 429, 503)
    # Times a streaming answer whose replica died mid-way is resumed on another replica
    # from the text already sent (peer/resume.py). 0 ends such a stream with an error.
    max_resumes: int = 2
    # How the replica is picked (peer/availability.py ROUTINGS): "affinity_bounded" sends
    # a conversation's turns to the replica that holds its prefix in cache while it has a
    # free slot or its load stays under 1.25x the mean (issue 22's rule; a later turn then
    # evaluates only its new tokens), else the next in the prefix's ranking. "affinity"
    # puts any free slot before a home that would queue: in bench/affinity.py it sent the
    # busier home's extra chats away to prefill their whole history (78-91% of later turns
    # hit, against 94-100% for affinity_bounded; docs/cluster.md). "least_loaded" ignores
    # the prefix.
    routing: str = "affinity_bounded"

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}")


ReplicasOf = Callable[[str], list[Replica]]
AvailabilityOf = Callable[[str], ModelAvailability]
# A refused or reset connection to a node: direct evidence for membership (gossip.Gossip).
ReportUnreachable = Callable[[str], None]


class _Attempt:
    """What one try at one replica came to; `watch` goes on watching the stream."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.upstream: UpstreamResponse | None = None
        self.first = b""
        self.failure = ""


class Forwarder:
    """Proxies OpenAI requests to remote replicas. `forward` is called by OpenAIApi."""

    def __init__(
        self,
        upstream: UpstreamPool,
        replicas_of: ReplicasOf,
        availability_of: AvailabilityOf,
        node_id: str,
        config: ForwardConfig | None = None,
        member_state: Callable[[str], str] = lambda node: "alive",
        report_unreachable: ReportUnreachable = lambda node: None,
    ):
        self._upstream = upstream
        self._replicas_of = replicas_of
        self._availability_of = availability_of
        self._node_id = node_id
        self._config = config or ForwardConfig()
        self._watches = Watches(member_state, self._config.member_check_s)
        self._report_unreachable = report_unreachable
        self._inflight: dict[str, int] = {}  # node id -> requests this peer has there now

    @staticmethod
    def forwardable(request: web.Request) -> bool:
        """False for a request another peer already forwarded here: serve it or refuse."""
        return FORWARDED_HEADER not in request.headers

    def inflight(self) -> dict[str, int]:
        return {node: n for node, n in self._inflight.items() if n}

    def _key(self, request: web.Request, body: bytes) -> str | None:
        """The request's prefix key, parsed from the body once (None: no affinity)."""
        if self._config.routing not in AFFINITY_ROUTINGS:
            return None
        key = request.get(AFFINITY_KEY)
        if key is None:
            try:
                key = prefix_key(json.loads(body)) or ""
            except ValueError:
                key = ""
            request[AFFINITY_KEY] = key
        return key or None

    def _candidates(self, model: str, exclude: set[str], key: str | None = None) -> list[Replica]:
        ordered = order_replicas(
            self._replicas_of(model), self._inflight, key, self._config.routing
        )
        return [r for r in ordered if not r.local and r.node_id not in exclude]

    def serves_here(self, request: web.Request, body: bytes, model: str, engine) -> bool:
        """Whether this peer's own ready instance (`engine`, read live) is the best replica
        for the request: it is while the prefix's replica is this one, or it can start the
        request at once, or it would queue it and no other replica has a free slot."""
        if self._config.routing == "local_first":
            return True
        mine = Replica(
            self._node_id,
            "",
            True,
            "ready",
            engine.queue_depth,
            free_slots=engine.free_slots,
            admits=engine.admits(),
        )
        others = [r for r in self._replicas_of(model) if not r.local]
        best = order_replicas(
            [mine, *others], self._inflight, self._key(request, body), self._config.routing
        )
        return best[0].local

    async def forward(
        self, request: web.Request, body: bytes, model: str, fallback: bool = False
    ) -> web.StreamResponse | None:
        """Send the request to the best remote replica and stream its answer back.
        `fallback`: this peer's own replica can take the request, so no remote's refusal
        (a retry status, an unreachable host) is passed on: None when none answered. The
        last remote still gets the long wait: a home queueing the turn is not abandoned
        for a local slot that may queue it too."""
        candidates = self._candidates(model, set(), self._key(request, body))
        if not candidates:
            # This peer's view may lag (gossip reaches it a round late): a replica it knows
            # as loading may serve by now, and a loading host holds the request until it
            # does. Try it before answering 503.
            candidates = [
                r
                for r in self._replicas_of(model)
                if r.state == "loading" and not r.local and r.member_state == "alive"
            ]
        if not candidates:
            raise self._availability_of(model).error(model)
        headers = self._upstream_headers(request)
        tries = candidates[: max(1, self._config.max_attempts)]
        deadline = asyncio.get_running_loop().time() + self._config.request_timeout_s
        failures: list[str] = []
        for i, replica in enumerate(tries):
            has_next = i < len(tries) - 1
            attempt = await self._attempt(
                request, replica, headers, body, has_next, deadline, refused_next=fallback
            )
            if attempt.upstream is None:
                failures.append(attempt.failure)
                continue
            return await self._relay(request, replica, attempt, deadline, body, model, headers)
        if fallback:  # e.g. a full home under the load bound refused: serve it here
            log.info("%s served here: %s", model, "; ".join(failures))
            return None
        log.warning("no replica of %s answered: %s", model, "; ".join(failures))
        # Undeployed meanwhile, or only loading replicas were tried: the model's own state
        # says more than "unreachable".
        if self._availability_of(model).state == "absent" or all(r.state != "ready" for r in tries):
            raise self._availability_of(model).error(model)
        raise ModelAvailability("unreachable", "; ".join(failures)).error(model)

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        headers = {}
        traceparent = request.get(TRACEPARENT_KEY)
        for name, value in request.headers.items():
            lowered = name.lower()
            ours = traceparent is not None and lowered == TRACEPARENT_HEADER  # set below
            passed = lowered not in _NOT_PASSED_UPSTREAM and not ours
            if passed and not lowered.startswith(_PEER_HEADER_PREFIX):
                headers[name] = value
        if traceparent is not None:  # every hop carries the trace (W3C Trace Context)
            headers[TRACEPARENT_HEADER] = traceparent
        headers[FORWARDED_HEADER] = self._node_id
        # The client's id when it was sane, else the one chosen for it here (request_id.py).
        rid = request.get(REQUEST_ID_KEY) or request.headers.get(REQUEST_ID_HEADER)
        if rid:
            headers[REQUEST_ID_HEADER] = rid
        return headers

    async def _attempt(
        self,
        request: web.Request,
        replica: Replica,
        headers: dict[str, str],
        body: bytes,
        has_next: bool,
        deadline: float,
        path: str | None = None,
        refused_next: bool = False,
    ) -> _Attempt:
        """Send to one replica and read its first chunk. `upstream` is None when the next
        replica should be tried (nothing reached the client); raises ForwardError 504 when
        the last one ran out of time. `refused_next`: a retry status moves on even from
        the last replica (this peer can serve the request itself)."""
        limit = self._config.first_byte_timeout_s if has_next else self._config.request_timeout_s
        watch = self._watches.start(replica.node_id, limit, deadline, has_next)
        out = _Attempt(watch)
        self._inflight[replica.node_id] = self._inflight.get(replica.node_id, 0) + 1
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(None) as cm:
                watch.waiting(cm)
                upstream = await self._upstream.request(
                    request.method,
                    replica.addr,
                    path or request.raw_path,
                    headers,
                    body,
                    self._config.connect_timeout_s,
                )
                if upstream.status == 401:
                    # That peer refused our signature: its cluster key differs. The
                    # client did nothing wrong, so this is that replica failing.
                    out.failure = f"{replica.node_id} refused this peer's signature"
                    return out
                # A 404 is that replica's instance gone (stopped, or the peer restarted
                # without it), not the model: never tell the client it does not exist.
                final = any(name.lower() == _FINAL_LOWER for name, _ in upstream.headers)
                if (
                    upstream.status in self._config.retry_statuses
                    and (has_next or refused_next or upstream.status == 404)
                    and not final
                ):
                    out.failure = f"{replica.node_id} answered {upstream.status}"
                    return out
                # Read the first chunk before answering the client: until then a
                # broken replica can still be swapped for another one.
                out.first = await upstream.readany()
                # From here the watch closes the stream instead of ending this wait.
                watch.streaming(upstream, self._config.stall_timeout_s)
                out.upstream, upstream = upstream, None
                return out
        except UpstreamError as exc:  # refused, reset, timed out connecting, a broken answer
            if isinstance(exc, Unreachable):  # direct evidence it is down
                self._report_unreachable(replica.node_id)
            out.failure = f"{replica.node_id} at {replica.addr}: {exc}"
            return out
        except TimeoutError as exc:
            if has_next or watch.why.startswith("gossip"):
                out.failure = f"{replica.node_id} abandoned: {watch.why}"
                return out
            raise ForwardError(
                504,
                f"the replica {replica.node_id} did not answer within "
                f"{self._config.request_timeout_s:.0f}s",
                type="timeout",
            ) from exc
        finally:
            # On retry, timeout and the client's disconnect (the handler is cancelled):
            # closing the upstream connection makes the replica cancel its handler too,
            # which frees the model's slot there.
            if upstream is not None:
                upstream.close()
            if out.upstream is None:
                self._watches.stop(watch)
                self._inflight[replica.node_id] -= 1  # else: once the relay is over

    async def _relay(
        self,
        request: web.Request,
        replica: Replica,
        attempt: _Attempt,
        deadline: float,
        body: bytes,
        model: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Stream the answer to the client. A streamed chat or completion whose replica dies
        mid-way is resumed on another replica from the text sent so far (peer/resume.py)."""
        upstream = attempt.upstream
        assert upstream is not None
        response = HeadersWithFirstChunk(status=upstream.status, reason=upstream.reason)
        # The host ends this body with a usage trailer that the client never sees, so the
        # length it announced is not the client's (aiohttp then sends it chunked).
        trailer = _has_trailer(upstream)
        for key, value in upstream.headers:
            lowered = key.lower()
            if lowered in _NOT_PASSED_DOWNSTREAM or lowered == _TRAILER_LOWER:
                continue
            if trailer and lowered == "content-length":
                continue
            response.headers.add(key, value)
        response.headers[REPLICA_HEADER] = replica.node_id
        is_sse = upstream.content_type == "text/event-stream"
        # Whole SSE events only reach the client, so an error or a resumed answer never
        # lands in the middle of one.
        sse = resume.SseText(request.path == resume.CHAT_PATH) if is_sse else None
        can_resume = (
            sse is not None
            and upstream.status == 200
            and request.path in resume.RESUMABLE_PATHS
            and self._config.max_resumes > 0
        )
        chunk, resumes, tried = attempt.first, 0, {replica.node_id}
        try:
            await response.prepare(request)
            while True:
                splitter = TrailerSplitter() if _has_trailer(attempt.upstream) else None
                reason = await self._pump(response, attempt, replica, chunk, sse, splitter)
                if splitter is not None:
                    _note_usage(request, splitter.usage())
                if reason is None:
                    break
                log.warning("replica %s %s mid-stream", replica.node_id, reason)
                nxt = None
                if can_resume and not sse.done and resumes < self._config.max_resumes:
                    nxt = await self._resume(request, body, model, headers, sse, tried, deadline)
                if nxt is None:
                    await self._end_broken(request, response, is_sse, replica, reason)
                    return response
                self._release(replica.node_id, attempt)
                resumes += 1
                replica, attempt = nxt
                chunk = attempt.first
                tried.add(replica.node_id)
                log.info("resumed a stream of %s on %s", model, replica.node_id)
            if sse is not None and (rest := sse.leftover()):
                await response.write(rest)
            await response.write_eof()
            return response
        finally:
            self._release(replica.node_id, attempt)

    def _release(self, node_id: str, attempt: _Attempt) -> None:
        """Ends an attempt that reached the streaming stage: its connection, its watch."""
        self._watches.stop(attempt.watch)
        if attempt.upstream is not None:
            attempt.upstream.close()
            attempt.upstream = None
            self._inflight[node_id] -= 1

    async def _pump(
        self,
        response: web.StreamResponse,
        attempt: _Attempt,
        replica: Replica,
        chunk: bytes,
        sse: resume.SseText | None,
        splitter: TrailerSplitter | None,
    ) -> str | None:
        """Copy upstream to the client until it ends (None) or breaks (the reason)."""
        upstream, watch = attempt.upstream, attempt.watch
        assert upstream is not None
        while True:
            if chunk and splitter is not None:
                chunk = splitter.feed(chunk)
            if chunk:
                out = sse.feed(chunk) if sse is not None else chunk
                if out:
                    await response.write(out)  # client gone: raises; caller closes
            try:
                chunk = await upstream.readany()
            except UpstreamError as exc:
                # A connection cut mid-answer (kill -9 resets it) is evidence too.
                if isinstance(exc, Unreachable) and not watch.why:
                    self._report_unreachable(replica.node_id)
                return watch.why or f"failed: {exc}"
            if not chunk:
                return watch.why or None
            watch.progressed = True

    async def _resume(
        self,
        request: web.Request,
        body: bytes,
        model: str,
        headers: dict[str, str],
        sse: resume.SseText,
        tried: set[str],
        deadline: float,
    ) -> tuple[Replica, _Attempt] | None:
        """Ask another replica for the rest of the answer; None when none can give it."""
        try:
            original = json.loads(body)
        except ValueError:
            return None
        rest = resume.continuation(request.path, original, sse.text, sse.tokens)
        if rest is None:
            return None
        data = json.dumps(rest).encode()
        key = self._key(request, body)
        candidates = self._candidates(model, tried, key)[: max(1, self._config.max_attempts)]
        for i, replica in enumerate(candidates):
            # The last one left waits as long as the request may (a busy replica queues
            # the rest of the answer behind its other requests).
            has_next = i < len(candidates) - 1
            attempt = await self._attempt(
                request, replica, headers, data, has_next, deadline, path=request.path
            )
            if attempt.upstream is None:
                continue
            if attempt.upstream.status != 200:
                self._release(replica.node_id, attempt)
                continue
            sse.leftover()  # the broken event's first half is never sent
            return replica, attempt
        return None

    async def _end_broken(
        self,
        request: web.Request,
        response: web.StreamResponse,
        is_sse: bool,
        replica: Replica,
        reason: str,
    ) -> None:
        if is_sse:
            # As the serving peer does when its engine dies mid-stream: an error event,
            # then [DONE], so OpenAI clients raise instead of waiting.
            error = ForwardError(502, f"replica {replica.node_id} {reason}")
            body, head = error.body(), ""
            if request.path == resume.RESPONSES_PATH:
                # The Responses stream's own `error` event (type, code, message), keeping the
                # `error` object too: the openai SDK raises on it in either API.
                body = {
                    "type": "error",
                    "code": "server_error",
                    "message": error.message,
                    "param": None,
                    **body,
                }
                head = "event: error\n"
            payload = json.dumps(body, separators=(",", ":"))
            with contextlib.suppress(ConnectionError):
                await response.write(f"{head}data: {payload}\n\ndata: [DONE]\n\n".encode())
                await response.write_eof()
            return
        # A plain body cut short: drop the connection so the client sees the truncation
        # instead of a short body that looks complete.
        if request.transport is not None:
            request.transport.abort()
