"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Handlers validate (validate.py), find an engine for the model (a `ModelLookup`),
and render the engine's events as OpenAI JSON or Server-Sent Events. Engine errors
become HTTP errors here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from aiohttp import web

from aivailable.api import body as body_reader
from aivailable.api import openai_render as render
from aivailable.api.errors import ApiError, bad_request, not_found
from aivailable.api.inference import Gate, Metered, OpenGate, visible_models
from aivailable.api.reads import Barrier, marked, read_mode
from aivailable.api.validate import Parsed, parse_chat, parse_completion, parse_embeddings
from aivailable.backends.base import (
    ChatRequest,
    ContextOverflow,
    Engine,
    EngineError,
    EngineUnavailable,
    Finished,
    InvalidRequest,
    QueueFull,
    TextDelta,
)
from aivailable.metrics import Metrics
from peer.availability import NoReadyReplica
from peer.errors import ServiceError

log = logging.getLogger(__name__)

# Bytes of a /v1 request body: a 128k-token context is about 0.5 MB of text, and JSON
# escaping may make that a few MB; an 8 MiB body is never a prompt a model could take.
MAX_BODY = 4 << 20


class Servable(Protocol):
    """What the API needs of a model instance (aivailable.cluster.instances.Instance is one)."""

    state: str
    engine: Engine | None
    error: str


# Returns the instances this peer can serve, by model name; the peer process supplies
# it so the API never owns the set of loaded models.
ModelLookup = Callable[[], Mapping[str, Servable]]


class Forwarding(Protocol):
    """Sends a request for a model this peer cannot serve to a peer that can
    (peer.forward.Forwarder is one)."""

    def forwardable(self, request: web.Request) -> bool: ...

    async def forward(
        self, request: web.Request, body: bytes, model: str
    ) -> web.StreamResponse: ...

    def serves_here(self, request: web.Request, body: bytes, model: str, engine: Engine) -> bool:
        """Whether this peer's own ready engine is the best replica for the request."""
        ...


def engine_error(exc: EngineError, model: str = "", tools: int = 0) -> ServiceError:
    """The one place engine errors turn into HTTP statuses. An instance that is not ready
    answers as a peer without a ready replica does: its body names the model's state.
    `tools`: how many tools the request sent, named in an overflow (Open WebUI's page sends
    36 built-in ones with every chat, ~6,000 tokens, and "Say hello" would not fit)."""
    if isinstance(exc, QueueFull):
        return ApiError(
            429,
            f"the model's queue is full; retry after {exc.retry_after:.0f}s",
            type="rate_limit_error",
            code="queue_full",
            retry_after=exc.retry_after,
        )
    if isinstance(exc, EngineUnavailable):
        return NoReadyReplica(model, exc.state, exc.detail, str(exc), exc.retry_after)
    if isinstance(exc, ContextOverflow):
        hint = (
            f"; the definitions of the {tools} tools sent with it are part of the prompt: send"
            " fewer tools, or deploy the model with a larger n_ctx"
            if tools
            else ""
        )
        return ApiError(400, str(exc) + hint, param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), param="messages")
    return ApiError(500, f"engine error: {exc}", type="server_error")


# One encoder for every event: json.dumps with separators builds a new one per call, and a
# stream encodes one event per token.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def _sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else _compact(data)
    return f"data: {payload}\n\n".encode()


class TextEvents:
    """The SSE event of one text delta without logprobs. Chunks of a stream differ only in
    their text, so each choice's chunk is encoded once around a mark and each token's text
    is spliced in: byte for byte what encoding the whole chunk gives, at a fraction of the
    cost (a stream sends one per token). `chunk` is the stream's chunk builder."""

    _MARK = "\x00\x01"

    def __init__(self, chunk: Callable[..., dict]):
        self._chunk = chunk
        self._parts: dict[int, tuple[str, ...]] = {}

    def __call__(self, index: int, text: str) -> bytes:
        parts = self._parts.get(index)
        if parts is None:
            whole = _compact(self._chunk(index, {"content": self._MARK}, self._MARK, None))
            mark = _compact(self._MARK)
            # () when the mark is not there once (a model name holding it): encode whole.
            parts = tuple(whole.split(mark)) if whole.count(mark) == 1 else ()
            self._parts[index] = parts
        if not parts:
            return _sse(self._chunk(index, {"content": text}, text, None))
        return f"data: {parts[0]}{_compact(text)}{parts[1]}\n\n".encode()


