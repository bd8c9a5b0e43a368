"""The RaftDriver's clock and its datagram path, with real drivers on loopback HTTP.

The clock wakes only when a tick is due to act (an idle follower sleeps through its
election timeout while heartbeats keep resetting it); heartbeats and their answers can go
as datagrams (the peer's sealed gossip transport; here a fake of it that hands the bytes
to the other driver), with everything else over HTTP."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from consensus import NotLeader
from consensus.types import APP, HEARTBEAT, Message
from consensus.wire import encode_batch
from tests.integration.test_raft_driver import FAST, IDS, Cluster, wait_for

TICK_S = FAST.tick_interval_ms / 1000


@pytest.fixture
async def cluster(tmp_path, request):
    async with aiohttp.ClientSession() as session:
        c = Cluster(tmp_path, session, datagrams=getattr(request, "param", False))
        try:
            yield c
        finally:
            await c.stop_all()


async def settled(cluster: Cluster):
    """The leader, once its no-op is applied everywhere."""
    leader = await cluster.leader()
    await wait_for(lambda: all(p.driver.applied_index >= 1 for p in cluster.running()))
    return leader


async def test_an_idle_clock_wakes_per_heartbeat_on_the_leader_and_per_timeout_on_followers(
    cluster,
):
    for nid in IDS:
        await cluster.add(nid, IDS)
    leader = await settled(cluster)
    term = leader.driver.term
    before = {p.id: p.driver.clock_wakeups for p in cluster.running()}
    ticks = 60
    await asyncio.sleep(ticks * TICK_S)
    assert leader.driver.role == "leader" and leader.driver.term == term
    woke = {p.id: p.driver.clock_wakeups - before[p.id] for p in cluster.running()}
    # The leader: one wake-up per heartbeat and per CheckQuorum round, not one per tick.
    assert woke[leader.id] <= ticks // FAST.heartbeat_ticks + ticks // FAST.election_ticks + 3
    for p in cluster.running():
        if p is not leader:
            assert p.driver.role == "follower" and p.driver.leader_id == leader.id
            # At most one per election timeout (>= election_ticks): heartbeats reset it.
            assert woke[p.id] <= ticks // FAST.election_ticks + 2


@pytest.mark.parametrize("cluster", [True], indirect=True)
async def test_heartbeats_as_datagrams_hold_the_followers_and_a_lost_leader_is_replaced(cluster):
    for nid in IDS:
        await cluster.add(nid, IDS)
    leader = await settled(cluster)
    term = leader.driver.term
    sent = leader.driver.datagrams_sent
    await asyncio.sleep(4 * FAST.election_ticks * TICK_S)  # several election timeouts
    assert leader.driver.datagrams_sent > sent  # heartbeats went this way
    assert leader.driver.role == "leader" and leader.driver.term == term
    assert all(p.driver.leader_id == leader.id for p in cluster.running())
    await asyncio.wait_for(leader.driver.propose(b"over http"), 5)  # appends still by HTTP
    await wait_for(lambda: all(p.sm.datas() == [b"over http"] for p in cluster.running()))

    await leader.stop()
    new = await cluster.leader(exclude={leader.id})
    assert new.driver.term > term
    await asyncio.wait_for(new.driver.propose(b"after"), 5)
    await wait_for(lambda: all(p.sm.datas() == [b"over http", b"after"] for p in cluster.running()))


@pytest.mark.parametrize("cluster", [True], indirect=True)
async def test_when_the_heartbeat_datagrams_are_lost_followers_elect_anew(cluster):
    # The counterpart: the followers were held by the datagrams, not by anything else.
    for nid in IDS:
        await cluster.add(nid, IDS)
    leader = await settled(cluster)
    term = leader.driver.term
    cluster.datagram_drop = True
    await wait_for(lambda: any(p.driver.term > term for p in cluster.running()), 5)
    cluster.datagram_drop = False
    async with asyncio.timeout(10):  # an election already under way may depose one more
        while True:
            new = await cluster.leader()
            try:
                await asyncio.wait_for(new.driver.propose(b"x"), 5)
                break
            except NotLeader:
                await asyncio.sleep(TICK_S)
    await wait_for(lambda: all(b"x" in p.sm.datas() for p in cluster.running()))


async def test_a_datagram_carrying_anything_but_heartbeats_is_refused(cluster):
    for nid in IDS:
        await cluster.add(nid, IDS)
    leader = await settled(cluster)
    follower = next(p for p in cluster.running() if p is not leader)
    last = follower.driver.node.last_index
    forged = Message(APP, leader.id, follower.id, leader.driver.term, index=last, log_term=1)
    beat = Message(HEARTBEAT, leader.id, follower.id, leader.driver.term)
    follower.driver.receive_datagram(encode_batch(leader.id, [beat, forged]))
    follower.driver.receive_datagram(b"\x93not a batch")
    assert follower.driver.datagrams_refused == 2
    assert follower.driver.node.last_index == last


async def test_a_stalled_event_loop_is_no_burst_of_ticks_and_no_election(cluster):
    for nid in IDS:
        await cluster.add(nid, IDS)
    leader = await settled(cluster)
    term = leader.driver.term
    ticks = {p.id: p.driver._ticks for p in cluster.running()}
    time.sleep(5 * FAST.election_ticks * TICK_S)  # noqa: ASYNC251 - the stall under test
    await asyncio.sleep(FAST.election_ticks * TICK_S)
    # Heartbeats flowed until the stall: nobody's election timeout had run out by then, so
    # the ticks of the stall itself are not made up and nobody campaigns afterwards.
    assert all(p.driver.term == term for p in cluster.running())
    assert leader.driver.role == "leader"
    for p in cluster.running():
        assert p.driver._ticks - ticks[p.id] < 4 * FAST.election_ticks
