"""Forwarding: any peer answers /v1/* for a model it does not serve by proxying to a replica.

Two halves, as everywhere in this project:
- pure replica choice (`order_replicas`, `summarize_availability`): which ready replica
  to try first, and what to tell the client when there is none;
- the thin asyncio adapter (`Forwarder`): sends the same request to that replica over the
  peer's shared `aiohttp.ClientSession` (which signs it, see peer/auth.py), streams the
  answer back chunk by chunk, retries once elsewhere when nothing has been sent yet, and
  closes the upstream request when the client goes away.

A forwarded request carries `X-Aivailable-Forwarded: <origin node>`; the receiving peer
serves it locally or answers 503/404, never forwards it again, so there are no loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from aivailable.api.errors import ApiError
from peer.auth import FORWARDED_HEADER

log = logging.getLogger(__name__)

# FORWARDED_HEADER (peer/auth.py) is set on the upstream request to the origin node's id;
# its presence means "serve locally only", and peers accept it only when signed.
# Set on the response to the client: which node served the request.
REPLICA_HEADER = "X-Aivailable-Replica"

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
    )
)
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


# ---------------------------------------------------------------- pure replica choice


@dataclass(frozen=True)
class Replica:
    """One instance of a model somewhere in the cluster, as the gossip view shows it."""

    node_id: str
    addr: str  # "host:port" of that peer's HTTP API
    local: bool  # hosted by this very peer
    state: str  # instance state: pending, loading, ready, failed, stopping
    queue_depth: int = 0  # requests waiting or running there, as last gossiped


def order_replicas(
    replicas: Iterable[Replica], inflight: Mapping[str, int] | None = None
) -> list[Replica]:
    """The ready replicas, best first: this node's own, then the least loaded, then by node id.

    `inflight` adds the requests this peer has sent to each node since gossip last
    reported its queue depth, so a burst between two gossip rounds still spreads out
    instead of piling on the replica that happened to look idle.
    """
    inflight = inflight or {}
    ready = [r for r in replicas if r.state == "ready"]
    return sorted(
        ready, key=lambda r: (not r.local, r.queue_depth + inflight.get(r.node_id, 0), r.node_id)
    )


# What the client should wait before asking again, by model state, in seconds: a model
# loads in seconds; a pending one first has to fetch its file; an unplaced one waits for
# the controller to find room (a node joining, another model removed).
_RETRY_AFTER_S = {
    "loading": 2.0,
    "pending": 5.0,
    "stopping": 2.0,
    "failed": 10.0,
    "unplaced": 30.0,
    "unreachable": 2.0,
    "unknown": 2.0,
}
# When replicas are in different states, the most hopeful one names the model's state.
_HOPE = ("ready", "loading", "pending", "stopping", "failed")


@dataclass(frozen=True)
class ModelAvailability:
    """Why a model has no ready replica, for the 503 the client gets.

    state: "loading" | "pending" | "stopping" | "failed" (its replicas' best state),
    "unplaced" (the controller found no room; `reason` says why), "unreachable" (ready
    replicas exist but none answered), "unknown" (this peer has no cluster view yet),
    or "absent" (no such model is deployed: 404, not 503).
    """

    state: str
    reason: str = ""
    retry_after: float | None = None  # seconds; None: the state's default above

    def error(self, model: str) -> ApiError:
        if self.state == "absent":
            return ApiError(
                404,
                f"the model '{model}' does not exist"
                + (f" (deployed: {self.reason})" if self.reason else ""),
                param="model",
                code="model_not_found",
            )
        if self.state == "unplaced":
            message = f"the model '{model}' is not placed on any node"
        elif self.state == "unreachable":
            message = f"no replica of the model '{model}' answered"
        else:
            message = f"no ready replica of the model '{model}': it is {self.state}"
        if self.reason:
            message += f": {self.reason}"
        retry = self.retry_after if self.retry_after is not None else _RETRY_AFTER_S.get(self.state)
        return NoReadyReplica(model, self.state, self.reason, message, retry or 2.0)


class NoReadyReplica(ApiError):
    """503 whose error body also names the model's state and the reason, as data."""

    def __init__(self, model: str, state: str, reason: str, message: str, retry_after: float):
        super().__init__(
            503,
            message,
            type="service_unavailable",
            param="model",
            code=f"model_{state}",
            retry_after=retry_after,
        )
        self.model = model
        self.state = state
        self.reason = reason

    def body(self) -> dict:
        body = super().body()
        body["error"].update(model=self.model, state=self.state, reason=self.reason or None)
        return body


def summarize_availability(
    deployed: bool, placement_states: Iterable[str], unplaced_reason: str = ""
) -> ModelAvailability:
    """The model's availability from the committed plan and the instance states in gossip.

    For the peer process to build `availability_of` from its cluster view.
    """
    if not deployed:
        return ModelAvailability("absent")
    states = set(placement_states)
    if not states:
        if unplaced_reason:
            return ModelAvailability("unplaced", unplaced_reason)
        return ModelAvailability("pending", "waiting for the controller to place it")
    best = min(states, key=lambda s: _HOPE.index(s) if s in _HOPE else len(_HOPE))
    if best == "ready":  # ready somewhere, yet not in replicas_of: gossip is behind
        return ModelAvailability("unreachable", "its ready replicas did not answer")
    return ModelAvailability(best, unplaced_reason)


# ---------------------------------------------------------------- the asyncio adapter


class _Watchdog:
    """Closes a streaming upstream response that stalls or passes its deadline.

    One timer per stream that re-arms itself, rather than a timeout around every chunk
    read: an `asyncio.timeout` costs a timer each time, several microseconds per token.
    Closing the response makes the pending read raise, and `fired` says why.
    """

    def __init__(self, upstream: aiohttp.ClientResponse, stall_s: float, deadline: float):
        self._upstream = upstream
        self._stall_s = stall_s
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self.fired = False
        self._handle = self._loop.call_at(min(self._last + stall_s, deadline), self._check)

    def progress(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        due = min(self._last + self._stall_s, self._deadline)
        if now >= due:
            self.fired = True
            self._upstream.close()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class _RelayResponse(web.StreamResponse):
    """Sends its headers together with the first chunk: one segment and one wake-up
    for the client instead of two, which is most of a hop's cost on a busy machine."""

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
    # Seconds of silence tolerated once the answer is streaming. A token takes well under
    # a second even on old GPUs; 60 s rides out a replica stopped (SIGSTOP) for a while
    # without leaving a client hanging behind a dead one until request_timeout_s.
    stall_timeout_s: float = 60.0
    # Replicas tried per request: the best, then one more (the "retry once").
    # More would multiply load during an overload for little gain.
    max_attempts: int = 2
    # Upstream statuses that mean "try another replica" when nothing has reached the
    # client yet: 503 (that instance is loading, failed or stopping), 429 (its queue is
    # full, which is exactly when another replica should take the request) and 404 (the
    # model has just left that node; gossip had not said so yet).
    retry_statuses: tuple[int, ...] = (404, 429, 503)


ReplicasOf = Callable[[str], list[Replica]]
AvailabilityOf = Callable[[str], ModelAvailability]


class Forwarder:
    """Proxies OpenAI requests to remote replicas. `forward` is called by OpenAIApi."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        replicas_of: ReplicasOf,
        availability_of: AvailabilityOf,
        node_id: str,
        config: ForwardConfig | None = None,
    ):
        self._session = session
        self._replicas_of = replicas_of
        self._availability_of = availability_of
        self._node_id = node_id
        self._config = config or ForwardConfig()
        self._inflight: dict[str, int] = {}  # node id -> requests this peer has there now
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._config.connect_timeout_s, sock_read=None
        )

    @staticmethod
    def forwardable(request: web.Request) -> bool:
        """False for a request another peer already forwarded here: serve it or refuse."""
        return FORWARDED_HEADER not in request.headers

    def inflight(self) -> dict[str, int]:
        return {node: n for node, n in self._inflight.items() if n}

    async def forward(self, request: web.Request, body: bytes, model: str) -> web.StreamResponse:
        """Send the request to the best remote replica and stream its answer back."""
        candidates = [
            r for r in order_replicas(self._replicas_of(model), self._inflight) if not r.local
        ]
        if not candidates:
            raise self._availability_of(model).error(model)
        headers = self._upstream_headers(request)
        tries = candidates[: max(1, self._config.max_attempts)]
        deadline = asyncio.get_running_loop().time() + self._config.request_timeout_s
        failures: list[str] = []
        for i, replica in enumerate(tries):
            is_last = i == len(tries) - 1
            response = await self._attempt(
                request, replica, headers, body, is_last, deadline, failures
            )
            if response is not None:
                return response
        log.warning("no replica of %s answered: %s", model, "; ".join(failures))
        if self._availability_of(model).state == "absent":  # undeployed meanwhile
            raise self._availability_of(model).error(model)
        raise ModelAvailability("unreachable", "; ".join(failures)).error(model)

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _NOT_PASSED_UPSTREAM
            and not k.lower().startswith(_PEER_HEADER_PREFIX)
        }
        headers[FORWARDED_HEADER] = self._node_id
        return headers

    async def _attempt(
        self,
        request: web.Request,
        replica: Replica,
        headers: dict[str, str],
        body: bytes,
        is_last: bool,
        deadline: float,
        failures: list[str],
    ) -> web.StreamResponse | None:
        """One replica. Returns None to move on to the next (nothing reached the client)."""
        url = URL(f"http://{replica.addr}{request.raw_path}", encoded=True)
        self._inflight[replica.node_id] = self._inflight.get(replica.node_id, 0) + 1
        upstream: aiohttp.ClientResponse | None = None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    upstream = await self._session.request(
                        request.method,
                        url,
                        data=body,
                        headers=headers,
                        timeout=self._timeout,
                        auto_decompress=False,
                        allow_redirects=False,
                    )
                    if upstream.status == 401:
                        # That peer refused our signature: its cluster key differs. The
                        # client did nothing wrong, so this is that replica failing.
                        failures.append(f"{replica.node_id} refused this peer's signature")
                        return None
                    # A 404 is that replica's instance gone (stopped, or the peer restarted
                    # without it), not the model: never tell the client it does not exist.
                    if upstream.status in self._config.retry_statuses and (
                        not is_last or upstream.status == 404
                    ):
                        failures.append(f"{replica.node_id} answered {upstream.status}")
                        return None
                    # Read the first chunk before answering the client: until then a
                    # broken replica can still be swapped for another one.
                    first = await upstream.content.readany()
            except aiohttp.ClientError as exc:  # refused, reset, timed out connecting
                failures.append(f"{replica.node_id} at {replica.addr}: {exc!r}")
                return None
            except TimeoutError as exc:
                raise ApiError(
                    504,
                    f"the replica {replica.node_id} did not answer within "
                    f"{self._config.request_timeout_s:.0f}s",
                    type="timeout",
                ) from exc
            return await self._relay(request, replica, upstream, first, deadline)
        finally:
            # Runs on success, on retry, on timeout and on the client's disconnect (the
            # handler is cancelled): closing the upstream connection makes the replica
            # cancel its handler too, which frees the model's slot there.
            if upstream is not None:
                upstream.close()
            self._inflight[replica.node_id] -= 1

    async def _relay(
        self,
        request: web.Request,
        replica: Replica,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        deadline: float,
    ) -> web.StreamResponse:
        response = _RelayResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in _NOT_PASSED_DOWNSTREAM:
                response.headers.add(key, value)
        response.headers[REPLICA_HEADER] = replica.node_id
        is_sse = upstream.content_type == "text/event-stream"
        await response.prepare(request)
        if first:
            await response.write(first)
        tail = first[-2:]
        watchdog = _Watchdog(upstream, self._config.stall_timeout_s, deadline)
        try:
            while True:
                try:
                    chunk = await upstream.content.readany()
                except aiohttp.ClientError as exc:
                    # The replica died, stalled or ran out of time mid-answer: nothing to
                    # retry, since the client already has part of it. End it so it knows.
                    reason = "timed out" if watchdog.fired else f"failed: {exc!r}"
                    log.warning("replica %s %s mid-stream", replica.node_id, reason)
                    await self._end_broken(request, response, is_sse, tail, replica, reason)
                    return response
                if not chunk:
                    break
                watchdog.progress()
                await response.write(chunk)  # client gone: raises; finally closes upstream
                tail = (tail + chunk)[-2:]
        finally:
            watchdog.cancel()
        await response.write_eof()
        return response

    async def _end_broken(
        self,
        request: web.Request,
        response: web.StreamResponse,
        is_sse: bool,
        tail: bytes,
        replica: Replica,
        reason: str,
    ) -> None:
        if is_sse:
            # As the serving peer does when its engine dies mid-stream: an error event,
            # then [DONE], so OpenAI clients raise instead of waiting.
            error = ApiError(502, f"replica {replica.node_id} {reason}", type="server_error")
            sep = b"" if tail == b"\n\n" else b"\n\n"
            payload = json.dumps(error.body(), separators=(",", ":"))
            with contextlib.suppress(ConnectionError):
                await response.write(sep + f"data: {payload}\n\ndata: [DONE]\n\n".encode())
                await response.write_eof()
            return
        # A plain body cut short: drop the connection so the client sees the truncation
        # instead of a short body that looks complete.
        if request.transport is not None:
            request.transport.abort()
