"""What a limited key can see and spend, through every API, decided from the one typed request
and charged from the engine's own counts: on the entry peer, and through a routing-only peer
that forwards to the host (the usage trailer, peer/usage.py). Real aiohttp servers, the real
guard, OpenAI and Ollama APIs, the real forwarder; the engine is the FakeEngine."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aivailable.access.guard import AccessGuard
from aivailable.access.limits import RateLimiter
from aivailable.api.app import build_app
from aivailable.api.ollama_api import OllamaApi
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.base import Finished
from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster import keys as k
from aivailable.cluster.state import ClusterState
from aivailable.metrics import Metrics
from peer.availability import ModelAvailability, Replica
from peer.forward import ForwardConfig, Forwarder
from peer.upstream import UpstreamPool

LIMIT = 64  # Config.max_tokens_limit of these peers


class CountingEngine(FakeEngine):
    """The FakeEngine, summing the tokens it reported: what every charge must equal."""

    def __init__(self, name: str, **kw):
        super().__init__(name, **kw)
        self.counted = 0

    async def generate(self, request):
        async for event in super().generate(request):
            if isinstance(event, Finished):
                self.counted += event.prompt_tokens + event.completion_tokens
            yield event

    async def embed(self, inputs):
        result = await super().embed(inputs)
        self.counted += result.prompt_tokens
        return result


def instance(engine):
    return SimpleNamespace(engine=engine, error="", state="ready")


async def engines() -> dict[str, CountingEngine]:
    out = {
        "a": CountingEngine("a", reply="one two three four five six"),
        "b": CountingEngine("b", reply="other model"),
        "e": CountingEngine("e", kind="embedding"),
    }
    for engine in out.values():
        await engine.start()
    return out


def apis(lookup, metrics, gate=None, forwarder=None, catalog=None) -> list:
    openai = OpenAIApi(lookup, metrics, LIMIT, 5, forwarder=forwarder, catalog=catalog, gate=gate)
    return [openai.routes(), OllamaApi(openai).routes()]


class Cluster:
    """An entry peer with API keys on; `via="host"` makes it routing-only: it has no
    instance and forwards every request to a host peer that runs the engines."""

    def __init__(self, via: str):
        self.via = via
        self.state = ClusterState()
        self.limiter = RateLimiter()
        self.servers: list[TestServer] = []
        self.upstream: UpstreamPool | None = None

    async def start(self) -> Cluster:
        self.engines = await engines()
        local = {n: instance(e) for n, e in self.engines.items()}
        guard = AccessGuard(True, lambda: self.state.access, self.limiter)
        forwarder = None
        entry_instances = local
        if self.via == "host":
            host = build_app(Metrics(), lambda: True, apis(lambda: local, Metrics()))
            host_server = await self._serve(host)
            self.upstream = UpstreamPool()
            replica = Replica("host", f"127.0.0.1:{host_server.port}", False, "ready")
            forwarder = Forwarder(
                self.upstream,
                lambda model: [replica],
                lambda model: ModelAvailability("unknown"),
                "entry",
                ForwardConfig(request_timeout_s=10.0),
            )
            entry_instances = {}
        metrics = Metrics()
        entry = build_app(
            metrics,
            lambda: True,
            apis(
                lambda: entry_instances,
                metrics,
                gate=guard,
                forwarder=forwarder,
                catalog=lambda: list(self.engines),
            ),
            middlewares=[guard.middleware],
        )
        self.base = str((await self._serve(entry)).make_url("")).rstrip("/")
        return self

    async def _serve(self, app) -> TestServer:
        server = TestServer(app)
        await server.start_server()
        self.servers.append(server)
        return server

    async def close(self) -> None:
        for server in self.servers:
            await server.close()
        if self.upstream is not None:
            await self.upstream.close()

    def key(self, **fields) -> tuple[str, k.KeyRecord]:
        secret = k.new_secret()
        record = k.KeyRecord(k.new_key_id(), k.hash_secret(secret), "user", **fields)
        assert self.state.apply(k.encode_key_create(record)).ok
        return secret, record

    def counted(self) -> int:
        return sum(e.counted for e in self.engines.values())

    async def call(self, method: str, path: str, key: str, body: dict | None = None):
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.base + path, headers=headers, json=body) as resp,
        ):
            raw = await resp.read()
        assert b"\x00" not in raw  # a host's usage trailer never reaches a client
        text = raw.decode()
        try:
            return resp.status, json.loads(text)
        except ValueError:  # a stream: SSE events or NDJSON lines
            return resp.status, text


@pytest.fixture(params=["local", "host"])
async def cluster(request):
    c = await Cluster(request.param).start()
    yield c
    await c.close()


CHAT = [{"role": "user", "content": "hello there"}]


async def test_a_scoped_key_sees_only_its_models_in_every_listing(cluster):
    key, _ = cluster.key(models=("a",))
    status, listing = await cluster.call("GET", "/v1/models", key)
    assert status == 200 and [m["id"] for m in listing["data"]] == ["a"]
    assert (await cluster.call("GET", "/v1/models/a", key))[0] == 200
    assert (await cluster.call("GET", "/v1/models/b", key))[0] == 404
    status, tags = await cluster.call("GET", "/api/tags", key)
    assert status == 200 and [m["name"] for m in tags["models"]] == ["a:latest"]
    status, ps = await cluster.call("GET", "/api/ps", key)
    assert status == 200 and all(m["name"] == "a:latest" for m in ps["models"])
    assert (await cluster.call("POST", "/api/show", key, {"model": "a"}))[0] == 200
    status, shown = await cluster.call("POST", "/api/show", key, {"model": "b:latest"})
    assert status == 404 and "error" in shown
    # Using it is refused too, whatever the API, and no engine ran.
    status, body = await cluster.call(
        "POST", "/v1/chat/completions", key, {"model": "b", "messages": CHAT}
    )
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert (await cluster.call("POST", "/api/chat", key, {"model": "b", "messages": CHAT}))[
        0
    ] == 404
    assert (await cluster.call("POST", "/api/embed", key, {"model": "e", "input": "x"}))[0] == 404
    assert cluster.engines["b"].requests == [] and cluster.counted() == 0
    # An unscoped key sees them all.
    everyone, _ = cluster.key()
    _, tags = await cluster.call("GET", "/api/tags", everyone)
    assert sorted(m["name"] for m in tags["models"]) == ["a:latest", "b:latest", "e:latest"]


OLLAMA_CALLS = [
    ("/api/chat", {"model": "a", "messages": CHAT}),  # Ollama streams by default
    ("/api/chat", {"model": "a:latest", "messages": CHAT, "stream": False}),
    ("/api/generate", {"model": "a", "prompt": "say something", "stream": False}),
    ("/api/generate", {"model": "a", "prompt": "say something", "raw": True}),
    ("/v1/chat/completions", {"model": "a", "messages": CHAT, "stream": True}),
]


async def test_tpm_holds_through_ollama_and_streams(cluster):
    key, record = cluster.key(tpm=60)
    answered = 0
    for _ in range(20):
        for path, body in OLLAMA_CALLS:
            status, answer = await cluster.call("POST", path, key, body)
            if status == 429:
                # Refused in the shape of the API that was asked.
                error = answer["error"]
                assert isinstance(error, str) if path.startswith("/api/") else error["code"]
                break
            assert status == 200
            answered += 1
            # Charged what the engine counted, stream or not, forwarded or not.
            assert cluster.limiter.tokens[record.id] == cluster.counted()
        else:
            continue
        break
    # Each answer costs 9-12 tokens: the key is stopped once it has spent its 60.
    assert 5 <= answered <= 7 and cluster.limiter.tokens[record.id] >= 60


async def test_a_stream_is_charged_what_it_used_not_its_bound(cluster):
    key, record = cluster.key(tpm=1000)
    body = {"model": "a", "messages": CHAT, "stream": True, "max_tokens": 60}
    status, _ = await cluster.call("POST", "/v1/chat/completions", key, body)
    assert status == 200
    assert 0 < cluster.limiter.tokens[record.id] == cluster.counted() < 60


async def test_ollama_num_predict_is_bounded_like_max_tokens(cluster):
    key, _ = cluster.key()
    for path, body in (
        ("/api/chat", {"model": "a", "messages": CHAT, "stream": False}),
        ("/api/generate", {"model": "a", "prompt": "hi", "stream": False}),
    ):
        status, refused = await cluster.call(
            "POST", path, key, {**body, "options": {"num_predict": LIMIT + 1}}
        )
        assert (
            status == 400 and "num_predict" in refused["error"] and str(LIMIT) in refused["error"]
        )
        status, done = await cluster.call(
            "POST", path, key, {**body, "options": {"num_predict": 2}}
        )
        assert status == 200 and done["eval_count"] == 2
        status, done = await cluster.call(
            "POST", path, key, {**body, "options": {"num_predict": -1}}
        )
        assert status == 200 and done["eval_count"] == 6  # no bound of its own: the limit's
    openai = {"model": "a", "messages": CHAT, "max_tokens": LIMIT + 1}
    status, refused = await cluster.call("POST", "/v1/chat/completions", key, openai)
    assert status == 400 and refused["error"]["param"] == "max_tokens"


def request_shapes():
    text = st.text(alphabet="abc xyz", min_size=1, max_size=30).filter(str.strip)
    bound = st.integers(1, 8)
    stream = st.booleans()
    return st.one_of(
        st.builds(
            lambda t, n, s, m: (
                "/v1/chat/completions",
                {
                    "model": "a",
                    "messages": [{"role": "user", "content": t}],
                    "n": n,
                    "stream": s,
                    "max_tokens": m,
                },
            ),
            text,
            st.integers(1, 3),
            stream,
            bound,
        ),
        st.builds(
            lambda t, s, m: (
                "/v1/completions",
                {"model": "a", "prompt": t, "stream": s, "max_tokens": m},
            ),
            text,
            stream,
            bound,
        ),
        st.builds(
            lambda ts: ("/v1/embeddings", {"model": "e", "input": ts}),
            st.lists(text, min_size=1, max_size=3),
        ),
        st.builds(
            lambda t, s, m: (
                "/api/chat",
                {
                    "model": "a",
                    "messages": [{"role": "user", "content": t}],
                    "stream": s,
                    "options": {"num_predict": m},
                },
            ),
            text,
            stream,
            bound,
        ),
        st.builds(
            lambda t, s, raw: (
                "/api/generate",
                {"model": "a", "prompt": t, "stream": s, "raw": raw},
            ),
            text,
            stream,
            st.booleans(),
        ),
        st.builds(lambda t: ("/api/embed", {"model": "e", "input": [t]}), text),
        st.builds(lambda t: ("/api/embeddings", {"model": "e", "prompt": t}), text),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    via=st.sampled_from(["local", "host"]),
    shapes=st.lists(request_shapes(), min_size=1, max_size=4),
)
def test_the_tokens_charged_equal_the_engines_counts(via, shapes):
    async def scenario():
        cluster = await Cluster(via).start()
        try:
            key, record = cluster.key(tpm=1_000_000)
            for path, body in shapes:
                status, _ = await cluster.call("POST", path, key, body)
                assert status == 200, (path, body)
            assert cluster.limiter.tokens[record.id] == cluster.counted() > 0
        finally:
            await cluster.close()

    asyncio.run(scenario())
