"""Deterministic whole-cluster simulation of consensus.RaftNode, driven by hypothesis.

The network drops, duplicates, reorders and delays; partitions are symmetric, asymmetric or
isolate one node; nodes crash at any point of the Ready loop (before save, between save and
send, after send) and restart from storage; clocks are skewed. After every step the five
properties of the Raft paper's Figure 3 are checked, and every acknowledged proposal must
survive. Each example ends by healing everything and requiring progress (liveness).

Example counts (env AIVAILABLE_SIM_EXAMPLES, default 2000 = the CI count):
    AIVAILABLE_SIM_EXAMPLES=100000 python -m pytest tests/sim/test_raft_sim.py -m slow
A failure prints the hypothesis steps (the seed is the `seed=` of `setup`) and a
@reproduce_failure blob; the seeded runs print `python -m tests.sim.raft_fuzz SEED`.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from consensus.replication import LeaderReplication

from .raft_fuzz import linearizable_run, random_run
from .raft_sim import CRASH_POINTS, Cluster

EXAMPLES = int(os.environ.get("AIVAILABLE_SIM_EXAMPLES", "2000"))
SEEDED_RUNS = int(os.environ.get("AIVAILABLE_SIM_SEEDS", "300"))
LINEARIZABLE_RUNS = int(os.environ.get("AIVAILABLE_SIM_LINEARIZABLE_SEEDS", "200"))

node_index = st.integers(0, 4)


class RaftSimulation(RuleBasedStateMachine):
    """Each rule is one thing that can happen to a cluster; hypothesis picks the sequence."""

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        n=st.sampled_from([3, 5]),
        snapshot_every=st.sampled_from([0, 4, 16]),
        drop=st.sampled_from([0.0, 0.05, 0.25]),
        dup=st.sampled_from([0.0, 0.1]),
        delay=st.sampled_from([(1, 3), (1, 12), (1, 40)]),
        max_append_entries=st.sampled_from([1, 8, 64]),
    )
    def setup(self, seed, n, snapshot_every, drop, dup, delay, max_append_entries):
        self.c = Cluster(
            n=n,
            seed=seed,
            snapshot_every=snapshot_every,
            drop=drop,
            dup=dup,
            delay=delay,
            max_append_entries=max_append_entries,
        )

    def _id(self, i: int) -> str:
        return self.c.ids[i % len(self.c.ids)]

    @rule()
    def next_timer(self):
        """Jump to the next timer: the earliest tick or delivery."""
        self.c.next_event()

    @rule(events=st.integers(1, 200))
    def run_for(self, events):
        self.c.run(events)

    @rule(count=st.integers(1, 6), payload=st.binary(max_size=12))
    def propose(self, count, payload):
        for i in range(count):
            self.c.propose(payload + bytes([i]))

    @rule(i=node_index, point=st.sampled_from(CRASH_POINTS))
    def crash_inside_ready_loop(self, i, point):
        nid = self._id(i)
        if self.c.nodes[nid] is not None:
            self.c.crash_at[nid] = point

    @rule(i=node_index)
    def crash(self, i):
        nid = self._id(i)
        if self.c.nodes[nid] is not None:
            self.c.crash(nid)

    @rule(i=node_index)
    def restart(self, i):
        nid = self._id(i)
        if self.c.nodes[nid] is None:
            self.c.start(nid)

    @rule(i=node_index)
    def isolate(self, i):
        self.c.isolate(self._id(i))

    @rule(order=st.permutations(range(5)), cut=st.integers(1, 4))
    def partition(self, order, cut):
        ids = [self._id(i) for i in order if i < len(self.c.ids)]
        cut = min(cut, len(ids) - 1)
        self.c.partition(tuple(ids[:cut]), tuple(ids[cut:]))

    @rule(a=node_index, b=node_index)
    def cut_one_way(self, a, b):
        if self._id(a) != self._id(b):
            self.c.blocked.add((self._id(a), self._id(b)))

    @rule()
    def heal(self):
        self.c.heal()

    @rule(op=st.sampled_from(["add", "remove", "promote", "learner"]), i=node_index)
    def change_membership(self, op, i):
        if op == "learner":
            self.c.conf_change("add", self._id(i), voter=False)
        else:
            self.c.conf_change(op, self._id(i))

    @rule(i=node_index)
    def transfer_leadership(self, i):
        self.c.transfer(self._id(i))

    @invariant()
    def figure_3_properties_hold(self):
        self.c.check()

    def teardown(self):
        if hasattr(self, "c"):
            note(f"seed={self.c.seed} now={self.c.now} nodes={self.c.alive()}")
            self.c.settle()


RaftSimulation.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.slow
class TestRaftSimulation(RaftSimulation.TestCase):
    pass


@pytest.mark.slow
def test_seeded_random_runs():
    """Whole runs chosen by one integer each; a failure names the seed that replays it."""
    for seed in range(SEEDED_RUNS):
        try:
            random_run(seed)
        except Exception as exc:
            raise AssertionError(
                f"seed {seed} failed: replay with `python -m tests.sim.raft_fuzz {seed}`"
            ) from exc


@pytest.mark.slow
def test_reads_and_writes_under_the_nemesis_are_linearizable():
    """Jepsen in simulation: writes and ReadIndex reads on any node, with crashes inside the
    Ready loop, a leader cut off (often without CheckQuorum) and lossy links; each run's
    history goes through the Wing-Gong checker (tests/linearizability.py)."""
    for seed in range(LINEARIZABLE_RUNS):
        linearizable_run(seed)  # raises, naming the seed and the history


def test_the_linearizability_run_catches_reads_served_without_a_quorum_round(monkeypatch):
    # A leader that answers reads from its own commit index without confirming that it still
    # leads serves stale reads once it is cut off; the checker must say so for some seed.
    monkeypatch.setattr(LeaderReplication, "_confirmed", lambda self, read: True)
    caught = []
    for seed in range(40):
        try:
            linearizable_run(seed)
        except AssertionError as exc:
            caught.append(seed)
            assert "not linearizable" in str(exc)
    assert caught


def test_a_seed_replays_exactly():
    a, b = random_run(7), random_run(7)
    assert (a.now, a.delivered, a.acked, a.leader_of_term, a.window_events) == (
        b.now,
        b.delivered,
        b.acked,
        b.leader_of_term,
        b.window_events,
    )


def test_runs_deliver_inside_the_ready_window_as_the_driver_does():
    c = random_run(7)
    assert c.window_events > 0
    quiet = Cluster(n=3, seed=7, interleave=0.0)
    quiet.run(2000)
    assert quiet.window_events == 0 and quiet.leader() is not None


def test_the_checker_catches_two_leaders_in_a_term():
    c = Cluster(n=3, seed=1)
    c.run_until(lambda: c.leader() is not None, 10_000)
    leader = c.leader()
    other = next(n for n in c.alive() if n is not leader)
    other.role, other.term = "leader", leader.term  # forge a second leader
    with pytest.raises(AssertionError, match="two leaders"):
        c.check()


def test_the_checker_catches_a_lost_acknowledged_proposal():
    c = Cluster(n=3, seed=2)
    c.run_until(lambda: c.leader() is not None, 10_000)
    index = c.propose(b"precious")
    c.run_until(lambda: index in c.acked, 10_000)
    for nid in c.ids:  # wipe every disk: the entry is gone everywhere
        c.crash(nid)
        c.storages[nid] = type(c.storages[nid])()
    c.leader_of_term.clear()
    c.committed.clear()
    for nid in c.ids:
        c.start(nid)
    with pytest.raises(AssertionError, match="acknowledged proposal"):
        c.run_until(lambda: False, 10_000)


def test_the_checker_catches_diverging_logs():
    c = Cluster(n=3, seed=3)
    c.run_until(lambda: c.leader() is not None, 10_000)
    c.propose(b"a")
    c.propose(b"b")
    c.run(200)
    follower = next(n for n in c.alive() if n.role != "leader")
    e = follower.log.entries[-2]
    follower.log.entries[-2] = type(e)(e.term, e.index, e.kind, b"forged")
    with pytest.raises(AssertionError, match="Log Matching"):
        c.check()


# Found by the simulation in CI (seed 7116): n2 was made a learner, then leader n1 removed
# itself from {n1, n3}. n1 committed the removal and stepped down, but the append that
# carried that commit to n3 was held back, so n3 kept the old configuration and needed n1's
# vote, which n1's longer log refused: no leader, ever. The steps as hypothesis shrank them.
LEADER_REMOVES_ITSELF = [
    ("run_for", {"events": 41}), ("change_membership", {"i": 4, "op": "remove"}),
    ("propose", {"count": 5, "payload": b""}), ("run_for", {"events": 66}),
    ("propose", {"count": 3, "payload": b""}), ("next_timer", {}),
    ("change_membership", {"i": 1, "op": "learner"}), ("next_timer", {}),
    ("propose", {"count": 5, "payload": b""}), ("next_timer", {}), ("next_timer", {}),
    ("propose", {"count": 5, "payload": b""}), ("next_timer", {}), ("next_timer", {}),
    ("next_timer", {}), ("next_timer", {}), ("propose", {"count": 5, "payload": b""}),
    ("propose", {"count": 5, "payload": b""}), ("propose", {"count": 2, "payload": b""}),
    ("propose", {"count": 6, "payload": b""}), ("run_for", {"events": 114}),
    ("change_membership", {"i": 0, "op": "remove"}),
]  # fmt: skip


def test_a_leader_that_removes_itself_leaves_a_cluster_that_elects_another(monkeypatch):
    monkeypatch.setitem(globals(), "note", lambda *a, **k: None)
    state = RaftSimulation()
    state.setup(seed=7116, drop=0.0, delay=(1, 12), max_append_entries=8,
                snapshot_every=16, n=3, dup=0.0)  # fmt: skip
    for rule_name, args in LEADER_REMOVES_ITSELF:
        getattr(state, rule_name)(**args)
        state.figure_3_properties_hold()
    state.teardown()  # heals, then requires a leader and a committed proposal
