"""The read model, the status JSON, deploy/undeploy through the leader, the proposer's retries."""

import asyncio
from dataclasses import dataclass, field
from random import Random
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.cluster import state as cs
from aivailable.cluster.errors import ClusterError
from aivailable.cluster.keys import stamp
from aivailable.cluster.payload import node_payload, read_payload
from aivailable.cluster.raft import (
    Proposer,
    RaftClusterView,
    address_book,
    apply_entry,
    caught_up,
    leader_ready,
)
from aivailable.cluster.runner import Trigger
from aivailable.cluster.state import ClusterState
from aivailable.cluster.status import cluster_status
from aivailable.cluster.view import ReadModel
from aivailable.gpu import GpuInfo
from consensus import MemoryStorage, RaftNode
from placement import Assignment, Plan, Unplaced

GIB = 1 << 30


@dataclass
class Entry:
    term: int
    index: int
    data: bytes


class NotLeader(Exception):
    pass


@dataclass
class FakeDriver:
    """The parts of consensus.RaftDriver the view uses; "replicates" by calling every apply."""

    role: str = "leader"
    id: str = "a"
    leader_id: str | None = "a"
    term: int = 3
    applied_index: int = 0
    voters: tuple = ("a", "b")
    learners: tuple = ("c",)
    appliers: list = field(default_factory=list)
    log: list = field(default_factory=list)

    async def propose(self, data: bytes) -> int:
        if self.role != "leader":
            raise NotLeader(self.leader_id)
        self.log.append(data)
        index = len(self.log)
        for apply in self.appliers:
            apply(Entry(self.term, index, data), self.term)
        self.applied_index = index
        return index


def member(mid, state, payload, since=0.0, incarnation=0):
    return SimpleNamespace(
        id=mid, state=state, payload=payload, since=since, incarnation=incarnation
    )


def payload(addr, instances=(), files=(), cluster="c1"):
    gpus = [GpuInfo("gpu0", "fake", "GTX 1080", 8 * GIB, 8 * GIB, "", "")]
    return node_payload(addr, cluster, gpus, {}, instances, files)


def test_the_read_model_follows_events_and_keeps_since():
    view = ReadModel("me")
    assert view.update(
        [member("b", "suspect", payload("127.0.0.1:2", files=[("ab" * 32, 5, "x")]))], 10.0
    )
    assert view.update([member("a", "alive", payload("127.0.0.1:1"), since=3.0)], 11.0)
    assert [n.id for n in view.nodes()] == ["a", "b"]
    b = view.node("b")
    assert b.since == 10.0 and b.files == (("ab" * 32, 5, "x"),) and b.cluster_id == "c1"
    assert view.node("a").since == 3.0 and view.node("a").gpus[0].id == "a/gpu0"
    # The same news again changes nothing; a state change is a new since.
    version = view.version
    assert not view.update(
        [member("b", "suspect", payload("127.0.0.1:2", files=[("ab" * 32, 5, "x")]))], 12.0
    )
    assert view.version == version
    assert view.update([member("b", "dead", None)], 13.0)
    assert view.node("b").since == 13.0 and view.node("b").files  # payload kept while hidden
    # A full resync forgets members gossip no longer has, never this node itself.
    view.set_own(view.node("a").payload, 14.0)
    assert view.update([member("a", "alive", payload("127.0.0.1:1"), since=3.0)], 15.0, full=True)
    assert [n.id for n in view.nodes()] == ["a", "me"]


def test_nodes_of_another_cluster_are_never_replicas_and_are_reported():
    inst = [{"model": "m", "state": "ready", "queue_depth": 0, "gpus": ["gpu0"]}]
    view = ReadModel("me")
    view.update(
        [
            member("a", "alive", payload("127.0.0.1:1", inst)),
            member("x", "alive", payload("127.0.0.1:9", inst, cluster="other")),
            member("d", "dead", payload("127.0.0.1:4", inst)),
            member("s", "suspect", payload("127.0.0.1:5", inst)),
        ],
        1.0,
    )
    got = view.replicas_of("m", "c1")
    assert [(r.node_id, r.member_state) for r in got] == [("a", "alive"), ("s", "suspect")]
    assert [n.id for n in view.members("c1")] == ["a", "d", "s"]
    assert view.other_clusters("c1") == {"other": ["x"]}
    assert [f[0] for f in view.peer_files("c1")] == ["a"]
    # Before the cluster id is known there is nothing to tell clusters apart by.
    assert len(view.replicas_of("m", None)) == 3


