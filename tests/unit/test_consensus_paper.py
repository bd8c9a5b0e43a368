"""Scenario tests of RaftNode against the Raft paper, in the style of etcd-raft's raft_paper_test.go.

Each test names the section of "In Search of an Understandable Consensus Algorithm (Extended
Version)" (Ongaro & Ousterhout, 2014) whose rule it checks.
"""

from __future__ import annotations

from random import Random

import pytest

from consensus import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    PRE_CANDIDATE,
    Entry,
    MemoryStorage,
    Message,
    NotLeader,
    RaftNode,
)
from consensus.types import (
    APP,
    APP_RESP,
    HEARTBEAT,
    NOOP,
    VOTE,
    VOTE_RESP,
    HardState,
    Ready,
)
from tests.sim.raft_net import SyncNetwork

IDS = ("n1", "n2", "n3")


def new_node(nid="n1", voters=IDS, storage=None, **kw) -> RaftNode:
    kw.setdefault("pre_vote", False)
    kw.setdefault("check_quorum", False)
    return RaftNode(nid, storage or MemoryStorage(), voters=voters, rng=Random(nid), **kw)


def drain(node: RaftNode) -> list[Message]:
    """Persist and apply everything the node has ready; return its messages."""
    out = []
    while node.has_ready():
        rd = node.ready()
        out.extend(rd.messages)
        node.advance(rd)
    return out


def storage_with(entries, term=0, vote=None, commit=0) -> MemoryStorage:
    s = MemoryStorage()
    s.save(Ready(hard_state=HardState(term, vote, commit), entries=tuple(entries)))
    return s


def ents(*terms: int) -> list[Entry]:
    return [Entry(t, i + 1, "cmd", b"%d" % (i + 1)) for i, t in enumerate(terms)]


def make_leader(node: RaftNode) -> None:
    """Elect `node` by delivering granted votes from every other voter (no pre-vote), then
    acknowledge its no-op from every follower so that they are in replicate state."""
    node.campaign()
    drain(node)
    for v in node.voters:
        if v != node.id:
            node.step(Message(VOTE_RESP, v, node.id, node.term))
    assert node.role == LEADER
    drain(node)
    for v in node.voters:
        if v != node.id:
            node.step(Message(APP_RESP, v, node.id, node.term, index=node.last_index))
    drain(node)


# ---- 5.1 Raft basics


def test_5_1_a_server_starts_as_follower():
    assert new_node().role == FOLLOWER


@pytest.mark.parametrize("role", [FOLLOWER, CANDIDATE, LEADER])
def test_5_1_a_larger_term_turns_any_server_into_a_follower(role):
    n = new_node()
    if role == CANDIDATE:
        n.campaign()
    elif role == LEADER:
        make_leader(n)
    higher = n.term + 5
    n.step(Message(APP, "n2", "n1", term=higher))
    assert (n.role, n.term, n.leader_id) == (FOLLOWER, higher, "n2")


def test_5_1_a_request_with_a_stale_term_is_rejected():
    n = new_node(storage=storage_with([], term=3))
    n.step(Message(APP, "n2", "n1", term=2, entries=(Entry(2, 1),)))
    assert n.last_index == 0 and n.term == 3


# ---- 5.2 Leader election


def test_5_2_leader_sends_heartbeats_every_heartbeat_timeout():
    n = new_node(heartbeat_ticks=2)
    make_leader(n)
    n.tick()
    assert [m for m in drain(n) if m.type == HEARTBEAT] == []
    n.tick()
    beats = [m for m in drain(n) if m.type == HEARTBEAT]
    assert sorted(m.dst for m in beats) == ["n2", "n3"]


@pytest.mark.parametrize("start_role", [FOLLOWER, CANDIDATE])
def test_5_2_election_timeout_starts_an_election(start_role):
    n = new_node()
    if start_role == CANDIDATE:
        n.campaign()
        drain(n)
    term = n.term
    for _ in range(2 * n.election_ticks):
        n.tick()
    msgs = drain(n)
    assert n.role == CANDIDATE and n.term > term and n.vote == "n1"
    votes = [m for m in msgs if m.type == VOTE and m.term == n.term]
    assert sorted(m.dst for m in votes) == ["n2", "n3"]


