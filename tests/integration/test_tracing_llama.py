"""One trace across two peers with the real llama.cpp engine on SmolLM2: the entry peer's
admission and forward, the host's queue wait, prefill and decode with the engine's token
counts, exported to an OTLP/HTTP collector on loopback. In one process, as
tests/unit/test_responses_peers.py, with a LlamaEngine (its worker process) as the host's."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from aivailable.backends.llama_engine import EngineConfig, LlamaEngine
from peer.upstream import UpstreamPool
from tests.unit.test_responses_peers import Collector, Peers, check_span_tree, traced_call

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(embedded_model):
    peers = Peers()
    peers.model = "smollm2-135m"
    peers.timeout_s = 120.0
    peers.collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", peers.collector.receive)
    peers.collector_url = await peers.serve("collector", app)
    peers.session = aiohttp.ClientSession()
    peers.upstream = UpstreamPool()
    # One slot: of two requests at once, one waits for the other's end.
    engine = LlamaEngine(
        peers.model, embedded_model, n_ctx=512, n_parallel=1, config=EngineConfig()
    )
    await engine.start()
    try:
        peers.host = await peers.peer("host", engine)
        peers.entry = await peers.peer("entry", forward_to="host")
        yield peers
    finally:
        for tracing in peers.tracings:
            await asyncio.to_thread(tracing.shutdown)
        await peers.session.close()
        await peers.upstream.close()
        for server in peers.servers:
            await server.close()
        await engine.stop()


async def test_one_trace_from_the_entry_to_the_real_engines_phases(cluster):
    body, spans = await traced_call(cluster, "0af7651916cd43dd8448eb211c80319c")
    check_span_tree(spans, body)
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0


async def test_a_request_that_waits_for_the_slot_has_its_wait_apart_from_its_prefill(cluster):
    ids = ("1" * 32, "2" * 32)
    results = await asyncio.gather(*(traced_call(cluster, t) for t in ids))
    phases = []
    for body, spans in results:
        check_span_tree(spans, body)
        phases.append({s.name: s for s in spans if s.node == "host"})
    first, second = sorted(phases, key=lambda p: p["queue wait"].end)
    # The slot was the first's until it finished: the second's wait outlasts that prefill,
    # and its own prefill begins only then.
    assert second["queue wait"].end >= first["prefill"].end
    assert second["prefill"].start >= first["prefill"].end
