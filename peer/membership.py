"""SWIM membership with the Lifeguard extensions, as a pure state machine (sans-IO).

Drive it with `tick(now)`, `receive(addr, port, messages, now)` and the push-pull calls;
collect `take_outputs()` (packets to send, push-pulls to make) and `take_events()`.
Time is a `now` argument in seconds, randomness a seeded `random.Random`: a simulation
replays exactly. Follows hashicorp/memberlist's state.go closely: round-robin probing,
indirect probes with nacks, suspicion with confirmations, incarnations and refutation,
local-health awareness, tombstones, and piggybacked transmit-limited broadcasts.
"""

from __future__ import annotations

from random import Random
from typing import Any

from peer import wire
from peer.awareness import Awareness
from peer.broadcast import BroadcastQueue
from peer.config import GossipConfig
from peer.member_table import Counters, Member, Probe, Relay
from peer.messages import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberEvent,
    MemberRecord,
    MemberView,
    Message,
    Nack,
    Output,
    Packet,
    Ping,
    PushPullRequest,
    Suspect,
)
from peer.suspicion import Suspicion


class Membership:
    def __init__(
        self,
        config: GossipConfig,
        node_id: str,
        addr: str,
        port: int,
        rng: Random,
        now: float,
        payload: dict[str, Any] | None = None,
        incarnation: int = 0,
    ) -> None:
        self.config = config
        self.id = node_id
        self.rng = rng
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue()
        self.counters = Counters()
        me = Member(node_id, addr, port, incarnation, ALIVE, now, wire.normalize(payload or {}))
        self._me = me
        self._members: dict[str, Member] = {node_id: self._me}
        self._live: int | None = None  # cached live_count()
        self._suspicions: dict[str, Suspicion] = {}
        self._rechecks: dict[str, float] = {}  # suspected node -> when to ask it directly again
        self._relays: dict[int, Relay] = {}
        self._probe: Probe | None = None
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._seq = rng.randrange(1 << 32)
        self._leaving = False
        # Start timers at random phases so that nodes started together do not beat in step.
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        self._next_push_pull = now + rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._next_reap = now + config.dead_reclaim_time / 4
        self._outputs: list[Output] = []
        self._events: list[MemberEvent] = []

    # ----- queries ---------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    def members(self) -> list[MemberView]:
        return [m.view() for m in sorted(self._members.values(), key=lambda m: m.id)]

    def member(self, node_id: str) -> MemberView | None:
        m = self._members.get(node_id)
        return None if m is None else m.view()

    def live_count(self) -> int:
        if self._live is None:  # recounted only after a state change
            self._live = sum(1 for m in self._members.values() if m.state in (ALIVE, SUSPECT))
        return self._live

    def take_outputs(self) -> list[Output]:
        out, self._outputs = self._outputs, []
        return out

    def take_events(self) -> list[MemberEvent]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float:
        """The earliest `now` at which tick() has something to do."""
        if self._leaving:
            return self._next_gossip
        times = [self._next_probe, self._next_push_pull, self._next_reap]
        # A gossip round with nothing queued sends nothing: an idle peer need not wake 10
        # times a second for it. What queues a broadcast also wakes the adapter's clock.
        if len(self.broadcasts):
            times.append(self._next_gossip)
        if self._probe is not None:
            p = self._probe
            waiting_ack = not (p.indirect_sent or p.acked) and p.target in self._members
            times.append(p.ack_deadline if waiting_ack else p.end)
        times.extend(r.deadline for r in self._relays.values())
        times.extend(s.deadline for s in self._suspicions.values())
        times.extend(self._rechecks.values())
        return min(times)

    def local_state(self) -> list[MemberRecord]:
        """Full state for push-pull."""
        return [
            MemberRecord(
                m.id, m.addr, m.port, m.incarnation, m.state, None if m.payload_stale else m.payload
            )
            for m in self._members.values()
        ]

    # ----- local changes ---------------------------------------------------------------

    def set_payload(self, payload: dict[str, Any], now: float) -> None:
        """Replace this node's payload; a new incarnation carries it to everyone. The same
        payload again changes nothing: the peer republishes it periodically, and a fresh
        incarnation each time would flood the cluster with alive broadcasts."""
        payload = wire.normalize(payload)
        if payload == self._me.payload or self._leaving:
            return  # a leaving node must not announce itself alive again (its workers
            # stop after the leave, and each stop changes the payload)
        self._me.payload = payload
        self._me.incarnation += 1
        self._broadcast_self_alive()

    def report_unreachable(self, node_id: str, now: float) -> bool:
        """Direct evidence from outside SWIM (a forwarded request refused or reset): suspect
        the member now, as a failed probe would. Refutation and the suspicion timeout still
        decide whether it dies, so one flaky connection cannot kill a live peer."""
        m = self._members.get(node_id)
        if m is None or m is self._me or m.state != ALIVE:
            return False
        self._on_suspect(Suspect(m.id, m.incarnation, self.id), now)
        return True

    def leave(self, now: float) -> None:
        """Graceful leave: tell every live member directly and by gossip."""
        self._leaving = True
        self._me.incarnation += 1
        self._me.state = LEFT
        self._live = None
        msg = Dead(self.id, self._me.incarnation, self.id)
        self._queue(msg)
        for m in self._members.values():
            if m is not self._me and m.state in (ALIVE, SUSPECT):
                self._send(m.addr, m.port, [msg])

    def request_push_pull(self, addr: str, port: int) -> None:
        self._outputs.append(PushPullRequest(addr, port))

    # ----- the clock -------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self._leaving:
            if now >= self._next_gossip:
                self._gossip(now)
            return
        self._check_probe(now)
        for seq in [s for s, r in self._relays.items() if now >= r.deadline]:
            relay = self._relays.pop(seq)
            if relay.nack:
                self._send(relay.addr, relay.port, [Nack(relay.seq)])
        for node_id in [n for n, s in self._suspicions.items() if now >= s.deadline]:
            self._suspicion_expired(node_id, now)
        for node_id in [n for n, t in self._rechecks.items() if now >= t]:
            self._recheck_suspect(node_id, now)
        if now >= self._next_probe:
            self._start_probe(now)
        if now >= self._next_gossip:
            self._gossip(now)
        if now >= self._next_push_pull:
            n = self.live_count()
            self._next_push_pull = now + self.config.push_pull_scaled(n)
            peers = self._random_members(1, lambda m: m.state == ALIVE)
            # Also retry one dead member (Serf's reconnect): after a partition heals, each side
            # learns the other lives again even though neither gossips to it any more.
            peers += self._random_members(1, lambda m: m.state == DEAD)
            for m in peers:
                self._outputs.append(PushPullRequest(m.addr, m.port))
        if now >= self._next_reap:
            self._reap(now)

    def _gossip(self, now: float) -> None:
        # Skip missed rounds rather than bursting after a pause.
        interval = self.config.gossip_interval
        self._next_gossip = max(self._next_gossip + interval, now + interval / 2)
        if not len(self.broadcasts):
            return
        recent = now - self.config.gossip_to_the_dead
        targets = self._random_members(
            self.config.gossip_nodes,
            lambda m: m.state in (ALIVE, SUSPECT) or m.since >= recent,
        )
        limit = self.config.retransmit_limit(self.live_count())
        for m in targets:
            msgs = self.broadcasts.take(self._budget(), limit)
            if not msgs:
                break
            self._emit(m.addr, m.port, msgs)

    def _reap(self, now: float) -> None:
        self._next_reap = now + self.config.dead_reclaim_time / 4
        cutoff = now - self.config.dead_reclaim_time
        for node_id in [
            m.id for m in self._members.values() if m.state in (DEAD, LEFT) and m.since < cutoff
        ]:
            if node_id != self.id:
                del self._members[node_id]
                self._live = None

    # ----- probing ---------------------------------------------------------------------

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                m = self._members.get(self._probe_order[self._probe_index])
                self._probe_index += 1
                if m is not None and m is not self._me and m.state in (ALIVE, SUSPECT):
                    return m
            self._probe_order = [i for i in self._members if i != self.id]
            self.rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _start_probe(self, now: float) -> None:
        interval = self.awareness.scale(self.config.probe_interval)
        self._next_probe = now + interval
        target = self._next_target()
        if target is None:
            return
        self._seq += 1
        self.counters.probes += 1
        timeout = self.awareness.scale(self.config.probe_timeout)
        self._probe = Probe(self._seq, target.id, now + timeout, now + interval)
        msgs: list[Message] = [Ping(self._seq, target.id, self.id)]
        if target.state == SUSPECT:
            # Lifeguard's buddy system: tell the suspect directly so it can refute at once.
            msgs.append(Suspect(target.id, target.incarnation, self.id))
        self._send(target.addr, target.port, msgs)

    def _check_probe(self, now: float) -> None:
        p = self._probe
        if p is None:
            return
        target = self._members.get(p.target)
        if p.acked or target is None or target.state not in (ALIVE, SUSPECT):
            p.indirect_sent = True  # nothing more to do for this probe but let it end
            if now >= p.end or target is None:
                self._probe = None
            return
        if not p.indirect_sent and now >= p.ack_deadline and now < p.end:
            p.indirect_sent = True
            helpers = self._random_members(
                self.config.indirect_checks,
                lambda m: m.state == ALIVE and m.id != p.target,
            )
            for h in helpers:
                self.counters.indirect_probes += 1
                ping = IndirectPing(p.seq, target.id, target.addr, target.port, self.id, True)
                self._send(h.addr, h.port, [ping])
            p.expected_nacks = len(helpers)
        if now < p.end:
            return
        self._probe = None
        if now - p.end > self.config.probe_interval:
            # We were paused or starved past the probe's end: our own health is the likelier
            # culprit, so the missing ack proves nothing about the target.
            self.awareness.apply_delta(1)
            return
        self.counters.probes_failed += 1
        # Lifeguard: missing nacks mean our own links are bad; if every helper nacked, the
        # helpers hear us fine and the target is the one in trouble (memberlist's rule).
        self.awareness.apply_delta(p.expected_nacks - p.nacks if p.expected_nacks else 1)
        self._on_suspect(Suspect(target.id, target.incarnation, self.id), now)

    # ----- receiving -------------------------------------------------------------------

    def receive(self, addr: str, port: int, messages: list[Message], now: float) -> None:
        for msg in messages:
            self.counters.messages_in += 1
            self._dispatch(addr, port, msg, now)

    def _dispatch(self, addr: str, port: int, msg: Message, now: float) -> None:
        match msg:
            case Ping():
                if msg.target == self.id and not self._leaving:
                    self._send(addr, port, [Ack(msg.seq)])
            case IndirectPing():
                if self._leaving:
                    return
                self._seq += 1
                relay = Relay(addr, port, msg.seq, now + self.config.probe_timeout, msg.nack)
                self._relays[self._seq] = relay
                self._send(msg.target_addr, msg.target_port, [Ping(self._seq, msg.target, self.id)])
            case Ack():
                p = self._probe
                if p is not None and p.seq == msg.seq and not p.acked:
                    p.acked = True
                    self.awareness.apply_delta(-1)
                elif msg.seq in self._relays:
                    relay = self._relays.pop(msg.seq)
                    self._send(relay.addr, relay.port, [Ack(relay.seq)])
            case Nack():
                p = self._probe
                if p is not None and p.seq == msg.seq:
                    p.nacks += 1
            case Alive():
                self._on_alive(msg, now)
            case Suspect():
                self._answer_stale_claim(addr, port, msg.node, msg.incarnation)
                self._on_suspect(msg, now)
            case Dead():
                self._answer_stale_claim(addr, port, msg.node, msg.incarnation)
                self._on_dead(msg, now)

    def merge_remote_state(self, records: list[MemberRecord], now: float) -> None:
        """Merge a push-pull peer's full state (memberlist's mergeState)."""
        for r in records:
            if r.state == ALIVE:
                self._on_alive(Alive(r.node, r.incarnation, r.addr, r.port, r.payload), now)
            elif r.state == LEFT:
                self._on_dead(Dead(r.node, r.incarnation, r.node), now)
            elif r.node in self._members or r.node == self.id:
                # Another's "dead" is only a suspicion here: we judge liveness ourselves.
                self._on_suspect(Suspect(r.node, r.incarnation, self.id), now)

    # ----- state changes (memberlist's aliveNode / suspectNode / deadNode) -------------

    def _on_alive(self, msg: Alive, now: float) -> None:
        if msg.node == self.id:
            if self._leaving:
                return
            if msg.incarnation > self._me.incarnation or (
                msg.incarnation == self._me.incarnation
                and msg.payload is not None
                and msg.payload != self._me.payload
            ):
                self._refute(msg.incarnation, None)
            return
        m = self._members.get(msg.node)
        if m is None:
            m = Member(msg.node, msg.addr, msg.port, msg.incarnation, ALIVE, now)
            m.payload = dict(msg.payload or {})
            m.payload_stale = msg.payload is None
            self._members[msg.node] = m
            self._live = None
            # Probe the newcomer at a random point of the current round.
            self._probe_order.insert(
                self.rng.randint(self._probe_index, len(self._probe_order)), m.id
            )
            self._queue(msg)
            self._event("joined", m)
            if msg.payload is None:
                self.request_push_pull(msg.addr, msg.port)
            return
        if msg.incarnation == m.incarnation and m.payload_stale and msg.payload is not None:
            m.payload_stale = False  # the push-pull we asked for, or the alive we missed
            if msg.payload != m.payload:
                m.payload = dict(msg.payload)
                self._event("payload", m)
            return
        if msg.incarnation <= m.incarnation:
            return
        was = m.state
        self._suspicions.pop(m.id, None)
        self._rechecks.pop(m.id, None)
        m.incarnation, m.addr, m.port = msg.incarnation, msg.addr, msg.port
        if was != ALIVE:
            m.state, m.since = ALIVE, now
            if was != SUSPECT:
                self._live = None
        self._queue(msg)
        if was != ALIVE:
            self._event("alive", m)
        m.payload_stale = msg.payload is None
        if msg.payload is None:
            self.request_push_pull(msg.addr, msg.port)
        elif msg.payload != m.payload:
            m.payload = dict(msg.payload)
            self._event("payload", m)

    def _on_suspect(self, msg: Suspect, now: float) -> None:
        if msg.node == self.id:
            if not self._leaving and msg.incarnation >= self._me.incarnation:
                self._refute(msg.incarnation, msg.sender)
            return
        m = self._members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation:
            return
        suspicion = self._suspicions.get(m.id)
        if suspicion is not None:
            if suspicion.confirm(msg.sender):
                self._queue(msg)  # re-gossip so others learn of the confirmation
            return
        if m.state != ALIVE:
            return
        n = self.live_count()
        needed = self.config.suspicion_confirmations
        if n - 2 < needed:
            needed = 0  # too few members to confirm anything (memberlist does the same)
        low, high = self.config.suspicion_bounds(n)
        self.counters.suspicions += 1
        if msg.incarnation > m.incarnation:
            m.payload_stale = True  # that incarnation's payload has not reached us yet
        m.incarnation, m.state, m.since = msg.incarnation, SUSPECT, now
        self._suspicions[m.id] = Suspicion(msg.sender, needed, low, high, now)
        self._rechecks[m.id] = now + self.config.probe_interval
        self._queue(msg)
        self._event("suspect", m)

    def _on_dead(self, msg: Dead, now: float) -> None:
        if msg.node == self.id:
            if not self._leaving and msg.incarnation >= self._me.incarnation:
                self._refute(msg.incarnation, msg.sender)
            return
        m = self._members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return
        self._suspicions.pop(m.id, None)
        self._rechecks.pop(m.id, None)
        m.incarnation, m.since = msg.incarnation, now
        m.state = LEFT if msg.sender == msg.node else DEAD
        self._live = None
        self._queue(msg)
        self._event(m.state, m)

    def _recheck_suspect(self, node_id: str, now: float) -> None:
        """Still no refutation: tell the suspect directly (a ping carrying the suspicion).
        A live suspect answers with its newer alive even if its broadcast refutation was
        lost; this bounds false positives under heavy loss (beyond memberlist)."""
        m = self._members.get(node_id)
        if m is None or m.state != SUSPECT or node_id not in self._suspicions:
            self._rechecks.pop(node_id, None)
            return
        self._rechecks[node_id] = now + self.config.probe_interval  # unscaled: the safety net
        self._seq += 1
        self._send(
            m.addr, m.port, [Ping(self._seq, m.id, self.id), Suspect(m.id, m.incarnation, self.id)]
        )

    def _suspicion_expired(self, node_id: str, now: float) -> None:
        self._suspicions.pop(node_id, None)
        self._rechecks.pop(node_id, None)
        m = self._members.get(node_id)
        if m is None or m.state != SUSPECT:
            return
        self.counters.declared_dead += 1
        self._on_dead(Dead(node_id, m.incarnation, self.id), now)

    def _answer_stale_claim(self, addr: str, port: int, node_id: str, claimed: int) -> None:
        """The sender still gossips a suspicion that was refuted: show it the newer alive
        directly, so a lost refutation is repaired by every stale claim that reaches anyone
        who knows better (beyond memberlist; it keeps 30% loss free of false positives)."""
        if self._leaving:
            return
        if node_id == self.id:
            if claimed < self._me.incarnation:
                self._send(addr, port, [self._self_alive()])
            return
        m = self._members.get(node_id)
        if m is not None and m.state == ALIVE and claimed < m.incarnation:
            self._send(addr, port, [self._alive_of(m)])

    def _refute(self, claimed: int, accuser: str | None) -> None:
        self.counters.refutations += 1
        self.awareness.apply_delta(1)  # being suspected hints at our own poor health
        self._me.incarnation = max(self._me.incarnation, claimed) + 1
        msg = self._broadcast_self_alive()
        accused_by = self._members.get(accuser) if accuser else None
        if accused_by is not None and accused_by.state in (ALIVE, SUSPECT):
            self._send(accused_by.addr, accused_by.port, [msg])

    def _alive_of(self, m: Member) -> Alive:
        msg = Alive(m.id, m.incarnation, m.addr, m.port, None if m.payload_stale else m.payload)
        if wire.encoded_size(msg) > self.config.max_gossip_payload:
            msg = Alive(m.id, m.incarnation, m.addr, m.port, None)
        return msg

    def _self_alive(self) -> Alive:
        return self._alive_of(self._me)

    def _broadcast_self_alive(self) -> Alive:
        msg = self._self_alive()
        self._queue(msg)
        return msg

    # ----- output helpers --------------------------------------------------------------

    def _queue(self, msg: Alive | Suspect | Dead) -> None:
        """Queue news about a member. Its alive (which carries the payload) and its
        suspicion are queued apart, so a suspicion at the same incarnation does not cut the
        payload's spread short; a death supersedes both, a newer alive the suspicion."""
        if isinstance(msg, Alive):
            self.broadcasts.remove(msg.node)
            key = _alive_key(msg.node)
        else:
            key = msg.node
            if isinstance(msg, Dead):
                self.broadcasts.remove(_alive_key(msg.node))
        self.broadcasts.enqueue(key, msg, wire.encoded_size(msg))

    def queued(self, node_id: str) -> list[Message]:
        """Broadcasts waiting to be sent about node_id (for tests and debugging)."""
        found = (self.broadcasts.pending(_alive_key(node_id)), self.broadcasts.pending(node_id))
        return [m for m in found if m is not None]

    def _budget(self) -> int:
        c = self.config
        return c.packet_size - wire.ENVELOPE_OVERHEAD - wire.COMPOUND_OVERHEAD

    def _send(self, addr: str, port: int, msgs: list[Message]) -> None:
        """Send msgs, piggybacking as many queued broadcasts as fit."""
        used = sum(wire.encoded_size(m) for m in msgs)
        limit = self.config.retransmit_limit(self.live_count())
        extra = [m for m in self.broadcasts.take(self._budget() - used, limit) if m not in msgs]
        self._emit(addr, port, msgs + extra)

    def _emit(self, addr: str, port: int, msgs: list[Message]) -> None:
        self.counters.packets_out += 1
        self._outputs.append(Packet(addr, port, tuple(msgs)))

    def _random_members(self, k: int, accept) -> list[Member]:
        pool = [m for m in self._members.values() if m is not self._me and accept(m)]
        if len(pool) <= k:
            self.rng.shuffle(pool)
            return pool
        return self.rng.sample(pool, k)

    def _event(self, kind: str, m: Member) -> None:
        self._events.append(MemberEvent(kind, m.view()))


def _alive_key(node_id: str) -> str:
    return node_id + "\x00alive"
