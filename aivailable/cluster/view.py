"""The one read model of the cluster: every gossip member as a `NodeView`, kept up to date
from gossip events (pushed, not polled), and the questions the rest of the peer asks of it.

A node belongs to this cluster when its payload names this cluster's id. A node of another
cluster that shares the key (two labs, one secret) is visible in gossip but never placed on,
forwarded to or counted; `other_clusters()` says so for the status and the log. Pure: time
comes in as `now`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aivailable.cluster.identity import node_of
from aivailable.cluster.payload import PeerPayload, read_payload
from aivailable.cluster.state import ClusterState
from peer.availability import ModelAvailability, Replica, summarize_availability
from placement import Gpu

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
REACHABLE = (ALIVE, SUSPECT)


@dataclass(frozen=True)
class NodeView:
    """One gossip member: its state since when, and its parsed payload."""

    id: str
    state: str  # alive | suspect | dead | left
    since: float  # when it entered this state (gossip's clock, seconds)
    payload: PeerPayload = PeerPayload()
    incarnation: int = 0  # gossip's: a restarted node comes back with a higher one

    @property
    def addr(self) -> str:
        return self.payload.addr

    @property
    def cluster_id(self) -> str | None:
        return self.payload.cluster_id

    @property
    def member(self) -> str | None:
        """Its Raft id, as it advertises it (None: an older peer, whose Raft id is its name)."""
        return self.payload.member

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        return self.payload.gpus

    @property
    def files(self) -> tuple[tuple[str, int, str], ...]:
        return self.payload.files

    @property
    def rpc_version(self) -> str | None:
        return self.payload.rpc_version

    @property
    def rpc_ready(self) -> bool:
        return self.payload.rpc_ready


def node_view(member: Any, now: float, previous: NodeView | None = None) -> NodeView:
    """A gossip MemberView -> NodeView. `since` is the core's when it has one, else when
    this view first saw the state."""
    since = getattr(member, "since", 0.0) or (
        previous.since if previous is not None and previous.state == member.state else now
    )
    payload = read_payload(member.id, member.payload)
    if member.payload is None and previous is not None:
        payload = previous.payload  # the core hides a payload it has not fetched yet
    return NodeView(member.id, member.state, since, payload, getattr(member, "incarnation", 0))


def member_of(node: NodeView, cluster_id: str | None) -> bool:
    """True when `node` is of the cluster `cluster_id`. Before the cluster id is known (a
    peer still joining) every node counts: there is nothing to tell them apart by."""
    return cluster_id is None or node.cluster_id == cluster_id


class ReadModel:
    """The cluster as this peer knows it. `update` takes gossip member views (from events or
    a full resync) and says whether anything a decision reads changed."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._nodes: dict[str, NodeView] = {}
        self.version = 0  # bumps on every change
        # Raft id -> node name, rebuilt when the version moves: every Raft send asks.
        self._by_member: dict[str, str] = {}
        self._by_member_version = -1

    def update(self, members: Iterable[Any], now: float, full: bool = False) -> bool:
        """Apply member views; `full`: they are the whole membership (members absent are
        forgotten). Returns True when a NodeView changed."""
        changed = False
        seen = set()
        for m in members:
            seen.add(m.id)
            old = self._nodes.get(m.id)
            new = node_view(m, now, old)
            if new != old:
                self._nodes[m.id] = new
                changed = True
        if full:
            for gone in set(self._nodes) - seen - {self.me}:
                del self._nodes[gone]
                changed = True
        if changed:
            self.version += 1
        return changed

    def set_own(self, payload: PeerPayload, now: float) -> bool:
        """This node's own view: gossip sends no events about ourselves."""
        old = self._nodes.get(self.me)
        since = old.since if old is not None else now
        new = NodeView(self.me, ALIVE, since, payload, old.incarnation if old is not None else 0)
        if new == old:
            return False
        self._nodes[self.me] = new
        self.version += 1
        return True

    # ---- reading

    def nodes(self) -> list[NodeView]:
        return [self._nodes[k] for k in sorted(self._nodes)]

    def node(self, node_id: str) -> NodeView | None:
        return self._nodes.get(node_id)

    def members(self, cluster_id: str | None) -> list[NodeView]:
        """The nodes of cluster `cluster_id` (see member_of)."""
        return [n for n in self.nodes() if member_of(n, cluster_id)]

    def other_clusters(self, cluster_id: str | None) -> dict[str, list[str]]:
        """Other cluster ids visible in gossip (same key), with their reachable nodes."""
        out: dict[str, list[str]] = {}
        if cluster_id is None:
            return out
        for n in self.nodes():
            if n.cluster_id not in (None, cluster_id) and n.state in REACHABLE:
                out.setdefault(n.cluster_id, []).append(n.id)
        return out

    def addresses(self) -> dict[str, str]:
        return {n.id: n.addr for n in self.nodes() if n.addr}

    def reads_raft_datagrams(self, node_id: str) -> bool:
        """Whether that node reads Raft heartbeats on the gossip channel (its "rd")."""
        node = self._nodes.get(node_id)
        return node is not None and node.payload.raft_datagrams

    def node_of_member(self, raft_id: str) -> str:
        """The node name of a Raft id: the node that advertises it, else the name in it."""
        if self._by_member_version != self.version:
            self._by_member = {n.member: n.id for n in self._nodes.values() if n.member}
            self._by_member_version = self.version
        return self._by_member.get(raft_id) or node_of(raft_id)

    def peer_files(self, cluster_id: str | None) -> list[tuple[str, str, list[str]]]:
        """(node, addr, sha256s) of alive members other than this one that hold files."""
        return [
            (n.id, n.addr, [f[0] for f in n.files])
            for n in self.members(cluster_id)
            if n.id != self.me and n.state == ALIVE and n.addr
        ]

    def replicas_of(self, model: str, cluster_id: str | None) -> list[Replica]:
        """Instances of `model` on reachable members of this cluster, any instance state."""
        return [
            Replica(
                n.id,
                n.addr,
                n.id == self.me,
                inst.state,
                inst.queue_depth,
                n.state,
                inst.free_slots,
            )
            for n in self.members(cluster_id)
            if n.state in REACHABLE and n.addr
            for inst in n.payload.instances
            if inst.model == model
        ]

    def instance_states(self, cluster_id: str | None) -> dict[tuple[str, str], str]:
        """(node, model) -> instance state, for members of this cluster."""
        return {
            (n.id, inst.model): inst.state
            for n in self.members(cluster_id)
            for inst in n.payload.instances
        }

    def availability_of(self, model: str, state: ClusterState) -> ModelAvailability:
        """Why `model` has no ready replica to forward to: from the committed plan and the
        instance states its placements gossip."""
        if model not in state.models:
            return summarize_availability(False, ())
        placements = state.plan.for_model(model) if state.plan else ()
        states = self.instance_states(state.cluster_id)
        found = [states[(a.node, model)] for a in placements if (a.node, model) in states]
        unplaced = next(
            (u.reason for u in (state.plan.unplaced if state.plan else ()) if u.model == model),
            "",
        )
        return summarize_availability(True, found or (["pending"] if placements else []), unplaced)


def rpc_pairing(nodes: Sequence[NodeView]) -> tuple[str | None, dict[str, str]]:
    """The llama.cpp RPC version split models use (the one most usable nodes speak; the
    highest on a tie), and for every other node why it is left out of splits. llama.cpp
    refuses a server of another major version and the wire format changes with any."""
    count: dict[str, int] = {}
    for n in nodes:
        if n.rpc_version:
            count[n.rpc_version] = count.get(n.rpc_version, 0) + 1
    if not count:
        return None, {n.id: "no llama.cpp RPC backend" for n in nodes}

    def key(v: str) -> tuple:
        return (count[v], tuple(int(x) for x in v.split(".") if x.isdigit()))

    chosen = max(count, key=key)
    skipped = {}
    for n in nodes:
        if not n.rpc_version:
            skipped[n.id] = "no llama.cpp RPC backend"
        elif n.rpc_version != chosen:
            skipped[n.id] = f"RPC protocol {n.rpc_version} differs from the cluster's {chosen}"
    return chosen, skipped
