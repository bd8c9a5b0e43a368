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


@pytest.fixture
async def embedder():
    engine = FakeEngine("emb", kind="embedding")
    await engine.start()
    chat = FakeEngine("fake")
    await chat.start()
    instances = {
        "emb": SimpleNamespace(engine=engine, error="", state="ready"),
        "fake": SimpleNamespace(engine=chat, error="", state="ready"),
    }
    metrics = Metrics()
    openai = OpenAIApi(lambda: instances, metrics, max_tokens_limit=64, request_timeout_s=5)
    app = build_app(metrics, lambda: True, [openai.routes(), OllamaApi(openai).routes()])
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client
    await client.close()


async def test_openai_embeddings_in_float_and_base64(embedder):
    import base64
    import struct

    resp = await embedder.post(
        "/v1/embeddings", json={"model": "emb", "input": ["a b", "c", "a b"]}
    )
    body = await resp.json()
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and vectors[0] == vectors[2] != vectors[
        1
    ]
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}  # the fake counts words
    resp = await embedder.post(
        "/v1/embeddings", json={"model": "emb", "input": "c", "encoding_format": "base64"}
    )
    packed = base64.b64decode((await resp.json())["data"][0]["embedding"])
    assert struct.unpack("<8f", packed) == pytest.approx(vectors[1], abs=1e-6)


async def test_embedding_errors(embedder):
    for body, param in (
        ({"model": "emb", "input": []}, "input"),
        ({"model": "emb", "input": [1, 2]}, "input"),
        ({"model": "emb", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "emb", "input": "x", "dimensions": 3}, "dimensions"),
    ):
        resp = await embedder.post("/v1/embeddings", json=body)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    # The kinds do not mix: a chat model has no embeddings, an embedding model no chat.
    resp = await embedder.post("/v1/embeddings", json={"model": "fake", "input": "x"})
    assert resp.status == 400 and "embeddings" in (await resp.json())["error"]["message"]
    resp = await embedder.post(
        "/v1/chat/completions",
        json={"model": "emb", "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status == 400


async def test_ollama_embed_and_embeddings(embedder):
    body = await (
        await embedder.post("/api/embed", json={"model": "emb:latest", "input": ["x", "y"]})
    ).json()
    assert len(body["embeddings"]) == 2 and len(body["embeddings"][0]) == 8
    legacy = await (
        await embedder.post("/api/embeddings", json={"model": "emb", "prompt": "x"})
    ).json()
    assert legacy["embedding"] == body["embeddings"][0]
