"""The edge of a peer in-process: API keys, roles, model scopes, limits, /cluster/keys, body
limits, and peer signatures that name their target, all checked before a body is read."""

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.access.config import AccessConfig
from aivailable.access.guard import AccessGuard, body_limits, usage_metrics
from aivailable.access.keys_api import KeysApi, bootstrap_admin_key
from aivailable.access.limits import RateLimiter
from aivailable.api.app import build_app
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster import keys as k
from aivailable.cluster.state import ClusterState
from aivailable.metrics import Metrics
from peer.auth import Identity, PeerAuth

SECRET = b"s" * 32
HI = [{"role": "user", "content": "hi"}]
LIMITS = AccessConfig(max_body_bytes=64 << 10, max_peer_body_bytes=64 << 10)


class Clock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def stub_routes(seen: list) -> list[web.RouteDef]:
    async def status(request):
        return web.json_response({"node_id": "n1"})

    async def raft(request):
        seen.append(await request.read())
        return web.json_response({"ok": True})

    return [
        web.get("/cluster/status", status),
        web.post("/raft/messages", raft),
    ]


class Peer:
    """An app with the real middlewares and /cluster/keys over a ClusterState."""

    def __init__(self, enabled=True, clock=None, port=0):
        self.caught_up = True  # what the guard asks: is this peer's state current?
        self.clock = clock or Clock()
        self.state = ClusterState()
        self.limiter = RateLimiter()
        self.seen: list = []
        self.metrics = Metrics()
        self.identity = Identity(port, frozenset({"127.0.0.1"}))
        self.peer_auth = PeerAuth(SECRET, clock=self.clock, identity=self.identity)

        async def propose(data: bytes) -> int:
            assert self.state.apply(k.stamp(data)).ok
            return 1

        self.propose = propose
        access = lambda: self.state.access  # noqa: E731
        guard = AccessGuard(
            enabled, access, self.limiter, self.clock, caught_up=lambda: self.caught_up
        )
        keys_api = KeysApi(access, propose, self.limiter, self.clock)
        # The real OpenAI API over fake engines: the guard decides from its typed requests.
        self.engines = {name: FakeEngine(name) for name in ("a", "b")}
        instances = {
            name: SimpleNamespace(engine=e, error="", state="ready")
            for name, e in self.engines.items()
        }
        openai = OpenAIApi(lambda: instances, self.metrics, 64, 5, gate=guard)
        refresh = usage_metrics(self.metrics.registry, self.limiter, access)
        self.app = build_app(
            self.metrics,
            lambda: True,
            [stub_routes(self.seen), openai.routes(), keys_api.routes()],
            on_scrape=refresh,
            middlewares=[body_limits(LIMITS, 1 << 20), self.peer_auth.middleware, guard.middleware],
        )

    def add_key(self, role="user", **fields) -> tuple[str, k.KeyRecord]:
        secret = k.new_secret()
        record = k.KeyRecord(k.new_key_id(), k.hash_secret(secret), role, **fields)
        assert self.state.apply(k.encode_key_create(record)).ok
        return secret, record


@pytest.fixture
async def serve():
    servers = []

    async def start(peer: Peer, port: int = 0) -> str:
        for engine in peer.engines.values():
            await engine.start()
        server = TestServer(peer.app, port=port)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


async def call(method, url, headers=None, **kw):
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, **kw) as resp,
    ):
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text  # /metrics, the page
        return resp.status, body, resp.headers


