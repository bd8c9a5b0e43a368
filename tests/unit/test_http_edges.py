"""The HTTP edges every route shares: request ids (through forwarding too), the access log,
CORS, and the safe JSON body reader; over real aiohttp servers on loopback."""

import json
import logging
import re
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.api.body import MAX_BODY_BYTES, depth_exceeds, parse_json, read_json
from aivailable.api.cluster_api import ClusterApi
from aivailable.api.errors import ApiError
from aivailable.api.request_id import REQUEST_ID_HEADER, request_id
from aivailable.metrics import Metrics
from peer.forward import ForwardConfig, Forwarder, Replica
from peer.upstream import UpstreamPool

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


async def streamed(request: web.Request) -> web.StreamResponse:
    """SSE, whose headers leave before the handler returns; reports the id it was given."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    seen = request_id(request)
    await resp.write(f"data: {json.dumps({'seen': seen})}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def echo_json(request: web.Request) -> web.Response:
    return web.json_response({"got": await read_json(request)})


async def fails(request: web.Request) -> web.Response:
    raise ApiError(429, "busy", retry_after=2)


ROUTES = [
    web.post("/v1/stream", streamed),
    web.post("/echo", echo_json),
    web.get("/busy", fails),
]


@pytest.fixture
async def client():
    async with TestClient(TestServer(build_app(Metrics(), lambda: True, [ROUTES]))) as c:
        yield c


@pytest.fixture
async def cors_client():
    app = build_app(Metrics(), lambda: True, [ROUTES], cors_origins=("http://lab.example:3000",))
    async with TestClient(TestServer(app)) as c:
        yield c


# ---------------------------------------------------------------- request ids


async def test_every_response_carries_a_request_id_the_client_may_choose(client):
    for method, path in (("GET", "/healthz"), ("GET", "/busy"), ("GET", "/nope"), ("PUT", "/echo")):
        resp = await client.request(method, path)
        assert HEX_ID.match(resp.headers[REQUEST_ID_HEADER]), (method, path, resp.status)
    resp = await client.get("/healthz", headers={REQUEST_ID_HEADER: "trace-7f3a:span/1"})
    assert resp.headers[REQUEST_ID_HEADER] == "trace-7f3a:span/1"
    # One that could break a log line or a header is replaced, not echoed.
    for bad in ("x" * 129, "two words", "", "a\tb"):
        resp = await client.get("/healthz", headers={REQUEST_ID_HEADER: bad})
        assert HEX_ID.match(resp.headers[REQUEST_ID_HEADER])
    ids = {(await client.get("/healthz")).headers[REQUEST_ID_HEADER] for _ in range(5)}
    assert len(ids) == 5


async def test_a_streamed_response_carries_the_id_its_handler_saw(client):
    resp = await client.post("/v1/stream", json={})
    first = json.loads((await resp.content.readline()).decode()[len("data: ") :])
    assert first["seen"] == resp.headers[REQUEST_ID_HEADER]
    assert HEX_ID.match(first["seen"])


async def test_the_id_crosses_the_forwarding_hop_and_is_in_both_access_logs(caplog):
    """client -> front peer (Forwarder) -> replica peer: one id everywhere."""
    replica_app = build_app(Metrics(), lambda: True, [ROUTES])
    async with TestServer(replica_app) as replica, UpstreamPool() as upstream:
        forwarder = Forwarder(
            upstream,
            lambda m: [Replica("r1", f"127.0.0.1:{replica.port}", False, "ready", 0)],
            lambda m: None,
            "front",
            ForwardConfig(),
        )

        async def forward(request: web.Request) -> web.StreamResponse:
            return await forwarder.forward(request, await request.read(), "m")

        front_app = build_app(Metrics(), lambda: True, [[web.post("/v1/stream", forward)]])
        async with TestClient(TestServer(front_app)) as front:
            caplog.set_level(logging.INFO, logger="aivailable.access")
            for sent in (None, "client-chosen-id"):
                caplog.clear()
                headers = {REQUEST_ID_HEADER: sent} if sent else {}
                resp = await front.post("/v1/stream", json={}, headers=headers)
                rid = resp.headers[REQUEST_ID_HEADER]
                seen = json.loads((await resp.content.readline()).decode()[len("data: ") :])
                await resp.read()
                assert seen["seen"] == rid and (sent is None or rid == sent)
                lines = [r.getMessage() for r in caplog.records if r.name == "aivailable.access"]
                assert len(lines) == 2 and all(f"rid={rid}" in line for line in lines)
                assert any(line.endswith("replica=r1") for line in lines)  # the front's line
                assert all('"POST /v1/stream" 200' in line for line in lines)


async def test_peer_traffic_is_logged_at_debug_only(client, caplog):
    caplog.set_level(logging.DEBUG, logger="aivailable.access")
    await client.get("/healthz")
    await client.post("/echo", json=1)
    levels = {r.getMessage().split('"')[1]: r.levelno for r in caplog.records}
    assert levels == {"GET /healthz": logging.DEBUG, "POST /echo": logging.INFO}


# ---------------------------------------------------------------- CORS


async def test_cors_is_off_by_default(client):
    resp = await client.options(
        "/echo",
        headers={"Origin": "http://lab.example:3000", "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.post("/echo", json=1, headers={"Origin": "http://lab.example:3000"})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_a_listed_origin_gets_preflights_and_readable_responses(cors_client):
    origin = "http://lab.example:3000"
    resp = await cors_client.options(
        "/v1/stream",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-stainless-os"
    )
    assert "Access-Control-Allow-Credentials" not in resp.headers
    for method, path in (("POST", "/v1/stream"), ("POST", "/echo"), ("GET", "/busy")):
        resp = await cors_client.request(method, path, json={}, headers={"Origin": origin})
        assert resp.headers["Access-Control-Allow-Origin"] == origin, path
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
        await resp.read()


async def test_an_unlisted_origin_is_refused_and_gets_no_cors_headers(cors_client):
    resp = await cors_client.options(
        "/echo",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    assert "not allowed" in (await resp.json())["error"]["message"]
    resp = await cors_client.post("/echo", json=1, headers={"Origin": "http://evil.example"})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    # Asked-for headers that are not header names are never echoed.
    resp = await cors_client.options(
        "/echo",
        headers={
            "Origin": "http://lab.example:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-a, <script>",
        },
    )
    assert resp.status == 204 and "Access-Control-Allow-Headers" not in resp.headers


async def test_a_star_allows_any_origin():
    app = build_app(Metrics(), lambda: True, [ROUTES], cors_origins=("*",))
    async with TestClient(TestServer(app)) as c:
        resp = await c.options(
            "/echo", headers={"Origin": "http://a.example", "Access-Control-Request-Method": "GET"}
        )
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == (
            "http://a.example"
        )


# ---------------------------------------------------------------- the safe JSON reader


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested more than 64"),
        (b"[" * 65 + b"]" * 65, 400, "nested more than 64"),
        (b'{"a": ' * 70 + b"1" + b"}" * 70, 400, "nested more than 64"),
        (b"1" * 5000, 400, "not valid JSON"),  # more digits than Python parses
        (b'{"x": NaN}', 400, "NaN is not valid JSON"),
        (b"[Infinity]", 400, "not valid JSON"),
        (b'"\xff\xfe\xfa"', 400, "not valid JSON"),
        (b"{", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b" " * (MAX_BODY_BYTES + 1), 413, "larger than"),
    ],
)
async def test_bad_bodies_get_a_clean_4xx(client, body, status, message):
    resp = await client.post("/echo", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert message in (await resp.json())["error"]["message"]
    assert (await client.get("/healthz")).status == 200


async def test_a_chunked_body_over_the_limit_is_refused_too(client):
    async def chunks():
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b" " * (1 << 20)

    resp = await client.post("/echo", data=chunks())
    assert resp.status == 413


async def test_good_bodies_pass_unchanged(client):
    value = {"a": [1, 2.5, None, True, "é"], "b": {"c": [[[]]]}}
    assert (await (await client.post("/echo", json=value)).json()) == {"got": value}
    assert parse_json(b"[" * 64 + b"]" * 64) is not None


def test_depth_counts_containers_iteratively():
    assert not depth_exceeds(1, 0) and not depth_exceeds([], 1) and depth_exceeds([[]], 1)
    deep: list = []
    for _ in range(50_000):  # far past the recursion limit, and still no RecursionError
        deep = [deep]
    assert depth_exceeds(deep, 64) and not depth_exceeds(deep, 50_001)
    assert depth_exceeds({"a": {"b": {}}}, 2) and not depth_exceeds({"a": {"b": {}}}, 3)


# ---------------------------------------------------------------- the cluster API on it


class FakeView:
    def __init__(self):
        self.deployed = []

    def status(self) -> dict:
        return {"node_id": "n1", "leader": "n1", "term": 1, "nodes": [], "models": []}

    async def deploy(self, name, source, replicas, n_ctx, **options) -> dict:
        self.deployed.append((name, source, replicas, n_ctx))
        return {"name": name, "source": source, "replicas": replicas, "n_ctx": n_ctx}

    async def undeploy(self, name) -> bool:
        return False


@pytest.fixture
async def cluster():
    view = FakeView()
    downloads = [{"source": "org/r/m.gguf", "file": "m.gguf", "done": 5, "total": 9}]
    api = ClusterApi(view, downloads=lambda: downloads)
    async with TestClient(TestServer(build_app(Metrics(), lambda: True, [api.routes()]))) as c:
        yield SimpleNamespace(client=c, view=view)


async def test_cluster_status_lists_downloads_in_progress(cluster):
    body = await (await cluster.client.get("/cluster/status")).json()
    assert body["node_id"] == "n1"
    assert body["downloads"] == [
        {"source": "org/r/m.gguf", "file": "m.gguf", "done": 5, "total": 9}
    ]


async def test_deploy_takes_remote_sources_and_refuses_malformed_ones(cluster):
    resp = await cluster.client.post("/cluster/models", json={"source": "hf://org/Repo:Q8_0"})
    assert resp.status == 202
    assert cluster.view.deployed == [("Repo:Q8_0", "hf://org/Repo:Q8_0", 1, 2048)]
    for source in ("hf://org/../x.gguf", "hf://org", "https://h.example/m.bin"):
        resp = await cluster.client.post("/cluster/models", json={"source": source})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "source"
    resp = await cluster.client.post("/cluster/models", data=b"[" * 100_000)
    assert resp.status == 400
    assert len(cluster.view.deployed) == 1


def test_cors_origins_come_from_flags_environment_and_toml(tmp_path):
    from aivailable import cli
    from aivailable.config import load_config

    args = cli.build_parser().parse_args(
        ["up", "--cors-origin", "http://a:1", "--cors-origin", "*"]
    )
    assert load_config(cli._up_overrides(args), environ={}).cors_origins == ("http://a:1", "*")
    env = {"AIVAILABLE_CORS_ORIGINS": "http://a:1, http://b"}
    assert load_config(environ=env).cors_origins == ("http://a:1", "http://b")
    toml = tmp_path / "p.toml"
    toml.write_text('cors-origins = ["http://c"]\n')
    assert load_config(toml_path=toml, environ={}).cors_origins == ("http://c",)
    assert load_config(environ={}).cors_origins == ()  # off by default
