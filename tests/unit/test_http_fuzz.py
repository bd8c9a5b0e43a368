"""Fuzzing the HTTP surface (OpenAI and cluster routes) with hypothesis: whatever a client
sends, the answer is never a 5xx, always carries a request id, and the peer stays healthy.

The peer is the real app (build_app with OpenAIApi over a FakeEngine and ClusterApi over a
stand-in view) on a real socket; its event loop runs in a thread so hypothesis drives it
from an ordinary test.
"""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aivailable.api.app import build_app
from aivailable.api.cluster_api import ClusterApi
from aivailable.api.ollama_api import OllamaApi
from aivailable.api.openai_api import OpenAIApi
from aivailable.api.request_id import REQUEST_ID_HEADER
from aivailable.api.responses_api import ResponsesApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.metrics import Metrics
from tests.unit.test_http_edges import FakeView

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def peer():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-peer", daemon=True)
    thread.start()

    def run(coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def start():
        engine = FakeEngine("fake", reply="one two three four", queue_limit=4)
        await engine.start()
        instances = {"fake": SimpleNamespace(engine=engine, error="", state="ready")}
        metrics = Metrics()
        openai = OpenAIApi(lambda: instances, metrics, max_tokens_limit=64, request_timeout_s=5)
        cluster = ClusterApi(FakeView(), downloads=list)
        ollama = OllamaApi(openai)
        responses = ResponsesApi(openai, metrics, 5, "n1")
        app = build_app(
            metrics,
            lambda: True,
            [openai.routes(), ollama.routes(), responses.routes(), cluster.routes()],
            cors_origins=("http://lab.example",),
        )
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        return SimpleNamespace(
            engine=engine, server=server, session=aiohttp.ClientSession(), url=server.make_url("")
        )

    state = run(start())
    yield SimpleNamespace(run=run, **vars(state))

    async def stop():
        await state.session.close()
        await state.server.close()
        await state.engine.stop()

    run(stop())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def send(peer, method: str, path: str, body: bytes | None, headers: dict) -> tuple:
    url = peer.url.with_path(path, encoded=True)
    async with peer.session.request(method, url, data=body, headers=headers) as resp:
        text = await resp.read()  # a stream too, to its end
        return resp.status, resp.headers.get(REQUEST_ID_HEADER), text


# ---------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | values,
        "content": st.text(max_size=60) | values,
        "name": values,
    },
)
openai_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["fake", "absent"]) | values},
    optional={
        "messages": st.lists(message, max_size=4) | values,
        "prompt": st.text(max_size=60) | values,
        "max_tokens": st.integers(-3, 10**7) | values,
        "stream": st.booleans() | values,
        "stream_options": st.fixed_dictionaries({"include_usage": values}) | values,
        "temperature": st.floats(-5, 5) | values,
        "top_p": values,
        "stop": st.lists(st.text(max_size=5), max_size=5) | values,
        "seed": values,
        "n": values,
    },
)
input_item = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["message", "function_call", "function_call_output", "x"]) | values,
        "role": st.sampled_from(["user", "assistant", "developer", "robot"]) | values,
        "content": st.text(max_size=40)
        | st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": values}))
        | values,
        "call_id": values,
        "name": values,
        "arguments": st.text(max_size=20) | values,
        "output": values,
    },
)
responses_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["fake", "absent"]) | values},
    optional={
        "input": st.text(max_size=60) | st.lists(input_item, max_size=4) | values,
        "instructions": st.text(max_size=20) | values,
        "stream": st.booleans() | values,
        "max_output_tokens": st.integers(-3, 10**7) | values,
        "tools": st.lists(
            st.fixed_dictionaries({"type": st.just("function"), "name": values}), max_size=2
        )
        | values,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | values,
        "text": st.fixed_dictionaries({"format": values}) | values,
        "previous_response_id": st.sampled_from(["resp_6e31_x", "resp_zz_y"]) | values,
        "store": values,
        "metadata": values,
        "temperature": values,
    },
)
deploy_body = st.fixed_dictionaries(
    {},
    optional={
        "source": st.sampled_from(
            [
                "builtin:smollm2-135m",
                "builtin:nope",
                "hf://org/R:Q4_0",
                "hf://o/../x.gguf",
                "x.gguf",
            ]
        )
        | values,
        "name": st.text(max_size=140) | values,
        "replicas": st.integers(-2, 100) | values,
        "n_ctx": st.integers(0, 10**6) | values,
    },
)


def nested(depth: int, opener: bytes = b"[") -> bytes:
    closer = b"]" if opener == b"[" else b"}"
    return (opener if opener == b"[" else b'{"a":') * depth + b"1" + closer * depth


bodies = st.one_of(
    openai_body.map(json.dumps).map(str.encode),
    responses_body.map(json.dumps).map(str.encode),
    deploy_body.map(json.dumps).map(str.encode),
    values.map(json.dumps).map(str.encode),
    st.binary(max_size=200),
    st.sampled_from([b"NaN", b'{"model": Infinity}', b"\xff\xfe", b""]),
)
# Bodies that make json.loads itself fail (RecursionError, ValueError past 4300 digits) go
# only to routes that read through aivailable/api/body.py: the cluster and OpenAI routes.
hostile_bodies = st.one_of(
    st.builds(nested, st.integers(30, 200_000), st.sampled_from([b"[", b"{"])),
    st.integers(4301, 20_000).map(lambda n: b"7" * n),
)
SAFE_READER_ROUTES = [
    ("POST", "/cluster/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
]
ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/fake"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_6e31_x"),
    ("DELETE", "/v1/responses/resp_zz"),
    ("POST", "/cluster/models"),
    ("DELETE", "/cluster/models/fake"),
    ("GET", "/cluster/status"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("POST", "/api/show"),
    ("GET", "/api/tags"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]
odd_paths = st.text(st.sampled_from("abcz019-_.~%/:@!$&'()*+,;="), min_size=0, max_size=30).map(
    lambda tail: "/" + tail
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded"]
        ),
        REQUEST_ID_HEADER: st.text(
            st.characters(min_codepoint=33, max_codepoint=126), max_size=200
        ),
        "Origin": st.sampled_from(["http://lab.example", "http://evil.example", "null"]),
        "Access-Control-Request-Method": st.sampled_from(["POST", "GET", "BREW"]),
        "Access-Control-Request-Headers": st.text(
            st.characters(min_codepoint=32, max_codepoint=126), max_size=60
        ),
    },
)
requests = st.one_of(
    st.tuples(st.sampled_from(ROUTES), bodies, headers),
    st.tuples(st.sampled_from(SAFE_READER_ROUTES), hostile_bodies, headers),
    st.tuples(
        st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]), odd_paths),
        bodies,
        headers,
    ),
)


def test_fuzzed_requests_never_get_a_5xx_and_the_peer_stays_healthy(peer):
    @settings(
        max_examples=250,
        deadline=None,
        database=None,  # nothing written into the repo
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests)
    def never_a_5xx(request):
        (method, path), body, hdrs = request
        status, rid, _ = peer.run(send(peer, method, path, body, hdrs))
        assert status < 500, (method, path, body[:200], hdrs)
        assert rid, "every response carries a request id"

    never_a_5xx()
    status, _, text = peer.run(send(peer, "GET", "/healthz", None, {}))
    assert status == 200
    status, _, text = peer.run(
        send(peer, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(), {})
    )
    assert status == 200
    assert json.loads(text)["choices"][0]["message"]["content"] == "one two three"
    assert peer.engine.queue_depth == 0
