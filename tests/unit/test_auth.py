"""Peer-request HMAC: signatures, refusals, replay protection, and both aiohttp middlewares."""

import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.api.app import build_app
from aivailable.metrics import Metrics
from peer.auth import (
    FORWARDED_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AuthConfig,
    AuthError,
    NonceCache,
    PeerAuth,
    derive_request_key,
    make_peer_session,
    requires_signature,
)

SECRET = b"s" * 32
OTHER_SECRET = b"t" * 32
BODY = b'{"term": 3, "entries": []}'


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def pair(clock=None, config=None):
    clock = clock or Clock()
    return PeerAuth(SECRET, config, clock), PeerAuth(SECRET, config, clock), clock


def test_key_derivation_is_deterministic_and_depends_on_the_secret():
    assert derive_request_key(SECRET) == derive_request_key(SECRET)
    assert derive_request_key(SECRET) != derive_request_key(OTHER_SECRET)
    assert len(derive_request_key(SECRET)) == 32
    assert derive_request_key(SECRET) != SECRET  # never the raw secret
    with pytest.raises(ValueError):
        derive_request_key(b"short")


def test_a_good_signature_verifies():
    sender, receiver, _ = pair()
    headers = sender.signed_headers("POST", "/raft/append?x=1", BODY)
    receiver.verify("POST", "/raft/append?x=1", headers, BODY)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/raft/append?x=1", BODY + b" "),  # tampered body
        ("POST", "/raft/append?x=2", BODY),  # tampered query
        ("POST", "/raft/vote?x=1", BODY),  # another path
        ("PUT", "/raft/append?x=1", BODY),  # another method
        ("POST", "/raft/append?x=1", b""),  # body dropped
    ],
)
def test_any_change_to_the_request_is_refused(method, path, body):
    sender, receiver, _ = pair()
    headers = sender.signed_headers("POST", "/raft/append?x=1", BODY)
    with pytest.raises(AuthError, match="bad signature"):
        receiver.verify(method, path, headers, body)


def test_another_clusters_key_is_refused():
    clock = Clock()
    stranger = PeerAuth(OTHER_SECRET, clock=clock)
    receiver = PeerAuth(SECRET, clock=clock)
    headers = stranger.signed_headers("POST", "/raft/append", BODY)
    with pytest.raises(AuthError, match="bad signature"):
        receiver.verify("POST", "/raft/append", headers, BODY)


def test_during_a_key_rotation_both_keys_are_accepted_and_the_new_one_signs():
    clock = Clock()
    old_peer = PeerAuth(OTHER_SECRET, clock=clock)
    rotating = PeerAuth(SECRET, clock=clock, also_accept=(OTHER_SECRET,))
    new_only = PeerAuth(SECRET, clock=clock)
    rotating.verify("GET", "/raft/x", old_peer.signed_headers("GET", "/raft/x"), b"")
    new_only.verify("GET", "/raft/x", rotating.signed_headers("GET", "/raft/x"), b"")
    with pytest.raises(AuthError):
        new_only.verify("GET", "/raft/x", old_peer.signed_headers("GET", "/raft/x"), b"")


def test_a_forged_signature_is_refused():
    sender, receiver, _ = pair()
    headers = sender.signed_headers("POST", "/raft/append", BODY)
    headers[SIGNATURE_HEADER] = "0" * 64
    with pytest.raises(AuthError, match="bad signature"):
        receiver.verify("POST", "/raft/append", headers, BODY)


@pytest.mark.parametrize("offset_s", [-61.0, 61.0, -3600.0])
def test_stale_or_future_timestamps_are_refused(offset_s):
    sender_clock, receiver_clock = Clock(), Clock()
    sender = PeerAuth(SECRET, clock=sender_clock)
    receiver = PeerAuth(SECRET, AuthConfig(max_skew_s=60), clock=receiver_clock)
    sender_clock.now += offset_s
    headers = sender.signed_headers("GET", "/internal/model/x", b"")
    with pytest.raises(AuthError, match="off this peer's clock"):
        receiver.verify("GET", "/internal/model/x", headers, b"")


