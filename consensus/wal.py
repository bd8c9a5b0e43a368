"""The write-ahead log's framing and its checks, pure byte work (FileStorage does the files).

A record is  u32 payload length | u32 CRC32 of those 4 length bytes | u32 rolling CRC32 | payload
(msgpack). The rolling CRC (etcd's wal) is CRC32 of the payload started from the previous
record's CRC, across segment boundaries, so a lost, reordered or duplicated record breaks the
chain. The first record of every segment is its header {"seg": seq, "prev": crc}: `prev` is the
rolling CRC the previous segment ended with, and the header's own CRC starts from it, so a
segment checks on its own and also proves it continues its predecessor. The length has its own
CRC so that a damaged length is caught as damage instead of looking like a record cut short.

Only one thing is forgiven: an incomplete final record of the final segment (a write that a
crash cut short: fewer bytes than a header, or a header that checks with a payload running
past the end of the file). That record was never acknowledged, so cutting it loses nothing.
Anything else that does not check raises StorageCorrupt.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

HEADER = struct.Struct("<III")
_LENGTH = struct.Struct("<I")
MAX_RECORD = 1 << 30

RECOVERY_ADVICE = (
    "Refusing to start: a member that forgets acknowledged entries or a vote breaks Raft's "
    "safety. To recover, delete the data dir {dir} (the whole raft directory) and start this "
    "peer again: it rejoins under a new member id, as a learner that catches up from the "
    "leader and is then promoted, and the leader retires its old id."
)


class StorageError(Exception):
    """The Raft storage cannot be used; the message says why and what to do."""


class StorageCorrupt(StorageError):
    """A record, segment or snapshot file does not check: refuse to start (etcd: 'crc mismatch')."""

    def __init__(self, path: Path, offset: int, problem: str, data_dir: Path | None = None):
        self.path, self.offset, self.problem = path, offset, problem
        advice = RECOVERY_ADVICE.format(dir=data_dir if data_dir is not None else path.parent)
        super().__init__(f"raft storage is corrupt: {path} at byte {offset}: {problem}. {advice}")


class StorageFull(StorageError):
    """The disk (or the quota) is full: said as such, not as some other I/O problem."""


def frame(payload: bytes, prev_crc: int) -> tuple[bytes, int]:
    """One record; returns its bytes and the rolling CRC after it."""
    crc = zlib.crc32(payload, prev_crc)
    length = _LENGTH.pack(len(payload))
    return HEADER.pack(len(payload), zlib.crc32(length), crc) + payload, crc


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@dataclass
class Segment:
    """The records of one segment file that check, and where the valid bytes end."""

    seq: int
    path: Path
    records: list[dict] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each record starts
    end_crc: int = 0
    valid_bytes: int = 0
    torn_at: int | None = None  # offset of an incomplete final record, if any

    @property
    def header(self) -> dict | None:
        return self.records[0] if self.records else None


def read_segment(
    seq: int, path: Path, data: bytes, prev_crc: int | None, final: bool, data_dir: Path
) -> Segment:
    """Check and decode one segment. `prev_crc` is the CRC the previous segment ended with
    (None for the first segment kept). Raises StorageCorrupt for anything but a torn tail of
    the final segment."""
    seg = Segment(seq, path)
    crc = 0
    pos = 0

    def corrupt(problem: str) -> StorageCorrupt:
        return StorageCorrupt(path, pos, problem, data_dir)

    while pos < len(data):
        if len(data) - pos < HEADER.size:
            seg.torn_at = pos
            break
        length, length_crc, record_crc = HEADER.unpack_from(data, pos)
        if zlib.crc32(_LENGTH.pack(length)) != length_crc or length > MAX_RECORD:
            raise corrupt("the record header does not check (length damaged)")
        end = pos + HEADER.size + length
        if end > len(data):
            seg.torn_at = pos
            break
        payload = data[pos + HEADER.size : end]
        record = _decode(payload)
        if not seg.records:
            if not isinstance(record, dict) or record.get("seg") != seq:
                raise corrupt(f"the segment header does not name segment {seq}")
            crc = record.get("prev")
            if not isinstance(crc, int):
                raise corrupt("the segment header has no CRC chain start")
        if zlib.crc32(payload, crc) != record_crc:
            raise corrupt("CRC mismatch")
        if not seg.records and prev_crc is not None and crc != prev_crc:
            raise corrupt(f"the segment does not continue segment {seq - 1} (CRC chain broken)")
        if not isinstance(record, dict):
            raise corrupt("a record that checks but does not decode")
        crc = record_crc
        seg.records.append(record)
        seg.offsets.append(pos)
        pos = end
    if seg.torn_at is not None and not final:
        raise corrupt("an incomplete record in a segment that is not the last one")
    if not seg.records and not final:
        raise corrupt("an empty segment that is not the last one")
    seg.end_crc = crc
    seg.valid_bytes = pos if seg.torn_at is None else seg.torn_at
    return seg


def read_checked_file(path: Path, data_dir: Path) -> dict:
    """A file written whole and renamed into place (snapshot, vote): one record, any
    mismatch is damage."""
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise StorageCorrupt(path, 0, "the file is shorter than a record header", data_dir)
    length, length_crc, crc = HEADER.unpack_from(data, 0)
    if zlib.crc32(_LENGTH.pack(length)) != length_crc or HEADER.size + length != len(data):
        raise StorageCorrupt(path, 0, "the file's record length does not check", data_dir)
    payload = data[HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise StorageCorrupt(path, HEADER.size, "CRC mismatch", data_dir)
    record = _decode(payload)
    if not isinstance(record, dict):
        raise StorageCorrupt(path, HEADER.size, "the record is malformed", data_dir)
    return record


def _decode(payload: bytes):
    try:
        return msgpack.unpackb(payload, raw=False)
    except Exception:
        return None  # a payload that does not decode fails its CRC check (or its header check)
