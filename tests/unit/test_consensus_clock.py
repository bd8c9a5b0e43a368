"""RaftNode.ticks_until_due: the tick a driver may sleep until (consensus/driver.py's clock).

The driver ticks lazily: it sleeps until the tick the core says may act and makes up the
ticks in between at once. That is only right if no tick before the one named does
anything, and the one named does: checked on seeded clusters in every role."""

from __future__ import annotations

import copy
from random import Random

from consensus import FOLLOWER, LEADER
from consensus.types import HEARTBEAT
from tests.sim.raft_net import SyncNetwork


def acts(node) -> bool:
    """Whether the last tick made the node do something: a message, a new role, or a
    leader's CheckQuorum round (which starts over quietly when the quorum was heard)."""
    quorum_round = node.role == LEADER and node.election_elapsed == 0
    return bool(node.msgs) or node.role != node._role_before or quorum_round


def tick_watch(node) -> bool:
    node._role_before = node.role
    node.tick()
    return acts(node)


def check_due(node) -> None:
    due = node.ticks_until_due()
    if due is None:  # a learner: no tick ever acts
        probe = copy.deepcopy(node)
        assert not any(tick_watch(probe) for _ in range(5 * probe.election_ticks))
        return
    assert due >= 1
    probe = copy.deepcopy(node)
    probe.msgs.clear()
    for _ in range(due - 1):
        assert not tick_watch(probe), f"{probe} acted before its due tick"
    assert tick_watch(probe), f"{probe} did nothing at its due tick"


def test_a_follower_is_due_at_its_election_timeout_and_the_leader_at_its_heartbeat():
    net = SyncNetwork(election_ticks=10, heartbeat_ticks=3)
    leader = net.elect("n1")
    assert leader.role == LEADER
    assert leader.ticks_until_due() == 3
    before = len(net.sent)
    net.tick("n1", 2)
    assert not [m for m in net.sent[before:] if m.type == HEARTBEAT]
    net.tick("n1", 1)
    assert len([m for m in net.sent[before:] if m.type == HEARTBEAT]) == 2
    follower = net["n2"]
    assert follower.role == FOLLOWER
    assert follower.ticks_until_due() == follower.randomized_election_timeout
    net.tick("n2", 4)
    assert follower.ticks_until_due() == follower.randomized_election_timeout - 4


def test_no_tick_before_the_due_one_acts_and_the_due_one_does():
    for seed in range(20):
        rng = Random(seed)
        net = SyncNetwork(ids=("n1", "n2", "n3", "n4", "n5"), seed=seed, heartbeat_ticks=3)
        for step in range(60):
            nid = rng.choice(net.ids)
            for node in net.nodes.values():
                check_due(node)
            choice = rng.random()
            if choice < 0.6:
                net.tick(nid, rng.randrange(1, 6))
            elif choice < 0.7:
                net.isolate(nid)
            elif choice < 0.8:
                net.heal()
            else:
                leaders = [n for n in net.nodes.values() if n.role == LEADER]
                if leaders:
                    net.propose(leaders[0].id, b"x%d" % step)


def test_a_learner_never_falls_due():
    net = SyncNetwork(ids=("n1", "n2", "n3", "l1"), voters=("n1", "n2", "n3"), learners=("l1",))
    net.elect("n1")
    assert net["l1"].ticks_until_due() is None
    check_due(net["l1"])
