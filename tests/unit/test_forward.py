"""Replica choice, the 503 bodies, and the Forwarder against small real aiohttp upstreams."""

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.api.app import build_app
from aivailable.api.openai_api import OpenAIApi
from aivailable.local_peers import free_port
from aivailable.metrics import Metrics
from peer.auth import FORWARDED_HEADER
from peer.availability import ModelAvailability, Replica, order_replicas, summarize_availability
from peer.forward import REPLICA_HEADER, ForwardConfig, Forwarder
from peer.upstream import UpstreamPool


def r(node, state="ready", depth=0, local=False, addr="127.0.0.1:1"):
    return Replica(node_id=node, addr=addr, local=local, state=state, queue_depth=depth)


# ---------------------------------------------------------------- replica choice


def test_only_ready_replicas_are_chosen():
    replicas = [r("a", "loading"), r("b"), r("c", "failed"), r("d", "pending"), r("e")]
    assert [x.node_id for x in order_replicas(replicas)] == ["b", "e"]


def test_own_replica_first_then_least_queue_depth_then_node_id():
    replicas = [r("c", depth=1), r("b", depth=1), r("a", depth=4), r("z", depth=9, local=True)]
    assert [x.node_id for x in order_replicas(replicas)] == ["z", "b", "c", "a"]


def test_a_suspect_host_comes_after_every_alive_one():
    replicas = [
        Replica("a", "x:1", False, "ready", 0, member_state="suspect"),
        Replica("b", "x:2", False, "ready", 9),
    ]
    assert [x.node_id for x in order_replicas(replicas)] == ["b", "a"]


def test_requests_in_flight_from_here_count_on_top_of_gossiped_depth():
    replicas = [r("a", depth=1), r("b", depth=2)]
    assert order_replicas(replicas, {"a": 2})[0].node_id == "b"
    assert order_replicas(replicas, {"b": 0})[0].node_id == "a"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["n1", "n2", "n3", "n4", "n5"]),
            st.sampled_from(["ready", "loading", "failed", "pending", "stopping"]),
            st.integers(0, 5),
            st.booleans(),
        ),
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_order_is_a_deterministic_sorted_choice_of_the_ready_ones(rows):
    replicas = [r(n, s, d, local) for n, s, d, local in rows]
    ordered = order_replicas(replicas)
    assert sorted(x.node_id for x in ordered) == sorted(n for n, s, _, _ in rows if s == "ready")
    assert ordered == order_replicas(list(reversed(replicas)))
    keys = [(not x.local, x.queue_depth, x.node_id) for x in ordered]
    assert keys == sorted(keys)


# ---------------------------------------------------------------- the 503 bodies


def test_a_loading_model_gets_503_naming_its_state_with_retry_after():
    error = ModelAvailability("loading").error("smol")
    assert error.status == 503 and error.retry_after == 2.0
    body = error.body()["error"]
    assert body["code"] == "model_loading" and body["state"] == "loading"
    assert "loading" in body["message"] and body["param"] == "model"
    assert error.response().headers["Retry-After"] == "2"


def test_an_unplaced_model_gets_503_with_the_reason():
    reason = "needs 6 GiB, the largest free GPU has 4 GiB"
    error = ModelAvailability("unplaced", reason).error("big")
    body = error.body()["error"]
    assert error.status == 503 and body["code"] == "model_unplaced"
    assert "needs 6 GiB" in body["message"] and body["reason"].startswith("needs 6 GiB")
    assert int(error.response().headers["Retry-After"]) >= 1


def test_an_absent_model_is_404_and_retry_after_can_be_set():
    assert ModelAvailability("absent").error("x").status == 404
    error = ModelAvailability("pending", retry_after=7).error("x")
    assert error.response().headers["Retry-After"] == "7"


