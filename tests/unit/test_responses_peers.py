"""The Responses API across peers, in one process: a routing-only entry peer forwarding to
host peers (the real forwarder), driven by the official openai client; the usage ledger
booked on the entry peer; and one trace, with spans from both peers, at an OTLP/HTTP
collector on loopback. The engines are FakeEngines."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from types import SimpleNamespace

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.access.ledger import LedgerGate, UsageBook
from aivailable.api.app import build_app
from aivailable.api.inference import OpenGate
from aivailable.api.openai_api import OpenAIApi
from aivailable.api.responses_api import ResponsesApi
from aivailable.api.responses_store import PeerResponses
from aivailable.api.tracing import Tracing
from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster.state import ClusterState
from aivailable.metrics import Metrics
from peer.availability import ModelAvailability, Replica
from peer.forward import ForwardConfig, Forwarder
from peer.upstream import UpstreamPool
from tests.unit.responses_tools import WEATHER_TOOL, replies


def otlp_spans(body: bytes) -> list[SimpleNamespace]:
    """The spans of one OTLP/HTTP export request, flat, each with its peer (`node`)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    message = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in message.resource_spans:
        attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            spans += [
                SimpleNamespace(
                    node=attrs.get("service.instance.id"),
                    name=span.name,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent=span.parent_span_id.hex(),
                    start=span.start_time_unix_nano,
                    end=span.end_time_unix_nano,
                    attributes={a.key: a.value for a in span.attributes},
                )
                for span in scope.spans
            ]
    return spans


class Collector:
    """An OTLP/HTTP trace collector on loopback: keeps every span it receives."""

    def __init__(self):
        self.spans: list[SimpleNamespace] = []

    async def receive(self, request: web.Request) -> web.Response:
        self.spans += otlp_spans(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")


class Peers:
    def __init__(self):
        self.servers: list[TestServer] = []
        self.addresses: dict[str, str] = {}
        self.tracings: list[Tracing] = []
        self.model = "fake"
        self.timeout_s = 5.0  # a generation's limit (a real engine on a busy machine: more)

    async def serve(self, name: str, app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        self.addresses[name] = f"127.0.0.1:{server.port}"
        return f"http://127.0.0.1:{server.port}"

    async def peer(self, name: str, engine=None, forward_to: str | None = None, book=None):
        tracing = Tracing(self.collector_url, name)
        self.tracings.append(tracing)
        metrics = Metrics()
        instances = {}
        if engine is not None:
            instances = {self.model: SimpleNamespace(engine=engine, error="", state="ready")}
        forwarder = None
        if forward_to is not None:
            replica = Replica(forward_to, self.addresses[forward_to], False, "ready")
            forwarder = Forwarder(
                self.upstream,
                lambda model: [replica],
                lambda model: ModelAvailability("unknown"),
                name,
                ForwardConfig(request_timeout_s=2 * self.timeout_s),
            )
        gate = LedgerGate(OpenGate(), book) if book is not None else OpenGate()
        api = OpenAIApi(
            tracing.lookup(lambda: instances),
            metrics,
            64,
            self.timeout_s,
            forwarder=tracing.forwarder(forwarder),
            catalog=lambda: [self.model],
            gate=tracing.gate(gate),
        )
        peers = PeerResponses(self.session, lambda: self.addresses)
        responses = ResponsesApi(api, metrics, self.timeout_s, name, peers=peers)
        app = build_app(
            metrics,
            lambda: True,
            [api.routes(), responses.routes()],
            middlewares=[tracing.middleware],
        )
        return await self.serve(name, app)


@pytest.fixture
async def cluster():
    peers = Peers()
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.receive)
    peers.collector_url = await peers.serve("collector", app)
    peers.collector = collector
    peers.session = aiohttp.ClientSession()
    peers.upstream = UpstreamPool()
    peers.engines = [FakeEngine("fake", reply=replies), FakeEngine("fake", reply=replies)]
    for engine in peers.engines:
        await engine.start()
    peers.book = UsageBook()
    peers.host = await peers.peer("host", peers.engines[0])
    peers.host2 = await peers.peer("host2", peers.engines[1])
    peers.entry = await peers.peer("entry", forward_to="host", book=peers.book)
    yield peers
    for tracing in peers.tracings:
        await asyncio.to_thread(tracing.shutdown)
    await peers.session.close()
    await peers.upstream.close()
    for server in peers.servers:
        await server.close()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="aiv-test", max_retries=0)


