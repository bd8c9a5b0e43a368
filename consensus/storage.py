"""Raft storage: what must survive a crash (hard state, log, latest snapshot).

Both storages expose the same two calls the core and driver use:
  initial_state() -> (HardState, Snapshot | None, list[Entry])   # read once at node start
  save(rd)                                                         # durable when it returns

FileStorage layout in its directory:
  member              an id created with the directory (see FileStorage._member_id)
  vote                the latest term and vote, rewritten (atomically) each time they change,
                      after the log record that holds them: a log cut short that lost them is
                      refused instead of forgetting a vote
  snapshot            the latest snapshot (one checked record), replaced atomically by rename
  log-<seq>.wal       append-only segments of checked, CRC-chained records (framing: wal.py).
                      One save() is one record and one fsync, so a crash leaves either the whole
                      record or an incomplete final record, which recovery cuts off (and logs).
A segment saved with a snapshot has a "base" header (the hard state and the entries kept after
the snapshot); older segments are then deleted, which is how the log is truncated behind it.

Recovery refuses (StorageCorrupt) anything else that does not check: a damaged record in any
segment, a missing or reordered segment, a hard state that goes backwards, a log with a gap.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from pathlib import Path

from .types import ConfState, Entry, HardState, Ready, Snapshot
from .wal import (
    HEADER,
    Segment,
    StorageCorrupt,
    StorageError,
    StorageFull,
    frame,
    pack,
    read_checked_file,
    read_segment,
)

log = logging.getLogger(__name__)


def _apply_snapshot(entries: list[Entry], snap: Snapshot, restore: bool) -> list[Entry]:
    if restore:
        return []  # the leader's snapshot replaces the whole log
    return [e for e in entries if e.index > snap.index]


def _apply_entries(entries: list[Entry], new: tuple[Entry, ...] | list[Entry]) -> list[Entry]:
    if not new:
        return entries
    first = new[0].index
    if not entries or entries[-1].index + 1 == first:
        entries.extend(new)  # the common case: a plain append
        return entries
    kept = [e for e in entries if e.index < first]
    kept.extend(new)
    return kept


class MemoryStorage:
    """Everything in memory; survives a simulated crash because the simulator keeps the object."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    def initial_state(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        return self.hard_state, self.snapshot, list(self.entries)

    def save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = _apply_snapshot(self.entries, rd.snapshot, rd.restore is not None)
        self.entries = _apply_entries(self.entries, rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.index if self.snapshot else 0


# ---- FileStorage encoding


def _pack_entry(e: Entry) -> list:
    return [e.term, e.index, e.kind, e.data]


def _unpack_entries(raw) -> list[Entry]:
    return [Entry(int(x[0]), int(x[1]), str(x[2]), bytes(x[3])) for x in raw]


def _pack_hs(hs: HardState) -> list:
    return [hs.term, hs.vote, hs.commit]


def _pack_snapshot(s: Snapshot, restore: bool) -> dict:
    return {
        "v": 1,
        "index": s.index,
        "term": s.term,
        "voters": list(s.conf.voters),
        "learners": list(s.conf.learners),
        "data": s.data,
        "restore": restore,
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(path: Path, exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(
            f"the disk is full: cannot write the raft storage in {path} ({exc.strerror}). "
            "Free some space on that disk and start the peer again; what was acknowledged is kept."
        )
    return StorageError(
        f"cannot write the raft storage in {path}: {exc}. Check the disk, then start the peer again."
    )


def _entries_problem(log: list[Entry], start: int, new: list[Entry], commit: int) -> str | None:
    """Why appending `new` to a log that begins after `start` is impossible for Raft, if so."""
    last = log[-1].index if log else start
    first = new[0].index
    if first <= start or first > last + 1:
        return f"entries from {first} do not continue a log of {start + 1}..{last} (a gap)"
    if first <= commit:
        return f"entries from {first} overwrite committed entry {commit}"
    prev_term = log[first - start - 2].term if first - 1 > start else 0
    for e in new:
        if e.index != first or e.term < prev_term:
            return f"entry {e.index} (term {e.term}) is out of order"
        first, prev_term = first + 1, e.term
    return None


def _hard_state_problem(old: HardState, new: HardState) -> str | None:
    if new.term < old.term:
        return f"the term goes backwards ({old.term} -> {new.term})"
    if new.term == old.term and old.vote is not None and new.vote != old.vote:
        return f"the vote of term {new.term} changes ({old.vote} -> {new.vote})"
    if new.commit < old.commit:
        return f"the commit index goes backwards ({old.commit} -> {new.commit})"
    return None


class FileStorage:
    """Durable storage in a directory. Synchronous: save() returns after fsync. The driver
    calls it from a thread so the event loop never waits on the disk.

    Opening it raises StorageCorrupt if what is on disk does not check (see wal.py), and save()
    raises StorageFull on a full disk. After any failed save the storage refuses further saves
    (fail-stop: the file may end in a partial record, which the next start cuts off)."""

    def __init__(self, path: str | os.PathLike, segment_bytes: int = 64 << 20):
        self.path = Path(path)
        self.segment_bytes = segment_bytes  # start a new segment once the current one is this big
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self._seq = 0
        self._crc = 0  # the rolling CRC of the last record written
        self._vote: tuple[int, str | None] = (0, None)  # what the vote file holds
        self._file = None
        self._size = 0
        self._failed: StorageError | None = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.member_id = self._member_id()
            self._recover()
        except OSError as exc:
            raise _io_error(self.path, exc) from exc

    def _member_id(self) -> str:
        """An id created with this directory and kept for its life. A peer that comes back
        with a wiped or replaced directory gets a new one, so it can rejoin as a new Raft
        member (learner, then voter) instead of voting again in terms it already voted in."""
        path = self.path / "member"
        if path.exists():
            member = path.read_text().strip()
            if len(member) != 16 or any(c not in "0123456789abcdef" for c in member):
                raise self._corrupt(path, 0, f"not a member id: {member[:40]!r}")
            return member
        member = uuid.uuid4().hex[:16]
        tmp = self.path / "member.tmp"
        with open(tmp, "w") as f:
            f.write(member + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.path)
        return member

    # ---- recovery

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.path.glob("log-*.wal"):
            try:
                found.append((int(p.stem[4:]), p))
            except ValueError:
                continue
        return sorted(found)

    def _corrupt(self, path: Path, offset: int, problem: str) -> StorageCorrupt:
        return StorageCorrupt(path, offset, problem, self.path)

    def _read_snapshot(self) -> tuple[Snapshot | None, bool]:
        snap_path = self.path / "snapshot"
        if not snap_path.exists():
            return None, False
        s = read_checked_file(snap_path, self.path)
        try:
            conf = ConfState(tuple(s["voters"]), tuple(s["learners"]))
            return Snapshot(int(s["index"]), int(s["term"]), conf, bytes(s["data"])), s["restore"]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._corrupt(snap_path, HEADER.size, f"malformed snapshot ({exc!r})") from exc

    def _read_segments(self) -> list[Segment]:
        listed = self._segments()
        for (before, _), (seq, p) in zip(listed, listed[1:], strict=False):
            if seq != before + 1:
                raise self._corrupt(p, 0, f"segment {before + 1} is missing")
        parsed: list[Segment] = []
        for i, (seq, p) in enumerate(listed):
            prev = parsed[-1].end_crc if parsed else None
            final = i == len(listed) - 1
            parsed.append(read_segment(seq, p, p.read_bytes(), prev, final, self.path))
        last = parsed[-1] if parsed else None
        if last is not None and last.torn_at is not None:
            # A write cut short by a crash: it never returned, so nothing acknowledged is in it.
            log.warning(
                "raft storage: cutting an incomplete final record at byte %d of %s",
                last.torn_at,
                last.path,
            )
            with open(last.path, "r+b") as f:
                f.truncate(last.valid_bytes)
                f.flush()
                os.fsync(f.fileno())
        if last is not None and not last.records:  # a crash came before its header was whole
            last.path.unlink()
            _fsync_dir(self.path)
            parsed.pop()
            self._seq = last.seq - 1
        return parsed

    def _recover(self) -> None:
        for stale in self.path.glob("*.tmp"):
            stale.unlink()
        snapshot, restored = self._read_snapshot()
        parsed = self._read_segments()
        bases = [i for i, seg in enumerate(parsed) if "base" in seg.header]
        if bases:
            # Segments before the latest base are left over from a cleanup a crash interrupted.
            for seg in parsed[: bases[-1]]:
                seg.path.unlink()
            parsed = parsed[bases[-1] :]
            base = parsed[0].header["base"]
            if snapshot is None or snapshot.index < base:
                raise self._corrupt(parsed[0].path, 0, f"the snapshot at {base} is missing")
        elif parsed and parsed[0].seq != 1:
            raise self._corrupt(parsed[0].path, 0, "the segments before this one are missing")
        elif not parsed and snapshot is not None:
            raise self._corrupt(self.path / "snapshot", 0, "no log segment follows the snapshot")
        start = parsed[0].header["base"] if bases else 0
        entries, hs = self._replay(parsed, start)
        if snapshot is not None and snapshot.index > start:
            # The crash came after the snapshot was written but before its base segment.
            entries = _apply_snapshot(entries, snapshot, restored)
        last = max(entries[-1].index if entries else 0, snapshot.index if snapshot else 0)
        if hs.commit > last:
            where = parsed[-1].path if parsed else self.path
            raise self._corrupt(where, 0, f"commit {hs.commit} is beyond the log's end {last}")
        self._check_vote(hs, parsed[-1].path if parsed else self.path)
        self.snapshot, self.hard_state, self.entries = snapshot, hs, entries
        if parsed:
            self._seq, self._crc = parsed[-1].seq, parsed[-1].end_crc
            self._file = open(parsed[-1].path, "ab")  # noqa: SIM115 - kept open for our lifetime
            self._size = self._file.tell()
        else:
            self._open_segment()

    def _replay(self, parsed: list[Segment], start: int) -> tuple[list[Entry], HardState]:
        entries: list[Entry] = []
        hs = HardState()
        for seg in parsed:
            for offset, r in zip(seg.offsets, seg.records, strict=True):
                try:
                    new = _unpack_entries(r.get("e") or ())
                    new_hs = HardState(*r["hs"]) if r.get("hs") is not None else None
                except (TypeError, ValueError, IndexError) as exc:
                    raise self._corrupt(seg.path, offset, f"malformed record ({exc!r})") from exc
                problem = None
                if "base" in r:
                    entries = []
                    if new and new[0].index != start + 1:
                        problem = f"the base at {start} is followed by entry {new[0].index}"
                elif new:
                    problem = _entries_problem(entries, start, new, hs.commit)
                if problem is None and new_hs is not None:
                    problem = _hard_state_problem(hs, new_hs)
                if problem is not None:
                    raise self._corrupt(seg.path, offset, problem)
                entries = _apply_entries(entries, new)
                hs = new_hs or hs
        return entries, hs

    def _check_vote(self, hs: HardState, log_end: Path) -> None:
        """The log's last hard state must not be behind the vote file: a term or vote that was
        acknowledged must survive even a log whose tail was cut off (which looks like a crash)."""
        path = self.path / "vote"
        self._vote = (0, None)
        if path.exists():
            record = read_checked_file(path, self.path)
            try:
                self._vote = (int(record["term"]), record["vote"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._corrupt(path, HEADER.size, f"malformed vote ({exc!r})") from exc
        term, vote = self._vote
        if term > hs.term or (term == hs.term and vote is not None and hs.vote != vote):
            raise self._corrupt(
                log_end,
                0,
                f"the log ends before the vote for {vote!r} in term {term} that {path.name} "
                f"records (the log's hard state is term {hs.term}, vote {hs.vote!r}): "
                "its end was cut off",
            )
        if (hs.term, hs.vote) != self._vote:
            self._save_vote(hs)  # a crash came between the log record and the vote file

    def _save_vote(self, hs: HardState) -> None:
        tmp = self.path / "vote.tmp"
        with open(tmp, "wb") as f:
            f.write(frame(pack({"term": hs.term, "vote": hs.vote}), 0)[0])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "vote")
        _fsync_dir(self.path)
        self._vote = (hs.term, hs.vote)

    def _open_segment(self, base: dict | None = None) -> None:
        """Start segment seq+1 with its header (a base header if a snapshot was just saved)."""
        if self._file is not None:
            self._file.close()
        self._seq += 1
        p = self.path / f"log-{self._seq:016d}.wal"
        self._file = open(p, "wb")  # noqa: SIM115 - kept open for the storage's lifetime
        self._size = 0
        self._write(pack({"seg": self._seq, "prev": self._crc, **(base or {})}))
        _fsync_dir(self.path)

    # ---- the storage interface

    def initial_state(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        return self.hard_state, self.snapshot, list(self.entries)

    def save(self, rd: Ready) -> None:
        if self._failed is not None:
            raise StorageError(f"the raft storage failed earlier and stays closed: {self._failed}")
        try:
            self._save(rd)
        except OSError as exc:
            self._failed = _io_error(self.path, exc)
            raise self._failed from exc

    def _save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self._save_snapshot(rd.snapshot, rd.restore is not None)
        if not rd.entries and rd.hard_state is None:
            return
        record = {}
        if rd.entries:
            record["e"] = [_pack_entry(e) for e in rd.entries]
            self.entries = _apply_entries(self.entries, rd.entries)
        if rd.hard_state is not None:
            record["hs"] = _pack_hs(rd.hard_state)
            self.hard_state = rd.hard_state
        self._write(pack(record))
        if rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) != self._vote:
            self._save_vote(rd.hard_state)
        if self._size >= self.segment_bytes:
            self._open_segment()

    def _write(self, payload: bytes) -> None:
        data, crc = frame(payload, self._crc)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._crc = crc
        self._size += len(data)

    def _save_snapshot(self, snap: Snapshot, restore: bool) -> None:
        # 1. the snapshot file, atomically; 2. a new segment whose base header holds the hard
        # state and the entries kept after the snapshot; 3. delete the older segments.
        tmp = self.path / "snapshot.tmp"
        with open(tmp, "wb") as f:
            f.write(frame(pack(_pack_snapshot(snap, restore)), 0)[0])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "snapshot")
        _fsync_dir(self.path)
        self.snapshot = snap
        self.entries = _apply_snapshot(self.entries, snap, restore)
        old = self._segments()
        base = {
            "base": snap.index,
            "hs": _pack_hs(self.hard_state),
            "e": [_pack_entry(e) for e in self.entries],
        }
        self._open_segment(base)
        for _, p in old:  # oldest first: a crash leaves a contiguous run before the base
            p.unlink()
        _fsync_dir(self.path)

    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.index if self.snapshot else 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