@pytest.mark.parametrize(
    "deployed, states, reason, expected",
    [
        (False, [], "", "absent"),
        (True, [], "no GPU fits", "unplaced"),
        (True, [], "", "pending"),
        (True, ["failed", "loading"], "", "loading"),
        (True, ["stopping", "pending"], "", "pending"),
        (True, ["failed"], "", "failed"),
        (True, ["ready"], "", "unreachable"),
    ],
)
def test_summarize_availability(deployed, states, reason, expected):
    availability = summarize_availability(deployed, states, reason)
    assert availability.state == expected
    if expected == "unplaced":
        assert availability.reason == reason


# ---------------------------------------------------------------- the Forwarder


async def start(app: web.Application) -> TestServer:
    server = TestServer(app)
    await server.start_server()
    return server


def upstream_app(name: str, *, status=200, tokens=3, delay=0.0, die_after=None, seen=None):
    """A replica stand-in: echoes what it got, or streams SSE tokens; records cancellations."""
    seen = seen if seen is not None else SimpleNamespace(requests=[], cancelled=0, finished=0)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.requests.append(
            SimpleNamespace(path=request.path_qs, body=body, headers=dict(request.headers))
        )
        if status != 200:
            return web.json_response({"error": {"message": name}}, status=status)
        if not json.loads(body).get("stream"):
            return web.json_response({"served_by": name, "echo": json.loads(body)})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(tokens):
                if die_after is not None and i == die_after:
                    request.transport.abort()
                    return resp
                await resp.write(f"data: {json.dumps({'token': i, 'by': name})}\n\n".encode())
                await asyncio.sleep(delay)
            await resp.write(b"data: [DONE]\n\n")
            seen.finished += 1
        except asyncio.CancelledError:
            seen.cancelled += 1
            raise
        return resp

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", handle)
    return app, seen


FRONT = ForwardConfig(connect_timeout_s=1.0, request_timeout_s=1.5, stall_timeout_s=0.5)
# Limits too long to end a test: only gossip's word can make the forwarder move on.
PATIENT = ForwardConfig(request_timeout_s=60.0, first_byte_timeout_s=60.0, stall_timeout_s=60.0)


@pytest.fixture
async def front(request):
    """A front peer whose only route forwards to whatever replicas the test sets; gossip's
    view of each host is `members` (default alive); reported suspicions land in `reported`."""
    state = SimpleNamespace(
        replicas=[],
        availability=ModelAvailability("unknown"),
        servers=[],
        members={},
        reported=[],
    )
    upstream = UpstreamPool()
    forwarder = Forwarder(
        upstream,
        lambda m: state.replicas,
        lambda m: state.availability,
        "front",
        getattr(request, "param", FRONT),
        member_state=lambda node: state.members.get(node, "alive"),
        report_unreachable=state.reported.append,
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        return await forwarder.forward(request, await request.read(), "m")

    app = build_app(Metrics(), lambda: True, [[web.post("/v1/{tail:.*}", handle)]])
    client = TestClient(TestServer(app))
    await client.start_server()

    async def add(app_and_seen, node, depth=0):
        server = await start(app_and_seen[0])
        state.servers.append(server)
        state.replicas.append(r(node, depth=depth, addr=f"127.0.0.1:{server.port}"))
        return app_and_seen[1]

    state.add = add
    state.client = client
    state.forwarder = forwarder
    yield state
    await client.close()
    for server in state.servers:
        await server.close()
    await upstream.close()


async def sse(resp) -> list:
    return [
        line.decode().strip()[len("data: ") :]
        async for line in resp.content
        if line.startswith(b"data: ")
    ]


async def test_the_request_goes_to_the_best_replica_unchanged_and_marked(front):
    seen_a = await front.add(upstream_app("a"), "a", depth=3)
    seen_b = await front.add(upstream_app("b"), "b", depth=1)
    resp = await front.client.post(
        "/v1/chat/completions?x=1",
        json={"model": "m", "n": 1},
        headers={"Authorization": "Bearer k", "X-Aivailable-Signature": "client-made"},
    )
    assert resp.status == 200 and resp.headers[REPLICA_HEADER] == "b"
    assert (await resp.json()) == {"served_by": "b", "echo": {"model": "m", "n": 1}}
    assert not seen_a.requests
    got = seen_b.requests[0]
    assert got.path == "/v1/chat/completions?x=1" and json.loads(got.body)["n"] == 1
    assert got.headers[FORWARDED_HEADER] == "front"
    assert got.headers["Authorization"] == "Bearer k"
    assert "X-Aivailable-Signature" not in got.headers  # a client cannot pass peer headers
    assert front.forwarder.inflight() == {}


async def test_sse_streams_through_in_order(front):
    await front.add(upstream_app("a", tokens=4, delay=0.01), "a")
    resp = await front.client.post("/v1/chat/completions", json={"stream": True})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = await sse(resp)
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["token"] for e in events[:-1]] == [0, 1, 2, 3]


