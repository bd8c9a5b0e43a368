"""Forwarding between real aiohttp peers on loopback, with the FakeEngine and the cluster key.

A front peer (no model of its own) forwards to two backend peers, each serving the
FakeEngine, all three apps built as the peer process builds them: OpenAIApi with its
forwarder, the error middleware, and the peer-auth middleware; the front's outgoing
upstream pool signs with the cluster secret.
"""

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.api.app import build_app
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.local_peers import free_port
from aivailable.metrics import Metrics
from peer.auth import FORWARDED_HEADER, PeerAuth, make_peer_session
from peer.availability import ModelAvailability, Replica, summarize_availability
from peer.forward import REPLICA_HEADER, ForwardConfig, Forwarder
from peer.upstream import UpstreamPool

SECRET = b"cluster-secret-for-tests-0123456789"
REPLY = "alpha beta gamma delta epsilon zeta"
CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}


class Peer:
    """One peer's HTTP side: its instances, its forwarder, the app, on a loopback port."""

    def __init__(self, name: str, secret: bytes = SECRET):
        self.name = name
        self.instances: dict[str, SimpleNamespace] = {}
        self.auth = PeerAuth(secret)
        self.session = make_peer_session(self.auth)  # the rest of peer traffic
        self.upstream = UpstreamPool(self.auth)  # forwarded requests
        self.cluster: list[Peer] = []  # the others, as gossip would show them
        self.extra_replicas: list[Replica] = []  # stale or dead entries of the gossip view
        self.hits = 0  # /v1 requests this peer received
        # Queue depths as gossip last reported them, by node; None: the live value.
        self.gossiped_depth: dict[str, int] | None = None
        self.unplaced_reason = ""
        self.forwarder = Forwarder(
            self.upstream,
            self.replicas_of,
            self.availability_of,
            name,
            ForwardConfig(connect_timeout_s=1.0, request_timeout_s=20.0, stall_timeout_s=5.0),
        )
        metrics = Metrics()
        api = OpenAIApi(lambda: self.instances, metrics, 64, 20, forwarder=self.forwarder)

        async def raft(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = build_app(metrics, lambda: True, [api.routes(), [web.post("/raft/append", raft)]])
        app.middlewares.append(self.auth.middleware)

        @web.middleware
        async def count(request, handler):
            self.hits += request.path.startswith("/v1/")
            return await handler(request)

        app.middlewares.append(count)
        self.server = TestServer(app)

    async def start(self) -> "Peer":
        await self.server.start_server()
        self.addr = f"127.0.0.1:{self.server.port}"
        self.url = f"http://{self.addr}"
        return self

    async def serve(self, engine: FakeEngine) -> FakeEngine:
        await engine.start()
        self.instances[engine.name] = SimpleNamespace(
            engine=engine, error="", state=engine.state, model=engine.name
        )
        return engine

    def replicas_of(self, model: str) -> list[Replica]:
        """What the gossip view would say: every peer's instance, its state and queue."""
        replicas = list(self.extra_replicas)
        for peer in [self, *self.cluster]:
            inst = peer.instances.get(model)
            if inst is not None and inst.engine is not None:
                replicas.append(
                    Replica(
                        peer.name,
                        peer.addr,
                        peer is self,
                        inst.engine.state,
                        inst.engine.queue_depth
                        if self.gossiped_depth is None
                        else self.gossiped_depth.get(peer.name, 0),
                    )
                )
        return replicas

    def availability_of(self, model: str) -> ModelAvailability:
        states = [r.state for r in self.replicas_of(model)]
        return summarize_availability(True, states, self.unplaced_reason)

    async def close(self) -> None:
        await self.upstream.close()
        await self.session.close()
        await self.server.close()


@pytest.fixture
async def trio():
    front, b1, b2 = Peer("front"), Peer("b1"), Peer("b2")
    for peer in (front, b1, b2):
        await peer.start()
    for peer in (front, b1, b2):
        peer.cluster = [p for p in (front, b1, b2) if p is not peer]
    yield SimpleNamespace(front=front, b1=b1, b2=b2)
    for peer in (front, b1, b2):
        await peer.close()


def engine(**kwargs) -> FakeEngine:
    return FakeEngine("smol", reply=REPLY, **kwargs)


async def wait_for(predicate, within=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_the_openai_client_streams_token_by_token_through_the_front(trio):
    e1 = await trio.b1.serve(engine(token_delay=0.05))
    client = openai.AsyncOpenAI(base_url=trio.front.url + "/v1", api_key="unused")
    stream = await client.chat.completions.create(**CHAT, stream=True)
    pieces = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if not pieces:
                # The first token is here while the backend is still generating:
                # nothing on the way buffered the answer.
                assert e1.completed == 0 and e1.queue_depth == 1
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == REPLY and len(pieces) == len(REPLY.split())
    assert e1.completed == 1
    await client.close()


async def test_the_openai_client_gets_a_plain_completion_and_the_serving_node(trio):
    await trio.b2.serve(engine())
    client = openai.AsyncOpenAI(base_url=trio.front.url + "/v1", api_key="unused")
    raw = await client.chat.completions.with_raw_response.create(**CHAT)
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY
    assert raw.headers[REPLICA_HEADER] == "b2"
    await client.close()


async def test_the_least_loaded_replica_is_chosen(trio):
    e1 = await trio.b1.serve(engine())
    e2 = await trio.b2.serve(engine())
    trio.front.gossiped_depth = {"b1": 2, "b2": 1}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(trio.front.url + "/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and resp.headers[REPLICA_HEADER] == "b2"
    assert e2.completed == 1 and e1.completed == 0


async def test_a_dead_first_replica_is_retried_on_the_second(trio):
    e2 = await trio.b2.serve(engine())
    # Gossip says "dead" is ready and idle, so it is tried first; its port is closed.
    trio.front.extra_replicas = [Replica("dead", f"127.0.0.1:{free_port()}", False, "ready", 0)]
    async with aiohttp.ClientSession() as session:
        resp = await session.post(trio.front.url + "/v1/chat/completions", json=CHAT)
        body = await resp.json()
    assert resp.status == 200 and body["choices"][0]["message"]["content"] == REPLY
    assert resp.headers[REPLICA_HEADER] == "b2" and e2.completed == 1


async def test_a_client_disconnect_mid_stream_frees_the_backends_slot(trio):
    e1 = await trio.b1.serve(engine(token_delay=0.2))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            trio.front.url + "/v1/chat/completions", json={**CHAT, "stream": True}
        )
        assert resp.status == 200
        await resp.content.readline()
        assert e1.queue_depth == 1
        resp.close()
    await wait_for(lambda: e1.queue_depth == 0)
    assert e1.cancelled == 1 and e1.completed == 0
    assert trio.front.forwarder.inflight() == {}


async def test_a_burst_between_gossip_rounds_spreads_over_the_replicas(trio):
    e1 = await trio.b1.serve(engine(token_delay=0.05, queue_limit=8))
    e2 = await trio.b2.serve(engine(token_delay=0.05, queue_limit=8))
    trio.front.gossiped_depth = {}  # gossip has not reported the burst yet: all idle
    # One prompt six times: prefix affinity would keep it on one replica up to the load
    # bound (tests/integration/test_routing_peers.py); spreading is least_loaded's job.
    fwd = trio.front.forwarder
    fwd._config = dataclasses.replace(fwd._config, routing="least_loaded")

    async def one(session):
        resp = await session.post(
            trio.front.url + "/v1/completions",
            json={"model": "smol", "prompt": "x", "stream": True},
        )
        return resp.headers[REPLICA_HEADER], await resp.read()

    async with aiohttp.ClientSession() as session:
        served = await asyncio.gather(*(one(session) for _ in range(6)))
    by = [node for node, _ in served]
    assert sorted(by) == ["b1"] * 3 + ["b2"] * 3
    assert e1.completed == 3 and e2.completed == 3


async def test_no_ready_replica_gives_503_with_retry_after_and_the_state(trio):
    loading = engine()
    loading.state = "loading"  # as while its start() loads the model
    trio.b1.instances["smol"] = SimpleNamespace(engine=loading, error="", state="loading")
    async with aiohttp.ClientSession() as session:
        resp = await session.post(trio.front.url + "/v1/chat/completions", json=CHAT)
        error = (await resp.json())["error"]
        assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
        assert error["code"] == "model_loading" and error["state"] == "loading"

        del trio.b1.instances["smol"]
        trio.front.unplaced_reason = "it needs 6 GiB and the largest free GPU has 4 GiB"
        resp = await session.post(trio.front.url + "/v1/chat/completions", json=CHAT)
        error = (await resp.json())["error"]
        assert resp.status == 503 and "Retry-After" in resp.headers
        assert error["state"] == "unplaced" and "6 GiB" in error["message"]


async def test_a_forwarded_request_is_not_forwarded_again(trio):
    # Stale gossip: the front and b1 each think the other serves "smol"; neither does.
    for peer, other in ((trio.front, trio.b1), (trio.b1, trio.front)):
        peer.extra_replicas = [Replica(other.name, other.addr, False, "ready", 0)]
    async with aiohttp.ClientSession() as session:
        resp = await session.post(trio.front.url + "/v1/chat/completions", json=CHAT)
    # b1 answered for itself (the model is not there: 404) instead of sending it back; the
    # front tells the client no replica answered (503), not that the model does not exist.
    error = (await resp.json())["error"]
    assert resp.status == 503 and error["code"] == "model_unreachable"
    assert "b1 answered 404" in error["message"]
    assert trio.front.hits == 1 and trio.b1.hits == 1


async def test_unsigned_peer_requests_are_refused(trio):
    async with aiohttp.ClientSession() as plain:
        resp = await plain.post(trio.b1.url + "/raft/append", json={"term": 1})
        assert resp.status == 401 and "unsigned" in (await resp.json())["error"]["message"]
        # A client pretending to be a forwarding peer, to dodge forwarding, is refused too.
        resp = await plain.post(
            trio.b1.url + "/v1/chat/completions", json=CHAT, headers={FORWARDED_HEADER: "x"}
        )
        assert resp.status == 401
    resp = await trio.front.session.post(trio.b1.url + "/raft/append", json={"term": 1})
    assert resp.status == 200 and (await resp.json()) == {"ok": True}


async def test_a_peer_with_another_clusters_key_cannot_forward(trio):
    e1 = await trio.b1.serve(engine())
    stranger = await Peer("stranger", secret=b"another-cluster-secret-9876543210").start()
    stranger.cluster = [trio.b1]
    try:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(stranger.url + "/v1/chat/completions", json=CHAT)
            body = await resp.json()
        assert resp.status == 503 and "refused this peer's signature" in body["error"]["message"]
        assert e1.requests == []
    finally:
        await stranger.close()


async def test_the_stream_body_is_byte_for_byte_what_the_backend_sent(trio):
    await trio.b1.serve(engine())
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        via = await session.post(trio.front.url + "/v1/chat/completions", json=payload)
        direct = await session.post(trio.b1.url + "/v1/chat/completions", json=payload)
        via_events = [json.loads(x[6:]) for x in (await via.text()).split("\n\n") if x[6:8] == '{"']
        direct_events = [
            json.loads(x[6:]) for x in (await direct.text()).split("\n\n") if x[6:8] == '{"'
        ]
    assert via.headers["Content-Type"] == direct.headers["Content-Type"]
    strip = [{k: v for k, v in e.items() if k not in ("id", "created")} for e in via_events]
    assert strip == [
        {k: v for k, v in e.items() if k not in ("id", "created")} for e in direct_events
    ]
