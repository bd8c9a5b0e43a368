"""The leader's side of log replication (paper 5.3, 7), pure: LeaderReplication.

RaftNode (core.py) keeps the roles, elections and the follower's side. A node that wins an
election creates one LeaderReplication for its term and drops it when it steps down; it owns
what only a leader tracks: each member's Progress, the heartbeat timer, a leadership transfer
under way. It appends the leader's entries, sends AppendEntries, heartbeats and snapshots as
each follower's Progress allows, handles the answers, and advances the commit index once a
quorum of voters holds an entry. It talks to the node only through what it is given: the
shared RaftLog, a `send` callable and a `latest_snapshot` callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .log import RaftLog
from .progress import PROBE, REPLICATE, SNAPSHOT, Progress
from .types import (
    APP,
    APP_RESP,
    HEARTBEAT,
    HEARTBEAT_RESP,
    READ_INDEX,
    READ_INDEX_RESP,
    SNAP,
    TIMEOUT_NOW,
    Entry,
    Message,
    ReadState,
    Snapshot,
)


@dataclass
class PendingRead:
    """A ReadIndex request waiting for a quorum of voters to confirm this leader."""

    context: bytes
    index: int  # the leader's commit index when the request came in
    requester: str
    acks: set[str]


class LeaderReplication:
    def __init__(
        self,
        node_id: str,
        term: int,
        log: RaftLog,
        send: Callable[..., None],
        latest_snapshot: Callable[[], Snapshot],
        read_done: Callable[[ReadState], None],
        *,
        election_ticks: int,
        heartbeat_ticks: int,
        max_append_entries: int,
        max_inflight: int,
    ):
        self.id = node_id
        self.term = term
        self.log = log
        self._send = send  # send(kind, to, **fields): a Message from this leader in its term
        self._latest_snapshot = latest_snapshot
        self._read_done = read_done  # a read this leader asked for itself is ready
        self.reads: list[PendingRead] = []  # in arrival order
        self._reads_before_commit: list[tuple[bytes, str]] = []
        self.election_ticks = election_ticks
        self.heartbeat_ticks = heartbeat_ticks
        self.max_append_entries = max_append_entries
        self.max_inflight = max_inflight
        self.heartbeat_elapsed = 0
        self.transferee: str | None = None  # a leadership transfer under way (dissertation 3.10)
        self.needs_broadcast = False  # appended entries not yet sent (sent at the next ready())
        self.removed = False  # a committed configuration dropped this leader: it must step down
        last = log.last_index()
        self.progress: dict[str, Progress] = {m: Progress(last + 1) for m in log.conf().members()}
        own = self.progress.setdefault(node_id, Progress(last + 1))  # even if being removed
        own.match = last
        own.recent_active = True

    @property
    def voters(self) -> tuple[str, ...]:
        return self.log.conf().voters

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    # ---- the leader's own calls

    def append(self, items: list[tuple[str, bytes]]) -> None:
        """Append (kind, data) items to the log as entries of the leader's term."""
        last = self.log.last_index()
        entries = [
            Entry(self.term, last + 1 + i, kind, data) for i, (kind, data) in enumerate(items)
        ]
        self.log.append(entries)
        self.progress[self.id].maybe_update(self.log.last_index())
        self.maybe_commit()
        self.needs_broadcast = True  # batched: one message per follower per ready()

    def flush(self) -> None:
        """Send what append() queued."""
        if self.needs_broadcast:
            self.needs_broadcast = False
            self.broadcast_append()

    def transfer(self, to: str) -> bool:
        """Start handing leadership to `to`; False if that transfer is already under way."""
        if self.transferee == to:
            return False
        self.transferee = to
        if self.progress[to].match == self.log.last_index():
            self._send(TIMEOUT_NOW, to)
        else:
            self.maybe_send_append(to)
        return True

    def tick(self) -> None:
        """The replication timers: resend a lost snapshot, send heartbeats when due."""
        self.heartbeat_elapsed += 1
        for peer, pr in self.progress.items():
            if pr.state == SNAPSHOT:
                pr.snapshot_wait += 1
                if pr.snapshot_wait >= self.election_ticks:  # the snapshot was probably lost
                    pr.become_probe()
                    self.maybe_send_append(peer)
        if self.heartbeat_elapsed >= self.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            # The latest pending read rides along: its acks release every read before it.
            self._send_heartbeats(self.reads[-1].context if self.reads else b"")

    def ticks_until_due(self) -> int:
        """Ticks until tick() sends heartbeats or gives up waiting on a snapshot."""
        due = self.heartbeat_ticks - self.heartbeat_elapsed
        for pr in self.progress.values():
            if pr.state == SNAPSHOT:
                due = min(due, self.election_ticks - pr.snapshot_wait)
        return max(1, due)

    def _send_heartbeats(self, context: bytes) -> None:
        for peer, pr in self.progress.items():
            if peer != self.id:
                commit = min(pr.match, self.log.committed)
                self._send(HEARTBEAT, peer, commit=commit, context=context)

    # ---- linearizable reads: ReadIndex (dissertation 6.4), etcd's ReadOnlySafe

    def read_index(self, context: bytes, requester: str) -> None:
        """Serve a read at the current commit index once a quorum of voters has confirmed,
        after the request arrived, that this node is still the leader (6.4 steps 1-2; the
        requester waits until it has applied that index, step 3)."""
        if self.log.term(self.log.committed) != self.term:
            # Until its no-op commits, a new leader's commit index may lag what an earlier
            # leader committed (6.4 step 1): hold the read until then.
            self._reads_before_commit.append((context, requester))
            return
        read = PendingRead(context, self.log.committed, requester, {self.id})
        if self._confirmed(read):
            self._release(read)  # a single voter needs nobody's confirmation
            return
        self.reads.append(read)
        self._send_heartbeats(context)

    def _confirmed(self, read: PendingRead) -> bool:
        return sum(1 for v in self.voters if v in read.acks) >= self.quorum()

    def _ack_read(self, voter: str, context: bytes) -> None:
        for i, read in enumerate(self.reads):
            if read.context == context:
                read.acks.add(voter)
                if self._confirmed(read):
                    # Leadership confirmed after every earlier read arrived: release them too.
                    done, self.reads = self.reads[: i + 1], self.reads[i + 1 :]
                    for r in done:
                        self._release(r)
                return

    def _release(self, read: PendingRead) -> None:
        if read.requester == self.id:
            self._read_done(ReadState(read.index, read.context))
        else:
            self._send(READ_INDEX_RESP, read.requester, index=read.index, context=read.context)

    def quorum_active(self) -> bool:
        """CheckQuorum (dissertation 6.2): has a quorum of voters been heard from since the
        last call? Starts the next round."""
        active = sum(
            1
            for v in self.voters
            if v == self.id or (v in self.progress and self.progress[v].recent_active)
        )
        for peer, pr in self.progress.items():
            pr.recent_active = peer == self.id
        return active >= self.quorum()

    # ---- answers from followers

    def step(self, m: Message) -> None:
        """A message to the leader (vote requests aside): a follower's answer to an append."""
        pr = self.progress.get(m.src)
        if pr is None:
            return
        if m.type == APP_RESP:
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif m.type == READ_INDEX:
            self.read_index(m.context, m.src)
        elif m.type == HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if m.context:
                self._ack_read(m.src, m.context)
            if pr.state == REPLICATE and len(pr.inflights) >= self.max_inflight:
                pr.inflights.popleft()  # free one slot so a lost append gets retried
            if pr.match < self.log.last_index():
                self.maybe_send_append(m.src)

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decrease_to(m.index, next_probe):
                if pr.state == REPLICATE:
                    pr.become_probe()
                self.maybe_send_append(m.src)
            return
        was_paused = pr.is_paused(self.max_inflight)
        if not pr.maybe_update(m.index):
            return
        if pr.state == PROBE:
            pr.become_replicate()
        elif pr.state == SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        if self.maybe_commit():
            if self.removed:
                return  # stepping down: maybe_commit sent the last appends
            self.broadcast_append()
            if m.src not in self.progress:
                return  # the committed configuration dropped the sender
        elif was_paused:
            self.maybe_send_append(m.src)
        while self.maybe_send_append(m.src, send_if_empty=False):
            pass
        if m.src == self.transferee and pr.match == self.log.last_index():
            self._send(TIMEOUT_NOW, m.src)

    # ---- commit and sending

    def maybe_commit(self) -> bool:
        """Commit up to the highest index a quorum of voters holds (5.3, 5.4.2)."""
        matches = sorted(
            (self.progress[v].match if v in self.progress else 0 for v in self.voters),
            reverse=True,
        )
        if not matches:
            return False
        committed = self.log.maybe_commit(matches[self.quorum() - 1], self.term)
        if committed:
            self._sync_progress_with_conf()  # a committed conf entry takes effect now
            if self._reads_before_commit:
                held, self._reads_before_commit = self._reads_before_commit, []
                for context, requester in held:
                    self.read_index(context, requester)
        # A leader removed from the configuration steps down once the change is committed
        # (dissertation 4.2.2); until then it replicates without counting itself. The
        # configuration takes effect where it is committed, so the others must learn that
        # commit: an append may be held back (a probe or a full window), a heartbeat is
        # not. Without it a voter left with the old configuration needs this node's vote,
        # which a longer log here refuses, and no leader is ever elected.
        if (
            not self.removed
            and self.id not in self.voters
            and self.log.committed >= self.log.pending_conf_index()
        ):
            self.broadcast_append()
            self._send_heartbeats(b"")
            self.removed = True
        return committed

    def _sync_progress_with_conf(self) -> None:
        members = set(self.log.conf().members())
        for member in members:
            if member not in self.progress:
                self.progress[member] = Progress(self.log.last_index() + 1)
        for peer in list(self.progress):
            if peer not in members and peer != self.id:
                del self.progress[peer]

    def broadcast_append(self) -> None:
        for peer in list(self.progress):
            if peer != self.id:
                self.maybe_send_append(peer)

    def maybe_send_append(self, to: str, send_if_empty: bool = True) -> bool:
        """Send `to` what its Progress allows: entries from its next index, or the snapshot."""
        pr = self.progress[to]
        if pr.is_paused(self.max_inflight):
            return False
        prev_index = pr.next - 1
        prev_term = self.log.term(prev_index)
        if prev_term is None:
            # The entries it needs are compacted: InstallSnapshot (7).
            snapshot = self._latest_snapshot()
            self._send(SNAP, to, snapshot=snapshot)
            pr.become_snapshot(snapshot.index)
            return True
        entries = self.log.slice(
            pr.next, min(self.log.last_index() + 1, pr.next + self.max_append_entries)
        )
        if not entries and not send_if_empty:
            return False
        self._send(
            APP,
            to,
            index=prev_index,
            log_term=prev_term,
            entries=tuple(entries),
            commit=self.log.committed,
        )
        pr.sent_append(entries[-1].index if entries else None)
        return True