class OpenAIApi:
    def __init__(
        self,
        lookup: ModelLookup,
        metrics: Metrics,
        max_tokens_limit: int,
        request_timeout_s: float,
        owner: str = "aivailable",
        forwarder: Forwarding | None = None,
        catalog: Callable[[], Iterable[str]] | None = None,
        max_body: int = MAX_BODY,
        read_barrier: Barrier | None = None,
        gate: Gate | None = None,
        wait_for_replica: Callable[[str], Awaitable[bool]] | None = None,
    ):
        """`catalog`: the model names the cluster serves (default: the local instances).
        `max_body`: bytes of a request body at most (413 beyond). `read_barrier`: what a
        `?consistent=1` model listing awaits first (aivailable/api/reads.py; None: refused).
        `gate`: who may run and see what (aivailable/api/inference.py; None: everyone).
        `wait_for_replica(model)`: hold a request while the model has no ready replica
        (scaled to zero, or loading), True once one is ready (cluster/on_demand.py)."""
        self._wait_for_replica = wait_for_replica
        self.read_barrier = read_barrier
        self.gate: Gate = gate or OpenGate()
        self._max_body = max_body
        self._lookup = lookup
        self._metrics = metrics
        self.max_tokens_limit = max_tokens_limit
        self._timeout = request_timeout_s
        self._owner = owner
        self._forwarder = forwarder
        self._catalog = catalog or (lambda: self._lookup().keys())

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
        ]

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": self._owner}

    async def list_models(self, request: web.Request) -> web.Response:
        mode = await read_mode(request, self.read_barrier)
        names = self.model_names(request)
        listing = {"object": "list", "data": [self._model_card(n) for n in names]}
        return marked(web.json_response(listing), mode)

    async def get_model(self, request: web.Request) -> web.Response:
        mode = await read_mode(request, self.read_barrier)
        name = request.match_info["model"]
        if name not in self.model_names(request):
            raise not_found(f"the model '{name}' does not exist", param="model")
        return marked(web.json_response(self._model_card(name)), mode)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat", parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions", parse_completion)

    async def read_body(self, request: web.Request) -> bytes:
        """The body, refused with 413 before it is read when it is over the limit: a
        prompt beyond any context must not cost the peer its memory or the model a slot."""
        return await body_reader.read_body(request, self._max_body)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw = await self.read_body(request)
        parsed = parse_embeddings(body_reader.parse_json(raw))
        model, asked = parsed.model, parsed.request
        async with Metered(self.gate, request, parsed) as meter:
            engine = await self.engine_or_forward(request, raw, model)
            if isinstance(engine, web.StreamResponse):
                return engine
            result = await self.embed(engine, model, asked.inputs, meter)
            width = len(result.vectors[0]) if result.vectors else 0
            if asked.dimensions is not None and asked.dimensions != width:
                raise bad_request(
                    f"the model '{model}' gives {width} dimensions, not {asked.dimensions}",
                    "dimensions",
                )
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": render.embedding(v, asked.encoding),
                }
                for i, v in enumerate(result.vectors)
            ]
            usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
            answer = {"object": "list", "data": data, "model": model, "usage": usage}
            return meter.json_response(answer)

    async def embed(self, engine: Engine, model: str, inputs, meter: Metered):
        """An engine's embeddings, its errors as HTTP errors, counted in the metrics and
        charged to the caller."""
        status = "200"
        try:
            async with asyncio.timeout(self._timeout):
                result = await engine.embed(inputs)
        except EngineError as exc:
            status = str(engine_error(exc, model).status)
            raise engine_error(exc, model) from exc
        except TimeoutError as exc:
            status = "504"
            raise ApiError(504, "embedding took too long", type="timeout") from exc
        finally:
            self._metrics.requests.labels("embeddings", model, status).inc()
        self._metrics.tokens.labels(model, "prompt").inc(result.prompt_tokens)
        meter.used(result.prompt_tokens)
        return result

    async def engine_or_forward(
        self, request: web.Request, raw: bytes, model: str
    ) -> Engine | web.StreamResponse:
        """The local engine serving `model`, or the answer of a peer that serves it."""
        instances = self._lookup()
        instance = instances.get(model)
        ready_here = instance is not None and instance.state == "ready"
        if not ready_here and self._wait_for_replica is not None:
            # Load on demand: wait for a replica (here or elsewhere) instead of a 503; a
            # stream's first byte goes out once the model answers.
            await self._wait_for_replica(model)
            instances = self._lookup()
            instance = instances.get(model)
        # --- forwarding hook (peer/forward.py): no ready instance here, so another peer's
        # replica serves it; a request already forwarded to us is never forwarded again.
        if (
            self._forwarder is not None
            and not self._serves_here(request, raw, model, instance)
            and self._forwarder.forwardable(request)
        ):
            # A ready replica here that would take the request is the fallback when the
            # remotes refuse (a full prefix home under the load bound): never a 429 while
            # a slot is free here.
            engine = instance.engine if instance is not None else None
            here = instance is not None and instance.state == "ready" and engine is not None
            if not (here and not instance.error and engine.admits()):
                return await self._forwarder.forward(request, raw, model)
            response = await self._forwarder.forward(request, raw, model, fallback=True)
            if response is not None:
                return response
        # --- end of forwarding hook
        if instance is None:
            available = ", ".join(sorted(instances)) or "none"
            raise not_found(
                f"the model '{model}' does not exist (available: {available})", param="model"
            )
        engine = instance.engine
        if engine is None or instance.error:
            raise engine_error(EngineUnavailable(instance.state, instance.error), model)
        return engine

    def _serves_here(self, request: web.Request, raw: bytes, model: str, instance) -> bool:
        """A ready instance here serves the request unless the forwarder knows a better
        replica: the one holding its prefix, or one with a free slot while this one is
        full (issue 22: no refusal while a slot is free anywhere)."""
        if instance is None or instance.state != "ready" or instance.engine is None:
            return False
        if not self._forwarder.forwardable(request):
            return True  # forwarded here: serve or refuse, never forward again
        return self._forwarder.serves_here(request, raw, model, instance.engine)

    def model_names(self, request: web.Request) -> list[str]:
        """Every model the cluster serves that this caller may see."""
        return visible_models(self.gate, request, self._catalog())

    def local_engine(self, model: str) -> Engine | None:
        """This peer's engine of `model`, if it runs one."""
        instance = self._lookup().get(model)
        return instance.engine if instance is not None else None

    def local_models(self) -> list[str]:
        """The models this peer runs itself, ready or not."""
        return sorted(self._lookup())

    async def _serve(self, request: web.Request, endpoint: str, parse) -> web.StreamResponse:
        raw = await self.read_body(request)
        body = body_reader.parse_json(raw)  # deep or odd JSON: a 400, never a 500
        parsed: Parsed = parse(body, self.max_tokens_limit)
        async with Metered(self.gate, request, parsed) as meter:
            engine = await self.engine_or_forward(request, raw, parsed.model)
            if isinstance(engine, web.StreamResponse):
                return engine
            return await self._local(request, engine, meter, endpoint)

    async def _local(
        self, request: web.Request, engine: Engine, meter: Metered, endpoint: str
    ) -> web.StreamResponse:
        parsed = meter.parsed
        started = time.monotonic()
        status = "200"
        try:
            if parsed.stream:
                return await self._stream(request, engine, meter, started)
            return await self._complete(engine, meter, started)
        except ApiError as exc:
            status = str(exc.status)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = "499"  # the client went away
            self._metrics.client_disconnects.labels(parsed.model).inc()
            raise
        finally:
            self._metrics.requests.labels(endpoint, parsed.model, status).inc()
            self._metrics.latency.labels(endpoint, parsed.model).observe(time.monotonic() - started)

    def count(self, meter: Metered, finished: Finished) -> None:
        """The engine's counts of a finished generation: in the metrics, and charged."""
        model = meter.parsed.model
        self._metrics.tokens.labels(model, "prompt").inc(finished.prompt_tokens)
        self._metrics.tokens.labels(model, "completion").inc(finished.completion_tokens)
        self._count_cache(model, finished)
        meter.used(finished.prompt_tokens, finished.completion_tokens)

    def _count_cache(self, model: str, finished: Finished) -> None:
        hit = finished.cached_tokens > 0
        self._metrics.prefix_cache.labels(model, "yes" if hit else "no").inc()
        self._metrics.cached_tokens.labels(model).inc(finished.cached_tokens)
        if finished.restored_tokens:
            self._metrics.prompt_cache_restores.labels(model).inc()
            self._metrics.restored_tokens.labels(model).inc(finished.restored_tokens)
        log.debug(
            "prefix cache: %s reused %d of %d prompt tokens (%d restored from RAM)",
            model,
            finished.cached_tokens,
            finished.prompt_tokens,
            finished.restored_tokens,
        )

    async def generate_whole(
        self, engine: Engine, meter: Metered, started: float
    ) -> tuple[list[list[str]], list[list[dict]], Finished]:
        """A whole generation of `meter.parsed`: the text and logprobs of each choice and the
        engine's Finished, counted and charged; its errors as HTTP errors. Every API's
        non-streamed answer is rendered from this (OpenAI's, the Responses API's)."""
        parsed = meter.parsed
        n = parsed.request.params.n
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[dict]] = [[] for _ in range(n)]
        finished: Finished | None = None
        try:
            async with asyncio.timeout(self._timeout):
                async with contextlib.aclosing(engine.generate(parsed.request)) as events:
                    async for event in events:
                        if isinstance(event, TextDelta):
                            if not any(texts):
                                self._metrics.ttft.labels(parsed.model).observe(
                                    time.monotonic() - started
                                )
                            texts[event.index].append(event.text)
                            logprobs[event.index].extend(event.logprobs)
                        elif isinstance(event, Finished):
                            finished = event
        except EngineError as exc:
            raise engine_error(exc, parsed.model, len(parsed.functions)) from exc
        except TimeoutError as exc:
            raise ApiError(
                504, f"generation took longer than {self._timeout:.0f}s", type="timeout"
            ) from exc
        if finished is None:
            raise ApiError(500, "the engine ended without finishing", type="server_error")
        self.count(meter, finished)
        return texts, logprobs, finished

    async def _complete(self, engine: Engine, meter: Metered, started: float) -> web.Response:
        parsed = meter.parsed
        n = parsed.request.params.n
        texts, logprobs, finished = await self.generate_whole(engine, meter, started)
        is_chat = isinstance(parsed.request, ChatRequest)
        reasons = finished.finish_reasons or (finished.finish_reason,)
        choices = []
        for i in range(n):
            text, reason = "".join(texts[i]), reasons[min(i, len(reasons) - 1)]
            if is_chat:
                message, reason = render.chat_message(text, reason, parsed)
                lp = render.chat_logprobs(logprobs[i], parsed.request.params)
                choice = {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}
            else:
                lp = render.completion_logprobs(logprobs[i], parsed.request.params)
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
            choices.append(choice)
        return meter.json_response(
            {
                "id": ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if is_chat else "text_completion",
                "created": int(time.time()),
                "model": parsed.model,
                "choices": choices,
                "usage": render.usage(finished),
            }
        )

    async def _stream(
        self, request: web.Request, engine: Engine, meter: Metered, started: float
    ) -> web.StreamResponse:
        parsed = meter.parsed
        is_chat = isinstance(parsed.request, ChatRequest)
        params = parsed.request.params
        base = {
            "id": ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion.chunk" if is_chat else "text_completion",
            "created": int(time.time()),
            "model": parsed.model,
        }
        # With tools, a choice's text may turn out to be a call: it is sent whole at the end.
        held: list[list[str]] | None = [[] for _ in range(params.n)] if parsed.functions else None

        def chunk(index: int, delta: dict | None, text: str | None, finish, lps=()) -> dict:
            if is_chat:
                lp = render.chat_logprobs(list(lps), params)
                choice = {"index": index, "delta": delta or {}, "logprobs": lp}
            else:
                lp = render.completion_logprobs(list(lps), params)
                choice = {"index": index, "text": text or "", "logprobs": lp}
            return {**base, "choices": [{**choice, "finish_reason": finish}]}

        text_event = None if params.logprobs else TextEvents(chunk)
        events = engine.generate(parsed.request)
        response: web.StreamResponse | None = None
        try:
            async with asyncio.timeout(self._timeout), contextlib.aclosing(events):
                # Wait for the first event before sending headers, so a full queue or a
                # failed engine still gets a proper status code rather than a broken stream.
                first = await anext(events)
                response = meter.sse_response()
                await response.prepare(request)
                if is_chat:
                    for i in range(params.n):
                        role = {"role": "assistant", "content": ""}
                        await response.write(_sse(chunk(i, role, None, None)))
                seen_text = False
                event = first
                while True:
                    if isinstance(event, TextDelta):
                        if not seen_text:
                            seen_text = True
                            self._metrics.ttft.labels(parsed.model).observe(
                                time.monotonic() - started
                            )
                        if held is not None:
                            held[event.index].append(event.text)
                        elif text_event is not None:
                            await response.write(text_event(event.index, event.text))
                        else:
                            delta = {"content": event.text}
                            out = chunk(event.index, delta, event.text, None, event.logprobs)
                            await response.write(_sse(out))
                    else:
                        self.count(meter, event)
                        reasons = event.finish_reasons or (event.finish_reason,)
                        for i in range(params.n):
                            reason = reasons[min(i, len(reasons) - 1)]
                            delta = None
                            if held is not None:
                                message, reason = render.chat_message(
                                    "".join(held[i]), reason, parsed
                                )
                                delta = render.stream_delta(message)
                            await response.write(_sse(chunk(i, delta, None, reason)))
                        if parsed.include_usage:
                            usage = render.usage(event)
                            await response.write(_sse({**base, "choices": [], "usage": usage}))
                        break
                    event = await anext(events)
        except EngineError as exc:
            error = engine_error(exc, parsed.model, len(parsed.functions))
            if response is None:
                raise error from exc
            await response.write(_sse(error.body()))
        except TimeoutError as exc:
            error = ApiError(
                504, f"generation took longer than {self._timeout:.0f}s", type="timeout"
            )
            if response is None:
                raise error from exc
            await response.write(_sse(error.body()))
        except StopAsyncIteration as exc:
            error = ApiError(500, "the engine ended without finishing", type="server_error")
            if response is None:
                raise error from exc
            await response.write(_sse(error.body()))
        await response.write(b"data: [DONE]\n\n" + meter.trailer())
        await response.write_eof()
        return response
