"""RaftNode: a pure Raft state machine in the style of etcd-io/raft (Tick/Step/Ready/Advance).

Nothing here touches a clock, a socket or a file. Time arrives as tick(), peers' messages as
step(), and everything the node wants done (persist, send, apply) leaves through ready().
The leader's side of log replication (progress, appends, heartbeats, snapshots, commit) is a
LeaderReplication (replication.py) that the node creates when it wins an election and drops
when it steps down; it depends on the log and two callables, never on the node.
Section numbers in comments refer to the Raft paper (Ongaro & Ousterhout, 2014) and, where
marked, to Ongaro's dissertation (2014).
"""

from __future__ import annotations

from random import Random

from .confchange import changed_conf
from .log import RaftLog
from .progress import Progress
from .replication import LeaderReplication
from .types import (
    APP,
    APP_RESP,
    CANDIDATE,
    CMD,
    CONF,
    FOLLOWER,
    HEARTBEAT,
    HEARTBEAT_RESP,
    LEADER,
    NOOP,
    PRE_CANDIDATE,
    PRE_VOTE,
    PRE_VOTE_RESP,
    READ_INDEX,
    READ_INDEX_RESP,
    SNAP,
    TIMEOUT_NOW,
    VOTE,
    VOTE_RESP,
    ConfState,
    HardState,
    Message,
    NotLeader,
    ProposalRejected,
    ReadState,
    Ready,
    Snapshot,
    encode_conf,
)

_WON, _LOST, _PENDING = "won", "lost", "pending"