async def test_a_dead_replica_is_skipped_for_the_next(front):
    front.replicas.append(r("dead", depth=0, addr=f"127.0.0.1:{free_port()}"))
    await front.add(upstream_app("b"), "b", depth=5)
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 200 and (await resp.json())["served_by"] == "b"


async def test_a_503_before_the_body_is_retried_once_elsewhere(front):
    seen_a = await front.add(upstream_app("a", status=503), "a", depth=0)
    await front.add(upstream_app("b"), "b", depth=1)
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 200 and (await resp.json())["served_by"] == "b"
    assert len(seen_a.requests) == 1


async def test_only_one_retry_and_the_last_answer_passes_through(front):
    seens = [await front.add(upstream_app(n, status=503), n, depth=i) for i, n in enumerate("abc")]
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 503 and (await resp.json())["error"]["message"] == "b"
    assert [len(s.requests) for s in seens] == [1, 1, 0]


async def test_a_replica_refusing_our_signature_is_a_failed_replica_not_a_401(front):
    await front.add(upstream_app("a", status=401), "a", depth=0)
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 503
    assert "refused this peer's signature" in (await resp.json())["error"]["message"]
    await front.add(upstream_app("b"), "b", depth=1)
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 200 and (await resp.json())["served_by"] == "b"


async def test_no_replica_answering_gives_503_unreachable(front):
    front.replicas += [r(n, addr=f"127.0.0.1:{free_port()}") for n in ("x", "y")]
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert (await resp.json())["error"]["code"] == "model_unreachable"


async def test_a_replica_this_view_shows_loading_is_tried_before_a_503(front):
    # The view lags: the replica turned ready a gossip round ago.
    seen = await front.add(upstream_app("a"), "a", depth=0)
    front.replicas[-1] = r("a", "loading", addr=front.replicas[-1].addr)
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 200 and (await resp.json())["served_by"] == "a"
    assert len(seen.requests) == 1


async def test_no_ready_replica_answers_with_the_models_availability(front):
    front.replicas.append(r("a", "loading"))
    front.replicas.append(r("me", local=True))  # never forwarded to itself
    front.availability = ModelAvailability("unplaced", "no GPU has 6 GiB free")
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    error = (await resp.json())["error"]
    assert error["state"] == "unplaced" and "6 GiB" in error["message"]


async def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error(front):
    await front.add(upstream_app("a", tokens=5, delay=0.01, die_after=2), "a")
    resp = await front.client.post("/v1/chat/completions", json={"stream": True})
    events = await sse(resp)
    assert [json.loads(e)["token"] for e in events[:2]] == [0, 1]
    assert "error" in json.loads(events[-2]) and events[-1] == "[DONE]"


async def test_a_stalled_replica_does_not_hang_the_client(front):
    await front.add(upstream_app("a", tokens=3, delay=5.0), "a")
    resp = await front.client.post("/v1/chat/completions", json={"stream": True})
    events = await asyncio.wait_for(sse(resp), timeout=4)
    assert json.loads(events[0])["token"] == 0
    assert "timed out" in json.loads(events[-2])["error"]["message"]


