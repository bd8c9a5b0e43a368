"""A deterministic whole-cluster simulation under virtual time.

Every peer runs the real parts of the cluster floor: a `RaftNode` over `MemoryStorage`, a
`Membership` core (through tests/sim/gossip_sim.py's network), a `ClusterState` fed by the
committed log, a `ReadModel` fed by its gossip events, the controller's pure `step` and the
reconciler's `plan_steps`, and a fake engine that loads in `load_s` of virtual time. The
network loses packets, honours partitions and buffers packets for paused peers; peers crash
(losing everything but their Raft storage) and restart. One seed drives all randomness, so
a failing seed replays exactly.

What the real runners do is done here step by step: the controller carries out one action
and waits until it is applied (or its term ends) before it asks again; the reconciler acts
only once `raft.caught_up`-style its peer applied an entry of the current term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from types import SimpleNamespace
from typing import Any

from aivailable.backends.demand import DemandWindow
from aivailable.backends.lifecycle import advance
from aivailable.cluster import state as cs
from aivailable.cluster.controller import ChangeConf, Context, ControllerConfig, Propose, step
from aivailable.cluster.payload import node_payload, read_payload
from aivailable.cluster.reconciler import Running, plan_steps
from aivailable.cluster.state import ClusterState
from aivailable.cluster.view import ReadModel
from consensus import MemoryStorage, RaftNode
from consensus.types import CMD
from peer.config import GossipConfig
from tests.sim.gossip_sim import GossipSim

GIB = 1 << 30
CLUSTER = "c1"
BEAT_S = 0.05  # one Raft tick and one pass of the cluster floor per peer
CONTROLLER = ControllerConfig(default_source=None, suspect_grace_s=3.0, tick_s=1.0)


class Violation(AssertionError):
    pass


@dataclass
class Instance:
    model: str
    gpus: tuple[str, ...]
    n_ctx: int
    source: str
    state: str = "loading"
    ready_at: float = 0.0
    window: DemandWindow | None = None  # its demand measurements, once ready
    admit_credit: float = 0.0  # fractions of requests, admitted or refused, not yet counted
    refuse_credit: float = 0.0


@dataclass
class Peer:
    id: str
    gpus: dict[str, int]  # local gpu id -> bytes
    cluster: str = CLUSTER
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    raft: RaftNode | None = None
    state: ClusterState = field(default_factory=ClusterState)
    view: ReadModel | None = None
    instances: dict[str, Instance] = field(default_factory=dict)
    caught_up: bool = False
    waiting: tuple[int, int] | None = None  # (index, term) of the controller's proposal
    boots: int = 0
    raft_buffer: list[Any] = field(default_factory=list)


class ClusterSim(GossipSim):
    def __init__(
        self,
        seed: int,
        gpus: dict[str, list[int]],
        voters: tuple[str, ...],
        loss: float = 0.0,
        load_s: float = 1.0,
        strangers: dict[str, list[int]] | None = None,
    ) -> None:
        super().__init__(0, seed, GossipConfig(), loss=loss, converged=False)
        self.load_s = load_s
        self.voters = voters
        self.learners = tuple(n for n in gpus if n not in voters)  # they serve, never vote
        self.peers: dict[str, Peer] = {}
        self.deployed: dict[str, cs.ModelRecord] = {}  # every model some peer applied
        # Demand traces: model -> concurrent streams at a virtual time. Each stream holds a
        # slot for `hold_s` per request; a replica queues one round beyond its slots and
        # refuses the rest (one retry per second per refused stream).
        self.load: dict[str, Callable[[float], int]] = {}
        self.keep_alive: dict[str, float | None] = {}  # model -> keep_alive its requests send
        self.slots = 4
        self.hold_s = 3.0
        self.scale_log: list[tuple[float, str, int, int, str]] = []  # (t, model, from, to, why)
        for nid, sizes in gpus.items():
            self._add_peer(Peer(nid, {f"gpu{i}": g * GIB for i, g in enumerate(sizes)}))
        # Peers of another cluster that share the key: in gossip, never in Raft.
        for nid, sizes in (strangers or {}).items():
            peer = Peer(nid, {f"gpu{i}": g * GIB for i, g in enumerate(sizes)}, cluster="c2")
            self._add_peer(peer)
        first = next(iter(self.peers))
        for nid in self.peers:
            if nid != first:
                self._schedule(self.now, "pushpull", nid, first)

    # ----- peers -----------------------------------------------------------------------

    def _add_peer(self, peer: Peer) -> None:
        self.peers[peer.id] = peer
        self.add_node(peer.id, join=None)
        self._boot(peer)

    def _boot(self, peer: Peer) -> None:
        peer.boots += 1
        peer.view = ReadModel(peer.id)
        peer.state = ClusterState()
        peer.instances = {}
        peer.caught_up = False
        peer.waiting = None
        peer.raft_buffer = []
        if peer.cluster == CLUSTER:
            peer.raft = RaftNode(
                peer.id,
                peer.storage,
                voters=self.voters,
                learners=self.learners,
                rng=Random(f"{self.seed}/{peer.id}/{peer.boots}"),
                election_ticks=10,
                heartbeat_ticks=1,
                pre_vote=True,
                check_quorum=True,
            )
        else:
            peer.state.cluster_id = peer.cluster  # its own cluster, for its payload
        self._publish(peer)
        self._schedule(self.now + self.rng.uniform(0, BEAT_S), "beat", peer.id, peer.boots)

    def crash(self, node_id: str) -> None:
        super().crash(node_id)
        self.peers[node_id].raft = None
        self.peers[node_id].instances = {}

    def restart(self, node_id: str, join: str | None = None) -> None:
        """Back with its Raft storage only; gossip joins through `join` (any live peer)."""
        join = join or next(p for p in self.peers if p != node_id and not self.nodes[p].crashed)
        self.add_node(node_id, join=join)
        self._boot(self.peers[node_id])

    # ----- what the test does to the cluster --------------------------------------------

    def leader(self) -> Peer | None:
        leaders = [
            p
            for p in self.peers.values()
            if p.raft is not None and p.raft.role == "leader" and self._up(p.id)
        ]
        return max(leaders, key=lambda p: p.raft.term) if leaders else None

    def propose(self, data: bytes) -> bool:
        leader = self.leader()
        if leader is None:
            return False
        leader.raft.propose(data)
        self._process(leader)
        return True

    def deploy(
        self,
        name: str,
        vram_gib: float,
        replicas: int = 1,
        priority: int = 0,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        idle_unload_s: float | None = None,
    ) -> bool:
        """Deploy through the leader, as `POST /cluster/models` does (VRAM known exactly)."""
        source = f"/m/{name}.gguf"
        deploy = cs.encode_deploy(
            name,
            source,
            replicas,
            2048,
            priority,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            idle_unload_s=idle_unload_s,
        )
        ok = self.propose(deploy)
        vram = int(vram_gib * GIB)
        sha = f"{sum(name.encode()) * 7919:064x}"
        return ok and self.propose(cs.encode_model_file(name, source, sha, vram, vram, 0))

    # ----- the event loop ----------------------------------------------------------------

    def _up(self, nid: str) -> bool:
        node = self.nodes[nid]
        return not node.crashed and node.paused_until <= self.now

    def _handle(self, kind: str, node_id: str, data: Any) -> None:
        if kind not in ("beat", "raft"):
            return super()._handle(kind, node_id, data)
        peer = self.peers[node_id]
        node = self.nodes[node_id]
        if node.crashed:
            return
        if kind == "beat":
            if data != peer.boots:
                return  # a beat of an earlier life
            self._schedule(self.now + BEAT_S, "beat", node_id, data)
            if node.paused_until > self.now:
                return
            for m in peer.raft_buffer:
                peer.raft.step(m)
            peer.raft_buffer = []
            self._beat(peer)
        elif peer.raft is not None:
            if node.paused_until > self.now:
                peer.raft_buffer.append(data)
            else:
                peer.raft.step(data)
                self._process(peer)

    def _flush(self, node) -> None:
        # Gossip events feed the peer's read model, as ClusterNode's event loop does.
        seen = len(self.log)
        super()._flush(node)
        peer = self.peers.get(node.id)
        if peer is None or peer.view is None:
            return
        subjects = {s for _, obs, _, s, _ in self.log[seen:] if obs == node.id and s != node.id}
        views = [node.core.member(s) for s in sorted(subjects)]
        peer.view.update([v for v in views if v is not None], self.now)

    def _send_raft(self, m: Any) -> None:
        if (m.src, m.dst) in self.blocked or self.rng.random() < self.loss:
            return
        self._schedule(self.now + self.rng.uniform(*self.latency), "raft", m.dst, m)

    def _process(self, peer: Peer) -> None:
        node = peer.raft
        while node is not None and node.has_ready():
            rd = node.ready()
            peer.storage.save(rd)
            for m in rd.messages:
                self._send_raft(m)
            if rd.restore is not None and rd.restore.data:
                peer.state.restore(rd.restore.data)
            for e in rd.committed:
                if e.kind == CMD:
                    before = dict(peer.state.scale)
                    peer.state.apply(e.data, e.term)
                    if peer is self.leader():
                        self._log_scale(before, peer.state.scale)
                    for name, record in peer.state.models.items():
                        self.deployed.setdefault(name, record)
            node.advance(rd)

    def _beat(self, peer: Peer) -> None:
        if peer.raft is not None:
            peer.raft.tick()
            self._process(peer)
        for inst in peer.instances.values():
            if inst.state == "loading" and self.now >= inst.ready_at:
                inst.state = advance(inst.state, "ready")
                inst.window = DemandWindow(self.slots, self.now)
        self._serve(peer)
        if peer.cluster == CLUSTER:
            self._reconcile(peer)
            self._control(peer)
            self._check_plans(peer)
        self._publish(peer)

    def _applied_own_term(self, peer: Peer) -> bool:
        node = peer.raft
        return node.log.term(node.applied_index) == node.term

    def _reconcile(self, peer: Peer) -> None:
        node = peer.raft
        if not peer.caught_up:
            peer.caught_up = node.leader_id is not None and self._applied_own_term(peer)
            if not peer.caught_up:
                return
        running = {
            m: Running(i.source, i.gpus, i.state, i.n_ctx) for m, i in peer.instances.items()
        }
        steps = plan_steps(peer.id, peer.state.assignments_for(peer.id), peer.state.models, running)
        for s in steps:
            if s.action == "stop":
                peer.instances.pop(s.model, None)
            else:
                peer.instances[s.model] = Instance(
                    s.model, s.gpus, s.n_ctx, s.source, ready_at=self.now + self.load_s
                )

    def _control(self, peer: Peer) -> None:
        node = peer.raft
        if node.role != "leader" or not self._applied_own_term(peer):
            return
        if peer.waiting is not None:
            index, term = peer.waiting
            if node.applied_index < index and node.term == term:
                return  # the runner awaits its proposal
            peer.waiting = None
        ctx = Context(peer.id, node.term, found_cluster_id=CLUSTER, wall=self.now)
        actions = step(peer.view.nodes(), peer.state, self.now, ctx, CONTROLLER)
        for action in actions:
            if isinstance(action, ChangeConf):
                continue  # the voters are fixed in this simulation
            assert isinstance(action, Propose)
            index = node.propose(action.data)
            peer.waiting = (index, node.term)
            self._process(peer)
            return

    def _publish(self, peer: Peer) -> None:
        own: dict[str, int] = {}
        for a in peer.state.assignments_for(peer.id):
            if a.model in peer.instances:
                for gpu, vram in zip(a.gpus, a.vram, strict=True):
                    local = gpu.split("/", 1)[1]
                    own[local] = own.get(local, 0) + vram
        gpus = [
            SimpleNamespace(
                id=g, vendor="fake", name="Fake", vram_total=size, vram_free=size - own.get(g, 0)
            )
            for g, size in peer.gpus.items()
        ]
        views = [
            {
                "model": i.model,
                "state": i.state,
                "queue_depth": 0,
                "gpus": list(i.gpus),
                "demand": i.window.signals(self.now) if i.window is not None else None,
            }
            for i in peer.instances.values()
        ]
        cluster = peer.state.cluster_id or (peer.cluster if peer.cluster != CLUSTER else None)
        payload = node_payload(
            peer.id, cluster, gpus, own, views, (), 0, 1, waiting=self._held(peer)
        )
        node = self.nodes[peer.id]
        if not node.crashed:
            node.core.set_payload(payload, self.now)
            super()._flush(node)
        peer.view.set_own(read_payload(peer.id, payload), self.now)

    # ----- demand -------------------------------------------------------------------------

    def hosts(self, model: str) -> list[Peer]:
        """Live members with a ready instance of `model`, by id (the load spreads over them)."""
        return [
            p
            for p in self.live_members()
            if model in p.instances and p.instances[model].state == "ready"
        ]

    def _share(self, model: str, peer: Peer) -> int:
        hosts = [p.id for p in self.hosts(model)]
        if peer.id not in hosts:
            return 0
        streams = max(0, int(self.load[model](self.now)))
        i = hosts.index(peer.id)
        return streams // len(hosts) + (1 if i < streams % len(hosts) else 0)

    def _serve(self, peer: Peer) -> None:
        """This peer's share of each model's trace, as its instances would measure it."""
        for model, inst in peer.instances.items():
            if inst.window is None or model not in self.load:
                continue
            share = self._share(model, peer)
            queued = min(share, 2 * self.slots)  # one round of queue beyond the slots
            inst.window.set_depth(self.now, queued)
            inst.admit_credit += queued * BEAT_S / self.hold_s
            inst.refuse_credit += (share - queued) * BEAT_S
            while inst.admit_credit >= 1:
                inst.admit_credit -= 1
                inst.window.admitted(self.now, self.keep_alive.get(model))
                inst.window.first_token(self.now, self.hold_s * max(0, queued - self.slots) / 4)
            while inst.refuse_credit >= 1:
                inst.refuse_credit -= 1
                inst.window.refused(self.now)

    def _held(self, peer: Peer) -> dict[str, int]:
        """Requests the first live member holds for a model with no ready replica."""
        live = self.live_members()
        if not live or peer is not live[0]:
            return {}
        return {
            m: int(f(self.now))
            for m, f in self.load.items()
            if int(f(self.now)) > 0 and not self.hosts(m)
        }

    def _log_scale(self, before: dict, after: dict) -> None:
        for name, rec in after.items():
            if before.get(name) != rec:
                old = before[name].wanted if name in before else rec.previous or 0
                self.scale_log.append((self.now, name, old, rec.wanted, rec.reason))

    def wanted(self, model: str) -> int:
        leader = self.leader()
        return leader.state.wanted_replicas(model) if leader and model in leader.state.models else 0

    # ----- invariants --------------------------------------------------------------------

    def _check_plans(self, peer: Peer) -> None:
        """After every step: no committed plan over capacity, replicas on distinct nodes,
        nothing placed on a node of another cluster."""
        plan = peer.state.plan
        if plan is None:
            return
        used: dict[str, int] = {}
        hosts: dict[str, set[str]] = {}
        for a in plan.assignments:
            host = self.peers.get(a.node)
            if host is None or host.cluster != CLUSTER:
                raise Violation(f"{peer.id}'s plan places {a.model} on {a.node}")
            if a.node in hosts.setdefault(a.model, set()):
                raise Violation(f"{peer.id}'s plan has two replicas of {a.model} on {a.node}")
            hosts[a.model].add(a.node)
            for gpu, vram in zip(a.gpus, a.vram, strict=True):
                used[gpu] = used.get(gpu, 0) + vram
        for gpu, total in used.items():
            node, local = gpu.split("/", 1)
            if total > self.peers[node].gpus[local]:
                raise Violation(f"{peer.id}'s plan puts {total} bytes on {gpu}")

    # ----- measurements ------------------------------------------------------------------

    def live_members(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.cluster == CLUSTER and self._up(p.id)]

    def ready_count(self, model: str) -> int:
        return sum(
            1
            for p in self.live_members()
            if model in p.instances and p.instances[model].state == "ready"
        )

    def settled(self) -> list[str]:
        """What still differs from the goal: every live peer holds one plan, every deployed
        model that fits is served (ready on a live peer), none is lost."""
        problems = []
        live = self.live_members()
        plans = {p.state.snapshot() for p in live}
        if len(plans) != 1:
            problems.append(f"{len(plans)} different states among live peers")
        for p in live:
            missing = set(self.deployed) - set(p.state.models)
            if missing:
                problems.append(f"{p.id} lost {sorted(missing)}")
        leader = self.leader()
        plan = leader.state.plan if leader is not None else None
        if plan is None:
            return [*problems, "no plan"]
        for name, record in self.deployed.items():
            unplaced = any(
                u.model == name and u.missing_replicas >= record.replicas for u in plan.unplaced
            )
            if not unplaced and self.ready_count(name) == 0:
                problems.append(f"{name} is not served")
        return problems
