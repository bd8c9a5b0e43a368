"""The Ollama endpoints over a real aiohttp server, driven with the FakeEngine."""

import json
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.api.ollama_api import OllamaApi
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.metrics import Metrics


@pytest.fixture
async def served():
    seen = []

    def reply(request):
        seen.append(request)
        return "one two three"

    engine = FakeEngine("fake", reply=reply)
    await engine.start()
    instances = {"fake": SimpleNamespace(engine=engine, error="", state="ready")}
    metrics = Metrics()
    openai = OpenAIApi(lambda: instances, metrics, max_tokens_limit=64, request_timeout_s=5)
    ollama = OllamaApi(openai, lambda name: {"size": 10, "sha256": "ab", "n_ctx": 512})
    client = TestClient(TestServer(build_app(metrics, lambda: True, [ollama.routes()])))
    await client.start_server()
    yield SimpleNamespace(client=client, seen=seen)
    await client.close()


async def test_tags_ps_show_and_version(served):
    tags = await (await served.client.get("/api/tags")).json()
    assert [m["name"] for m in tags["models"]] == ["fake:latest"]
    assert tags["models"][0]["size"] == 10 and tags["models"][0]["digest"] == "ab"
    assert [m["model"] for m in (await (await served.client.get("/api/ps")).json())["models"]] == [
        "fake:latest"
    ]
    show = await served.client.post("/api/show", json={"model": "fake:latest"})
    assert (await show.json())["model_info"]["context_length"] == 512
    assert (await (await served.client.get("/api/version")).json())["version"]


async def test_chat_streams_ndjson_and_maps_options(served):
    body = {
        "model": "fake:latest",
        "messages": [{"role": "user", "content": "hi"}],
        "options": {
            "temperature": 0,
            "top_k": 5,
            "num_predict": 7,
            "seed": 3,
            "stop": ["x"],
            "repeat_penalty": 1.2,
        },
    }
    resp = await served.client.post("/api/chat", json=body)
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == "one two three"
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 3
    p = served.seen[-1].params
    assert (p.temperature, p.top_k, p.max_tokens, p.seed, p.stop, p.repeat_penalty) == (
        0.0,
        5,
        7,
        3,
        ("x",),
        1.2,
    )


async def test_generate_without_streaming_and_json_format(served):
    resp = await served.client.post(
        "/api/generate",
        json={
            "model": "fake",
            "prompt": "hi",
            "stream": False,
            "format": "json",
            "system": "be brief",
        },
    )
    body = await resp.json()
    assert body["response"] == "one two three" and body["done"]
    request = served.seen[-1]
    assert request.messages[0] == {"role": "system", "content": "be brief"}
    assert request.params.grammar and "root" in request.params.grammar


async def test_errors_come_in_ollamas_shape(served):
    resp = await served.client.post(
        "/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status == 404 and "nope" in (await resp.json())["error"]
    resp = await served.client.post("/api/generate", data=b"{oops")
    assert resp.status == 400 and "error" in await resp.json()
    resp = await served.client.post("/api/chat", json={"model": "fake", "messages": []})
    assert resp.status == 400
    resp = await served.client.post(
        "/api/chat",
        json={"model": "fake", "messages": [{"role": "user", "content": "x"}], "format": 5},
    )
    assert resp.status == 400 and "format" in (await resp.json())["error"]