def test_a_clock_within_the_window_is_accepted():
    sender_clock, receiver_clock = Clock(), Clock()
    sender = PeerAuth(SECRET, clock=sender_clock)
    receiver = PeerAuth(SECRET, AuthConfig(max_skew_s=60), clock=receiver_clock)
    receiver_clock.now += 120  # it started two minutes ago (see the restart tests)
    sender_clock.now += 120 - 59
    receiver.verify("GET", "/x", sender.signed_headers("GET", "/x"), b"")


def test_a_replayed_request_is_refused_even_within_the_window():
    sender, receiver, clock = pair()
    headers = sender.signed_headers("POST", "/raft/append", BODY)
    receiver.verify("POST", "/raft/append", headers, BODY)
    clock.now += 5
    with pytest.raises(AuthError, match="replayed"):
        receiver.verify("POST", "/raft/append", headers, BODY)


@pytest.mark.parametrize(
    "drop_or_change",
    [
        {TIMESTAMP_HEADER: None},
        {NONCE_HEADER: None},
        {SIGNATURE_HEADER: None},
        {TIMESTAMP_HEADER: "yesterday"},
        {NONCE_HEADER: "not hex!"},
        {NONCE_HEADER: "ab"},
    ],
)
def test_missing_or_malformed_headers_are_refused(drop_or_change):
    sender, receiver, _ = pair()
    headers = sender.signed_headers("POST", "/raft/append", BODY)
    for key, value in drop_or_change.items():
        if value is None:
            del headers[key]
        else:
            headers[key] = value
    with pytest.raises(AuthError):
        receiver.verify("POST", "/raft/append", headers, BODY)


def test_a_bad_signature_does_not_use_up_the_nonce():
    sender, receiver, _ = pair()
    good = sender.signed_headers("POST", "/raft/append", BODY)
    forged = {**good, SIGNATURE_HEADER: "f" * 64}
    with pytest.raises(AuthError):
        receiver.verify("POST", "/raft/append", forged, BODY)
    receiver.verify("POST", "/raft/append", good, BODY)


def test_the_nonce_cache_is_bounded_and_still_refuses_replays_it_dropped():
    cache = NonceCache(size=3, window_ms=60_000)
    for i, nonce in enumerate(["a1", "a2", "a3", "a4"]):
        cache.check_and_add(nonce, 1000 + i, now_ms=2000)
    assert len(cache) == 3
    # "a1" was dropped to make room; its replay is refused by the floor, not let in.
    with pytest.raises(AuthError, match="too old"):
        cache.check_and_add("a1", 1000, now_ms=2000)
    with pytest.raises(AuthError, match="replayed"):
        cache.check_and_add("a4", 1003, now_ms=2000)
    cache.check_and_add("a5", 1004, now_ms=2000)  # newer requests still pass


def test_nonces_leave_the_cache_once_out_of_the_window():
    cache = NonceCache(size=100, window_ms=1000)
    cache.check_and_add("b1", 0, now_ms=0)
    cache.check_and_add("b2", 500, now_ms=500)
    cache.check_and_add("b3", 2000, now_ms=2000)
    assert len(cache) == 1


@pytest.mark.parametrize(
    "path, headers, needed",
    [
        ("/raft/append", {}, True),
        ("/gossip/pushpull", {}, True),
        ("/internal/models/x", {}, True),
        ("/v1/chat/completions", {}, False),
        ("/v1/chat/completions", {FORWARDED_HEADER: "n1"}, True),
        ("/cluster/status", {}, False),
        ("/healthz", {}, False),
        ("/metrics", {}, False),
        ("/", {}, False),
        ("/raftish", {}, False),
    ],
)
def test_which_requests_need_a_signature(path, headers, needed):
    assert requires_signature(path, headers) is needed


