"""Seed-driven random runs of the Raft simulator: one integer replays a whole run exactly.

`random_run(seed)` picks every action (events, proposals, crashes at any point of the Ready
loop, partitions, loss, conf changes) from `Random(seed)`. Used by test_raft_sim.py and by
`python -m tests.sim.raft_fuzz SEED [SEED_END]` to replay or search.
"""

from __future__ import annotations

import sys
from random import Random

from tests.linearizability import Operation, drop_unobserved, is_linearizable, register_model

from .raft_sim import CRASH_POINTS, Cluster


def random_run(seed: int, steps: int = 60, events_per_step: int = 150) -> Cluster:
    rng = Random(seed)
    n = rng.choice((3, 3, 5))
    c = Cluster(
        n=n,
        seed=seed,
        snapshot_every=rng.choice((0, 5, 20)),
        drop=rng.choice((0.0, 0.05, 0.2)),
        dup=rng.choice((0.0, 0.05)),
        delay=rng.choice(((1, 3), (1, 12), (1, 30))),
        max_append_entries=rng.choice((1, 4, 64)),
        pre_vote=rng.random() < 0.8,
        check_quorum=rng.random() < 0.8,
    )
    for _ in range(steps):
        action = rng.random()
        nid = rng.choice(c.ids)
        if action < 0.40:
            c.run(rng.randint(1, events_per_step))
        elif action < 0.62:
            for _ in range(rng.randint(1, 5)):
                c.propose(rng.randbytes(rng.randint(0, 8)))
        elif action < 0.70:
            if c.nodes[nid] is not None:
                c.crash_at[nid] = rng.choice(CRASH_POINTS)
        elif action < 0.75:
            if c.nodes[nid] is not None:
                c.crash(nid)
        elif action < 0.83:
            if c.nodes[nid] is None:
                c.start(nid)
        elif action < 0.87:
            c.isolate(nid)
        elif action < 0.90:
            ids = list(c.ids)
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            c.partition(tuple(ids[:cut]), tuple(ids[cut:]))
        elif action < 0.92:
            other = rng.choice([i for i in c.ids if i != nid])
            c.blocked.add((nid, other))  # asymmetric: nid cannot reach other, other can reach nid
        elif action < 0.95:
            c.heal()
        elif action < 0.97:
            c.transfer(nid)
        else:
            op = rng.choice(("add", "remove", "promote", "learner"))
            if op == "learner":
                c.conf_change("add", nid, voter=False)
            else:
                c.conf_change(op, nid)
        c.check()
    # Without PreVote a removed server that never learned of its removal keeps bumping the
    # term and resetting the others' timers until the leader lease holds: slow, but it ends.
    c.settle(max_ticks=200 if c.pre_vote else 5000)
    return c


def linearizable_run(seed: int, steps: int = 60) -> Cluster:
    """Jepsen in simulation: clients write (propose) and read (ReadIndex, on any node) while a
    nemesis crashes nodes at any point of the Ready loop, partitions and loses messages; the
    history (call, return or unknown) must be linearizable for a register."""
    rng = Random(seed)
    c = Cluster(
        n=rng.choice((3, 5)),
        seed=seed,
        snapshot_every=rng.choice((0, 5)),
        drop=rng.choice((0.0, 0.05, 0.2)),
        delay=rng.choice(((1, 3), (1, 12))),
        check_quorum=rng.random() < 0.5,  # without it a cut-off leader keeps believing it leads
    )
    written = 0
    for _ in range(steps):
        action = rng.random()
        nid = rng.choice(c.ids)
        if action < 0.35:
            c.run(rng.randint(1, 120))
        elif action < 0.55:
            written += 1
            c.propose(b"v%d" % written, nid=c.leader().id if c.leader() else None)
        elif action < 0.75:
            for _ in range(rng.randint(1, 3)):
                c.read(rng.choice(c.ids))
        elif action < 0.82:
            if c.nodes[nid] is not None:
                c.crash_at[nid] = rng.choice(CRASH_POINTS)
        elif action < 0.86:
            if c.nodes[nid] is not None:
                c.crash(nid)
        elif action < 0.92:
            if c.nodes[nid] is None:
                c.start(nid)
        elif action < 0.95:
            leader = c.leader()
            c.isolate(leader.id if leader and rng.random() < 0.7 else nid)
        elif action < 0.97:
            c.heal()
        else:
            c.transfer(nid)
        c.check()
    c.settle()
    c.run(500)  # let reads still in flight return
    history = drop_unobserved([Operation(*op) for op in c.ops])
    if not is_linearizable(history, register_model(None)):
        raise AssertionError(f"seed {seed}: the history is not linearizable: {history}")
    return c


def main(argv: list[str]) -> None:
    lo = int(argv[1]) if len(argv) > 1 else 0
    hi = int(argv[2]) if len(argv) > 2 else lo + 1
    for seed in range(lo, hi):
        try:
            c = random_run(seed)
        except Exception:
            print(f"seed {seed} FAILED; replay: python -m tests.sim.raft_fuzz {seed}")
            raise
        print(f"seed {seed} ok: {c.leader_changes} leader changes, {len(c.acked)} acked")


if __name__ == "__main__":
    main(sys.argv)
