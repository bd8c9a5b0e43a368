"""Routing between real aiohttp peers on loopback (issue 22): no refusal while a slot is free
anywhere, and a conversation's turns on one replica whichever peer they enter through.

The peers are built as in test_forward_peers.py (OpenAIApi, forwarder, peer auth); their
gossip view carries each instance's free slots as the real view does.
"""

import asyncio
import dataclasses

import aiohttp
import pytest

from aivailable.backends.fake_engine import FakeEngine
from peer.availability import Replica
from peer.forward import REPLICA_HEADER
from tests.integration.test_forward_peers import REPLY, Peer, wait_for


class GossipingPeer(Peer):
    frozen_view: list[Replica] | None = None  # what gossip last said, not updated

    def replicas_of(self, model: str) -> list[Replica]:
        if self.frozen_view is not None:
            return self.frozen_view
        out = []
        for peer in [self, *self.cluster]:
            inst = peer.instances.get(model)
            if inst is not None:
                e = inst.engine
                out.append(
                    Replica(
                        peer.name,
                        peer.addr,
                        peer is self,
                        e.state,
                        e.queue_depth,
                        free_slots=e.free_slots,
                    )
                )
        return out


# Both affinity rules keep these properties; affinity_bounded's full home under the load
# bound may refuse, and then the entry peer's own free slot serves (the fallback).
@pytest.fixture(params=["affinity", "affinity_bounded"])
async def pair(request):
    a, b = GossipingPeer("a"), GossipingPeer("b")
    for peer in (a, b):
        peer.forwarder._config = dataclasses.replace(peer.forwarder._config, routing=request.param)
        await peer.start()
    a.cluster, b.cluster = [b], [a]
    yield a, b
    for peer in (a, b):
        await peer.close()


def long_for_holders(request) -> str:
    # A holder's answer lasts the whole test (50 tokens, 0.1 s apart); the others' is short.
    text = request.messages[-1]["content"]
    return " ".join(["w"] * 50) if text.startswith(("hold", "long")) else REPLY


def one_slot(**kwargs) -> FakeEngine:
    # One slot and no queue: a second request here is refused with 429.
    return FakeEngine("smol", reply=long_for_holders, parallel=1, queue_limit=1, **kwargs)


def convo(*turns: str) -> dict:
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"model": "smol", "messages": messages}


async def hold_slot(session, peer, engine):
    """A slow stream that keeps `engine`'s one slot busy; served by `peer` itself."""
    resp = await session.post(
        peer.url + "/v1/chat/completions", json={**convo("long one"), "stream": True}
    )
    assert resp.status == 200, await resp.text()
    await wait_for(lambda: engine.queue_depth == 1)
    return resp


async def test_a_full_replica_peer_forwards_to_the_free_one_and_429_only_when_all_are_full(pair):
    a, b = pair
    ea = await a.serve(one_slot(token_delay=0.1))
    eb = await b.serve(one_slot(token_delay=0.1))
    async with aiohttp.ClientSession() as session:
        # Fill a's slot: a request entering at a whose prefix prefers b is sent there,
        # so ask until a's own engine holds one.
        holder = None
        for i in range(20):
            resp = await session.post(
                a.url + "/v1/chat/completions", json={**convo(f"hold {i}"), "stream": True}
            )
            if ea.queue_depth == 1 and REPLICA_HEADER not in resp.headers:
                holder = resp
                break
            await resp.read()
        assert holder is not None, "no conversation preferred a's own replica"
        # a is full, b is free: served by b, not refused.
        resp = await session.post(a.url + "/v1/chat/completions", json=convo("hello"))
        assert resp.status == 200, await resp.text()
        assert resp.headers[REPLICA_HEADER] == "b"
        assert (await resp.json())["choices"][0]["message"]["content"] == REPLY
        # Both full: now, and only now, the model is saturated.
        other = await hold_slot(session, b, eb)
        resp = await session.post(a.url + "/v1/chat/completions", json=convo("hello"))
        assert resp.status == 429, await resp.text()
        assert (await resp.json())["error"]["code"] == "queue_full"
        holder.close()
        other.close()


async def test_a_conversation_stays_on_one_replica_from_either_peer_and_moves_when_full(pair):
    a, b = pair
    engines = {"a": await a.serve(FakeEngine("smol", reply=REPLY, parallel=2)), "b": None}
    engines["b"] = await b.serve(FakeEngine("smol", reply=REPLY, parallel=2))
    async with aiohttp.ClientSession() as session:

        async def served_by(entry, body) -> str:
            resp = await session.post(entry.url + "/v1/chat/completions", json=body)
            assert resp.status == 200
            await resp.read()
            return resp.headers.get(REPLICA_HEADER, entry.name)

        turns = ["hi", REPLY, "more", REPLY, "again"]
        for c in range(6):
            homes = {
                await served_by(entry, convo(f"conversation {c}", *turns[:k]))
                for k in range(0, 5, 2)
                for entry in (a, b)
            }
            assert len(homes) == 1, f"conversation {c} went to {homes}"
        # Its home full (two turns of other clients hold both slots), the other idle:
        # the turn starts at once elsewhere instead of queueing behind them.
        body = convo("conversation 0")
        home = await served_by(a, body)
        engine = engines[home]
        engine.token_delay = 0.2
        entry = {"a": a, "b": b}[home]
        holders = [
            asyncio.ensure_future(session.post(entry.url + "/v1/chat/completions", json=body))
            for _ in range(2)
        ]
        await wait_for(lambda: engine.queue_depth == 2)
        assert await served_by(a, body) != home
        assert await served_by(b, body) != home
        for holder in holders:
            (await holder).close()


async def test_a_burst_of_one_prefix_stays_on_its_replica_up_to_the_load_bound(pair):
    """Six requests at once with one prefix, before gossip reports any (2 free slots each,
    it says): the prefix's replica takes 2 into its free slots, the other then starts 2 at
    once, and once both would queue the prefix's replica queues while under 1.25x the
    mean (bounds 4 and 4): 4 and 2."""
    a, b = pair
    for peer in (a, b):
        await peer.serve(FakeEngine("smol", reply=REPLY, parallel=8, token_delay=0.05))
    front = GossipingPeer("front")
    front.forwarder._config = a.forwarder._config  # the same routing
    await front.start()
    front.cluster = [a, b]
    front.frozen_view = [  # gossip says both idle all along
        Replica(p.name, p.addr, False, "ready", 0, free_slots=2) for p in (a, b)
    ]
    try:
        async with aiohttp.ClientSession() as session:

            async def one():
                resp = await session.post(front.url + "/v1/completions", json=BURST)
                await resp.read()
                return resp.headers[REPLICA_HEADER]

            served = await asyncio.gather(*(one() for _ in range(6)))
    finally:
        await front.close()
    counts = sorted(served.count(n) for n in ("a", "b"))
    assert counts == [2, 4]


BURST = {"model": "smol", "prompt": "the same prefix", "stream": True}
