"""ClusterNode's wiring: gossip events reach the read model and wake the runners (push)."""

import asyncio
from types import SimpleNamespace

import aiohttp

from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster.node import ClusterNode, NodeConfig
from aivailable.cluster.payload import node_payload
from aivailable.gpu import GpuInfo

GIB = 1 << 30


class FakeGossip:
    """Events the test pushes; members() only as the resync would see them."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.reported: list[str] = []
        self.payload: dict | None = None

    def members(self):
        return []

    def subscribe(self):
        gossip = self

        class Sub:
            def __aiter__(self):
                return self

            async def __anext__(self):
                return await gossip.queue.get()

            def close(self):
                gossip.closed = True

        return Sub()

    def set_payload(self, payload):
        self.payload = payload

    def report_unreachable(self, node_id):
        self.reported.append(node_id)


def member(node_id, state, cluster="c1", instances=()):
    gpus = [GpuInfo("gpu0", "fake", "F", 8 * GIB, 8 * GIB, "", "")]
    payload = node_payload(f"127.0.0.1:{len(node_id)}", cluster, gpus, {}, instances)
    return SimpleNamespace(id=node_id, state=state, since=1.0, incarnation=1, payload=payload)


async def test_a_gossip_event_updates_the_view_and_wakes_the_runners_at_once(tmp_path):
    config = NodeConfig("me", "127.0.0.1:1", tmp_path / "d", tmp_path / "c")
    gossip = FakeGossip()
    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
        node = ClusterNode(config, [], session, gossip, tg, lambda spec: FakeEngine(spec.model))
        node.cluster_id = "c1"
        loop = tg.create_task(node._event_loop())
        ready = [{"model": "m", "state": "ready", "queue_depth": 0, "gpus": ["gpu0"]}]
        await gossip.queue.put(
            SimpleNamespace(kind="joined", member=member("b", "alive", instances=ready))
        )
        assert await node.ctrl_wake.wait(5) and await node.rec_wake.wait(5)
        assert [r.node_id for r in node.replicas_of("m")] == ["b"]
        assert node.member_state("b") == "alive"
        # A stranger's news changes the view but it is never a replica.
        await gossip.queue.put(
            SimpleNamespace(kind="joined", member=member("x", "alive", "c2", ready))
        )
        assert await node.ctrl_wake.wait(5)
        assert [r.node_id for r in node.replicas_of("m")] == ["b"]
        await gossip.queue.put(SimpleNamespace(kind="dead", member=member("b", "dead")))
        assert await node.ctrl_wake.wait(5)
        assert node.replicas_of("m") == [] and node.member_state("b") == "dead"
        loop.cancel()
    assert gossip.closed
