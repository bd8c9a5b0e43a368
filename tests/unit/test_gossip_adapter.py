"""The asyncio Gossip adapter in one process: real UDP and HTTP on loopback, no mDNS."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.local_peers import free_port
from peer import wire
from peer.config import GossipConfig
from peer.crypto import Envelope, Keyring
from peer.gossip import Gossip, parse_host_port
from peer.messages import RAFT_CHANNEL, Alive, AppData, Ping
from peer.transport import UdpTransport, split_into_datagrams

SECRET = b"s" * 32
FAST = GossipConfig(probe_interval=0.2, probe_timeout=0.08, gossip_interval=0.05)


@contextlib.asynccontextmanager
async def cluster(specs):
    """specs: list of (name, secret, seed names). Yields {name: Gossip}."""
    ports = {name: free_port() for name, _, _ in specs}
    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
        nodes, runners, tasks = {}, [], []
        for name, secret, seeds in specs:
            g = Gossip(
                FAST, name, "127.0.0.1", ports[name], Keyring.from_secret(secret), session,
                seeds=[f"127.0.0.1:{ports[s]}" for s in seeds], payload={"gpus": [name]},
            )  # fmt: skip
            app = web.Application()
            app.add_routes(g.routes())
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", ports[name]).start()
            runners.append(runner)
            nodes[name] = g
            tasks.append(tg.create_task(g.run()))
        try:
            yield nodes
        finally:
            for t in tasks:
                t.cancel()
            for r in runners:
                await r.cleanup()


async def eventually(predicate, within=5.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return False


def drain(subscription) -> list:
    out = []
    while not subscription._queue.empty():
        out.append(subscription._queue.get_nowait())
    return out


def states(g: Gossip) -> dict[str, str]:
    return {m.id: m.state for m in g.members()}


async def test_nodes_join_through_seeds_and_share_payloads_and_events():
    specs = [("a", SECRET, []), ("b", SECRET, ["a"]), ("c", SECRET, ["b"])]
    async with cluster(specs) as nodes:
        events = nodes["a"].subscribe()
        all_alive = {"a": "alive", "b": "alive", "c": "alive"}
        assert await eventually(lambda: all(states(g) == all_alive for g in nodes.values()))
        nodes["c"].set_payload({"gpus": ["c", "new"]})

        def a_sees_new_payload():
            return any(
                m.id == "c" and m.payload == {"gpus": ["c", "new"]} for m in nodes["a"].members()
            )

        assert await eventually(a_sees_new_payload)
        kinds = {(ev.kind, ev.member.id) for ev in drain(events)}
        assert {("joined", "b"), ("joined", "c"), ("payload", "c")} <= kinds
        await nodes["b"].leave()
        assert await eventually(lambda: states(nodes["a"])["b"] == "left")
        assert ("dead", "b") not in {(e.kind, e.member.id) for e in drain(events)}
        assert nodes["a"].metrics_snapshot()["transport_rejected_bad_key"] == 0


async def test_a_node_with_another_secret_is_never_admitted():
    specs = [("a", SECRET, []), ("b", SECRET, ["a"]), ("x", b"w" * 32, ["a"])]
    async with cluster(specs) as nodes:
        assert await eventually(lambda: states(nodes["a"]).get("b") == "alive")
        assert await eventually(lambda: nodes["a"].metrics.push_pull_refused >= 1)
        await asyncio.sleep(0.5)
        assert "x" not in states(nodes["a"]) and "x" not in states(nodes["b"])
        assert set(states(nodes["x"])) == {"x"}
        assert nodes["x"].metrics.push_pull_failed >= 1


def test_bind_all_without_an_advertised_address_is_refused():
    with pytest.raises(ValueError):
        Gossip(GossipConfig(), "n", "0.0.0.0", 1, Keyring.from_secret(SECRET), None)
    assert parse_host_port("[::1]:7946") == ("::1", 7946)
    with pytest.raises(ValueError):
        parse_host_port("nohost")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 900), min_size=1, max_size=12))
def test_split_datagrams_fit_and_keep_every_message(sizes):
    msgs = [Alive(f"n{i}", i, "h", 1, {"p": "x" * s}) for i, s in enumerate(sizes)]
    limit = 1400 - wire.ENVELOPE_OVERHEAD
    out = split_into_datagrams(msgs, limit)
    assert all(0 < len(d) <= limit for d in out)
    assert [m for d in out for m in wire.decode_packet(d)] == msgs


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500), st.booleans())
def test_the_socket_handler_survives_any_datagram(data, sealed):
    env = Envelope(Keyring.from_secret(SECRET), 120)
    got = []
    t = UdpTransport(env, 1400, lambda h, p, m: got.append(m))
    if sealed:  # authentic envelope around garbage: reaches the decoder
        data = env.seal(data, time.time())
    t.datagram_received(data, ("127.0.0.1", 9))
    m = t.metrics
    rejected = (
        m.rejected_bad_key + m.rejected_tampered + m.rejected_replay + m.rejected_malformed
        + m.rejected_oversize
    )  # fmt: skip
    assert rejected + len(got) == 1  # every datagram is either delivered or counted


def test_a_real_packet_is_delivered_to_the_core():
    env = Envelope(Keyring.from_secret(SECRET), 120)
    got = []
    t = UdpTransport(env, 1400, lambda h, p, m: got.append((h, p, m)))
    t.datagram_received(env.seal(wire.encode_packet([Ping(1, "a", "b")]), time.time()), ("h", 5))
    assert got == [("h", 5, [Ping(1, "a", "b")])]


async def test_app_datagrams_reach_the_channel_handler_of_the_member_and_never_the_core():
    specs = [("a", SECRET, []), ("b", SECRET, ["a"]), ("x", b"x" * 32, ["a"])]
    async with cluster(specs) as nodes:
        got: list[bytes] = []
        nodes["b"].on_datagram(RAFT_CHANNEL, got.append)
        assert await eventually(lambda: states(nodes["a"]).get("b") == "alive")
        received = nodes["b"].transport.metrics.packets_received
        assert nodes["a"].send_datagram("b", RAFT_CHANNEL, b"beat")
        assert nodes["a"].send_datagram("b", 99, b"no handler there")  # dropped there
        assert await eventually(lambda: got == [b"beat"])
        assert nodes["a"].transport.metrics.app_packets_sent == 2
        assert nodes["b"].transport.metrics.packets_received >= received + 2
        # No route: a member gossip does not know, one of another cluster, a body too big.
        assert not nodes["a"].send_datagram("nobody", RAFT_CHANNEL, b"beat")
        assert not nodes["a"].send_datagram("x", RAFT_CHANNEL, b"beat")
        assert not nodes["a"].send_datagram("b", RAFT_CHANNEL, b"z" * (wire.MAX_APP_BODY + 1))
        # Sealed with another key, a datagram to b's port never reaches the handler.
        stranger = nodes["x"]
        stranger.transport.send_app("127.0.0.1", nodes["b"].port, AppData(RAFT_CHANNEL, b"forged"))
        assert await eventually(lambda: nodes["b"].transport.metrics.rejected_bad_key > 0)
        assert got == [b"beat"]


async def test_the_clock_wakes_for_a_changed_payload_but_not_for_an_unchanged_one():
    specs = [("a", SECRET, []), ("b", SECRET, ["a"])]
    async with cluster(specs) as nodes:
        a, b = nodes["a"], nodes["b"]
        assert await eventually(lambda: states(a).get("b") == "alive")
        before = a.metrics.clock_wakeups
        for _ in range(200):  # what the node's publish loop does when nothing changed
            a.set_payload({"gpus": ["a"]})
            await asyncio.sleep(0)
        # Only its own deadlines (probes every 0.2 s) woke it meanwhile, not 200 sets.
        assert a.metrics.clock_wakeups - before < 50
        a.set_payload({"gpus": ["a", "new"]})  # queues a broadcast: the next round sends it
        assert await eventually(lambda: b.core.member("a").payload == {"gpus": ["a", "new"]})