def test_cluster_status_shows_nodes_models_placements_and_unplaced():
    state = ClusterState()
    for cmd in (
        cs.encode_init("c1"),
        cs.encode_deploy("m", "builtin:smollm2-135m", replicas=2),
        cs.encode_deploy("big", "/m/big.gguf"),
        cs.encode_deploy("new", "/m/new.gguf"),
    ):
        state.apply(cmd, 1)
    plan = Plan(
        (Assignment("m", "a", ("a/gpu0",), (100,)), Assignment("m", "b", ("b/gpu0",), (100,))),
        (Unplaced("big", 1, "larger than any node"),),
    )
    state.apply(cs.encode_plan(plan, 1), 1)
    inst = [{"model": "m", "state": "ready", "queue_depth": 2, "free_slots": 1, "gpus": ["gpu0"]}]
    view = ReadModel("a")
    view.update(
        [
            member("a", "alive", payload("127.0.0.1:1", inst), incarnation=7),
            member("b", "dead", payload("127.0.0.1:2")),
            member("z", "alive", payload("127.0.0.1:3", inst, cluster="c2")),
            member("new", "alive", payload("127.0.0.1:4", cluster=None)),
        ],
        0.0,
    )
    status = cluster_status("a", "a", 4, state, view, ("a", "b"), ())
    assert (status["node_id"], status["leader"], status["term"], status["cluster_id"]) == (
        "a",
        "a",
        4,
        "c1",
    )
    a = status["nodes"][0]
    assert a["addr"] == "127.0.0.1:1" and a["state"] == "alive" and a["incarnation"] == 7
    assert a["gpus"][0]["vram_total"] == 8 * GIB and a["gpus"][0]["name"] == "GTX 1080"
    assert a["instances"] == inst
    models = {m["name"]: m for m in status["models"]}
    assert [(p["node"], p["state"]) for p in models["m"]["placements"]] == [
        ("a", "ready"),
        ("b", "pending"),
    ]
    assert "larger than any node" in models["big"]["unplaced"]
    assert models["new"]["placements"] == [] and models["new"]["unplaced"]
    # z is of another cluster; "new" has none yet (still listening): shown, never placed on.
    assert [n["id"] for n in status["nodes"]] == ["a", "b", "new"]
    other = status["other_clusters"]
    assert other[0]["cluster_id"] == "c2" and other[0]["nodes"] == ["z"] and other[0]["hint"]


async def test_propose_on_the_leader_and_read_your_writes():
    state = ClusterState()
    driver = FakeDriver()
    async with aiohttp.ClientSession() as session:
        proposer = Proposer(driver, session, lambda n: None, timeout_s=1.0)
        driver.appliers.append(apply_entry(state, [], proposer))
        assert await proposer.propose(cs.encode_deploy("m", "/m/m.gguf")) == 1
        assert "m" in state.models


async def test_a_follower_forwards_to_the_leader():
    leader_state, follower_state = ClusterState(), ClusterState()
    leader = FakeDriver()
    follower = FakeDriver(role="follower", leader_id="a")
    triggers = [Trigger()]
    async with aiohttp.ClientSession() as session:
        leader_proposer = Proposer(leader, session, lambda n: None)
        follower_proposer = Proposer(follower, session, lambda n: addrs.get(n), timeout_s=2.0)
        leader.appliers += [
            apply_entry(leader_state, []),
            apply_entry(follower_state, triggers, follower_proposer),
        ]
        app = web.Application()
        app.add_routes(leader_proposer.routes())
        async with TestServer(app, host="127.0.0.1") as server:
            addrs = {"a": f"127.0.0.1:{server.port}"}
            index = await follower_proposer.propose(cs.encode_deploy("m", "/m/m.gguf"))
            assert index == 1 and "m" in leader_state.models and "m" in follower_state.models
            assert await triggers[0].wait(0.01)
            # A follower's own endpoint refuses and names the leader instead of forwarding.
            app2 = web.Application()
            app2.add_routes(follower_proposer.routes())
            async with (
                TestServer(app2, host="127.0.0.1") as f,
                session.post(
                    f"http://127.0.0.1:{f.port}/internal/propose", data=cs.encode_undeploy("m")
                ) as resp,
            ):
                assert resp.status == 421 and (await resp.json())["leader"] == "a"
            # Bytes that are no command are refused at the edge, never proposed.
            async with session.post(f"http://{addrs['a']}/internal/propose", data=b"x") as resp:
                assert resp.status == 400 and len(leader.log) == 1


