"""The OpenAI-compatible endpoints over a real aiohttp server, driven with the FakeEngine."""

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.metrics import Metrics

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}]}


def instance(engine, state=None, error=""):
    """What the API looks up: an instance with an engine (or None while pending)."""
    return SimpleNamespace(
        engine=engine, error=error, state=state or (engine.state if engine else "pending")
    )


@pytest.fixture
async def served():
    engines = {"fake": FakeEngine("fake", reply="one two three four five", queue_limit=2)}
    await engines["fake"].start()
    instances = {name: instance(e) for name, e in engines.items()}
    metrics = Metrics()
    api = OpenAIApi(lambda: instances, metrics, max_tokens_limit=64, request_timeout_s=5)
    app = build_app(metrics, lambda: True, [api.routes()])
    client = TestClient(TestServer(app))
    await client.start_server()
    yield SimpleNamespace(
        client=client, engine=engines["fake"], instances=instances, metrics=metrics
    )
    await client.close()


async def sse_events(resp) -> list:
    events = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_models_lists_the_served_models(served):
    resp = await served.client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert [m["id"] for m in body["data"]] == ["fake"] and body["object"] == "list"
    assert (await served.client.get("/v1/models/fake")).status == 200
    assert (await served.client.get("/v1/models/nope")).status == 404


async def test_chat_returns_the_text_and_usage(served):
    resp = await served.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "one two three four five",
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["total_tokens"] > 5


async def test_max_tokens_cuts_with_finish_reason_length(served):
    resp = await served.client.post(
        "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2}
    )
    body = await resp.json()
    assert body["choices"][0]["text"] == "one two"
    assert body["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_is_sse_ending_in_done(served):
    resp = await served.client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three four five"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


async def test_completion_stream(served):
    resp = await served.client.post(
        "/v1/completions", json={"model": "fake", "prompt": "x", "stream": True}
    )
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "one two three four five"


@pytest.mark.parametrize(
    "payload, status, param",
    [
        (b"{not json", 400, None),
        (json.dumps({"model": "fake"}).encode(), 400, "messages"),
        (json.dumps({**CHAT, "model": "nope"}).encode(), 404, "model"),
        (json.dumps({**CHAT, "max_tokens": -5}).encode(), 400, "max_tokens"),
        (json.dumps({**CHAT, "temperature": "warm"}).encode(), 400, "temperature"),
    ],
)
async def test_bad_input_gets_an_openai_error_and_the_peer_keeps_serving(
    served, payload, status, param
):
    resp = await served.client.post(
        "/v1/chat/completions", data=payload, headers={"Content-Type": "application/json"}
    )
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["message"] and error["param"] == param
    assert (await served.client.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_unknown_routes_are_json_404(served):
    resp = await served.client.get("/v2/nothing")
    assert resp.status == 404 and "error" in await resp.json()


async def test_a_full_queue_answers_429_with_retry_after(served):
    served.engine.token_delay = 0.05

    async def stream():
        resp = await served.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        return await sse_events(resp)

    async with asyncio.TaskGroup() as tg:
        streams = [tg.create_task(stream()) for _ in range(2)]
        while served.engine.queue_depth < 2:
            await asyncio.sleep(0.01)
        resp = await served.client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"]["code"] == "queue_full"
    assert all(s.result()[-1] == "[DONE]" for s in streams)


async def test_a_loading_or_failed_model_answers_503(served):
    served.instances["fake"] = instance(None)
    resp = await served.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert (await resp.json())["error"]["code"] == "model_pending"
    served.engine.crash()
    served.instances["fake"] = instance(served.engine)
    resp = await served.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "model_failed"


async def test_a_crash_mid_stream_ends_the_stream_with_an_error_event(served):
    served.engine.token_delay = 0.05
    resp = await served.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    await resp.content.readline()
    served.engine.crash()
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert any(isinstance(e, dict) and "error" in e for e in events)


async def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    served.engine.token_delay = 0.2
    session = aiohttp.ClientSession()
    resp = await session.post(
        served.client.make_url("/v1/chat/completions"), json={**CHAT, "stream": True}
    )
    await resp.content.readline()
    assert served.engine.queue_depth == 1
    resp.close()
    await session.close()
    for _ in range(500):
        if served.engine.queue_depth == 0:
            break
        await asyncio.sleep(0.02)
    assert served.engine.queue_depth == 0 and served.engine.cancelled == 1


async def test_metrics_count_requests_and_tokens(served):
    await served.client.post("/v1/chat/completions", json=CHAT)
    text = await (await served.client.get("/metrics")).text()
    assert 'aivailable_requests_total{endpoint="chat",model="fake",status="200"} 1.0' in text
    assert 'aivailable_tokens_total{kind="completion",model="fake"} 5.0' in text


async def test_the_dashboard_is_served_at_the_root(served):
    resp = await served.client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "/cluster/status" in await resp.text()