async def test_a_replica_silent_before_answering_times_out_with_504(front):
    async def silent(request):
        await asyncio.sleep(30)

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", silent)
    await front.add((app, None), "slow")
    resp = await asyncio.wait_for(
        front.client.post("/v1/completions", json={"model": "m"}), timeout=6
    )
    assert resp.status == 504 and (await resp.json())["error"]["type"] == "timeout"


async def test_the_clients_disconnect_reaches_the_replica(front):
    seen = await front.add(upstream_app("a", tokens=50, delay=0.05), "a")
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            front.client.make_url("/v1/chat/completions"), json={"stream": True}
        )
        await resp.content.readline()
        resp.close()
    for _ in range(100):
        if seen.cancelled:
            break
        await asyncio.sleep(0.02)
    assert seen.cancelled == 1 and seen.finished == 0
    assert front.forwarder.inflight() == {}


def silent_app():
    seen = SimpleNamespace(requests=[], cancelled=0)

    async def silent(request):
        seen.requests.append(request.path)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.cancelled += 1
            raise

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", silent)
    return app, seen


async def later(delay: float, action) -> None:
    await asyncio.sleep(delay)
    action()


@pytest.mark.parametrize("front", [PATIENT], indirect=True)
@pytest.mark.parametrize("verdict", ["dead", "suspect"])
async def test_a_host_gossip_gives_up_on_is_abandoned_while_waiting(front, verdict):
    seen = await front.add(silent_app(), "frozen", depth=0)
    await front.add(upstream_app("b"), "b", depth=5)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(later(0.2, lambda: front.members.update(frozen=verdict)))
        resp = await asyncio.wait_for(
            front.client.post("/v1/completions", json={"model": "m"}), timeout=10
        )
    assert resp.status == 200 and (await resp.json())["served_by"] == "b"
    assert seen.requests  # it was tried first, then left
    assert front.forwarder.inflight() == {}


@pytest.mark.parametrize("front", [PATIENT], indirect=True)
async def test_a_suspect_host_is_waited_for_when_no_other_replica_exists(front):
    async def slow(request):
        await asyncio.sleep(0.5)
        return web.json_response({"served_by": "only"})

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", slow)
    await front.add((app, None), "only")
    front.members["only"] = "suspect"
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 200 and (await resp.json())["served_by"] == "only"


@pytest.mark.parametrize(
    "front",
    [ForwardConfig(request_timeout_s=60.0, first_byte_timeout_s=0.3, stall_timeout_s=60.0)],
    indirect=True,
)
async def test_a_replica_silent_past_the_first_byte_timeout_is_left_for_another(front):
    await front.add(silent_app(), "frozen", depth=0)
    await front.add(upstream_app("b"), "b", depth=5)
    resp = await asyncio.wait_for(
        front.client.post("/v1/completions", json={"model": "m"}), timeout=10
    )
    assert resp.status == 200 and (await resp.json())["served_by"] == "b"
    assert front.reported == []  # silence is not a refused connection


async def test_a_refused_connection_is_reported_to_membership(front):
    front.replicas.append(r("gone", addr=f"127.0.0.1:{free_port()}"))
    await front.add(upstream_app("b"), "b", depth=5)
    resp = await front.client.post("/v1/completions", json={"model": "m"})
    assert resp.status == 200 and front.reported == ["gone"]


def openai_upstream(name: str, words: list[str], die_after=None, chat=True):
    """A replica streaming OpenAI chunks, one word each; it can die after some."""
    seen = SimpleNamespace(bodies=[])

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.bodies.append(json.loads(await request.read()))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(words):
            if die_after is not None and i == die_after:
                # Half an event, then the connection is gone: the host died mid-write.
                await resp.write(b'data: {"choices": [{"del')
                request.transport.abort()
                return resp
            choice = {"delta": {"content": word}} if chat else {"text": word}
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", handle)
    return app, seen