async def test_no_leader_is_a_503_with_retry_after():
    driver = FakeDriver(role="follower", leader_id=None)
    async with aiohttp.ClientSession() as session:
        proposer = Proposer(driver, session, lambda n: None, timeout_s=0.3, retry_s=0.05)
        with pytest.raises(ClusterError) as info:
            await proposer.propose(cs.encode_undeploy("m"))
    assert info.value.status == 503 and info.value.retry_after and "no leader" in info.value.message


async def test_a_leader_elected_meanwhile_gets_the_proposal():
    state = ClusterState()
    driver = FakeDriver(role="candidate", leader_id=None)
    async with aiohttp.ClientSession() as session:
        proposer = Proposer(driver, session, lambda n: None, timeout_s=2.0, retry_s=0.02)
        driver.appliers.append(apply_entry(state, [], proposer))

        async def elect():
            await asyncio.sleep(0.1)
            driver.role, driver.leader_id = "leader", "a"

        async with asyncio.TaskGroup() as tg:
            tg.create_task(elect())
            assert await proposer.propose(cs.encode_deploy("m", "/m/m.gguf")) == 1


async def test_view_deploy_and_undeploy():
    state = ClusterState()
    driver = FakeDriver()
    async with aiohttp.ClientSession() as session:
        proposer = Proposer(driver, session, lambda n: None, timeout_s=1.0)
        driver.appliers.append(apply_entry(state, [], proposer))
        view = RaftClusterView("a", state, driver, proposer, ReadModel("a"))
        result = await view.deploy("smollm2-135m", "builtin:smollm2-135m", 2, 1024)
        assert result["replicas"] == 2 and result["state"] == "pending"
        rec = state.models["smollm2-135m"]
        assert rec.replicas == 2 and rec.sha256 and rec.size  # known for a built-in
        with pytest.raises(ClusterError) as info:
            await view.deploy("x", "builtin:nope", 1, 1024)
        assert info.value.status == 400
        assert await view.undeploy("smollm2-135m") and state.models == {}
        assert not await view.undeploy("smollm2-135m")
        status = view.status()
        assert status["voters"] == ["a", "b"] and status["learners"] == ["c"]


class SlowDriver(FakeDriver):
    """Commits after a moment, so proposals from concurrent requests interleave."""

    async def propose(self, data: bytes) -> int:
        await asyncio.sleep(0.01)
        return await super().propose(data)


async def test_an_undeploy_answers_from_what_its_own_entry_did():
    """Not from the peer's copy of the state before proposing: that copy may be behind the
    log, and two racing undeploys both find the model in it (tests/chaos/test_jepsen.py
    caught both: a 200 twice for one model, a 404 for a deployed one)."""
    state = ClusterState()
    driver = SlowDriver()
    async with aiohttp.ClientSession() as session:
        proposer = Proposer(driver, session, lambda n: None, timeout_s=1.0)
        driver.appliers.append(apply_entry(state, [], proposer))
        view = RaftClusterView("a", state, driver, proposer, ReadModel("a"))
        await proposer.propose(cs.encode_deploy("m", "/m/m.gguf"))
        racing = await asyncio.gather(view.undeploy("m"), view.undeploy("m"))
        assert sorted(racing) == [False, True] and "m" not in state.models
        # A peer whose copy is behind (here: one that has not seen the deploy) still answers
        # from the log.
        await proposer.propose(cs.encode_deploy("m", "/m/m.gguf"))
        behind = RaftClusterView("b", ClusterState(), driver, proposer, ReadModel("b"))
        assert await behind.undeploy("m") is True and "m" not in state.models
        assert await behind.undeploy("m") is False


async def test_an_undeploy_whose_result_this_peer_cannot_know_is_a_503():
    """A peer that caught up from a snapshot never applied the entry itself."""
    state = ClusterState()
    state.apply(cs.encode_deploy("m", "/m/m.gguf"))
    driver = FakeDriver()
    async with aiohttp.ClientSession() as session:
        proposer = Proposer(driver, session, lambda n: None, timeout_s=1.0)
        driver.appliers.append(apply_entry(state, [], None))  # applied, but not reported
        view = RaftClusterView("a", state, driver, proposer, ReadModel("a"))
        with pytest.raises(ClusterError) as info:
            await view.undeploy("m")
    assert info.value.status == 503 and info.value.code == "outcome_unknown"
    assert "m" not in state.models


