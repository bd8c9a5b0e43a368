"""The leader's view of one follower's log (etcd-raft's tracker.Progress), pure.

probe: one AppendEntries at a time until the follower's match index is found (nextIndex moves
back with the follower's hint, so a long divergent log costs a few round trips, not one per
entry); replicate: stream entries optimistically, at most `max_inflight` messages unacknowledged;
snapshot: an InstallSnapshot is on its way, send nothing else until it is acknowledged.
"""

from __future__ import annotations

from collections import deque

PROBE = "probe"
REPLICATE = "replicate"
SNAPSHOT = "snapshot"


class Progress:
    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "inflights",
        "recent_active",
        "pending_snapshot",
        "snapshot_wait",
    )

    def __init__(self, next_index: int, match: int = 0):
        self.match = match
        self.next = next_index
        self.state = PROBE
        self.probe_sent = False  # in probe: an append is out, wait for its answer or a heartbeat
        self.inflights: deque[int] = deque()  # in replicate: last index of each unacked append
        self.recent_active = False  # heard from since the last CheckQuorum round
        self.pending_snapshot = 0
        self.snapshot_wait = 0  # ticks since the snapshot was sent; resend when it gets too long

    def become_probe(self) -> None:
        if self.state == SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.clear()

    def become_replicate(self) -> None:
        self.state = REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflights.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_wait = 0
        self.inflights.clear()

    def maybe_update(self, index: int) -> bool:
        """An append was acknowledged up to `index`. False if the answer is stale."""
        updated = False
        if self.match < index:
            self.match = index
            self.probe_sent = False
            updated = True
        self.next = max(self.next, index + 1)
        while self.inflights and self.inflights[0] <= index:
            self.inflights.popleft()
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """An append at prev index `rejected` was refused; the follower hints `match_hint`."""
        if self.state == REPLICATE:
            if rejected <= self.match:
                return False  # stale: we already know it matches there
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale: not an answer to the probe we have out
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self, max_inflight: int) -> bool:
        if self.state == PROBE:
            return self.probe_sent
        if self.state == REPLICATE:
            return len(self.inflights) >= max_inflight
        return True

    def sent_append(self, last_index: int | None) -> None:
        if self.state == REPLICATE:
            if last_index is not None:
                self.next = last_index + 1
                self.inflights.append(last_index)
        elif self.state == PROBE:
            self.probe_sent = True

    def __repr__(self) -> str:
        return f"Progress({self.state} match={self.match} next={self.next})"
