"""Scenario tests of the Raft extensions in Ongaro's dissertation ("Consensus: Bridging Theory and
Practice", 2014): PreVote (9.6), CheckQuorum and the leader lease (6.2, 4.2.3), single-server
membership changes and learners (4.1-4.3), leadership transfer (3.10), and log compaction with
InstallSnapshot (paper section 7 / dissertation 5)."""

from __future__ import annotations

from random import Random

import pytest

from consensus import (
    FOLLOWER,
    LEADER,
    Entry,
    MemoryStorage,
    ProposalRejected,
    RaftNode,
    Ready,
    Snapshot,
)
from consensus.types import (
    APP_RESP,
    CONF,
    SNAP,
    TIMEOUT_NOW,
    VOTE_RESP,
    ConfState,
    HardState,
    Message,
    decode_conf,
)
from tests.sim.raft_net import SyncNetwork


def test_dissertation_9_6_pre_vote_keeps_an_isolated_node_from_raising_its_term():
    net = SyncNetwork(pre_vote=True, check_quorum=True)
    net.elect("n1")
    term = net["n1"].term
    net.isolate("n3")
    net.tick("n3", 100)  # many election timeouts alone
    assert net["n3"].term == term  # it never won a pre-vote, so it never bumped its term
    net.heal()
    net.tick(n=5)
    assert net["n1"].role == LEADER and net["n1"].term == term


def test_dissertation_9_6_without_pre_vote_a_returning_node_disrupts_the_leader():
    # The counterpart of the test above: the feature is what prevents the disruption.
    net = SyncNetwork(pre_vote=False, check_quorum=False)
    net.elect("n1")
    term = net["n1"].term
    net.isolate("n3")
    net.tick("n3", 100)
    assert net["n3"].term > term
    net.heal()
    net.tick(n=30)
    assert net["n1"].term > term  # the old leader was deposed by the higher term


def test_dissertation_6_2_check_quorum_leader_steps_down_without_a_quorum():
    net = SyncNetwork(check_quorum=True)
    net.elect("n1")
    net.isolate("n1")
    # The first check still counts the followers heard during the election; the second not.
    net.tick("n1", 2 * net["n1"].election_ticks)
    assert net["n1"].role == FOLLOWER


def test_dissertation_4_2_3_leader_lease_ignores_votes_while_a_leader_is_heard():
    net = SyncNetwork(pre_vote=False, check_quorum=True)
    net.elect("n1")
    term = net["n1"].term
    # n3 thinks the leader is gone (say, a long GC pause) and forces an election.
    net["n3"].campaign()
    net.deliver()
    assert net["n1"].role == LEADER and net["n1"].term == term
    assert net["n2"].term == term  # n2 heard n1 recently and ignored the vote request


def test_dissertation_4_1_add_a_learner_promote_it_and_remove_a_voter():
    net = SyncNetwork(pre_vote=True, check_quorum=True)
    leader = net.elect("n1")
    net.propose("n1", b"before")
    net.add_node("n4", pre_vote=True, check_quorum=True)
    leader.propose_conf_change("add", "n4", voter=False)
    net.deliver()
    assert leader.learners == ("n4",) and leader.voters == ("n1", "n2", "n3")
    net.propose("n1", b"learner sees this")
    assert [e.data for e in net.applied["n4"] if e.data and e.kind == "cmd"] == [
        b"before",
        b"learner sees this",
    ]
    assert net["n4"].voters == ("n1", "n2", "n3")  # a learner never campaigns
    net.tick("n4", 100)
    assert net["n4"].role == FOLLOWER and leader.role == LEADER
    leader.propose_conf_change("promote", "n4")
    net.deliver()
    assert set(leader.voters) == {"n1", "n2", "n3", "n4"} and leader.learners == ()
    leader.propose_conf_change("remove", "n2")
    net.deliver()
    assert set(leader.voters) == {"n1", "n3", "n4"}
    net.crash("n3")
    net.crash("n4")
    with pytest.raises(ProposalRejected):
        leader.propose_conf_change("remove", "n9")
    index = net.propose("n1", b"n1 alone is no majority of n1, n3, n4")
    assert leader.commit_index < index


def test_dissertation_4_1_one_membership_change_at_a_time():
    net = SyncNetwork()
    leader = net.elect("n1")
    net.crash("n2")
    net.crash("n3")
    leader.propose_conf_change("add", "n4", voter=False)  # cannot commit: no quorum
    with pytest.raises(ProposalRejected):
        leader.propose_conf_change("add", "n5", voter=False)


def test_dissertation_4_1_a_new_leader_changes_membership_only_after_committing_in_its_term():
    n = RaftNode("n1", MemoryStorage(), voters=("n1", "n2", "n3"), rng=Random(0), pre_vote=False)
    n.campaign()
    n.step(Message(VOTE_RESP, "n2", "n1", n.term))
    assert n.role == LEADER and n.commit_index < n.last_index  # its no-op is not committed yet
    with pytest.raises(ProposalRejected):
        n.propose_conf_change("add", "n4", voter=False)
    n.step(Message(APP_RESP, "n2", "n1", n.term, index=n.last_index))
    assert n.commit_index == n.last_index
    n.propose_conf_change("add", "n4", voter=False)


