"""FileStorage: durable, CRC-checked, recovers a prefix of what was acknowledged after any crash."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus import (
    Entry,
    FileStorage,
    MemoryStorage,
    RaftNode,
    Ready,
    Snapshot,
    StorageCorrupt,
    StorageError,
    StorageFull,
)
from consensus.types import ConfState, HardState

CONF = ConfState(("n1", "n2", "n3"))


def ents(lo: int, hi: int, term: int = 1) -> tuple[Entry, ...]:
    return tuple(Entry(term, i, "cmd", b"e%d" % i) for i in range(lo, hi + 1))


def reopen(path) -> tuple[HardState, Snapshot | None, list[Entry]]:
    s = FileStorage(path)
    try:
        return s.initial_state()
    finally:
        s.close()


def test_round_trip(tmp_path):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(2, "n1", 3), entries=ents(1, 5)))
    s.save(Ready(entries=ents(4, 6, term=2)))  # overwrites 4, 5 and appends 6
    s.close()
    hs, snap, entries = reopen(tmp_path)
    assert hs == HardState(2, "n1", 3) and snap is None
    assert [(e.index, e.term) for e in entries] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]


def test_a_torn_tail_is_cut_off_at_every_byte(tmp_path, caplog):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(1, None, 0), entries=ents(1, 3)))
    (segment,) = tmp_path.glob("log-*.wal")
    good = segment.read_bytes()
    s.save(Ready(hard_state=HardState(1, None, 4), entries=ents(4, 4)))
    s.close()
    last = segment.read_bytes()[len(good) :]
    for cut in range(len(last)):
        segment.write_bytes(good + last[:cut])
        hs, _, entries = reopen(tmp_path)
        assert [e.index for e in entries] == [1, 2, 3] and hs == HardState(1, None, 0)
        assert segment.read_bytes() == good  # the torn bytes are gone, appends go after good data
        if cut:
            assert f"at byte {len(good)} of {segment}" in caplog.text
    segment.write_bytes(good + last)
    assert [e.index for e in reopen(tmp_path)[2]] == [1, 2, 3, 4]


def test_a_damaged_record_refuses_to_start_naming_file_and_offset(tmp_path):
    s = FileStorage(tmp_path)
    for i in range(1, 6):
        s.save(Ready(entries=ents(i, i), hard_state=HardState(1, "n1", i - 1)))
    s.close()
    (segment,) = tmp_path.glob("log-*.wal")
    data = bytearray(segment.read_bytes())
    data[len(data) * 3 // 5] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageCorrupt) as refused:
        FileStorage(tmp_path)
    assert str(segment) in str(refused.value) and "delete the data dir" in str(refused.value)
    assert 0 < refused.value.offset < len(data)
    assert segment.read_bytes() == bytes(data)  # refusing changes nothing on disk


def test_a_hard_state_that_goes_backwards_is_refused(tmp_path):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(8, "c", 0), entries=ents(1, 2)))
    s.save(Ready(hard_state=HardState(3, None, 0)))  # only a damaged log could hold this
    s.close()
    with pytest.raises(StorageCorrupt, match="the term goes backwards"):
        FileStorage(tmp_path)


def test_a_missing_middle_segment_is_refused(tmp_path):
    s = FileStorage(tmp_path, segment_bytes=40)
    for i in range(1, 8):
        s.save(Ready(entries=ents(i, i)))
    s.close()
    segments = sorted(tmp_path.glob("log-*.wal"))
    assert len(segments) > 3
    segments[2].unlink()
    with pytest.raises(StorageCorrupt, match="is missing"):
        FileStorage(tmp_path)


def test_a_full_disk_is_reported_as_a_full_disk_and_stops_the_storage(tmp_path, monkeypatch):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(1, "n1", 0), entries=ents(1, 2)))

    def no_space(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageFull, match="the disk is full"):
        s.save(Ready(entries=ents(3, 3)))
    monkeypatch.undo()
    with pytest.raises(StorageError, match="failed earlier"):
        s.save(Ready(entries=ents(3, 3)))  # fail-stop: no write after a failed one
    s.close()


def test_a_snapshot_truncates_the_log_and_old_segments(tmp_path):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(1, "n1", 8), entries=ents(1, 10)))
    s.save(Ready(snapshot=Snapshot(8, 1, CONF, b"state@8")))
    s.save(Ready(entries=ents(11, 12)))
    s.close()
    assert len(list(tmp_path.glob("log-*.wal"))) == 1
    hs, snap, entries = reopen(tmp_path)
    assert snap == Snapshot(8, 1, CONF, b"state@8")
    assert [e.index for e in entries] == [9, 10, 11, 12] and hs.commit == 8


def test_a_snapshot_from_the_leader_replaces_the_whole_log(tmp_path):
    s = FileStorage(tmp_path)
    s.save(Ready(entries=ents(1, 10)))
    leader_snap = Snapshot(20, 3, CONF, b"leader state")
    s.save(Ready(snapshot=leader_snap, restore=leader_snap, hard_state=HardState(3, None, 20)))
    s.close()
    hs, snap, entries = reopen(tmp_path)
    assert snap == leader_snap and entries == [] and hs.commit == 20


@pytest.mark.parametrize("restore", [False, True])
def test_a_crash_between_the_snapshot_file_and_its_base_record(tmp_path, monkeypatch, restore):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(1, "n1", 6), entries=ents(1, 10)))
    snap = Snapshot(6, 1, CONF, b"s")

    def crash(*_a, **_k):
        raise SystemExit("power cut")

    monkeypatch.setattr(s, "_open_segment", crash)
    with pytest.raises(SystemExit):
        s.save(Ready(snapshot=snap, restore=snap if restore else None))
    monkeypatch.undo()
    s.close()
    _, got, entries = reopen(tmp_path)
    assert got == snap
    assert [e.index for e in entries] == ([] if restore else [7, 8, 9, 10])


ready_strategy = st.lists(
    st.tuples(st.integers(1, 30), st.integers(0, 8), st.integers(1, 3), st.booleans()),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(steps=ready_strategy)
def test_file_storage_behaves_like_memory_storage(tmp_path_factory, steps):
    path = tmp_path_factory.mktemp("fs")
    mem, disk = MemoryStorage(), FileStorage(path, segment_bytes=512)
    term = 1
    for first, count, term_step, snapshot in steps:
        term += term_step - 1  # a Raft log's terms never go down
        last = mem.last_index()
        first = min(first, last + 1)
        first = max(first, (mem.snapshot.index + 1) if mem.snapshot else 1)
        rd = Ready(
            entries=ents(first, first + count - 1, term), hard_state=HardState(term, None, 0)
        )
        mem.save(rd)
        disk.save(rd)
        if snapshot and mem.last_index() > (mem.snapshot.index if mem.snapshot else 0):
            at = mem.last_index() - 1 if mem.last_index() > 1 else 1
            if not mem.snapshot or at > mem.snapshot.index:
                snap_term = next(e.term for e in mem.entries if e.index == at)
                rd = Ready(snapshot=Snapshot(at, snap_term, CONF, b"%d" % at))
                mem.save(rd)
                disk.save(rd)
    disk.close()
    assert reopen(path) == mem.initial_state()


def test_a_raft_node_is_rebuilt_from_file_storage_alone(tmp_path):
    store = FileStorage(tmp_path)
    node = RaftNode("solo", store, voters=("solo",), rng=Random(0))
    node.campaign()
    for i in range(5):
        node.propose(b"cmd%d" % i)
    rd = node.ready()
    store.save(rd)
    node.advance(rd)
    store.close()
    again = RaftNode("solo", FileStorage(tmp_path), voters=("other",), rng=Random(1))
    assert again.term == node.term and again.voters == ("solo",)
    assert [e.data for e in again.log.entries if e.kind == "cmd"] == [
        b"cmd%d" % i for i in range(5)
    ]
    assert again.commit_index == node.commit_index


# ---- kill -9 a real writer process, many times

WRITER = textwrap.dedent(
    """
    import hashlib, random, sys
    from consensus import Entry, FileStorage, Ready, Snapshot
    from consensus.types import ConfState, HardState

    def data(i):
        return hashlib.sha256(b"%d" % i).digest() * (1 + i % 97)

    s = FileStorage(sys.argv[1], segment_bytes=256 << 10)
    rng = random.Random(int(sys.argv[2]))
    _, snap, entries = s.initial_state()
    last = entries[-1].index if entries else (snap.index if snap else 0)
    snapped = snap.index if snap else 0
    while True:
        if rng.random() < 0.03 and last > snapped + 5:
            at = snapped = last - rng.randint(0, 5)
            s.save(Ready(snapshot=Snapshot(at, 1, ConfState(("n1",)), b"snap%d" % at)))
        n = rng.randint(1, 40)
        batch = tuple(Entry(1, i, "cmd", data(i)) for i in range(last + 1, last + n + 1))
        s.save(Ready(entries=batch, hard_state=HardState(1, "n1", last + n)))
        last += n
        sys.stdout.write(f"{last}\\n")
        sys.stdout.flush()
    """
)


def expected_data(i: int) -> bytes:
    return hashlib.sha256(b"%d" % i).digest() * (1 + i % 97)


@pytest.mark.slow
def test_kill_9_mid_append_recovers_a_prefix_of_what_was_acknowledged(tmp_path):
    rng = Random(1234)
    data_dir = tmp_path / "raft"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    acked_total = 0
    for round_ in range(25):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(data_dir), str(round_)],
            stdout=subprocess.PIPE,
            env=env,
        )
        # Let it start and write for a while, then kill it without warning.
        first = proc.stdout.readline()
        assert first.strip().isdigit(), first
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        proc.stdout.close()
        lines = [first, *rest.splitlines(keepends=True)]
        acked = max(int(x) for x in lines if x.strip().isdigit())
        hs, snap, entries = reopen(data_dir)
        start = snap.index + 1 if snap else 1
        indexes = [e.index for e in entries]
        assert indexes == list(range(start, start + len(entries))), "a gap or garbage"
        last = indexes[-1] if indexes else start - 1
        assert last >= acked, f"round {round_}: acknowledged {acked} but recovered only {last}"
        for e in entries:
            assert e.data == expected_data(e.index), f"garbage at {e.index}"
        assert hs.commit == last  # the hard state travels in the same record as its entries
        acked_total = acked
    assert acked_total > 100


def test_a_log_cut_short_that_lost_a_vote_is_refused(tmp_path):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(3, None, 0), entries=ents(1, 2)))
    (segment,) = tmp_path.glob("log-*.wal")
    before_vote = segment.stat().st_size
    s.save(Ready(hard_state=HardState(8, "c", 0)))
    s.close()
    # Cutting the last record off looks like a crash, but the vote file remembers term 8.
    with open(segment, "r+b") as f:
        f.truncate(before_vote)
    with pytest.raises(StorageCorrupt, match="the log ends before the vote for 'c' in term 8"):
        FileStorage(tmp_path)


def test_a_crash_between_the_log_record_and_the_vote_file_keeps_the_logged_vote(
    tmp_path, monkeypatch
):
    s = FileStorage(tmp_path)
    s.save(Ready(hard_state=HardState(3, "a", 0)))

    def crash(_hs):
        raise SystemExit("power cut")

    monkeypatch.setattr(s, "_save_vote", crash)
    with pytest.raises(SystemExit):
        s.save(Ready(hard_state=HardState(4, "b", 0)))
    monkeypatch.undo()
    s.close()
    hs, _, _ = reopen(tmp_path)
    assert (hs.term, hs.vote) == (4, "b")
    hs, _, _ = reopen(tmp_path)  # the vote file caught up at the first restart
    assert (hs.term, hs.vote) == (4, "b")
