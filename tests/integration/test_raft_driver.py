"""Real RaftDrivers on loopback: each with its own aiohttp server and port, FileStorage on disk."""

from __future__ import annotations

import asyncio
import contextlib
from random import Random

import aiohttp
import msgpack
import pytest
from aiohttp import web

from consensus import FileStorage, NotLeader
from consensus.driver import MESSAGES_PATH, RaftConfig, RaftDriver

FAST = RaftConfig(tick_interval_ms=20, election_ticks=10, send_timeout_ms=500)


class StateMachine:
    def __init__(self):
        self.applied: list[tuple[int, int, bytes]] = []
        self.restored = 0

    def apply(self, entry, term):
        self.applied.append((entry.index, term, entry.data))

    def snapshot(self) -> bytes:
        return msgpack.packb(self.applied)

    def restore(self, data: bytes) -> None:
        self.restored += 1
        self.applied = [tuple(x) for x in msgpack.unpackb(data)]

    def datas(self) -> list[bytes]:
        return [d for _, _, d in self.applied]


class Peer:
    def __init__(self, cluster: Cluster, nid: str, voters, config: RaftConfig):
        self.cluster, self.id, self.voters, self.config = cluster, nid, voters, config
        self.storage = None
        self.driver = None
        self.runner = None
        self.task = None
        self.sm = StateMachine()

    async def start(self):
        self.storage = FileStorage(self.cluster.tmp / self.id)
        self.sm = StateMachine()
        self.driver = RaftDriver(
            self.id,
            self.storage,
            self.config,
            self.cluster.session,
            self.cluster.addresses.get,
            self.sm.apply,
            voters=self.voters,
            snapshot=self.sm.snapshot,
            restore=self.sm.restore,
            rng=Random(self.id),
            datagram=self.cluster.datagram if self.cluster.datagrams else None,
        )
        app = web.Application()
        app.add_routes(self.driver.routes())
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = self.cluster.ports.get(self.id, 0)
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        port = self.runner.addresses[0][1]
        self.cluster.ports[self.id] = port
        self.cluster.addresses[self.id] = f"127.0.0.1:{port}"
        self.task = asyncio.create_task(self.driver.run())  # owned and awaited by stop()

    async def stop(self):
        """Like kill -9 as far as the others can tell: the process and its port go away."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.runner.cleanup()
        self.storage.close()
        self.task = None


class Cluster:
    def __init__(self, tmp, session, datagrams=False):
        self.tmp, self.session = tmp, session
        # datagrams: heartbeats go through `datagram`, a fake of the peer's gossip
        # transport that hands the bytes to the running driver later in the loop.
        self.datagrams = datagrams
        self.datagram_drop = False  # True: every datagram is lost
        self.addresses: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.peers: dict[str, Peer] = {}

    async def add(self, nid, voters, config=FAST) -> Peer:
        peer = self.peers[nid] = Peer(self, nid, voters, config)
        await peer.start()
        return peer

    def datagram(self, dst: str, body: bytes) -> bool:
        peer = self.peers.get(dst)
        if peer is None or peer.task is None:
            return False  # like gossip: no route to a member it does not see alive
        if not self.datagram_drop:
            asyncio.get_running_loop().call_soon(peer.driver.receive_datagram, body)
        return True

    def running(self):
        return [p for p in self.peers.values() if p.task is not None]

    async def leader(self, within=10.0, exclude=()) -> Peer:
        async with asyncio.timeout(within):
            while True:  # noqa: ASYNC110 - polling the drivers' state, which has no event
                leaders = [
                    p for p in self.running() if p.driver.role == "leader" and p.id not in exclude
                ]
                if leaders:
                    return max(leaders, key=lambda p: p.driver.term)
                await asyncio.sleep(0.02)

    async def stop_all(self):
        for p in self.running():
            await p.stop()


@pytest.fixture
async def cluster(tmp_path):
    async with aiohttp.ClientSession() as session:
        c = Cluster(tmp_path, session)
        try:
            yield c
        finally:
            await c.stop_all()


async def wait_for(pred, within=10.0):
    async with asyncio.timeout(within):
        while not pred():  # noqa: ASYNC110 - polling state that has no event
            await asyncio.sleep(0.02)


IDS = ("n1", "n2", "n3")


async def test_three_drivers_elect_replicate_and_survive_leader_loss(cluster):
    for nid in IDS:
        await cluster.add(nid, IDS)
    leader = await cluster.leader()
    first = [b"cmd-%d" % i for i in range(20)]
    indexes = await asyncio.gather(*(leader.driver.propose(d) for d in first))
    assert len(set(indexes)) == 20
    await wait_for(lambda: all(p.sm.datas() == first for p in cluster.running()))
    # every replica applied the same entries at the same indexes with the same terms
    assert len({tuple(p.sm.applied) for p in cluster.running()}) == 1

    follower = next(p for p in cluster.running() if p is not leader)
    with pytest.raises(NotLeader) as err:
        await follower.driver.propose(b"nope")
    assert err.value.leader_id == leader.id

    old_term = leader.driver.term
    await leader.stop()
    new = await cluster.leader(exclude={leader.id})
    assert new.driver.term > old_term
    second = [b"after-%d" % i for i in range(5)]
    for d in second:
        await asyncio.wait_for(new.driver.propose(d), 5)
    await wait_for(lambda: all(p.sm.datas() == first + second for p in cluster.running()))

    # The old leader comes back from its FileStorage and catches up without deposing anyone.
    await leader.start()
    await wait_for(lambda: leader.sm.datas() == first + second)
    assert (await cluster.leader()).id == new.id


async def test_membership_changes_snapshots_and_leadership_transfer(cluster):
    config = RaftConfig(tick_interval_ms=20, election_ticks=10, snapshot_entries=8)
    for nid in IDS:
        await cluster.add(nid, IDS, config)
    leader = await cluster.leader()
    data = [b"x%d" % i for i in range(30)]
    for d in data:
        await leader.driver.propose(d)
    assert leader.driver.node.log.snap_index > 0  # compacted

    n4 = await cluster.add("n4", (), config)  # a brand-new server, empty disk
    await leader.driver.add_learner("n4")
    await wait_for(lambda: n4.sm.datas() == data)
    assert n4.sm.restored == 1  # it caught up through InstallSnapshot
    assert n4.driver.learners == ("n4",) and n4.driver.role == "follower"

    await leader.driver.promote("n4")
    assert set(leader.driver.voters) == {"n1", "n2", "n3", "n4"}
    assert await leader.driver.transfer_leadership("n4")
    await wait_for(lambda: n4.driver.role == "leader")
    await n4.driver.remove(leader.id)
    await wait_for(lambda: leader.id not in n4.driver.voters)
    await n4.driver.propose(b"after the change")
    others = [p for p in cluster.running() if p.id != leader.id]
    await wait_for(lambda: all(p.sm.datas()[-1:] == [b"after the change"] for p in others))


async def test_a_malformed_batch_is_refused_with_400(cluster):
    peer = await cluster.add("n1", ("n1",))
    url = f"http://{cluster.addresses['n1']}{MESSAGES_PATH}"
    async with cluster.session.post(url, data=b"\x00not msgpack") as resp:
        assert resp.status == 400
        assert "error" in await resp.json()
    async with cluster.session.post(url, data=msgpack.packb({"v": 99, "src": "x", "m": []})) as r:
        assert r.status == 400
    leader = await cluster.leader()
    assert leader is peer and await peer.driver.propose(b"still fine") > 0


async def test_read_index_on_any_driver_sees_every_write_acknowledged_before_it(cluster):
    for nid in IDS:
        await cluster.add(nid, IDS)
    leader = await cluster.leader()
    follower = next(p for p in cluster.running() if p is not leader)
    for i in range(10):
        written = await leader.driver.propose(b"w%d" % i)
        # Dissertation 6.4: the follower's read returns only once it has applied the write,
        # although the leader acknowledged it before the follower necessarily heard of it.
        index = await asyncio.wait_for(follower.driver.read_index(), 5)
        assert index >= written and follower.sm.applied[-1][0] >= written
        assert follower.sm.datas()[-1] == b"w%d" % i
    assert await asyncio.wait_for(leader.driver.read_index(), 5) >= written

    # A leader cut off from both followers can never confirm a read.
    for p in cluster.running():
        if p is not leader:
            await p.stop()
    with pytest.raises((TimeoutError, NotLeader)):
        await asyncio.wait_for(leader.driver.read_index(), FAST.election_ticks * 0.02 * 3)