def test_an_apply_result_names_its_proposal_only_the_first_time():
    state = ClusterState()
    data = stamp(cs.encode_undeploy("m"), "ab" * 16)
    first, again = state.apply(data), state.apply(data)
    assert first.ok and not first.changed and first.proposal == "ab" * 16
    assert not again.ok and again.proposal is None


def test_address_book_prefers_gossip_then_the_registry():
    state = ClusterState()
    state.apply(cs.encode_node_addr("b", "10.0.0.2:8000"), 1)
    gossip = {"a": "10.0.0.1:8000", "b": "10.0.0.9:8000"}
    address_of = address_book(state, lambda: gossip)
    assert address_of("a") == "10.0.0.1:8000" and address_of("b") == "10.0.0.9:8000"
    gossip.clear()
    assert address_of("b") == "10.0.0.2:8000" and address_of("z") is None


def test_apply_entry_logs_rejections_and_fires_only_on_change(caplog):
    state = ClusterState()
    t = Trigger()
    apply = apply_entry(state, [t])
    assert not apply(Entry(1, 1, b"junk"), 1).ok
    assert not t._event.is_set() and any("rejected" in r.getMessage() for r in caplog.records)
    assert apply(Entry(1, 2, cs.encode_deploy("m", "x")), 1).changed and t._event.is_set()


def test_a_new_leader_is_ready_only_once_it_applied_its_own_no_op():
    storage = MemoryStorage()
    node = RaftNode("a", storage, voters=("a",), rng=Random(1), election_ticks=3)
    driver = SimpleNamespace(node=node, role=None, leader_id=None)

    def sync():
        driver.role, driver.leader_id = node.role, node.leader_id

    while node.role != "leader":
        node.tick()
    sync()
    assert not leader_ready(driver) and not caught_up(driver)  # no-op not applied yet
    rd = node.ready()
    storage.save(rd)
    node.advance(rd)
    rd = node.ready()  # the no-op commits once stored
    storage.save(rd)
    node.advance(rd)
    sync()
    assert node.applied_index >= 1 and leader_ready(driver) and caught_up(driver)
    # A restarted node rebuilt from storage has the log but has heard no leader yet.
    again = RaftNode("a", storage, voters=("a",), rng=Random(1), election_ticks=3)
    driver = SimpleNamespace(node=again, role=again.role, leader_id=again.leader_id)
    assert not leader_ready(driver) and not caught_up(driver)


def test_status_shows_node_names_with_the_raft_ids_alongside():
    model = ReadModel("a")
    model.set_own(
        read_payload("a", node_payload("h:1", None, [], {}, [], member="a@" + "1" * 16)), 0
    )
    b_id = "b@" + "2" * 16
    driver = FakeDriver(
        id="a@" + "1" * 16,
        leader_id=b_id,
        voters=("a@" + "1" * 16, b_id, "c@" + "3" * 16),
        learners=("c@" + "4" * 16,),
    )
    status = RaftClusterView("a", ClusterState(), driver, None, model).status()
    assert status["leader"] == "b" and status["raft_id"] == "a@" + "1" * 16
    assert status["voters"] == ["a", "b", "c"] and status["learners"] == ["c"]
    assert {m["id"]: (m["node"], m["role"]) for m in status["raft_members"]} == {
        "a@" + "1" * 16: ("a", "voter"),
        b_id: ("b", "voter"),
        "c@" + "3" * 16: ("c", "voter"),
        "c@" + "4" * 16: ("c", "learner"),
    }
    assert [n["member"] for n in status["nodes"]] == ["a@" + "1" * 16]


def test_address_book_maps_a_raft_id_to_its_node():
    state = ClusterState()
    state.apply(cs.encode_node_addr("b", "10.0.0.2:8000"), 1)
    gossip = {"a": "10.0.0.1:8000"}
    address_of = address_book(state, lambda: gossip)
    assert address_of("a@" + "1" * 16) == "10.0.0.1:8000"
    assert address_of("b@" + "2" * 16) == "10.0.0.2:8000"  # the registry, by the name in it
    assert address_of("a") == "10.0.0.1:8000"  # a Raft id from before member ids
