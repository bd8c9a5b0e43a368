"""Liveness in simulation: a connected majority elects a leader within a bounded number of ticks,
and with PreVote + CheckQuorum a node that was cut off and comes back does not depose it."""

from __future__ import annotations

import pytest

from .raft_sim import Cluster

TICK = 10  # simulated time units per nominal tick (each node's own period is 8..12)
BOUND_TICKS = 100  # ten election timeouts: generous against the measured p99 of ~35


def ticks_until_leader(c: Cluster) -> float:
    start = c.now
    assert c.run_until(lambda: c.leader() is not None, BOUND_TICKS * TICK * 2), c.alive()
    return (c.now - start) / TICK


@pytest.mark.parametrize("n", [3, 5])
def test_a_connected_majority_elects_a_leader_within_bounded_ticks(n):
    worst = 0.0
    for seed in range(40):
        c = Cluster(n=n, seed=seed, drop=0.05, delay=(1, 5))
        worst = max(worst, ticks_until_leader(c))
        c.run(100)
        old = c.leader()
        c.crash(old.id)  # lose the leader; a majority is still connected
        if n == 5:
            c.crash(next(i for i in c.ids if c.nodes[i] is not None and i != old.id))
        worst = max(worst, ticks_until_leader(c))
        assert c.leader().id != old.id
    assert worst <= BOUND_TICKS


def test_no_leader_without_a_majority():
    c = Cluster(n=3, seed=3)
    ticks_until_leader(c)
    leader = c.leader()
    for nid in c.ids:
        if nid != leader.id:
            c.crash(nid)
    c.run_until(lambda: False, 50 * TICK * 10)
    assert c.leader() is None  # CheckQuorum made the lone leader step down
    assert all(n.role != "leader" for n in c.alive())


def leader_changes_after_isolation(seed: int, pre_vote: bool, check_quorum: bool) -> int:
    c = Cluster(n=3, seed=seed, pre_vote=pre_vote, check_quorum=check_quorum, delay=(1, 3))
    ticks_until_leader(c)
    c.run(200)
    leader = c.leader()
    changes_before = c.leader_changes
    follower = next(i for i in c.ids if i != leader.id)
    c.isolate(follower)
    c.run_until(lambda: False, 30 * 10 * TICK)  # thirty election timeouts alone
    c.heal()
    c.run_until(lambda: False, 20 * 10 * TICK)
    for i in range(5):
        c.propose(b"after-%d" % i)
    c.run(300)
    return c.leader_changes - changes_before


@pytest.mark.slow
def test_pre_vote_and_check_quorum_a_returning_node_does_not_depose_the_leader():
    changes = [leader_changes_after_isolation(seed, True, True) for seed in range(10)]
    assert changes == [0] * 10


@pytest.mark.slow
def test_without_pre_vote_a_returning_node_does_depose_the_leader():
    # The control experiment: the same runs without the two features do disrupt the leader.
    changes = [leader_changes_after_isolation(seed, False, False) for seed in range(10)]
    assert sum(1 for x in changes if x > 0) >= 8


def test_progress_on_a_flaky_network():
    c = Cluster(n=5, seed=11, drop=0.3, dup=0.1, delay=(1, 20))
    ticks_until_leader(c)
    acked_before = len(c.acked)
    for _ in range(20):
        c.propose(b"x")
        c.run(50)
    c.settle()
    assert len(c.acked) > acked_before