def test_dissertation_4_2_2_a_removed_leader_steps_down_once_its_removal_commits():
    net = SyncNetwork()
    leader = net.elect("n1")
    net.propose("n1", b"x")
    leader.propose_conf_change("remove", "n1")
    net.deliver()
    assert leader.role == FOLLOWER
    assert set(net["n2"].voters) == {"n2", "n3"}
    net.tick(n=40)
    new = [n for n in (net["n2"], net["n3"]) if n.role == LEADER]
    assert len(new) == 1
    net.tick("n1", 100)
    assert net["n1"].role == FOLLOWER  # not a voter any more: never campaigns


def test_conf_entries_carry_the_whole_configuration():
    net = SyncNetwork()
    leader = net.elect("n1")
    leader.propose_conf_change("add", "n4", voter=False)
    net.deliver()
    conf_entry = [e for e in leader.log.entries if e.kind == CONF][-1]
    conf = decode_conf(conf_entry.data)
    assert conf.voters == ("n1", "n2", "n3") and conf.learners == ("n4",)


def test_dissertation_3_10_leadership_transfer():
    net = SyncNetwork()
    net.elect("n1")
    net.propose("n1", b"x")
    net["n1"].transfer_leadership("n3")
    net.deliver()
    assert TIMEOUT_NOW in {m.type for m in net.sent}
    assert net["n3"].role == LEADER and net["n1"].role == FOLLOWER
    assert net["n1"].leader_id == "n3"


def test_dissertation_3_10_transfer_waits_for_the_target_to_catch_up():
    net = SyncNetwork()
    net.elect("n1")
    net.crash("n3")
    net.propose("n1", b"n3 misses this")
    net.down.discard("n3")
    net["n1"].transfer_leadership("n3")
    with pytest.raises(ProposalRejected):
        net["n1"].propose(b"refused during transfer")
    net.deliver()
    assert net["n3"].role == LEADER
    assert b"n3 misses this" in [e.data for e in net["n3"].log.entries]


def test_section_7_a_lagging_follower_is_sent_a_snapshot():
    net = SyncNetwork()
    leader = net.elect("n1")
    net.crash("n3")
    for i in range(10):
        net.propose("n1", b"%d" % i)
    leader.compact(leader.applied_index, b"state-at-%d" % leader.applied_index)
    net.deliver()
    assert leader.log.snap_index == leader.applied_index
    net.down.discard("n3")
    net.tick(n=2)
    assert SNAP in {m.type for m in net.sent if m.dst == "n3"}
    assert net["n3"].log.snap_index == leader.log.snap_index
    assert net["n3"].snapshot.data == leader.snapshot.data
    net.propose("n1", b"after")
    assert net["n3"].commit_index == leader.commit_index
    # It restarts from its storage alone: snapshot plus the log after it.
    net.start("n3")
    assert net["n3"].log.snap_index == leader.log.snap_index
    rd = net["n3"].ready()
    assert rd.restore is not None and rd.restore.data == leader.snapshot.data


def test_section_7_compaction_keeps_the_configuration():
    net = SyncNetwork()
    leader = net.elect("n1")
    leader.propose_conf_change("add", "n4", voter=False)
    net.deliver()
    net.propose("n1", b"x")
    snap = leader.compact(leader.applied_index, b"s")
    assert snap.conf.learners == ("n4",)


def test_a_single_voter_elects_itself_and_commits_alone():
    n = RaftNode("solo", MemoryStorage(), voters=("solo",), rng=Random(0))
    for _ in range(20):
        n.tick()
    assert n.role == LEADER
    index = n.propose(b"x")
    assert n.commit_index == index


def test_the_bootstrap_configuration_is_persisted_in_the_first_ready():
    store = MemoryStorage()
    n = RaftNode("n1", store, voters=("n1", "n2"), rng=Random(0))
    store.save(n.ready())
    again = RaftNode("n1", store, voters=("other",), rng=Random(0))
    assert again.voters == ("n1", "n2")


def test_section_7_a_snapshot_matching_our_log_keeps_the_rest_but_acks_only_its_index():
    store = MemoryStorage()
    entries = tuple(Entry(t, i + 1, "cmd", b"") for i, t in enumerate((1, 1, 1, 2, 2)))
    store.save(Ready(hard_state=HardState(2, None, 0), entries=entries))
    n = RaftNode("n2", store, voters=("n1", "n2", "n3"), rng=Random(0))
    snap = Snapshot(3, 1, ConfState(("n1", "n2", "n3")), b"s")
    n.step(Message(SNAP, "n1", "n2", 3, snapshot=snap))
    (resp,) = [m for m in n.ready().messages if m.type == APP_RESP]
    assert resp.index == 3  # entries 4 and 5 are not known to match the leader's
    assert n.commit_index == 3 and n.last_index == 5
