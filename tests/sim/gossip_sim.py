"""Deterministic discrete-event simulation of a cluster of pure `Membership` cores.

The network drops packets with probability `loss`, delays each by a random LAN latency,
honours partitions, and buffers packets for paused nodes (as a socket buffer would).
Everything random comes from one seed, so a failing seed replays exactly. Used by the
tests in tests/sim/test_gossip_*.py and by bench/gossip.py.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from random import Random
from typing import Any

from peer.config import GossipConfig
from peer.membership import Membership
from peer.messages import DEAD, LEFT, Packet, PushPullRequest

PORT = 7946


@dataclass
class SimNode:
    id: str
    core: Membership
    crashed: bool = False
    paused_until: float = 0.0
    buffered: list[tuple[str, tuple]] = field(default_factory=list)
    wake_at: float | None = None


class GossipSim:
    def __init__(
        self,
        n: int,
        seed: int,
        config: GossipConfig | None = None,
        loss: float = 0.0,
        latency: tuple[float, float] = (0.0002, 0.002),
        converged: bool = True,
    ) -> None:
        self.config = config or GossipConfig()
        self.seed = seed
        self.loss = loss
        self.latency = latency
        self.rng = Random(seed)
        self.now = 0.0
        self._heap: list[tuple[float, int, str, str, Any]] = []
        self._order = 0
        self.nodes: dict[str, SimNode] = {}
        self.blocked: set[tuple[str, str]] = set()
        # Observations, fed by every node's events: (time, observer, kind, subject, incarnation)
        self.log: list[tuple[float, str, str, str, int]] = []
        self.false_positives: list[tuple[float, str, str]] = []
        self.packets = 0
        for i in range(n):
            self.add_node(f"n{i:03d}", join=None)
        if converged:
            # Start as if everyone had pushed-pulled with everyone: all know all.
            everyone = [node.core.local_state()[0] for node in self.nodes.values()]
            for node in self.nodes.values():
                node.core.merge_remote_state(everyone, 0.0)
                node.core.take_outputs()
                node.core.take_events()
                node.core.broadcasts.clear()  # a settled cluster: the joins are old news
                self._reschedule(node)

    # ----- cluster control -------------------------------------------------------------

    def add_node(self, node_id: str, join: str | None, incarnation: int = 0) -> SimNode:
        rng = Random(self.rng.randrange(1 << 62))
        core = Membership(self.config, node_id, node_id, PORT, rng, self.now, {"v": 0}, incarnation)
        node = SimNode(node_id, core)
        self.nodes[node_id] = node
        if join is not None:
            self._schedule(self.now, "pushpull", node_id, join)
        self._reschedule(node)
        return node

    def crash(self, node_id: str) -> None:
        self.nodes[node_id].crashed = True

    def restart(self, node_id: str, join: str) -> SimNode:
        """A crashed node comes back with a fresh core (incarnation 0) and joins via `join`."""
        return self.add_node(node_id, join=join)

    def pause(self, node_id: str, duration: float) -> None:
        self.nodes[node_id].paused_until = self.now + duration
        self._schedule(self.now + duration, "resume", node_id, None)

    def partition(self, *groups: list[str]) -> None:
        for a_group in groups:
            for b_group in groups:
                if a_group is b_group:
                    continue
                self.blocked.update((a, b) for a in a_group for b in b_group)

    def heal(self) -> None:
        self.blocked.clear()

    def set_payload(self, node_id: str, payload: dict) -> None:
        node = self.nodes[node_id]
        node.core.set_payload(payload, self.now)
        self._flush(node)

    def leave(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.core.leave(self.now)
        self._flush(node)

    def live(self) -> list[SimNode]:
        return [
            n for n in self.nodes.values() if not n.crashed and n.core.member(n.id).state != LEFT
        ]

    def state_of(self, observer: str, subject: str) -> str | None:
        view = self.nodes[observer].core.member(subject)
        return None if view is None else view.state

    # ----- running ---------------------------------------------------------------------

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            when, _, kind, node_id, data = heapq.heappop(self._heap)
            self.now = when
            self._handle(kind, node_id, data)
        self.now = t

    def run_until_true(self, predicate, timeout: float, step: float = 0.01) -> float | None:
        """Seconds from now until predicate() holds, checked every `step`; None on timeout."""
        start = self.now
        while self.now - start <= timeout:
            if predicate():
                return self.now - start
            self.run_until(self.now + step)
        return None

    def _handle(self, kind: str, node_id: str, data: Any) -> None:
        node = self.nodes[node_id]
        if node.crashed:
            return
        paused = node.paused_until > self.now
        if kind == "wake":
            if paused or node.wake_at != self.now:
                return
            node.wake_at = None
            node.core.tick(self.now)
        elif kind == "deliver":
            if paused:
                node.buffered.append(data)
                return
            src, msgs = data
            node.core.receive(src, PORT, list(msgs), self.now)
        elif kind == "resume":
            if paused:
                return
            buffered, node.buffered = node.buffered, []
            for src, msgs in buffered:
                node.core.receive(src, PORT, list(msgs), self.now)
            node.wake_at = None
            node.core.tick(self.now)
        elif kind == "pushpull":
            if paused:
                return
            self._push_pull(node, data)
        self._flush(node)

    def _push_pull(self, node: SimNode, other_id: str) -> None:
        other = self.nodes.get(other_id)
        if (
            other is None
            or other.crashed
            or other.paused_until > self.now
            or (node.id, other_id) in self.blocked
        ):
            return
        # A TCP exchange: no loss, both sides merge the other's full state.
        theirs = other.core.local_state()
        other.core.merge_remote_state(node.core.local_state(), self.now)
        node.core.merge_remote_state(theirs, self.now)
        self._flush(other)

    def _flush(self, node: SimNode) -> None:
        for out in node.core.take_outputs():
            if isinstance(out, Packet):
                self.packets += 1
                dst = out.addr
                if (node.id, dst) in self.blocked or self.rng.random() < self.loss:
                    continue
                delay = self.rng.uniform(*self.latency)
                self._schedule(self.now + delay, "deliver", dst, (node.id, out.messages))
            elif isinstance(out, PushPullRequest):
                delay = self.rng.uniform(*self.latency) * 4
                self._schedule(self.now + delay, "pushpull", node.id, out.addr)
        for ev in node.core.take_events():
            subject = ev.member.id
            self.log.append((self.now, node.id, ev.kind, subject, ev.member.incarnation))
            if ev.kind == DEAD and not self.nodes[subject].crashed:
                self.false_positives.append((self.now, node.id, subject))
        self._reschedule(node)

    def _reschedule(self, node: SimNode) -> None:
        when = max(node.core.next_deadline(), self.now)
        if node.wake_at != when:
            node.wake_at = when  # any earlier-scheduled wake is now stale and skipped
            self._schedule(when, "wake", node.id, None)

    def _schedule(self, when: float, kind: str, node_id: str, data: Any) -> None:
        self._order += 1
        heapq.heappush(self._heap, (when, self._order, kind, node_id, data))

    # ----- measurements ----------------------------------------------------------------

    def all_see(self, subject: str, states: tuple[str, ...]) -> bool:
        return all(self.state_of(n.id, subject) in states for n in self.live() if n.id != subject)

    def all_dead(self, subject: str) -> bool:
        return self.all_see(subject, (DEAD, LEFT))

    def all_have_payload(self, subject: str, payload: dict) -> bool:
        for n in self.live():
            view = n.core.member(subject)
            if view is None or view.payload != payload:
                return False
        return True

    def agreement(self) -> list[str]:
        """Disagreements among live nodes about live nodes (empty when all agree)."""
        problems = []
        live = self.live()
        for subject in live:
            truth = subject.core.member(subject.id)
            for observer in live:
                seen = observer.core.member(subject.id)
                if seen is None or seen.state != "alive" or seen.payload != truth.payload:
                    problems.append(f"{observer.id} sees {subject.id} as {seen}")
        return problems