async def test_the_openai_client_through_a_routing_only_peer(cluster):
    entry = client(cluster.entry)
    first = await entry.responses.create(model="fake", input="hello", instructions="be kind")
    assert first.output_text == "turns 2 last hello" and first.status == "completed"
    assert first.usage.output_tokens == 4
    # The second turn on a host directly, continuing what the routing peer's host stored.
    second = await client(cluster.host).responses.create(
        model="fake", input="again", previous_response_id=first.id
    )
    assert second.output_text == "turns 3 last again"  # user, assistant, user
    # ... and a third on another host, which fetches the history from the first host.
    third = await client(cluster.host2).responses.create(
        model="fake", input="more", previous_response_id=second.id
    )
    assert third.output_text == "turns 5 last more"
    # Any peer finds any response.
    got = await client(cluster.host2).responses.retrieve(first.id)
    assert got.output_text == first.output_text
    await entry.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client(cluster.host2).responses.retrieve(first.id)


async def test_an_unknown_previous_response_is_a_404_through_the_routing_peer(cluster):
    """The host's 404 is about the id, not its instance: relayed, not retried elsewhere."""
    entry = client(cluster.entry)
    first = await client(cluster.host).responses.create(model="fake", input="hi")
    await client(cluster.host).responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as refused:
        await entry.responses.create(model="fake", input="again", previous_response_id=first.id)
    assert refused.value.body["param"] == "previous_response_id"
    assert cluster.engines[0].completed == 1  # the first turn only


async def test_a_streamed_function_tool_round_trip_with_the_openai_client(cluster):
    entry = client(cluster.entry)
    stream = await entry.responses.create(
        model="fake", input="weather?", tools=[WEATHER_TOOL], stream=True
    )
    kinds, final = [], None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert json.loads(call.arguments) == {"city": "Paris"}
    answer = await entry.responses.create(
        model="fake",
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert answer.output_text == "tool said sunny"
    streamed = await entry.responses.create(model="fake", input="hi", stream=True)
    text = "".join([e.delta async for e in streamed if e.type == "response.output_text.delta"])
    assert text == "turns 1 last hi"


async def test_the_entry_peer_books_the_hosts_counts(cluster):
    entry = client(cluster.entry)
    answers = [await entry.responses.create(model="fake", input="hi") for _ in range(2)]
    chat = await entry.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}]
    )
    state = ClusterState()

    async def propose(data: bytes):
        state.apply(data)

    assert await cluster.book.flush(propose)
    (row,) = state.usage.query()
    assert row.requests == 3
    assert row.prompt_tokens == sum(a.usage.input_tokens for a in answers) + (
        chat.usage.prompt_tokens
    )
    assert row.completion_tokens == sum(a.usage.output_tokens for a in answers) + (
        chat.usage.completion_tokens
    )


async def traced_call(cluster, trace_id: str, entry: str | None = None) -> list:
    """One forwarded /v1/responses request in trace `trace_id`; that trace's spans."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            (entry or cluster.entry) + "/v1/responses",
            json={"model": cluster.model, "input": "hi", "max_output_tokens": 8},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    for tracing in cluster.tracings:
        await asyncio.to_thread(tracing.provider.force_flush)
    return body, [s for s in cluster.collector.spans if s.trace_id == trace_id]


def check_span_tree(spans: list, body: dict, host: str = "host") -> None:
    """Entry: server span > admission, forward; the host's server span under the forward, and
    under it its phases, one after the other, with the engine's token counts."""
    by = {(s.node, s.name): s for s in spans}
    entry_server, host_server = by["entry", "POST /v1/responses"], by[host, "POST /v1/responses"]
    assert by["entry", "admission"].parent == entry_server.span_id
    assert by["entry", "forward"].parent == entry_server.span_id
    assert host_server.parent == by["entry", "forward"].span_id
    wait, prefill, decode = (by[host, name] for name in ("queue wait", "prefill", "decode"))
    assert all(s.parent == host_server.span_id for s in (wait, prefill, decode))
    assert host_server.start <= wait.start <= wait.end == prefill.start
    assert prefill.start <= prefill.end == decode.start <= decode.end <= host_server.end
    usage = body["usage"]
    assert prefill.attributes["gen_ai.usage.input_tokens"].int_value == usage["input_tokens"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    assert prefill.attributes["aivailable.cached_tokens"].int_value == cached
    assert decode.attributes["gen_ai.usage.output_tokens"].int_value == usage["output_tokens"]
    assert wait.attributes["aivailable.queue_depth"].int_value >= 0


async def test_one_trace_with_spans_from_both_peers(cluster):
    body, spans = await traced_call(cluster, "4bf92f3577b34da6a3ce929d0e0e4736")
    check_span_tree(spans, body)
    assert body["usage"]["output_tokens"] == 4  # "turns 1 last hi"


def test_without_the_flag_no_exporter_is_imported():
    code = (
        "import sys, aivailable.server, aivailable.cli; "
        "print(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
