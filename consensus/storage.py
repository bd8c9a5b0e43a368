"""Raft storage: what must survive a crash (hard state, log, latest snapshot).

Both storages expose the same two calls the core and driver use:
  initial_state() -> (HardState, Snapshot | None, list[Entry])   # read once at node start
  save(rd)                                                         # durable when it returns

FileStorage layout in its directory:
  snapshot            the latest snapshot (msgpack, CRC), replaced atomically by rename
  log-<seq>.wal       append-only segments of records: u32 length, u32 CRC32, msgpack payload.
                      One save() is one record and one fsync, so a crash leaves either the whole
                      record or a torn tail, which recovery detects by length/CRC and cuts off.
A new segment starts with a "base" record each time a snapshot is saved; older segments are
then deleted, which is how the log is truncated behind a snapshot.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import msgpack

from .types import ConfState, Entry, HardState, Ready, Snapshot


def _apply_snapshot(entries: list[Entry], snap: Snapshot, restore: bool) -> list[Entry]:
    if restore:
        return []  # the leader's snapshot replaces the whole log
    return [e for e in entries if e.index > snap.index]


def _apply_entries(entries: list[Entry], new: tuple[Entry, ...] | list[Entry]) -> list[Entry]:
    if not new:
        return entries
    first = new[0].index
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

_HEADER = struct.Struct("<II")  # payload length, CRC32 of payload
_MAX_RECORD = 1 << 30


def _pack_entry(e: Entry) -> list:
    return [e.term, e.index, e.kind, e.data]


def _unpack_entry(x: list) -> Entry:
    return Entry(x[0], x[1], x[2], x[3])


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


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _read_records(data: bytes) -> tuple[list[dict], int]:
    """Decode records until the end or the first torn/corrupt one; returns them and the
    byte offset where the valid prefix ends."""
    records, pos = [], 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if length > _MAX_RECORD or end > len(data):
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(msgpack.unpackb(payload, raw=False))
        except Exception:
            break
        pos = end
    return records, pos


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStorage:
    """Durable storage in a directory. Synchronous: save() returns after fsync. The driver
    calls it from a thread so the event loop never waits on the disk."""

    def __init__(self, path: str | os.PathLike, segment_bytes: int = 64 << 20):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes  # start a new segment once the current one is this big
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self._seq = 0
        self._file = None
        self._size = 0
        self._recover()

    # ---- recovery

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.path.glob("log-*.wal"):
            try:
                found.append((int(p.stem[4:]), p))
            except ValueError:
                continue
        return sorted(found)

    def _recover(self) -> None:
        for stale in self.path.glob("*.tmp"):
            stale.unlink()
        snap_path = self.path / "snapshot"
        restored = False
        if snap_path.exists():
            records, _ = _read_records(snap_path.read_bytes())
            if records:  # written by rename, so it is whole or absent; the check is belt and braces
                s = records[0]
                self.snapshot = Snapshot(
                    s["index"],
                    s["term"],
                    ConfState(tuple(s["voters"]), tuple(s["learners"])),
                    s["data"],
                )
                restored = s["restore"]
        segments = self._segments()
        contents = []
        for seq, p in segments:
            data = p.read_bytes()
            records, valid = _read_records(data)
            if valid < len(data):
                # A torn tail: only the last segment can have one (a new segment is started only
                # after the previous one is complete). Cut it off so appends go after good data.
                with open(p, "r+b") as f:
                    f.truncate(valid)
                    f.flush()
                    os.fsync(f.fileno())
            contents.append(records)
            self._seq = seq
        # Replay from the segment whose base record matches the snapshot. If the crash came
        # after the snapshot was written but before its base record, replay everything and
        # apply the snapshot's truncation rule instead.
        base_at = None
        if self.snapshot is not None:
            for i, records in enumerate(contents):
                if records and records[0].get("base") == self.snapshot.index:
                    base_at = i
        entries: list[Entry] = []
        for records in contents[base_at or 0 :]:
            for r in records:
                if "base" in r:
                    entries = []
                if r.get("hs") is not None:
                    self.hard_state = HardState(*r["hs"])
                if r.get("e"):
                    entries = _apply_entries(entries, [_unpack_entry(x) for x in r["e"]])
        if self.snapshot is not None and base_at is None:
            entries = _apply_snapshot(entries, self.snapshot, restored)
        self.entries = entries
        if self.snapshot is not None:
            self.entries = [e for e in self.entries if e.index > self.snapshot.index]
        self._open_segment(new=not segments)

    def _open_segment(self, new: bool) -> None:
        if self._file is not None:
            self._file.close()
        if new:
            self._seq += 1
        p = self.path / f"log-{self._seq:016d}.wal"
        self._file = open(p, "ab")  # noqa: SIM115 - kept open for the storage's lifetime
        self._size = self._file.tell()
        if new:
            _fsync_dir(self.path)

    # ---- the storage interface

    def initial_state(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        return self.hard_state, self.snapshot, list(self.entries)

    def save(self, rd: Ready) -> None:
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
        self._write(msgpack.packb(record, use_bin_type=True))
        if self._size >= self.segment_bytes:
            self._open_segment(new=True)

    def _write(self, payload: bytes) -> None:
        frame = _frame(payload)
        self._file.write(frame)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._size += len(frame)

    def _save_snapshot(self, snap: Snapshot, restore: bool) -> None:
        # 1. the snapshot file, atomically; 2. a new segment whose base record holds the hard
        # state and the entries kept after the snapshot; 3. delete the older segments.
        tmp = self.path / "snapshot.tmp"
        with open(tmp, "wb") as f:
            f.write(_frame(msgpack.packb(_pack_snapshot(snap, restore), use_bin_type=True)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "snapshot")
        _fsync_dir(self.path)
        self.snapshot = snap
        self.entries = _apply_snapshot(self.entries, snap, restore)
        old = self._segments()
        self._open_segment(new=True)
        base = {
            "base": snap.index,
            "hs": _pack_hs(self.hard_state),
            "e": [_pack_entry(e) for e in self.entries],
        }
        self._write(msgpack.packb(base, use_bin_type=True))
        for _, p in old:
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
