"""The in-memory Raft log of one node: entries after the latest snapshot, commit and stable marks,
and the configurations found in the log.

A configuration takes effect once its entry is committed (as in etcd-raft), not when appended
(dissertation 4.1): with append-time activation a leader that appended its own removal and
then lost its quorum can leave the survivors unable to elect anyone. Commit-time activation is
safe for single-server changes because each change is committed under the previous
configuration and the leader proposes the next one only after that.

Pure: no I/O. The node loads it from storage at start and tells storage what changed via Ready.
"""

from __future__ import annotations

from .types import CONF, ConfState, Entry, Snapshot, decode_conf


class LogSafetyError(AssertionError):
    """A Raft invariant was about to be broken (e.g. truncating a committed entry). Never caught."""


class RaftLog:
    def __init__(self, snapshot: Snapshot, entries: list[Entry], commit: int):
        self.snap_index = snapshot.index
        self.snap_term = snapshot.term
        self.entries: list[Entry] = []
        self.confs: list[tuple[int, ConfState]] = [(snapshot.index, snapshot.conf)]
        self._extend([e for e in entries if e.index > snapshot.index])
        self.stable = self.last_index()  # everything loaded from storage is on disk already
        self.committed = max(commit, snapshot.index)
        self.applied = snapshot.index

    # ---- reading

    def first_index(self) -> int:
        return self.snap_index + 1

    def last_index(self) -> int:
        return self.snap_index + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snap_term

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`; None if compacted away or beyond the end."""
        if index == self.snap_index:
            return self.snap_term
        if index < self.snap_index or index > self.last_index():
            return None
        return self.entries[index - self.snap_index - 1].term

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi; lo must not be compacted."""
        assert lo > self.snap_index, (lo, self.snap_index)
        return self.entries[lo - self.snap_index - 1 : hi - self.snap_index - 1]

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Is a log ending at (last_index, last_term) at least as up to date as ours? (5.4.1)"""
        return last_term > self.last_term() or (
            last_term == self.last_term() and last_index >= self.last_index()
        )

    def conf(self) -> ConfState:
        """The configuration in force: the latest committed one."""
        return self.conf_at(self.committed)

    def conf_at(self, index: int) -> ConfState:
        for at, conf in reversed(self.confs):
            if at <= index:
                return conf
        return self.confs[0][1]

    def pending_conf_index(self) -> int:
        return self.confs[-1][0]

    def unstable(self) -> list[Entry]:
        return self.entries[self.stable - self.snap_index :]

    def next_committed(self, limit: int) -> list[Entry]:
        lo = max(self.applied + 1, self.first_index())
        hi = min(self.committed, lo + limit - 1)
        return self.slice(lo, hi + 1) if hi >= lo else []

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, and that term (etcd-raft)."""
        index = min(index, self.last_index())
        while index > self.snap_index:
            t = self.term(index)
            if t is not None and t <= term:
                return index, t
            index -= 1
        return self.snap_index, self.snap_term

    # ---- writing

    def append(self, entries: list[Entry]) -> None:
        """Append, truncating any existing entries from entries[0].index on."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise LogSafetyError(f"truncating committed entry {first} (commit {self.committed})")
        if first > self.last_index() + 1:
            raise LogSafetyError(f"gap: appending {first} after {self.last_index()}")
        if first <= self.last_index():
            del self.entries[first - self.snap_index - 1 :]
            while self.confs[-1][0] >= first:
                self.confs.pop()
            self.stable = min(self.stable, first - 1)
        self._extend(entries)

    def _extend(self, entries: list[Entry]) -> None:
        for e in entries:
            self.entries.append(e)
            if e.kind == CONF:
                self.confs.append((e.index, decode_conf(e.data)))

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, entries: tuple[Entry, ...]
    ) -> int | None:
        """The follower's side of AppendEntries (5.3). Returns the last index now known to
        match the leader, or None if the consistency check fails."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        # Skip entries we already hold: a delayed or duplicated message must never truncate.
        for i, e in enumerate(entries):
            t = self.term(e.index)
            if t is None and e.index <= self.snap_index:
                continue  # compacted, so committed, so it matches
            if t != e.term:
                self.append(list(entries[i:]))
                break
        self.commit_to(min(commit, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise LogSafetyError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        # Only entries of the current term are committed by counting replicas (5.4.2).
        if index > self.committed and self.term(index) == term:
            self.committed = index
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        if index > self.stable and self.term(index) == term:
            self.stable = index

    def applied_to(self, index: int) -> None:
        self.applied = max(self.applied, index)

    def restore(self, snap: Snapshot) -> None:
        """Replace the whole log by a snapshot from the leader (7)."""
        self.snap_index, self.snap_term = snap.index, snap.term
        self.entries = []
        self.confs = [(snap.index, snap.conf)]
        self.committed = snap.index
        self.stable = snap.index
        self.applied = snap.index

    def compact(self, index: int) -> Snapshot:
        """Drop entries up to `index` (already applied); returns the snapshot header for them."""
        assert self.snap_index < index <= self.applied, (self.snap_index, index, self.applied)
        term = self.term(index)
        conf = self.conf_at(index)
        del self.entries[: index - self.snap_index]
        self.snap_index, self.snap_term = index, term
        later = [(at, c) for at, c in self.confs if at > index]
        self.confs = [(index, conf), *later]
        return Snapshot(index, term, conf)