@pytest.mark.parametrize(
    "size, granted, rejected, role",
    [
        (1, 0, 0, LEADER),
        (3, 1, 0, LEADER),
        (3, 2, 0, LEADER),
        (5, 2, 0, LEADER),
        (5, 1, 0, CANDIDATE),
        (3, 0, 2, FOLLOWER),
        (5, 1, 3, FOLLOWER),
        (5, 0, 0, CANDIDATE),
    ],
)
def test_5_2_a_candidate_wins_with_a_majority_and_loses_to_one(size, granted, rejected, role):
    voters = tuple(f"n{i + 1}" for i in range(size))
    n = new_node(voters=voters)
    n.campaign()
    others = list(voters[1:])
    for v in others[:granted]:
        n.step(Message(VOTE_RESP, v, "n1", n.term))
    for v in others[granted : granted + rejected]:
        n.step(Message(VOTE_RESP, v, "n1", n.term, reject=True))
    assert n.role == role


def test_5_2_each_server_votes_for_at_most_one_candidate_per_term():
    n = new_node()
    n.step(Message(VOTE, "n2", "n1", term=1))
    n.step(Message(VOTE, "n3", "n1", term=1))
    n.step(Message(VOTE, "n2", "n1", term=1))  # a retried request gets the same answer
    grants = [(m.dst, m.reject) for m in drain(n)]
    assert grants == [("n2", False), ("n3", True), ("n2", False)]


def test_5_2_a_candidate_steps_down_for_a_leader_of_its_term():
    n = new_node()
    n.campaign()
    n.step(Message(HEARTBEAT, "n2", "n1", term=n.term))
    assert (n.role, n.leader_id) == (FOLLOWER, "n2")


def test_5_2_election_timeouts_are_randomized_in_T_to_2T():
    seen = set()
    for seed in range(200):
        n = RaftNode("n1", MemoryStorage(), voters=IDS, rng=Random(seed), election_ticks=10)
        seen.add(n.randomized_election_timeout)
    assert seen == set(range(10, 20))


# ---- 5.3 Log replication


def test_5_3_leader_replicates_a_proposal_to_every_follower():
    n = new_node()
    make_leader(n)
    index = n.propose(b"x")
    apps = [m for m in drain(n) if m.type == APP]
    assert sorted(m.dst for m in apps) == ["n2", "n3"]
    for m in apps:
        assert m.entries[-1] == Entry(n.term, index, "cmd", b"x")
        # prev index/term name the entry just before the ones sent (5.3 consistency check)
        assert m.index == m.entries[0].index - 1
        assert m.log_term == (n.log.term(m.index) or 0)


def test_5_3_leader_commits_once_a_majority_stored_the_entry():
    net = SyncNetwork()
    leader = net.elect("n1")
    net.crash("n3")
    index = net.propose("n1", b"x")
    assert leader.commit_index == index  # n1 + n2 are a majority of three
    assert net.applied["n2"][-1].data == b"x"


def test_5_3_no_commit_without_a_majority():
    net = SyncNetwork()
    leader = net.elect("n1")
    net.crash("n2")
    net.crash("n3")
    index = net.propose("n1", b"x")
    assert leader.commit_index < index
    assert [e.data for e in net.applied["n1"] if e.data] == []


def test_5_3_follower_rejects_append_failing_the_consistency_check():
    n = new_node("n2", storage=storage_with(ents(1, 2), term=2))
    n.step(Message(APP, "n1", "n2", term=2, index=2, log_term=1, entries=(Entry(2, 3),)))
    (resp,) = drain(n)
    assert resp.type == APP_RESP and resp.reject and n.last_index == 2
    assert resp.reject_hint == 1  # fast backtracking: the last entry with term <= 1


@pytest.mark.parametrize(
    "incoming_prev, incoming, expect_terms",
    [
        (2, [Entry(3, 3)], [1, 2, 3]),  # append after a match
        (1, [Entry(3, 2)], [1, 3]),  # conflict at 2: truncate from there
        (0, [Entry(1, 1)], [1, 2]),  # already held: never truncate
        (1, [Entry(2, 2), Entry(3, 3)], [1, 2, 3]),
    ],
)
def test_5_3_follower_deletes_conflicting_entries_and_appends_new_ones(
    incoming_prev, incoming, expect_terms
):
    n = new_node("n2", storage=storage_with(ents(1, 2), term=3))
    prev_term = {0: 0, 1: 1, 2: 2}[incoming_prev]
    n.step(
        Message(
            APP,
            "n1",
            "n2",
            term=3,
            index=incoming_prev,
            log_term=prev_term,
            entries=tuple(incoming),
        )
    )
    assert [e.term for e in n.log.entries] == expect_terms