def texts(events: list[str], chat=True) -> str:
    out = []
    for e in events[:-1]:
        choice = json.loads(e)["choices"][0]
        out.append(choice["delta"]["content"] if chat else choice["text"])
    return "".join(out)


async def test_a_stream_whose_host_dies_is_resumed_on_another_replica(front):
    await front.add(openai_upstream("a", ["One", " two", " three"], die_after=2), "a", depth=0)
    b = await front.add(openai_upstream("b", [" three", "."]), "b", depth=5)
    request = {**CHAT, "stream": True, "max_tokens": 10}
    resp = await front.client.post("/v1/chat/completions", json=request)
    events = await sse(resp)
    assert events[-1] == "[DONE]" and texts(events) == "One two three."
    assert not any("error" in e for e in events[:-1])
    (rest,) = b.bodies
    assert rest["messages"][-1] == {"role": "assistant", "content": "One two"}
    assert rest["continue_final_message"] is True and rest["max_tokens"] == 8
    assert front.reported == ["a"]  # the reset is direct evidence too
    assert front.forwarder.inflight() == {}


async def test_a_completion_is_resumed_from_the_prompt_plus_the_text_sent(front):
    await front.add(openai_upstream("a", ["1,", " 2,"], die_after=1, chat=False), "a", depth=0)
    b = await front.add(openai_upstream("b", [" 2,", " 3"], chat=False), "b", depth=5)
    request = {"model": "m", "prompt": "Count:", "stream": True}
    resp = await front.client.post("/v1/completions", json=request)
    events = await sse(resp)
    assert texts(events, chat=False) == "1, 2, 3" and events[-1] == "[DONE]"
    assert b.bodies[0]["prompt"] == "Count:1," and "max_tokens" not in b.bodies[0]


# ---------------------------------------------------------------- the OpenAIApi hook


class RecordingForwarder:
    def __init__(self):
        self.calls = []

    def forwardable(self, request):
        return Forwarder.forwardable(request)

    async def forward(self, request, body, model):
        self.calls.append((model, body))
        return web.json_response({"forwarded": model})

    def serves_here(self, request, body, model, engine):
        return True


@pytest.fixture
async def hooked():
    instances = {}
    forwarder = RecordingForwarder()
    metrics = Metrics()
    api = OpenAIApi(lambda: instances, metrics, 64, 5, forwarder=forwarder)
    client = TestClient(TestServer(build_app(metrics, lambda: True, [api.routes()])))
    await client.start_server()
    yield SimpleNamespace(client=client, instances=instances, forwarder=forwarder)
    await client.close()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_model_not_served_here_is_forwarded_with_the_raw_body(hooked):
    raw = json.dumps(CHAT, indent=1).encode()
    resp = await hooked.client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert (await resp.json()) == {"forwarded": "m"}
    assert hooked.forwarder.calls == [("m", raw)]


async def test_a_loading_local_instance_is_forwarded_too(hooked):
    hooked.instances["m"] = SimpleNamespace(engine=None, error="", state="loading")
    resp = await hooked.client.post("/v1/chat/completions", json=CHAT)
    assert (await resp.json()) == {"forwarded": "m"}


async def test_a_forwarded_request_is_never_forwarded_again(hooked):
    headers = {FORWARDED_HEADER: "other"}
    resp = await hooked.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert resp.status == 404
    hooked.instances["m"] = SimpleNamespace(engine=None, error="", state="pending")
    resp = await hooked.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "model_pending"
    assert hooked.forwarder.calls == []


async def test_invalid_requests_are_refused_here_not_forwarded(hooked):
    resp = await hooked.client.post("/v1/chat/completions", json={"model": "m"})
    assert resp.status == 400 and hooked.forwarder.calls == []
