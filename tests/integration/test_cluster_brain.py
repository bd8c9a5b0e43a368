"""The cluster's brain end to end in one process: real RaftDrivers on loopback, ClusterState,
the controller's runner with the membership policy, Reconcilers over Instances with the fake
engine.
Gossip is a dictionary the test controls (which peers are alive, each one's payload).

A founder and two joiners become three voters; the embedded model is deployed and served;
the node hosting it is killed and the model comes back on another node; every survivor
ends with the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from random import Random
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster.controller import DEFAULT_MODEL_NAME, ControllerConfig
from aivailable.cluster.instances import Instances
from aivailable.cluster.membership_policy import MembershipConfig
from aivailable.cluster.payload import node_payload
from aivailable.cluster.raft import (
    Proposer,
    apply_entry,
    caught_up,
    caught_up_learners,
    leader_ready,
    raft_conf_hooks,
)
from aivailable.cluster.reconciler import ReconcilerConfig
from aivailable.cluster.runner import ControllerRunner, Reconciler, Trigger
from aivailable.cluster.state import ClusterState
from aivailable.cluster.view import NodeView, ReadModel
from aivailable.gpu import GpuInfo
from consensus import MemoryStorage
from consensus.driver import RaftConfig, RaftDriver

FAST = RaftConfig(tick_interval_ms=20, election_ticks=10, send_timeout_ms=500)
GIB = 1 << 30


class World:
    """The fake gossip: who is alive, and each peer's payload as it would gossip it."""

    def __init__(self, session: aiohttp.ClientSession):
        self.session = session
        self.addresses: dict[str, str] = {}
        self.states: dict[str, str] = {}
        self.peers: dict[str, BrainPeer] = {}
        self.view = ReadModel("test")

    def nodes(self) -> list[NodeView]:
        members = []
        for nid, peer in sorted(self.peers.items()):
            payload = peer.payload() if self.states[nid] == "alive" else peer.last_payload
            members.append(SimpleNamespace(id=nid, state=self.states[nid], payload=payload))
        self.view.update(members, time.monotonic(), full=True)
        return self.view.nodes()

    def changed(self) -> None:
        for peer in self.peers.values():
            peer.controller_trigger.fire()


class BrainPeer:
    def __init__(self, world: World, nid: str):
        self.world, self.id = world, nid
        self.state = ClusterState()
        self.controller_trigger, self.reconciler_trigger = Trigger(), Trigger()
        self.gpus = [GpuInfo("gpu0", "fake", "Fake 8G", 8 * GIB, 8 * GIB, "", "")]
        self.reconciler: Reconciler | None = None
        self.last_payload: dict | None = None
        self.driver: RaftDriver | None = None

    def payload(self) -> dict:
        rc = self.reconciler
        views = rc.views() if rc is not None else []
        used = rc.own_vram() if rc is not None else {}
        self.last_payload = node_payload(
            self.world.addresses.get(self.id, ""), "c1", self.gpus, used, views
        )
        return self.last_payload

    def instance_states(self) -> dict[str, str]:
        return {v["model"]: v["state"] for v in self.reconciler.views()} if self.reconciler else {}

    async def run(self, voters: tuple[str, ...], found: bool) -> None:
        w = self.world
        self.driver = driver = RaftDriver(
            self.id,
            MemoryStorage(),
            FAST,
            w.session,
            w.addresses.get,
            lambda e, t: apply(e, t),
            voters=voters,
            snapshot=self.state.snapshot,
            restore=self.state.restore,
            rng=Random(self.id),
        )
        proposer = Proposer(driver, w.session, w.addresses.get, timeout_s=3.0)
        apply = apply_entry(
            self.state, [self.controller_trigger, self.reconciler_trigger], proposer
        )
        app = web.Application()
        app.add_routes(driver.routes() + proposer.routes())
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        w.addresses[self.id] = f"127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with asyncio.TaskGroup() as tg:
                instances = Instances(
                    lambda source: Path("/models/fake.gguf"),
                    lambda spec: FakeEngine(spec.model, load_delay=0.05),
                    tg,
                )
                self.reconciler = Reconciler(
                    self.id,
                    self.state,
                    instances,
                    self.reconciler_trigger,
                    config=ReconcilerConfig(tick_s=0.1),
                    ready=lambda: caught_up(driver),
                )
                voters_of, change_conf = raft_conf_hooks(driver)
                controller = ControllerRunner(
                    self.id,
                    self.state,
                    w.nodes,
                    self.controller_trigger,
                    lambda: leader_ready(driver),
                    lambda: driver.term,
                    driver.propose,  # the leader proposes itself, never forwards
                    ControllerConfig(tick_s=0.1, propose_timeout_s=2.0),
                    MembershipConfig(dead_member_timeout_s=600.0),
                    voters_of,
                    change_conf,
                    caught_up_learners(driver, 100),
                    found_cluster_id="c1" if found else None,
                )
                tg.create_task(driver.run())
                tg.create_task(controller.run())
                tg.create_task(self.reconciler.run())
        finally:
            await runner.cleanup()


async def until(predicate, within: float, what: str):
    deadline = time.monotonic() + within
    while not predicate():  # noqa: ASYNC110 - polling several peers' state
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_found_join_serve_lose_the_host_and_serve_again():
    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
        world = World(session)
        tasks = {}
        for nid in ("p1", "p2", "p3"):
            world.peers[nid] = BrainPeer(world, nid)
            world.states[nid] = "alive"
        # p1 founds (voters=(p1,)); p2 and p3 join with no configuration of their own.
        for nid in ("p1", "p2", "p3"):
            voters = ("p1",) if nid == "p1" else ()
            tasks[nid] = tg.create_task(world.peers[nid].run(voters, found=nid == "p1"))
        peers = world.peers

        def leader():
            found = [
                p
                for p in peers.values()
                if p.driver and p.driver.role == "leader" and world.states[p.id] == "alive"
            ]
            return max(found, key=lambda p: p.driver.term) if found else None

        await until(lambda: leader() is not None, 10, "a leader")
        await until(lambda: set(leader().driver.voters) == {"p1", "p2", "p3"}, 15, "three voters")
        assert leader().state.cluster_id == "c1"

        def host():
            for p in peers.values():
                if (
                    world.states[p.id] == "alive"
                    and p.instance_states().get(DEFAULT_MODEL_NAME) == "ready"
                ):
                    return p
            return None

        await until(lambda: host() is not None, 15, "the default model to be ready")
        victim = host()
        plan_before = victim.state.plan
        assert [a.node for a in plan_before.assignments] == [victim.id]

        # kill -9 the host (maybe the leader too): its tasks and port vanish; gossip says dead.
        tasks[victim.id].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[victim.id]
        world.states[victim.id] = "dead"
        world.changed()
        await until(lambda: host() is not None and host() is not victim, 20, "re-placement")
        survivors = [p for p in peers.values() if p is not victim]
        new_host = host()
        await until(
            lambda: all(p.state.plan == new_host.state.plan for p in survivors),
            10,
            "the survivors to agree on the plan",
        )
        assert [a.node for a in new_host.state.plan.assignments] == [new_host.id]
        assert survivors[0].state.snapshot() == survivors[1].state.snapshot()
        # The dead voter is not removed before its timeout: quorum is 2 of the 3.
        assert set(leader().driver.voters) == {"p1", "p2", "p3"}
        for p in survivors:
            tasks[p.id].cancel()
