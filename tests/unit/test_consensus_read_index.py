"""Linearizable reads with ReadIndex (Ongaro's dissertation 6.4; etcd-raft's ReadOnlySafe).

6.4: the leader (1) takes its commit index as the read index, once it has committed an entry
of its own term; (2) confirms it is still the leader with a round of heartbeats acknowledged
by a quorum; (3) waits until its state machine has applied the read index; (4) serves the
read. A follower asks the leader for the read index and then does (3) and (4) itself.
"""

from __future__ import annotations

from random import Random

import pytest

from consensus import MemoryStorage, NotLeader, RaftNode, ReadState
from consensus.types import HEARTBEAT, HEARTBEAT_RESP, READ_INDEX, READ_INDEX_RESP
from tests.sim.raft_net import SyncNetwork


def test_6_4_the_leader_answers_only_after_a_quorum_confirms_it_still_leads():
    net = SyncNetwork()
    leader = net.elect("n1")
    net.propose("n1", b"w1")
    leader.read_index(b"r1")
    out = net.collect("n1")
    assert net.read_states["n1"] == []  # step 2 not done yet
    beats = [m for m in out if m.type == HEARTBEAT]
    assert {m.dst for m in beats} == {"n2", "n3"} and all(m.context == b"r1" for m in beats)
    net.deliver(*out)
    assert net.read_states["n1"] == [ReadState(leader.commit_index, b"r1")]
    assert leader.commit_index == 2  # the no-op and w1: the read sees the acknowledged write


def test_6_4_a_deposed_leader_cut_off_from_the_quorum_never_serves_a_stale_read():
    net = SyncNetwork(check_quorum=False)  # without CheckQuorum it never steps down by itself
    old = net.elect("n1")
    net.isolate("n1")
    new = net.elect("n2")  # n2 and n3 move on without n1
    index = net.propose("n2", b"written after the cut")
    assert new.commit_index >= index
    old.read_index(b"stale?")  # n1 still believes it leads
    net.tick("n1", 3)
    assert old.role == "leader" and net.read_states["n1"] == []
    # On the majority side the read includes the write.
    new.read_index(b"fresh")
    net.deliver()
    assert net.read_states["n2"] == [ReadState(new.commit_index, b"fresh")]


def step_all(net: SyncNetwork, msgs, dst: str) -> list:
    """Deliver to `dst` only the messages addressed to it; return what it sends back."""
    for m in msgs:
        if m.dst == dst:
            net[dst].step(m)
    return net.collect(dst)


def test_6_4_step_1_a_new_leader_holds_reads_until_its_own_entry_commits():
    net = SyncNetwork()
    net.elect("n1")
    written = net.propose("n1", b"w")
    net["n1"].transfer_leadership("n2")  # n2 campaigns at once, lease or not
    votes = step_all(net, net.collect("n1"), "n2")
    noop = step_all(net, step_all(net, votes, "n3"), "n2")  # n3's vote makes n2 leader
    leader = net["n2"]
    assert leader.role == "leader" and leader.commit_index == written
    leader.read_index(b"r")  # its commit index may still lag an earlier leader's
    held = net.collect("n2")
    assert held == [] and net.read_states["n2"] == []  # no heartbeat round yet
    net.deliver(*noop)
    (state,) = net.read_states["n2"]
    assert state.context == b"r" and state.index == written + 1  # includes the no-op


def test_6_4_a_follower_reads_at_the_leaders_commit_index():
    net = SyncNetwork()
    net.elect("n1")
    net.propose("n1", b"w")
    follower = net["n3"]
    follower.read_index(b"f1")
    out = net.collect("n3")
    assert [(m.type, m.dst, m.context) for m in out] == [(READ_INDEX, "n1", b"f1")]
    net.deliver(*out)
    (state,) = net.read_states["n3"]
    assert state == ReadState(net["n1"].commit_index, b"f1")
    assert any(m.type == READ_INDEX_RESP and m.dst == "n3" for m in net.sent)
    assert follower.applied_index >= state.index  # what step 3 waits for


def test_one_quorum_round_releases_every_read_queued_before_it():
    net = SyncNetwork()
    leader = net.elect("n1")
    leader.read_index(b"a")
    first = net.collect("n1")
    leader.read_index(b"b")
    second = net.collect("n1")
    # Only the answers to b's heartbeats arrive: leadership was confirmed after a and b.
    net.deliver(*[m for m in second if m.type == HEARTBEAT])
    assert first and [s.context for s in net.read_states["n1"]] == [b"a", b"b"]
    assert all(m.type == HEARTBEAT_RESP for m in net.sent if m.dst == "n1" and m.context)


def test_a_single_voter_reads_at_once_and_a_node_without_leader_refuses():
    solo = RaftNode("solo", MemoryStorage(), voters=("solo",), rng=Random(0))
    solo.campaign()
    solo.read_index(b"x")
    assert solo.ready().read_states == (ReadState(solo.commit_index, b"x"),)
    lonely = RaftNode("n2", MemoryStorage(), voters=("n1", "n2", "n3"), rng=Random(0))
    with pytest.raises(NotLeader):
        lonely.read_index(b"y")