class RaftNode:
    def __init__(
        self,
        id: str,
        storage,
        voters: tuple[str, ...] | list[str] = (),
        learners: tuple[str, ...] | list[str] = (),
        rng: Random | None = None,
        election_ticks: int = 10,
        heartbeat_ticks: int = 1,
        pre_vote: bool = True,
        check_quorum: bool = True,
        max_append_entries: int = 512,
        max_inflight: int = 64,
        max_committed_per_ready: int = 4096,
    ):
        if heartbeat_ticks < 1 or election_ticks <= heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        self.id = id
        self.rng = rng if rng is not None else Random(id)
        self.election_ticks = election_ticks
        self.heartbeat_ticks = heartbeat_ticks
        self.pre_vote = pre_vote
        self.check_quorum = check_quorum
        self.max_append_entries = max_append_entries
        self.max_inflight = max_inflight
        self.max_committed_per_ready = max_committed_per_ready

        hard_state, snapshot, entries = storage.initial_state()
        # The voters/learners arguments bootstrap a fresh node only; afterwards the
        # configuration comes from storage (snapshot and conf entries), so a restarted node
        # needs nothing but its storage. The bootstrap configuration is persisted as an
        # index-0 snapshot in the first Ready.
        fresh = snapshot is None and not entries and hard_state == HardState()
        if snapshot is None:
            snapshot = Snapshot(0, 0, ConfState(tuple(voters), tuple(learners)))
        self.log = RaftLog(snapshot, list(entries), hard_state.commit)
        self.snapshot = snapshot  # the latest snapshot: what a lagging follower is sent
        self.term = hard_state.term
        self.vote = hard_state.vote
        self._saved_hard_state = hard_state
        self._pending_snapshot = snapshot if fresh else None  # to persist
        self._restore = snapshot if snapshot.index > 0 else None  # to load into the state machine
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []  # linearizable reads ready to be served
        self._leading: LeaderReplication | None = None  # only while leader
        self.votes: dict[str, bool] = {}
        self.role = FOLLOWER
        self.leader_id: str | None = None
        self.election_elapsed = 0
        self.randomized_election_timeout = election_ticks
        self._become_follower(self.term, None)

    # ---- read-only views

    @property
    def commit_index(self) -> int:
        return self.log.committed

    @property
    def applied_index(self) -> int:
        return self.log.applied

    @property
    def last_index(self) -> int:
        return self.log.last_index()

    @property
    def voters(self) -> tuple[str, ...]:
        return self.log.conf().voters

    @property
    def learners(self) -> tuple[str, ...]:
        return self.log.conf().learners

    @property
    def progress(self) -> dict[str, Progress]:
        """The leader's view of each member's log (empty unless leader)."""
        return self._leading.progress if self._leading is not None else {}

    @property
    def lead_transferee(self) -> str | None:
        return self._leading.transferee if self._leading is not None else None

    def _quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def _promotable(self) -> bool:
        return self.id in self.voters

    # ---- the application's side: propose, conf changes, transfer, compaction

    def propose(self, data: bytes) -> int:
        """Append a command to the leader's log; returns its index. Raises NotLeader."""
        self._check_can_propose()
        self._leader_append([(CMD, bytes(data))])
        return self.log.last_index()

    def propose_conf_change(self, op: str, node: str, voter: bool = True) -> int:
        """One single-server membership change (dissertation 4.1): op "add" (voter=False adds
        a learner; voter=True on a learner promotes it), "promote" or "remove". It takes
        effect when committed; returns the index of its entry."""
        self._check_can_propose()
        # Dissertation 4.1 and Ongaro's 2015 raft-dev fix: a new leader must commit an entry of
        # its own term before changing membership, and only one change may be in flight.
        if self.log.term(self.log.committed) != self.term:
            raise ProposalRejected("the leader has not committed an entry of its term", True)
        if self.log.pending_conf_index() > self.log.committed:
            raise ProposalRejected("another configuration change is uncommitted", True)
        # The latest configuration in the log is the committed one: none is pending.
        new = changed_conf(self.log.conf(), op, node, voter)
        self._leader_append([(CONF, encode_conf(new, op, node))])
        return self.log.last_index()

    def transfer_leadership(self, to: str) -> None:
        """Hand leadership to voter `to` once its log is caught up (dissertation 3.10)."""
        if self.role != LEADER:
            raise NotLeader(self.leader_id)
        if to == self.id or to not in self.voters:
            raise ProposalRejected(f"cannot transfer leadership to {to!r}")
        if self._leading.transfer(to):
            self.election_elapsed = 0  # the transfer must finish within one election timeout

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read (dissertation 6.4, etcd's ReadOnlySafe): a later Ready
        carries ReadState(index, context) once the leader has confirmed with a quorum that
        it still leads; serve the read after applying up to `index`. On a follower the
        request goes to the leader. A request lost with a leader change never comes back:
        callers time out. Raises NotLeader while no leader is known."""
        if self.role == LEADER:
            self._leading.read_index(bytes(context), self.id)
        elif self.leader_id is not None:
            self._send(READ_INDEX, self.leader_id, context=bytes(context))
        else:
            raise NotLeader(None)

    def campaign(self) -> None:
        """Start an election now instead of at the next timeout (tests, bootstrap)."""
        if self._promotable():
            self._hup(transfer=False)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The state machine as of applied `index` is `data`: drop the log up to there (7)."""
        header = self.log.compact(index)
        snap = Snapshot(header.index, header.term, header.conf, bytes(data))
        self.snapshot = snap
        self._pending_snapshot = snap
        return snap

    def _check_can_propose(self) -> None:
        if self.role != LEADER:
            raise NotLeader(self.leader_id)
        if self.lead_transferee is not None:
            raise ProposalRejected("leadership transfer in progress", True)

    # ---- Ready / Advance

    def has_ready(self) -> bool:
        return bool(
            (self._leading is not None and self._leading.needs_broadcast)
            or self.msgs
            or self.read_states
            or self._pending_snapshot
            or self._restore
            or self.log.stable < self.log.last_index()
            or self.log.applied < self.log.committed
            or self._hard_state() != self._saved_hard_state
        )

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def ready(self) -> Ready:
        if self._leading is not None:
            self._leading.flush()
        hs = self._hard_state()
        return Ready(
            hard_state=hs if hs != self._saved_hard_state else None,
            entries=tuple(self.log.unstable()),
            snapshot=self._pending_snapshot,
            messages=tuple(self.msgs),
            committed=tuple(self.log.next_committed(self.max_committed_per_ready)),
            restore=self._restore,
            read_states=tuple(self.read_states),
            role=self.role,
            leader_id=self.leader_id,
            term=self.term,
        )

    def advance(self, rd: Ready) -> None:
        """rd has been saved, sent and applied."""
        if rd.hard_state is not None:
            self._saved_hard_state = rd.hard_state
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
        if rd.snapshot is not None and rd.snapshot is self._pending_snapshot:
            self._pending_snapshot = None
        if rd.restore is not None and rd.restore is self._restore:
            self._restore = None
        if rd.committed:
            self.log.applied_to(rd.committed[-1].index)
        del self.msgs[: len(rd.messages)]
        del self.read_states[: len(rd.read_states)]

    # ---- time

    def tick(self) -> None:
        if self.role == LEADER:
            self._tick_leader()
        else:
            self.election_elapsed += 1
            if self._promotable() and self.election_elapsed >= self.randomized_election_timeout:
                self.election_elapsed = 0
                self._hup(transfer=False)

    def ticks_until_due(self) -> int | None:
        """How many tick() calls from now until one may do something (campaign, check the
        quorum, send heartbeats, resend a snapshot); None if no tick ever will (a learner's
        clock only ages its lease). Ticks before that only count: a driver may sleep until
        then and make them up at once, but must make up the elapsed ones before step()."""
        if self.role == LEADER:
            return max(
                1, min(self.election_ticks - self.election_elapsed, self._leading.ticks_until_due())
            )
        if not self._promotable():
            return None
        return max(1, self.randomized_election_timeout - self.election_elapsed)

    def _tick_leader(self) -> None:
        leading = self._leading
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_ticks:
            self.election_elapsed = 0
            # CheckQuorum (dissertation 6.2): a leader that has not heard from a quorum within
            # an election timeout steps down, so clients stop waiting on a partitioned leader.
            if self.check_quorum and not leading.quorum_active():
                self._become_follower(self.term, None)
                return
            leading.transferee = None  # a transfer that took a whole timeout has failed
        leading.tick()

    # ---- role changes

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = None
        self.leader_id = None
        self.election_elapsed = 0
        # Randomized election timeout in [T, 2T) so that split votes are rare (5.2).
        self.randomized_election_timeout = self.election_ticks + self.rng.randrange(
            self.election_ticks
        )
        self.votes = {}
        self._leading = None

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role = FOLLOWER
        self.leader_id = leader

    def _become_pre_candidate(self) -> None:
        # PreVote (dissertation 9.6): find out whether an election could be won before
        # bumping the term, so a node that was cut off cannot depose a working leader.
        self.role = PRE_CANDIDATE
        self.votes = {}
        self.leader_id = None

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = LEADER
        self.leader_id = self.id
        self._leading = LeaderReplication(
            self.id,
            self.term,
            self.log,
            self._send,
            lambda: self.snapshot,
            self.read_states.append,
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            max_append_entries=self.max_append_entries,
            max_inflight=self.max_inflight,
        )
        # A no-op of the new term lets the leader commit entries of earlier terms (5.4.2, 8).
        self._leader_append([(NOOP, b"")])

    def _leader_append(self, items: list[tuple[str, bytes]]) -> None:
        self._leading.append(items)
        self._step_down_if_removed()

    def _step_down_if_removed(self) -> None:
        if self._leading is not None and self._leading.removed:
            self._become_follower(self.term, None)

    def _hup(self, transfer: bool) -> None:
        if self.role == LEADER:
            return
        if self.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            vote_term, kind = self.term + 1, PRE_VOTE
        else:
            self._become_candidate()
            vote_term, kind = self.term, VOTE
        result = self._poll(self.id, True)
        if result == _WON:  # a single-voter cluster
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        for voter in self.voters:
            if voter != self.id:
                self._send(
                    kind,
                    voter,
                    term=vote_term,
                    index=self.log.last_index(),
                    log_term=self.log.last_term(),
                    force=transfer,
                )

    def _poll(self, voter: str, granted: bool) -> str:
        self.votes.setdefault(voter, granted)
        voters = self.voters
        yes = sum(1 for v in voters if self.votes.get(v) is True)
        no = sum(1 for v in voters if self.votes.get(v) is False)
        if yes >= self._quorum():
            return _WON
        if no > len(voters) - self._quorum():
            return _LOST
        return _PENDING

    # ---- messages in

    def step(self, m: Message) -> None:
        if m.dst != self.id:
            return
        if m.term > self.term:
            if m.type in (VOTE, PRE_VOTE):
                # Leader lease with CheckQuorum (dissertation 4.2.3): while we have heard from a
                # leader within the minimum election timeout, ignore vote requests, unless
                # the leader itself asked for this election (leadership transfer).
                in_lease = (
                    self.check_quorum
                    and self.leader_id is not None
                    and self.election_elapsed < self.election_ticks
                )
                if in_lease and not m.force:
                    return
            if m.type == PRE_VOTE or (m.type == PRE_VOTE_RESP and not m.reject):
                pass  # a pre-vote never changes anyone's term
            else:
                leader = m.src if m.type in (APP, HEARTBEAT, SNAP) else None
                self._become_follower(m.term, leader)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and m.type in (APP, HEARTBEAT):
                # Tell a stale leader about the newer term; with PreVote it could otherwise
                # never learn it (our pre-votes would not reach it with a higher term).
                self._send(APP_RESP, m.src)
            elif m.type == PRE_VOTE:
                self._send(PRE_VOTE_RESP, m.src, reject=True)
            return

        if m.type in (VOTE, PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == LEADER:
            self._leading.step(m)
            self._step_down_if_removed()
        elif self.role in (CANDIDATE, PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: Message) -> None:
        resp = VOTE_RESP if m.type == VOTE else PRE_VOTE_RESP
        can_vote = (
            self.vote == m.src
            or (self.vote is None and self.leader_id is None)
            or (m.type == PRE_VOTE and m.term > self.term)
        )
        # Election restriction (5.4.1): only vote for a log at least as up to date as ours.
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(resp, m.src, term=m.term)
            if m.type == VOTE:
                self.election_elapsed = 0
                self.vote = m.src
        else:
            self._send(resp, m.src, reject=True)

    def _step_follower(self, m: Message) -> None:
        if m.type in (APP, HEARTBEAT, SNAP):
            self.election_elapsed = 0
            self.leader_id = m.src
            self._handle_from_leader(m)
        elif m.type == TIMEOUT_NOW and self._promotable():
            self._hup(transfer=True)
        elif m.type == READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))

    def _step_candidate(self, m: Message) -> None:
        if m.type in (APP, HEARTBEAT, SNAP):
            # Another server won this term (5.2).
            self._become_follower(m.term, m.src)
            self._handle_from_leader(m)
        elif (m.type == VOTE_RESP and self.role == CANDIDATE) or (
            m.type == PRE_VOTE_RESP and self.role == PRE_CANDIDATE
        ):
            result = self._poll(m.src, not m.reject)
            if result == _WON:
                if self.role == PRE_CANDIDATE:
                    self._campaign(pre=False, transfer=False)
                else:
                    self._become_leader()
            elif result == _LOST:
                self._become_follower(self.term, None)

    def _handle_from_leader(self, m: Message) -> None:
        if m.type == APP:
            self._handle_append(m)
        elif m.type == HEARTBEAT:
            self.log.commit_to(min(m.commit, self.log.last_index()))
            self._send(HEARTBEAT_RESP, m.src, context=m.context)
        else:
            self._handle_snapshot(m)

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(APP_RESP, m.src, index=self.log.committed)
            return
        last = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last is not None:
            self._send(APP_RESP, m.src, index=last)
            return
        # Consistency check failed (5.3). Hint the leader at the last index whose term is at
        # most the leader's term there, so it skips a whole divergent term per round trip.
        hint_index, hint_term = self.log.find_conflict_by_term(
            min(m.index, self.log.last_index()), m.log_term
        )
        self._send(
            APP_RESP, m.src, index=m.index, reject=True, reject_hint=hint_index, log_term=hint_term
        )

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        assert snap is not None
        if snap.index <= self.log.committed:
            self._send(APP_RESP, m.src, index=self.log.committed)
            return
        if self.log.match_term(snap.index, snap.term):
            # We hold the snapshot's last entry: keep the log after it, just commit (7). Only
            # up to snap.index is known to match; what follows may still diverge.
            self.log.commit_to(snap.index)
        else:
            self.log.restore(snap)
            self.snapshot = snap
            self._pending_snapshot = snap
            self._restore = snap
        self._send(APP_RESP, m.src, index=snap.index)

    def _send(self, kind: str, to: str, term: int | None = None, **fields) -> None:
        self.msgs.append(Message(kind, self.id, to, self.term if term is None else term, **fields))

    def __repr__(self) -> str:
        return (
            f"RaftNode({self.id} {self.role} term={self.term} lead={self.leader_id} "
            f"last={self.log.last_index()} commit={self.log.committed})"
        )
