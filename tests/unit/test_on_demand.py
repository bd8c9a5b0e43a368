"""Load on demand and Ollama's keep_alive: a request waits for a replica instead of a 503
(cluster/on_demand.py), keep_alive reaches the engine's demand window, /api/ps shows when
the model expires, and an engine measures its demand from ready."""

import asyncio
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.api.errors import ApiError
from aivailable.api.ollama_api import NEVER, OllamaApi, parse_keep_alive
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.base import ChatRequest
from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster import on_demand
from aivailable.cluster.on_demand import ReplicaWaiter
from aivailable.cluster.state import ModelRecord
from aivailable.metrics import Metrics


@pytest.mark.parametrize(
    "value,seconds",
    [(None, None), (0, 0.0), (-1, -1.0), ("-1", -1.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("250ms", 0.25), ("30", 30.0), (12.5, 12.5), ("-5m", -1.0)],
)  # fmt: skip
def test_keep_alive_reads_numbers_and_go_durations(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [1]])
def test_a_bad_keep_alive_is_a_400(value):
    with pytest.raises(ApiError) as err:
        parse_keep_alive(value)
    assert err.value.status == 400


async def test_a_request_waits_for_a_replica_and_is_counted_in_gossip_meanwhile():
    ready = {"m": False}
    published = []
    models = {"m": ModelRecord("m", "builtin:x", size=0)}
    waiter = ReplicaWaiter(
        lambda: models, lambda m: ready[m], lambda: published.append(dict(waiter.waiting)), 5.0
    )
    task = asyncio.ensure_future(waiter.wait("m"))
    await asyncio.sleep(0.05)
    assert waiter.waiting == {"m": 1} and published[-1] == {"m": 1}
    ready["m"] = True
    assert await task is True
    assert waiter.waiting == {} and published[-1] == {}
    assert await waiter.wait("absent") is False


async def test_the_wait_is_bounded_by_the_queue_bound_plus_the_expected_load(monkeypatch):
    monkeypatch.setattr(on_demand, "LOAD_FIXED_S", 0.1)
    models = {"m": ModelRecord("m", "builtin:x", size=0)}
    waiter = ReplicaWaiter(lambda: models, lambda m: False, lambda: None, 0.1)
    assert waiter.bound_s("m") == pytest.approx(0.2)
    assert await waiter.wait("m") is False
    assert waiter.waiting == {}


async def test_a_model_the_plan_cannot_place_is_refused_after_a_grace(monkeypatch):
    monkeypatch.setattr(on_demand, "UNPLACEABLE_GRACE_S", 0.05)
    models = {"m": ModelRecord("m", "builtin:x", size=0)}
    waiter = ReplicaWaiter(lambda: models, lambda m: False, lambda: None, 60.0, lambda m: True)
    assert await asyncio.wait_for(waiter.wait("m"), 5) is False


async def test_an_engine_measures_its_demand_once_ready():
    engine = FakeEngine("m", parallel=2)
    assert engine.signals() is None
    await engine.start()
    async for _ in engine.generate(ChatRequest(({"role": "user", "content": "hi"},))):
        pass
    s = engine.signals()
    assert s is not None and s.rpm > 0 and s.active == 0 and s.ttft_p90 is not None


@pytest.fixture
async def served():
    engine = FakeEngine("fake")
    instances = {"fake": SimpleNamespace(engine=engine, error="", state="pending")}
    waited = []

    async def wait_for_replica(model):
        waited.append(model)
        await engine.start()  # the leader placed it; it loaded
        instances["fake"].state = "ready"
        return True

    metrics = Metrics()
    openai = OpenAIApi(
        lambda: instances, metrics, 64, request_timeout_s=5, wait_for_replica=wait_for_replica
    )
    info = {"size": 10, "sha256": "ab", "n_ctx": 512, "idle_unload_s": 300.0}
    ollama = OllamaApi(openai, lambda name: info)
    client = TestClient(TestServer(build_app(metrics, lambda: True, [ollama.routes()])))
    await client.start_server()
    yield SimpleNamespace(client=client, engine=engine, waited=waited, info=info)
    await client.close()


async def test_a_request_for_a_model_not_loaded_waits_and_gets_its_answer(served):
    body = {"model": "fake", "prompt": "hi", "stream": False, "keep_alive": "10m"}
    resp = await served.client.post("/api/generate", json=body)
    assert resp.status == 200 and (await resp.json())["done"] is True
    assert served.waited == ["fake"]
    assert served.engine.demand.keep_alive_s == 600.0


async def test_keep_alive_zero_without_a_prompt_unloads_and_ps_shows_expires_at(served):
    await served.engine.start()
    ps = (await (await served.client.get("/api/ps")).json())["models"][0]
    assert ps["expires_at"] != NEVER and ps["expires_at"] > "2000"
    resp = await served.client.post("/api/generate", json={"model": "fake", "keep_alive": 0})
    assert (await resp.json())["done_reason"] == "unload"
    assert served.engine.demand.keep_alive_s == 0.0
    await served.client.post("/api/generate", json={"model": "fake", "keep_alive": -1})
    ps = (await (await served.client.get("/api/ps")).json())["models"][0]
    assert ps["expires_at"] == NEVER
