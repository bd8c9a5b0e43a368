"""A seeded, Raft-shaped sequence of Readys for FileStorage, and a writer process that saves them.

`readys(seed)` is deterministic, so a test can replay the same saves into a MemoryStorage and
know the exact state after every acknowledged save. Run as a module, it saves them into a
FileStorage and prints the number of saves completed after each one, until it is killed:

    python -m tests.unit.storage_workload DATA_DIR SEED
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from random import Random

from consensus import Entry, FileStorage, HardState, Ready, Snapshot
from consensus.types import ConfState

CONF = ConfState(("n1", "n2", "n3"))
SEGMENT_BYTES = 16 << 10  # small, so that a run spans several segments


def readys(seed: int) -> Iterator[Ready]:
    """Appends (sometimes overwriting the uncommitted tail), commits, new terms and votes,
    local compactions and snapshots from a leader, in the shapes the Raft core saves them."""
    rng = Random(seed)
    term, vote, commit = 1, "n1", 0
    snap_index, terms = 0, {0: 0}  # terms: index -> term of the entries in the log
    last = 0
    yield Ready(snapshot=Snapshot(0, 0, CONF), hard_state=HardState(term, vote, 0))
    while True:
        roll = rng.random()
        if roll < 0.05:
            term += 1
            vote = rng.choice((None, "n1", "n2", "n3"))
            yield Ready(hard_state=HardState(term, vote, commit))
        elif roll < 0.09 and commit > snap_index:
            snap_index = rng.randint(snap_index + 1, commit)
            yield Ready(snapshot=Snapshot(snap_index, terms[snap_index], CONF, b"s%d" % snap_index))
        elif roll < 0.11:
            snap_index = commit = last = last + rng.randint(1, 20)
            terms = {snap_index: term}
            snap = Snapshot(snap_index, term, CONF, b"leader@%d" % snap_index)
            yield Ready(snapshot=snap, restore=snap, hard_state=HardState(term, vote, commit))
        else:
            first = last + 1 if rng.random() < 0.85 else rng.randint(commit + 1, last + 1)
            batch = tuple(
                Entry(term, i, "cmd", rng.randbytes(rng.choice((8, 60, 300, 2000))))
                for i in range(first, first + rng.randint(1, 12))
            )
            last = batch[-1].index
            terms = {i: t for i, t in terms.items() if i < first}
            terms.update((e.index, e.term) for e in batch)
            commit = rng.randint(commit, last)
            yield Ready(entries=batch, hard_state=HardState(term, vote, commit))


def main(path: str, seed: int) -> None:
    storage = FileStorage(path, segment_bytes=SEGMENT_BYTES)
    for done, rd in enumerate(readys(seed), start=1):
        storage.save(rd)
        sys.stdout.write(f"{done}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