FIGURE_7 = {
    # Figure 7: the leader of term 8 and six possible follower logs (a)-(f).
    "leader": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6],
    "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],
    "b": [1, 1, 1, 4],
    "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    "e": [1, 1, 1, 4, 4, 4, 4],
    "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
}


@pytest.mark.parametrize("case", "abcdef")
def test_5_3_figure_7_leader_brings_any_follower_log_in_line(case):
    leader_store = storage_with(ents(*FIGURE_7["leader"]), term=8)
    follower_store = storage_with(ents(*FIGURE_7[case]), term=8)
    leader = new_node("n1", voters=("n1", "n2"), storage=leader_store)
    follower = new_node("n2", voters=("n1", "n2"), storage=follower_store)
    # Make n1 leader of term 8 regardless of the follower's log (as in the figure).
    leader.term = 7
    leader.campaign()
    leader.step(Message(VOTE_RESP, "n2", "n1", leader.term))
    assert leader.role == LEADER
    queue = drain(leader)
    rounds = 0
    while queue:
        rounds += 1
        m = queue.pop(0)
        target = follower if m.dst == "n2" else leader
        target.step(m)
        queue.extend(drain(target))
    assert [e.term for e in follower.log.entries] == [e.term for e in leader.log.entries]
    assert follower.commit_index == leader.commit_index == leader.last_index
    assert rounds < 20  # fast backtracking: a few round trips, not one per entry


# ---- 5.4 Safety


@pytest.mark.parametrize(
    "cand_last_term, cand_last_index, granted",
    [(2, 3, True), (2, 2, False), (3, 1, True), (1, 5, False)],
)
def test_5_4_1_vote_only_for_an_up_to_date_log(cand_last_term, cand_last_index, granted):
    n = new_node("n2", storage=storage_with(ents(1, 2, 2), term=2))
    n.step(Message(VOTE, "n1", "n2", term=3, index=cand_last_index, log_term=cand_last_term))
    (resp,) = drain(n)
    assert resp.reject is not granted


def test_5_4_2_a_leader_does_not_commit_an_old_term_entry_by_counting_replicas():
    # Figure 8: an entry of term 2 replicated on a majority must not be committed by the
    # leader of term 4 until an entry of term 4 is committed on top of it.
    store = storage_with(ents(1, 2), term=3)
    n = new_node("n1", storage=store)
    n.term = 3
    n.campaign()
    n.step(Message(VOTE_RESP, "n2", "n1", n.term))
    assert n.role == LEADER
    drain(n)
    # n2 acknowledges index 2 (the term-2 entry) but not the no-op at 3.
    n.step(Message(APP_RESP, "n2", "n1", n.term, index=2))
    assert n.commit_index == 0
    n.step(Message(APP_RESP, "n2", "n1", n.term, index=3))
    assert n.commit_index == 3  # the no-op of the current term commits everything before it


def test_5_4_2_a_new_leader_appends_a_no_op_of_its_term():
    n = new_node()
    make_leader(n)
    assert n.log.entries[-1].kind == NOOP and n.log.entries[-1].term == n.term


# ---- 5.5 Follower and candidate crashes, and durable state


def test_5_5_a_restarted_node_recovers_term_vote_and_log_from_storage_alone():
    net = SyncNetwork()
    net.elect("n1")
    net.propose("n1", b"a")
    before = (net["n2"].term, net["n2"].vote, list(net["n2"].log.entries))
    net.start("n2")  # rebuild from its storage only
    after = net["n2"]
    assert (after.term, after.vote, list(after.log.entries)) == before
    assert after.commit_index >= 1


def test_5_5_a_restarted_voter_does_not_vote_twice_in_a_term():
    store = MemoryStorage()
    n = new_node("n1", storage=store)
    n.step(Message(VOTE, "n2", "n1", term=5))
    rd = n.ready()
    store.save(rd)
    assert not rd.messages[0].reject
    n = new_node("n1", storage=store)  # crash after save, restart
    n.step(Message(VOTE, "n3", "n1", term=5))
    assert drain(n)[0].reject


def test_5_propose_on_a_follower_names_the_leader():
    net = SyncNetwork()
    net.elect("n2")
    with pytest.raises(NotLeader) as err:
        net["n1"].propose(b"x")
    assert err.value.leader_id == "n2"


def test_pre_vote_candidate_is_called_pre_candidate():
    n = RaftNode("n1", MemoryStorage(), voters=IDS, rng=Random(1))
    n.campaign()
    assert n.role == PRE_CANDIDATE and n.term == 0