# ---------------------------------------------------------------- over real HTTP


@pytest.fixture
async def peer_app():
    """A peer app with the auth middleware and routes that echo what they received."""
    auth = PeerAuth(SECRET)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"path": request.path_qs, "body": body.decode(), "method": request.method}
        )

    app = build_app(
        Metrics(),
        lambda: True,
        [
            [
                web.post("/raft/append", echo),
                web.get("/internal/model/{name}", echo),
                web.post("/v1/chat/completions", echo),
                web.get("/cluster/status", echo),
            ]
        ],
    )
    app.middlewares.append(auth.middleware)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


async def test_unsigned_peer_paths_get_a_401_json_error(peer_app):
    async with aiohttp.ClientSession() as plain:
        resp = await plain.post(peer_app.make_url("/raft/append"), data=BODY)
        assert resp.status == 401
        error = (await resp.json())["error"]
        assert error["type"] == "authentication_error" and "unsigned" in error["message"]
        resp = await plain.get(peer_app.make_url("/internal/model/smol"))
        assert resp.status == 401


async def test_client_paths_need_no_signature_but_a_forged_forward_mark_does(peer_app):
    async with aiohttp.ClientSession() as plain:
        assert (await plain.get(peer_app.make_url("/cluster/status"))).status == 200
        assert (await plain.get(peer_app.make_url("/healthz"))).status == 200
        resp = await plain.post(peer_app.make_url("/v1/chat/completions"), json={"a": 1})
        assert resp.status == 200
        resp = await plain.post(
            peer_app.make_url("/v1/chat/completions"),
            json={"a": 1},
            headers={FORWARDED_HEADER: "evil"},
        )
        assert resp.status == 401


async def test_the_signing_session_gets_through_with_every_kind_of_body(peer_app):
    async with make_peer_session(PeerAuth(SECRET)) as session:
        resp = await session.post(peer_app.make_url("/raft/append"), data=BODY)
        assert resp.status == 200 and (await resp.json())["body"] == BODY.decode()
        resp = await session.post(peer_app.make_url("/raft/append"), json={"term": 1})
        assert json.loads((await resp.json())["body"]) == {"term": 1}
        resp = await session.post(peer_app.make_url("/raft/append"), data="text body")
        assert (await resp.json())["body"] == "text body"
        resp = await session.get(peer_app.make_url("/internal/model/smol?offset=10&x=%20y"))
        assert resp.status == 200 and (await resp.json())["path"].endswith("offset=10&x=%20y")
        resp = await session.post(
            peer_app.make_url("/v1/chat/completions"),
            data=b"{}",
            headers={FORWARDED_HEADER: "n1"},
        )
        assert resp.status == 200


async def test_another_clusters_session_is_refused(peer_app):
    async with make_peer_session(PeerAuth(OTHER_SECRET)) as session:
        resp = await session.post(peer_app.make_url("/raft/append"), data=BODY)
        assert resp.status == 401
        assert "bad signature" in (await resp.json())["error"]["message"]


async def test_a_captured_request_replayed_over_http_is_refused(peer_app):
    sender = PeerAuth(SECRET)
    headers = sender.signed_headers("POST", "/raft/append", BODY)
    async with aiohttp.ClientSession() as plain:
        first = await plain.post(peer_app.make_url("/raft/append"), data=BODY, headers=headers)
        again = await plain.post(peer_app.make_url("/raft/append"), data=BODY, headers=headers)
    assert first.status == 200
    assert again.status == 401 and "replayed" in (await again.json())["error"]["message"]


async def test_a_streamed_body_cannot_be_signed_and_is_not_sent(peer_app):
    async def chunks():
        yield b"part"

    async with make_peer_session(PeerAuth(SECRET)) as session:
        with pytest.raises(TypeError, match="cannot sign"):
            await session.post(peer_app.make_url("/raft/append"), data=chunks())
