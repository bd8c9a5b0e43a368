"""A seeded, single-threaded whole-cluster simulator for consensus.RaftNode.

One `random.Random(seed)` drives everything (network delays, loss, duplication, tick skew), so
a run is a pure function of its seed and the actions applied to it. Time is an integer clock;
each node ticks every `period` units (8..12 when skewed: +-20% clock skew between nodes).

Like RaftDriver, which steps peers' messages, ticks and clients' proposals while it awaits
save() in a thread, the simulator delivers some of them between ready() and advance()
(`interleave`: the chance per Ready; its own seeded stream, so the main one is unchanged).

After every action `check()` asserts the five properties of the Raft paper's Figure 3 and
that no acknowledged proposal is lost. A proposal is acknowledged when the node it was
proposed on applies it (what RaftDriver.propose returns on).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from random import Random

import msgpack

from consensus import LEADER, MemoryStorage, NotLeader, ProposalRejected, RaftNode
from consensus.types import CMD, Entry, Message

CRASH_POINTS = ("before_save", "after_save", "after_send")


@dataclass
class StateMachine:
    applied: int = 0
    cmds: list = field(default_factory=list)  # (index, term, data) of applied "cmd" entries

    def encode(self) -> bytes:
        return msgpack.packb([self.applied, self.cmds], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> StateMachine:
        applied, cmds = msgpack.unpackb(data, raw=False)
        return cls(applied, [tuple(c) for c in cmds])


class SafetyViolation(AssertionError):
    pass


class Cluster:
    def __init__(
        self,
        n: int = 3,
        seed: int = 0,
        voters: tuple[str, ...] | None = None,
        learners: tuple[str, ...] = (),
        election_ticks: int = 10,
        heartbeat_ticks: int = 1,
        pre_vote: bool = True,
        check_quorum: bool = True,
        snapshot_every: int = 0,
        drop: float = 0.0,
        dup: float = 0.0,
        delay: tuple[int, int] = (1, 4),
        skew: bool = True,
        max_append_entries: int = 64,
        interleave: float = 0.3,
    ):
        self.seed = seed
        self.rng = Random(seed)
        self.interleave = interleave
        self.window_rng = Random(f"{seed}/window")
        self.window_events = 0  # messages, ticks and proposals that landed inside a Ready
        self.window_proposals = True  # off while settling: liveness is judged without load
        self.ids = [f"n{i + 1}" for i in range(n)]
        self.bootstrap_voters = tuple(voters) if voters is not None else tuple(self.ids)
        self.bootstrap_learners = tuple(learners)
        self.election_ticks = election_ticks
        self.heartbeat_ticks = heartbeat_ticks
        self.pre_vote = pre_vote
        self.check_quorum = check_quorum
        self.snapshot_every = snapshot_every
        self.max_append_entries = max_append_entries
        self.drop, self.dup, self.delay = drop, dup, delay
        self.storages = {i: MemoryStorage() for i in self.ids}
        self.nodes: dict[str, RaftNode | None] = {i: None for i in self.ids}
        self.sms: dict[str, StateMachine | None] = {i: None for i in self.ids}
        self.boots = dict.fromkeys(self.ids, 0)
        self.period = {i: self.rng.randint(8, 12) if skew else 10 for i in self.ids}
        self.next_tick: dict[str, int] = {}
        self.now = 0
        self.ticks = dict.fromkeys(self.ids, 0)
        self.queue: list[tuple[int, int, Message]] = []
        self.seq = 0
        self.blocked: set[tuple[str, str]] = set()  # directed (src, dst) pairs that lose everything
        self.crash_at: dict[str, str] = {}
        self.delivered = 0
        # history for the checks
        self.leader_of_term: dict[int, str] = {}
        self.leader_changes = 0  # how many distinct (term, leader) pairs have been seen
        self.committed: dict[int, tuple[Entry, int]] = {}  # index -> (entry, term it was seen in)
        self.commit_seen: dict[str, int] = {}
        self.applied: dict[int, Entry] = {}
        self.pending: dict[str, dict[int, tuple[int, bytes]]] = {i: {} for i in self.ids}
        self.acked: dict[int, tuple[int, bytes]] = {}
        self.leader_logs: dict[str, tuple[int, list[Entry]]] = {}
        self.last_proposal_term = 0
        # The clients' history for the linearizability check: [call, ret, kind, arg, result]
        # per operation, stamped by a logical clock that orders every call and return.
        self.ops: list[list] = []
        self.op_clock = 0
        self._write_ops: dict[tuple[str, int], int] = {}  # (node, index) -> its write
        self._read_ops: dict[str, dict[bytes, int]] = {i: {} for i in self.ids}
        self._reads_waiting: dict[str, list[tuple[int, int]]] = {i: [] for i in self.ids}
        for i in self.ids:
            self.start(i)

    # ---- nodes

    def start(self, nid: str) -> None:
        assert self.nodes[nid] is None
        self.boots[nid] += 1
        rng = Random(f"{self.seed}/{nid}/{self.boots[nid]}")
        self.nodes[nid] = RaftNode(
            nid,
            self.storages[nid],
            voters=self.bootstrap_voters,
            learners=self.bootstrap_learners,
            rng=rng,
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            pre_vote=self.pre_vote,
            check_quorum=self.check_quorum,
            max_append_entries=self.max_append_entries,
        )
        self.sms[nid] = StateMachine()
        self.commit_seen[nid] = 0
        self.next_tick[nid] = self.now + self.rng.randint(1, self.period[nid])
        self.process(nid)

    def crash(self, nid: str) -> None:
        """Lose everything not in storage: the node, its state machine, its clients' waits."""
        self.nodes[nid] = None
        self.sms[nid] = None
        self.pending[nid] = {}
        self.leader_logs.pop(nid, None)
        self.crash_at.pop(nid, None)
        self._read_ops[nid] = {}  # these reads never return: their outcome stays unknown
        self._reads_waiting[nid] = []

    def alive(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if n is not None]

    def leader(self) -> RaftNode | None:
        leaders = [n for n in self.alive() if n.role == LEADER]
        return max(leaders, key=lambda n: n.term) if leaders else None

    # ---- the Ready loop, as a driver runs it, with optional crashes inside it

    def process(self, nid: str) -> None:
        node = self.nodes[nid]
        while node is not None and node.has_ready():
            rd = node.ready()
            point = self.crash_at.pop(nid, None)
            if point == "before_save":
                return self.crash(nid)
            self._while_saving(nid)
            self.storages[nid].save(rd)
            if point == "after_save":
                return self.crash(nid)
            for m in rd.messages:
                self.send(m)
            if point == "after_send":
                return self.crash(nid)
            self.apply(nid, rd)
            node.advance(rd)
            self._serve_reads(nid, rd)
            sm = self.sms[nid]
            if self.snapshot_every and sm.applied - node.log.snap_index >= self.snapshot_every:
                node.compact(sm.applied, sm.encode())

    def _while_saving(self, nid: str) -> None:
        """What reaches a node while its driver awaits save(): a few of its messages (taken
        early from the network), maybe a tick, maybe a client's proposal. All of it lands
        between ready() and advance(), and nothing of it may leak into the Ready being saved."""
        rng = self.window_rng
        if rng.random() >= self.interleave:
            return
        node = self.nodes[nid]
        mine = sorted(x for x in self.queue if x[2].dst == nid)[: rng.randint(1, 3)]
        if mine:
            taken = {seq for _, seq, _ in mine}
            self.queue = [x for x in self.queue if x[1] not in taken]
            heapq.heapify(self.queue)
            for _, _, m in mine:
                if (m.src, m.dst) not in self.blocked:
                    self.delivered += 1
                    self.window_events += 1
                    node.step(m)
        if rng.random() < 0.3:
            self.next_tick[nid] += self.period[nid]  # the tick it takes now is its next one
            self.ticks[nid] += 1
            self.window_events += 1
            node.tick()
        if self.window_proposals and node.role == LEADER and rng.random() < 0.3:
            self.window_events += 1
            self._propose_on(node, b"w%d-%d" % (rng.randrange(1 << 16), self.op_clock))

    def apply(self, nid: str, rd) -> None:
        sm = self.sms[nid]
        if rd.restore is not None:
            restored = StateMachine.decode(rd.restore.data) if rd.restore.data else StateMachine()
            restored.applied = rd.restore.index
            self.sms[nid] = sm = restored
        for e in rd.committed:
            if e.index != sm.applied + 1:
                raise SafetyViolation(f"{nid} applied {e.index} after {sm.applied}")
            prev = self.applied.setdefault(e.index, e)
            if prev != e:  # State Machine Safety
                raise SafetyViolation(f"{nid} applied {e} but another node applied {prev}")
            committed, _ = self.committed.setdefault(e.index, (e, self.nodes[nid].term))
            if committed != e:
                raise SafetyViolation(f"{nid} applied {e} but {committed} was committed")
            sm.applied = e.index
            if e.kind == CMD:
                sm.cmds.append((e.index, e.term, e.data))
            mine = self.pending[nid].pop(e.index, None)
            if mine is not None and mine == (e.term, e.data):
                self.acked[e.index] = mine
                self._returned(self._write_ops.pop((nid, e.index)), None)  # acknowledged

    # ---- network

    def send(self, m: Message) -> None:
        if (m.src, m.dst) in self.blocked or self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.seq += 1
            at = self.now + self.rng.randint(*self.delay)
            heapq.heappush(self.queue, (at, self.seq, m))

    def isolate(self, nid: str) -> None:
        for other in self.ids:
            if other != nid:
                self.blocked |= {(nid, other), (other, nid)}

    def partition(self, *groups: tuple[str, ...]) -> None:
        side = {n: g for g, members in enumerate(groups) for n in members}
        for a in self.ids:
            for b in self.ids:
                if a != b and side.get(a, -1) != side.get(b, -2):
                    self.blocked.add((a, b))

    def heal(self) -> None:
        self.blocked.clear()

    # ---- time

    def next_event(self) -> None:
        """Jump to the next timer: the earliest tick or message delivery."""
        ticking = [(t, nid) for nid, t in self.next_tick.items() if self.nodes[nid] is not None]
        tick_at, tick_nid = min(ticking) if ticking else (None, None)
        if self.queue and (tick_at is None or self.queue[0][0] <= tick_at):
            at, _, m = heapq.heappop(self.queue)
            self.now = max(self.now, at)
            node = self.nodes.get(m.dst)
            if node is not None and (m.src, m.dst) not in self.blocked:
                self.delivered += 1
                node.step(m)
                self.process(m.dst)
        elif tick_nid is not None:
            self.now = max(self.now, tick_at)
            self.next_tick[tick_nid] = tick_at + self.period[tick_nid]
            self.ticks[tick_nid] += 1
            self.nodes[tick_nid].tick()
            self.process(tick_nid)

    def run(self, events: int, check: bool = True) -> None:
        for _ in range(events):
            self.next_event()
            if check:
                self.check()

    def run_until(self, pred, max_time: int, check: bool = True) -> bool:
        deadline = self.now + max_time
        while self.now <= deadline:
            if pred():
                return True
            self.next_event()
            if check:
                self.check()
        return pred()

    # ---- clients

    def propose(self, data: bytes, nid: str | None = None) -> int | None:
        node = self.nodes[nid] if nid else self.leader()
        if node is None:
            return None
        index = self._propose_on(node, data)
        if index is not None:
            self.process(node.id)
        return index

    def _propose_on(self, node: RaftNode, data: bytes) -> int | None:
        try:
            index = node.propose(data)
        except (NotLeader, ProposalRejected):
            return None
        self.pending[node.id][index] = (node.term, data)
        self.last_proposal_term = node.term
        self._write_ops[(node.id, index)] = self._called("write", data)
        return index

    def read(self, nid: str) -> None:
        """A linearizable read (ReadIndex) on nid: it returns the value of the last applied
        command once nid has applied up to the read index."""
        node = self.nodes[nid]
        if node is None:
            return
        context = b"read%d" % (self.op_clock + 1)
        try:
            node.read_index(context)
        except NotLeader:
            return  # refused at once: it never happened
        self._read_ops[nid][context] = self._called("read", None)
        self.process(nid)

    def _serve_reads(self, nid: str, rd) -> None:
        for state in rd.read_states:
            op = self._read_ops[nid].pop(state.context, None)
            if op is not None:
                self._reads_waiting[nid].append((state.index, op))
        sm = self.sms[nid]
        waiting = []
        for index, op in self._reads_waiting[nid]:
            if sm.applied >= index:
                self._returned(op, sm.cmds[-1][2] if sm.cmds else None)
            else:
                waiting.append((index, op))
        self._reads_waiting[nid] = waiting

    def _called(self, kind: str, arg) -> int:
        self.op_clock += 1
        self.ops.append([self.op_clock, None, kind, arg, None])
        return len(self.ops) - 1

    def _returned(self, op: int, result) -> None:
        self.op_clock += 1
        self.ops[op][1] = self.op_clock
        self.ops[op][4] = result

    def conf_change(self, op: str, target: str, voter: bool = True) -> int | None:
        node = self.leader()
        if node is None:
            return None
        try:
            index = node.propose_conf_change(op, target, voter=voter)
        except (NotLeader, ProposalRejected):
            return None
        self.process(node.id)
        return index

    def transfer(self, target: str) -> None:
        node = self.leader()
        if node is None:
            return
        try:
            node.transfer_leadership(target)
        except (NotLeader, ProposalRejected):
            return
        self.process(node.id)

    # ---- the checks

    def check(self) -> None:
        nodes = self.alive()
        for n in nodes:
            if n.role == LEADER:
                # Election Safety: at most one leader per term.
                holder = self.leader_of_term.setdefault(n.term, n.id)
                if holder != n.id:
                    raise SafetyViolation(f"two leaders in term {n.term}: {holder} and {n.id}")
                self._check_leader(n)
            self._record_commits(n)
        # Log Matching: same index and term => identical logs up to there.
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                _check_log_matching(a, b)

    def _record_commits(self, n: RaftNode) -> None:
        log = n.log
        start = max(self.commit_seen[n.id], log.snap_index) + 1
        for index in range(start, log.committed + 1):
            e = log.entries[index - log.snap_index - 1]
            prev, _ = self.committed.setdefault(index, (e, n.term))
            if prev != e:
                raise SafetyViolation(f"{n.id} committed {e} at {index}, others {prev}")
        self.commit_seen[n.id] = max(self.commit_seen[n.id], log.committed)

    def _check_leader(self, n: RaftNode) -> None:
        log = n.log
        seen = self.leader_logs.get(n.id)
        if seen is not None and seen[0] == n.term:
            # Leader Append-Only: a leader never overwrites or deletes its entries.
            for e in seen[1]:
                if e.index > log.snap_index and log.term(e.index) != e.term:
                    raise SafetyViolation(f"leader {n.id} lost or overwrote {e}")
        else:
            # Leader Completeness: a new leader holds every entry committed in earlier terms.
            self.leader_changes += 1
            for index, (e, seen_term) in self.committed.items():
                if seen_term < n.term and index > log.snap_index and log.term(index) != e.term:
                    raise SafetyViolation(f"leader {n.id} of term {n.term} lacks committed {e}")
            # ... in particular every acknowledged proposal, which must never be lost.
            for index, (term, data) in self.acked.items():
                if index > log.snap_index:
                    held = (
                        log.entries[index - log.snap_index - 1]
                        if index <= log.last_index()
                        else None
                    )
                    if held is None or (held.term, held.data) != (term, data):
                        raise SafetyViolation(
                            f"acknowledged proposal {index} lost: leader {n.id} holds {held}"
                        )
        self.leader_logs[n.id] = (n.term, list(log.entries[-64:]))

    # ---- the end of a run: heal everything and demand progress

    def settle(self, max_ticks: int = 200) -> None:
        """Heal, restart everyone, then require a leader and every acked proposal applied on
        every member within a bounded number of ticks (liveness with a connected majority)."""
        self.heal()
        self.window_proposals = False
        self.drop = self.dup = 0.0
        self.crash_at.clear()
        for nid in self.ids:
            if self.nodes[nid] is None:
                self.start(nid)
        horizon = max_ticks * max(self.period.values())
        if not self.run_until(lambda: self.leader() is not None, horizon):
            raise SafetyViolation(
                f"no leader within {max_ticks} ticks after healing: {self.alive()}"
            )
        # Commit a fresh entry through whoever leads; retry if leadership moves under it.
        marker = None
        for attempt in range(40):
            self.run_until(lambda: self.leader() is not None, horizon)
            data = b"settle-%d" % attempt
            index = self.propose(data)
            if index is None:  # refused (e.g. a transfer under way): let time pass, retry
                self.run_until(lambda: False, 2 * max(self.period.values()))
                continue
            want = (self.last_proposal_term, data)
            if self.run_until(lambda i=index, w=want: self.acked.get(i) == w, horizon // 4):
                marker = index
                break
        if marker is None:
            raise SafetyViolation(f"no proposal committed after healing: {self.alive()}")
        leader = self.leader()
        members: list[str] = []

        def caught_up() -> bool:
            now_leader = self.leader()
            if now_leader is None:
                return False
            members[:] = now_leader.log.conf().members()
            # Proposals taken inside a Ready window may have been acknowledged after the marker.
            last = max([marker, *self.acked])
            return all(self.sms[m] is not None and self.sms[m].applied >= last for m in members)

        if not self.run_until(caught_up, horizon):
            raise SafetyViolation(f"members did not catch up to {marker} led by {leader}")
        for m in members:
            have = set(self.sms[m].cmds)
            for index, (term, data) in self.acked.items():
                if (index, term, data) not in have:
                    raise SafetyViolation(f"{m} lacks acknowledged {(index, term, data)}")
        self.check()


def _check_log_matching(a: RaftNode, b: RaftNode) -> None:
    la, lb = a.log, b.log
    lo = max(la.snap_index, lb.snap_index) + 1
    hi = min(la.last_index(), lb.last_index())
    # Find the highest common index holding the same term; everything up to it must be equal.
    index = hi
    while index >= lo:
        ea = la.entries[index - la.snap_index - 1]
        eb = lb.entries[index - lb.snap_index - 1]
        if ea.term == eb.term:
            break
        index -= 1
    if index < lo:
        return
    sa = la.entries[lo - la.snap_index - 1 : index - la.snap_index]
    sb = lb.entries[lo - lb.snap_index - 1 : index - lb.snap_index]
    if sa != sb:
        bad = next(x.index for x, y in zip(sa, sb, strict=True) if x != y)
        raise SafetyViolation(
            f"{a.id} and {b.id} agree on term at {index} but differ at {bad} (Log Matching)"
        )
