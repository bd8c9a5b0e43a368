"""The Responses API over a real aiohttp server, driven with the FakeEngine."""

import json
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.api.openai_api import OpenAIApi
from aivailable.api.responses_api import ResponsesApi
from aivailable.api.responses_store import ResponseStore, StoreConfig, node_of, response_id
from aivailable.backends.fake_engine import FakeEngine
from aivailable.metrics import Metrics
from tests.unit.responses_tools import WEATHER_TOOL, replies


@pytest.fixture
async def served():
    engine = FakeEngine("fake", reply=replies)
    await engine.start()
    instances = {"fake": SimpleNamespace(engine=engine, error="", state="ready")}
    metrics = Metrics()
    api = OpenAIApi(lambda: instances, metrics, max_tokens_limit=64, request_timeout_s=5)
    responses = ResponsesApi(api, metrics, 5, "n1")
    app = build_app(metrics, lambda: True, [api.routes(), responses.routes()])
    client = TestClient(TestServer(app))
    await client.start_server()
    yield SimpleNamespace(client=client, store=responses.store, engine=engine)
    await client.close()


async def events_of(resp) -> list[dict]:
    out = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
    return out


async def test_a_string_input_gets_a_message_and_usage(served):
    resp = await served.client.post(
        "/v1/responses", json={"model": "fake", "input": "hello", "instructions": "be brief"}
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["object"] == "response" and body["status"] == "completed"
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0]["text"] == "turns 2 last hello"  # system + user
    usage = body["usage"]
    assert usage["output_tokens"] == 4
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert node_of(body["id"]) == "n1"


async def test_previous_response_id_continues_and_get_delete(served):
    first = await (
        await served.client.post("/v1/responses", json={"model": "fake", "input": "a"})
    ).json()
    second = await (
        await served.client.post(
            "/v1/responses",
            json={"model": "fake", "input": "b", "previous_response_id": first["id"]},
        )
    ).json()
    # user a, assistant answer, user b
    assert second["output"][0]["content"][0]["text"] == "turns 3 last b"
    assert second["previous_response_id"] == first["id"]
    got = await served.client.get(f"/v1/responses/{second['id']}")
    assert (await got.json())["output"] == second["output"]
    gone = await served.client.delete(f"/v1/responses/{second['id']}")
    assert (await gone.json())["deleted"] is True
    assert (await served.client.get(f"/v1/responses/{second['id']}")).status == 404
    missing = await served.client.post(
        "/v1/responses", json={"model": "fake", "input": "c", "previous_response_id": "resp_x_y"}
    )
    assert missing.status == 404
    assert (await missing.json())["error"]["param"] == "previous_response_id"


async def test_store_false_keeps_nothing(served):
    body = await (
        await served.client.post(
            "/v1/responses", json={"model": "fake", "input": "a", "store": False}
        )
    ).json()
    assert (await served.client.get(f"/v1/responses/{body['id']}")).status == 404


async def test_another_key_cannot_read_a_response(served):
    mine = {"Authorization": "Bearer aiv-mine"}
    body = await (
        await served.client.post(
            "/v1/responses", json={"model": "fake", "input": "a"}, headers=mine
        )
    ).json()
    assert (await served.client.get(f"/v1/responses/{body['id']}", headers=mine)).status == 200
    theirs = {"Authorization": "Bearer aiv-theirs"}
    assert (await served.client.get(f"/v1/responses/{body['id']}", headers=theirs)).status == 404


async def test_the_stream_has_the_responses_events_in_order(served):
    resp = await served.client.post(
        "/v1/responses", json={"model": "fake", "input": "hello", "stream": True}
    )
    assert resp.status == 200
    events = await events_of(resp)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "turns 1 last hello"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["usage"]["output_tokens"] == 4


async def test_a_function_tool_round_trip(served):
    body = {"model": "fake", "input": "weather in Paris?", "tools": [WEATHER_TOOL]}
    first = await (await served.client.post("/v1/responses", json=body)).json()
    (call,) = first["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    follow = {
        "model": "fake",
        "previous_response_id": first["id"],
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}],
    }
    second = await (await served.client.post("/v1/responses", json=follow)).json()
    assert second["output"][0]["content"][0]["text"] == "tool said sunny"


async def test_a_streamed_function_call_has_argument_events(served):
    body = {"model": "fake", "input": "weather?", "tools": [WEATHER_TOOL], "stream": True}
    events = await events_of(await served.client.post("/v1/responses", json=body))
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(done["arguments"]) == {"city": "Paris"}
    assert events[-1]["response"]["output"][0]["type"] == "function_call"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"max_output_tokens": 10_000}, "max_output_tokens"),
        (
            {"input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
async def test_unsupported_or_bad_fields_are_a_400_naming_them(served, extra, param):
    resp = await served.client.post("/v1/responses", json={"model": "fake", "input": "x", **extra})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param


async def test_max_output_tokens_cuts_as_incomplete(served):
    body = await (
        await served.client.post(
            "/v1/responses", json={"model": "fake", "input": "hello", "max_output_tokens": 2}
        )
    ).json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 2


def test_the_store_is_bounded_and_expires():
    now = [0.0]
    store = ResponseStore(StoreConfig(max_items=2, ttl_s=10), clock=lambda: now[0])
    for i in range(3):
        store.put(response_id("n1", str(i)), {"owner": "", "response": {}, "items": []})
    assert len(store) == 2 and store.get(response_id("n1", "0")) is None
    now[0] = 11
    assert store.get(response_id("n1", "2")) is None


def test_ids_point_at_their_node():
    assert node_of(response_id("peer 7", "abc")) == "peer 7"
    assert node_of("resp_zz_1") is None and node_of("chatcmpl-1") is None