async def test_without_a_key_only_health_and_the_page_are_open(serve):
    base = await serve(Peer())
    for path in ("/v1/models", "/cluster/status", "/metrics", "/cluster/keys"):
        status, body, headers = await call("GET", base + path)
        assert status == 401, path
        assert body["error"]["code"] == "invalid_api_key"
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await call("GET", base + "/v1/models", bearer("definitely-wrong"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert (await call("GET", base + "/healthz"))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(base + "/") as resp:
        assert resp.status == 200


async def test_auth_off_leaves_everything_open(serve):
    base = await serve(Peer(enabled=False))
    assert (await call("GET", base + "/cluster/status"))[0] == 200
    assert (await call("GET", base + "/v1/models"))[0] == 200


async def test_roles_and_model_scopes(serve):
    peer = Peer()
    base = await serve(peer)
    user, _ = peer.add_key("user", models=("a",))
    metrics, _ = peer.add_key("metrics")
    admin, _ = peer.add_key("admin")
    # x-api-key works as well as Bearer.
    status, listing, _ = await call("GET", base + "/v1/models", {"x-api-key": user})
    assert status == 200 and [m["id"] for m in listing["data"]] == ["a"]
    status, body, _ = await call("GET", base + "/v1/models/b", bearer(user))
    assert status == 404 and body["error"]["code"] == "model_not_found"  # hidden
    status, body, _ = await call("GET", base + "/cluster/status", bearer(user))
    assert status == 403 and body["error"]["type"] == "permission_error"
    status, body, _ = await call(
        "POST", base + "/v1/chat/completions", bearer(user), json={"model": "b", "messages": HI}
    )
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert peer.engines["b"].requests == []  # the engine never ran
    status, _, _ = await call(
        "POST", base + "/v1/chat/completions", bearer(user), json={"model": "a", "messages": HI}
    )
    assert status == 200 and len(peer.engines["a"].requests) == 1
    assert (await call("GET", base + "/v1/models", bearer(metrics)))[0] == 403
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics", headers=bearer(metrics)) as r:
        assert r.status == 200
        text = await r.text()
    assert "aivailable_api_key_requests" in text and "aivailable_api_key_tokens" in text
    for path in ("/cluster/status", "/v1/models", "/metrics"):
        assert (await call("GET", base + path, bearer(admin)))[0] == 200


async def test_rpm_limit_answers_429_with_retry_after(serve):
    peer = Peer()
    base = await serve(peer)
    user, record = peer.add_key("user", rpm=2)
    for _ in range(2):
        assert (await call("GET", base + "/v1/models", bearer(user)))[0] == 200
    status, body, headers = await call("GET", base + "/v1/models", bearer(user))
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    peer.clock.now += 61
    assert (await call("GET", base + "/v1/models", bearer(user)))[0] == 200


async def test_tpm_counts_the_tokens_of_answers(serve):
    peer = Peer()
    base = await serve(peer)
    user, record = peer.add_key("user", tpm=50)
    chat = {"model": "a", "messages": HI}
    charged = []
    for _ in range(50):
        status, body, headers = await call(
            "POST", base + "/v1/chat/completions", bearer(user), json=chat
        )
        if status == 429:
            break
        assert status == 200
        charged.append(body["usage"]["total_tokens"])
    assert status == 429 and "Retry-After" in headers
    # The engine's counts, answer by answer, until they reached the key's 50.
    assert peer.limiter.tokens[record.id] == sum(charged) >= 50 > sum(charged[:-1])


async def test_keys_are_created_listed_used_and_revoked_over_http(serve):
    peer = Peer()
    base = await serve(peer)
    admin, _ = peer.add_key("admin")
    status, created, _ = await call(
        "POST",
        base + "/cluster/keys",
        bearer(admin),
        json={"role": "user", "models": "a,b", "rpm": 10, "expires": "30d", "name": "lab"},
    )
    assert status == 201 and created["key"].startswith("aiv-")
    assert created["models"] == ["a", "b"] and created["rpm"] == 10 and created["expires"]
    assert (await call("GET", base + "/v1/models", bearer(created["key"])))[0] == 200
    status, listing, _ = await call("GET", base + "/cluster/keys", bearer(admin))
    mine = next(x for x in listing["data"] if x["id"] == created["id"])
    assert "key" not in mine and "hash" not in mine and mine["requests_1m"] == 1
    assert created["key"] not in json.dumps(listing)
    status, _, _ = await call("DELETE", base + f"/cluster/keys/{created['id']}", bearer(admin))
    assert status == 200
    assert (await call("GET", base + "/v1/models", bearer(created["key"])))[0] == 401
    assert (await call("DELETE", base + "/cluster/keys/ffffffffffff", bearer(admin)))[0] == 404
    # A user key cannot make keys.
    user, _ = peer.add_key("user")
    assert (await call("POST", base + "/cluster/keys", bearer(user), json={}))[0] == 403
    for bad in ({"role": "root"}, {"rpm": -1}, {"expires": "yesterday"}, {"models": [1]}):
        assert (await call("POST", base + "/cluster/keys", bearer(admin), json=bad))[0] == 400


async def test_an_expired_key_is_refused(serve):
    peer = Peer()
    base = await serve(peer)
    user, _ = peer.add_key("user", expires_ms=int(peer.clock.now * 1000) + 5000)
    assert (await call("GET", base + "/v1/models", bearer(user)))[0] == 200
    peer.clock.now += 5
    assert (await call("GET", base + "/v1/models", bearer(user)))[0] == 401


async def test_a_peer_catching_up_answers_an_unknown_key_with_503_not_401(serve):
    """A peer restarted from its data dir replays its log before its key set is current
    (tests/chaos/test_jepsen.py saw the admin key refused as 'revoked' right after a
    kill -9 and restart): until it caught up, "try again", not "your key is wrong"."""
    peer = Peer()
    base = await serve(peer)
    admin, _ = peer.add_key("admin")
    peer.caught_up = False
    assert (await call("GET", base + "/v1/models", bearer(admin)))[0] == 200  # known: served
    status, body, headers = await call("GET", base + "/v1/models", bearer(k.new_secret()))
    assert status == 503 and body["error"]["code"] == "catching_up" and headers["Retry-After"]
    peer.caught_up = True
    assert (await call("GET", base + "/v1/models", bearer(k.new_secret())))[0] == 401


async def raw_request(base: str, head: str, body_bytes: int) -> bytes:
    """Send headers that announce a huge body, then only `body_bytes` of it: the answer must
    come without the peer waiting for (or reading) the rest."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + b"x" * body_bytes)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


@pytest.mark.parametrize(
    "path, extra, length, expected",
    [
        ("/raft/messages", "", 200 << 20, b" 413 "),  # over even the snapshot limit
        ("/raft/messages", "", 1 << 20, b" 401 "),  # within it, but unsigned
        ("/v1/chat/completions", "", 200 << 20, b" 413 "),
        ("/v1/chat/completions", "", 60 << 10, b" 401 "),  # no API key
        ("/v1/chat/completions", "Authorization: Bearer {admin}\r\n", 200 << 20, b" 413 "),
    ],
)
async def test_big_bodies_are_refused_before_they_are_read(serve, path, extra, length, expected):
    peer = Peer()
    base = await serve(peer)
    admin, _ = peer.add_key("admin")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{extra.format(admin=admin)}Content-Length: {length}\r\n\r\n"
    )
    status_line = await raw_request(base, head, 1024)
    assert expected in status_line.split(b"\r\n")[0]
    assert peer.seen == [] and all(not e.requests for e in peer.engines.values())


async def test_a_chunked_body_over_the_route_limit_is_refused(serve):
    peer = Peer()
    base = await serve(peer)
    admin, _ = peer.add_key("admin")

    async def chunks():
        for _ in range(200):
            yield b"x" * 1024

    status, _, _ = await call("POST", base + "/v1/chat/completions", bearer(admin), data=chunks())
    assert status == 413


async def test_signed_requests_name_their_peer_and_die_with_a_restart(serve, unused_tcp_port):
    clock = Clock()
    peer = Peer(clock=clock, port=unused_tcp_port)
    base = await serve(peer, unused_tcp_port)
    sender = PeerAuth(SECRET, clock=clock)
    body = b'{"term": 1}'
    target = f"127.0.0.1:{unused_tcp_port}"
    clock.now += 1
    good = sender.signed_headers("POST", "/raft/messages", body, target)
    assert (await call("POST", base + "/raft/messages", good, data=body))[0] == 200
    # The same capture again, to this peer: a replay.
    status, err, _ = await call("POST", base + "/raft/messages", good, data=body)
    assert status == 401 and "replayed" in err["error"]["message"]
    # Signed for another peer (another port of this machine, another machine).
    for other in (f"127.0.0.1:{unused_tcp_port + 1}", f"10.9.9.9:{unused_tcp_port}"):
        headers = sender.signed_headers("POST", "/raft/messages", body, other)
        status, err, _ = await call("POST", base + "/raft/messages", headers, data=body)
        assert status == 401 and "another peer" in err["error"]["message"]
    # Captured before a restart, sent to the restarted peer (fresh nonce cache): refused.
    captured = sender.signed_headers("POST", "/raft/messages", body, target)
    clock.now += 2
    restarted = Peer(clock=clock, port=unused_tcp_port)
    base2 = await serve(restarted)
    status, err, _ = await call("POST", base2 + "/raft/messages", captured, data=body)
    assert status == 401 and "before this peer started" in err["error"]["message"]
    assert len(peer.seen) == 1 and restarted.seen == []


async def test_the_first_admin_key_is_written_0600_and_committed_once(tmp_path):
    peer = Peer()
    lines: list[str] = []
    path = tmp_path / "admin.key"
    peer.state.cluster_id = "c1"
    await bootstrap_admin_key(
        path, lambda: peer.state.access, lambda: True, peer.propose, lines.append
    )
    assert path.stat().st_mode & 0o777 == 0o600
    secret = path.read_text().strip()
    assert peer.state.access.lookup(secret, 0).role == "admin"
    assert str(path) in lines[0]
    # Once done, a restart (or another peer) leaves it alone.
    await bootstrap_admin_key(path, lambda: peer.state.access, lambda: True, peer.propose, print)
    assert len(peer.state.access.keys) == 1


async def test_a_peer_that_loses_the_bootstrap_race_removes_its_file(tmp_path):
    peer = Peer()
    _, first = peer.add_key("admin")  # as plain key, so bootstrapped is still False

    async def racing_propose(data: bytes) -> int:
        peer.state.apply(k.encode_key_create(k.KeyRecord(k.new_key_id(), "f" * 64, "admin"), True))
        return await peer.propose(data)

    path = tmp_path / "admin.key"
    lines: list[str] = []
    await bootstrap_admin_key(
        path, lambda: peer.state.access, lambda: True, racing_propose, lines.append
    )
    assert not path.exists() and lines == []
    assert peer.state.access.bootstrapped and len(peer.state.access.keys) == 2


def test_this_machine_is_known_by_its_names_at_its_port():
    import socket

    from peer.auth import machine_identity

    me = machine_identity(8000, "0.0.0.0", "10.0.0.5")
    for target in ("127.0.0.1:8000", "localhost:8000", "10.0.0.5:8000"):
        assert me.is_me(target), target
    assert me.is_me(f"{socket.gethostname().lower()}:8000")
    assert not me.is_me("127.0.0.1:8001") and not me.is_me("192.0.2.7:8000")
    assert not me.is_me("0.0.0.0:8000") and not me.is_me("")
