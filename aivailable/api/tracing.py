"""Request spans over OTLP, with `--otlp-endpoint URL` only (opentelemetry-sdk, imported here
and only when `Tracing` is built: without the flag nothing is imported, started or paid).

Every peer a request crosses adds its spans to the one trace its traceparent names:
- a server span per inference request (the middleware), the parent of the others;
- entry peer: `admission` (the access gate) and `forward` (the hop to a replica; the
  traceparent sent on is this span's, peer/forward.py);
- host peer: `queue wait` (from the engine taking the request until a slot took it),
  `prefill` (until its first token) and `decode` (until it finished), with the engine's
  token counts.

The phases' times come from the engine's `Finished.timing` (the worker measures them per
sequence: a few ints, paid whether or not anyone traces). An engine that does not say gets
one `queue wait` or `prefill` span up to the first token, as seen from here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from aivailable.backends.base import Finished, TextDelta
from peer import trace
from peer.forward import REPLICA_HEADER, TRACEPARENT_KEY

TRACED_PREFIXES = ("/v1/", "/api/")  # inference and model reads; not peer traffic or polling


class Tracing:
    """One TracerProvider exporting to `endpoint` (OTLP/HTTP protobuf, `/v1/traces`)."""

    def __init__(self, endpoint: str, node: str, exporter: Any = None):
        """`exporter`: a SpanExporter in place of OTLP/HTTP (tests)."""
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/")
            exporter = OTLPSpanExporter(
                endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces"
            )
        resource = Resource.create({"service.name": "aivailable", "service.instance.id": node})
        self.provider = TracerProvider(resource=resource)
        # Batched: a span costs a request a list append, never an HTTP call.
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("aivailable")
        self.node = node
        self._propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()
        self._kind = SpanKind

    def shutdown(self) -> None:
        """Sends what is left and stops the exporter."""
        self.provider.shutdown()

    def current_traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get(trace.TRACEPARENT_HEADER)

    # ---- the three hooks -------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if not request.path.startswith(TRACED_PREFIXES):
            return await handler(request)
        sent = request.headers.get(trace.TRACEPARENT_HEADER)
        # A client's (or the previous hop's) trace is continued; without one, a new trace.
        parent = (
            self._propagator.extract({trace.TRACEPARENT_HEADER: sent})
            if trace.parse(sent) is not None
            else None
        )
        name = f"{request.method} {request.path}"
        with self.tracer.start_as_current_span(
            name, context=parent, kind=self._kind.SERVER, attributes={"aivailable.node": self.node}
        ) as span:
            request[TRACEPARENT_KEY] = self.current_traceparent() or request.get(TRACEPARENT_KEY)
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            return response

    def gate(self, gate: Any) -> TracedGate:
        return TracedGate(gate, self)

    def forwarder(self, forwarder: Any) -> TracedForwarder | None:
        return None if forwarder is None else TracedForwarder(forwarder, self)

    def lookup(self, lookup: Callable[[], Mapping[str, Any]]) -> Callable[[], Mapping[str, Any]]:
        """The instances, their engines' generations traced (only built with tracing on)."""

        def traced() -> Mapping[str, Any]:
            return {name: _TracedInstance(inst, self) for name, inst in lookup().items()}

        return traced


class TracedGate:
    """The access gate with its admission as a span."""

    def __init__(self, gate: Any, tracing: Tracing):
        self._gate = gate
        self._tracing = tracing

    def admit(self, request: web.Request, parsed) -> None:
        attributes = {"gen_ai.request.model": parsed.model, "aivailable.kind": parsed.kind}
        with self._tracing.tracer.start_as_current_span("admission", attributes=attributes):
            self._gate.admit(request, parsed)

    def charge(self, request: web.Request, parsed, usage) -> None:
        self._gate.charge(request, parsed, usage)

    def visible(self, request: web.Request, model: str) -> bool:
        return self._gate.visible(request, model)


class TracedForwarder:
    """The forwarder with each hop as a span whose context the replica continues."""

    def __init__(self, forwarder: Any, tracing: Tracing):
        self._forwarder = forwarder
        self._tracing = tracing

    def forwardable(self, request: web.Request) -> bool:
        return self._forwarder.forwardable(request)

    async def forward(
        self, request: web.Request, body: bytes, model: str, fallback: bool = False
    ) -> web.StreamResponse | None:
        tracer, kind = self._tracing.tracer, self._tracing._kind.CLIENT
        outer = request.get(TRACEPARENT_KEY)
        with tracer.start_as_current_span(
            "forward", kind=kind, attributes={"gen_ai.request.model": model}
        ) as span:
            request[TRACEPARENT_KEY] = self._tracing.current_traceparent() or outer
            try:
                response = await self._forwarder.forward(request, body, model, fallback)
            finally:
                request[TRACEPARENT_KEY] = outer
            if response is not None:
                span.set_attribute("aivailable.replica", response.headers.get(REPLICA_HEADER, ""))
            return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._forwarder, name)


class _TracedInstance(SimpleNamespace):
    def __init__(self, instance: Any, tracing: Tracing):
        engine = instance.engine
        super().__init__(
            state=instance.state,
            error=instance.error,
            engine=None if engine is None else _TracedEngine(engine, tracing),
        )


class _TracedEngine:
    """An engine whose generations leave queue-wait/prefill and decode spans."""

    def __init__(self, engine: Any, tracing: Tracing):
        self._engine = engine
        self._tracing = tracing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request):
        queued = self._engine.free_slots == 0  # no slot free: it waits for one first
        depth = self._engine.queue_depth
        started = time.time_ns()
        first = None
        # A generation cut short (the client left) leaves no engine spans; its server span stays.
        async with contextlib.aclosing(self._engine.generate(request)) as events:
            async for event in events:
                if first is None and isinstance(event, TextDelta):
                    first = time.time_ns()
                if isinstance(event, Finished):
                    self._spans(event, started, first, queued, depth)
                yield event

    def _spans(self, done: Finished, started: int, first: int | None, queued: bool, depth: int):
        """The host's phases, as spans with explicit times (children of the current span)."""
        tracer = self._tracing.tracer
        end = time.time_ns()
        prompt = {
            "gen_ai.usage.input_tokens": done.prompt_tokens,
            "aivailable.cached_tokens": done.cached_tokens,
        }
        phases = []  # (name, start, end, attributes)
        if done.timing is not None:
            t = done.timing
            # Clamped into what this peer saw: the worker's durations are dated by arrival.
            slot = min(max(started, t.slot_ns), end)
            token = min(max(slot, t.first_ns), end)
            end = min(max(token, t.end_ns), end)  # the engine's end, not this reader's
            phases += [
                ("queue wait", started, slot, {"aivailable.queue_depth": depth}),
                ("prefill", slot, token, prompt),
            ]
        else:
            token = first or end
            name = "queue wait" if queued else "prefill"
            phases.append((name, started, token, {**prompt, "aivailable.queue_depth": depth}))
        phases.append(
            ("decode", token, end, {"gen_ai.usage.output_tokens": done.completion_tokens})
        )
        for name, start, stop, attributes in phases:
            tracer.start_span(name, start_time=start, attributes=attributes).end(end_time=stop)
