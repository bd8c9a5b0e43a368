"""Voters, learners and the bootstrap rule: pure policy."""

from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.cluster.membership_policy import (
    FOUND,
    JOIN,
    RESUME,
    WAIT,
    ConfChange,
    MemberInfo,
    MembershipConfig,
    bootstrap_action,
    next_conf_change,
    quorum,
    voter_goal,
)

CFG = MembershipConfig(dead_member_timeout_s=60.0, discovery_window_s=3.0)
NOW = 1000.0


def alive(since=0.0, cluster="c"):
    return MemberInfo("alive", since, cluster)


def dead(since=0.0, cluster="c"):
    return MemberInfo("dead", since, cluster)


def apply(change: ConfChange, voters: set, learners: set) -> None:
    if change.op == "add" and not change.voter:
        assert change.node not in voters | learners
        learners.add(change.node)
    elif change.op == "promote":
        assert change.node in learners
        learners.discard(change.node)
        voters.add(change.node)
    elif change.op == "remove":
        assert change.node in voters | learners
        voters.discard(change.node)
        learners.discard(change.node)
    else:
        raise AssertionError(change)


def test_voter_goal_is_3_then_5_and_odd():
    assert [voter_goal(n) for n in range(1, 9)] == [1, 1, 3, 3, 5, 5, 5, 5]


def test_a_growing_cluster_gets_3_voters_then_5():
    voters, learners = {"n1"}, set()
    members = {f"n{i}": alive() for i in range(1, 4)}
    for _ in range(10):
        change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
        if change is None:
            break
        apply(change, voters, learners)
    assert voters == {"n1", "n2", "n3"} and learners == set()
    members["n4"] = alive()
    assert next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG) == ConfChange(
        "add", "n4", voter=False, reason="new member"
    )
    learners.add("n4")
    # Four alive: still 3 voters, the fourth stays a learner.
    assert next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG) is None
    members["n5"] = alive()
    for _ in range(10):
        change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
        if change is None:
            break
        apply(change, voters, learners)
    assert voters == {f"n{i}" for i in range(1, 6)} and learners == set()


def test_a_dead_voter_is_replaced_by_a_learner_then_removed_after_the_timeout():
    voters, learners = {"n1", "n2", "n3"}, {"n4", "n5"}
    members = {
        "n1": alive(),
        "n2": dead(since=NOW - 5),
        "n3": alive(),
        "n4": alive(),
        "n5": alive(),
    }
    change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
    assert (change.op, change.node) == ("promote", "n4")
    apply(change, voters, learners)
    # Not yet dead long enough to be removed: nothing more to do.
    assert next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG) is None
    later = NOW + CFG.dead_member_timeout_s
    change = next_conf_change("n1", voters, learners, members, later, "c", config=CFG)
    assert (change.op, change.node) == ("remove", "n2")
    apply(change, voters, learners)
    assert voters == {"n1", "n3", "n4"}


def test_a_learner_that_is_only_suspect_or_lagging_is_not_promoted_first():
    voters, learners = {"n1", "n2", "n3"}, {"n4", "n5", "n6"}
    members = {
        "n1": alive(),
        "n2": dead(since=NOW),
        "n3": alive(),
        "n4": MemberInfo("suspect", NOW),
        "n5": alive(),
        "n6": alive(),
    }
    change = next_conf_change(
        "n1", voters, learners, members, NOW, "c", caught_up={"n4", "n6"}, config=CFG
    )
    assert (change.op, change.node) == ("promote", "n6")


def test_a_voter_that_left_is_removed_at_once_and_the_leader_never():
    voters, learners = {"n1", "n2", "n3"}, set()
    members = {"n2": alive(), "n3": MemberInfo("left", NOW)}  # gossip lost sight of n1 itself
    change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
    assert (change.op, change.node) == ("remove", "n3")


def test_no_removal_that_would_lose_quorum():
    # Two of three voters dead past the timeout: removing one would leave 2 voters with 1
    # alive, so nothing is removed (that change could not commit anyway).
    voters = {"n1", "n2", "n3"}
    members = {"n1": alive(), "n2": dead(), "n3": dead()}
    assert next_conf_change("n1", voters, set(), members, NOW, "c", config=CFG) is None


def test_peers_of_another_cluster_are_not_added():
    members = {"n1": alive(), "n2": alive(cluster="other"), "n3": alive(cluster=None)}
    assert next_conf_change("n1", {"n1"}, set(), members, NOW, "c", config=CFG) is None


def test_a_voter_back_from_the_dead_is_demoted_to_learner_when_there_are_too_many():
    voters, learners = {"n1", "n2", "n3", "n4"}, set()
    members = {n: alive() for n in voters}
    change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
    assert (change.op, change.node) == ("remove", "n4")
    apply(change, voters, learners)
    change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
    assert change == ConfChange("add", "n4", voter=False, reason="new member")


# ---- seeded random configurations ------------------------------------------------------

NODES = [f"n{i}" for i in range(1, 9)]
member_state = st.sampled_from(
    ["alive", "alive", "suspect", "dead-new", "dead-old", "left", "absent"]
)


@st.composite
def clusters(draw):
    states = {n: draw(member_state) for n in NODES}
    states["n1"] = "alive"  # the leader
    roles = {n: draw(st.sampled_from(["voter", "learner", "none"])) for n in NODES}
    roles["n1"] = "voter"
    voters = {n for n in NODES if roles[n] == "voter"}
    learners = {n for n in NODES if roles[n] == "learner"}
    members = {}
    for n, s in states.items():
        if s == "absent":
            continue
        if s.startswith("dead"):
            members[n] = MemberInfo("dead", NOW if s == "dead-new" else NOW - 1000, "c")
        else:
            members[n] = MemberInfo(s, NOW - 1, "c")
    return voters, learners, members


def alive_voters(voters, members, leader="n1"):
    return {
        v
        for v in voters
        if v == leader or (v in members and members[v].state in ("alive", "suspect"))
    }


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_no_change_ever_leaves_the_alive_voters_short_of_a_quorum(cluster):
    voters, learners, members = cluster
    # Only a leader with a quorum runs the policy (check_quorum steps down otherwise).
    if len(alive_voters(voters, members)) < quorum(len(voters)):
        return
    for _ in range(40):
        change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
        if change is None:
            break
        apply(change, voters, learners)
        assert "n1" in voters
        assert len(alive_voters(voters, members)) >= quorum(len(voters)), change
    else:
        raise AssertionError("the policy did not settle")


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_a_stable_view_settles_on_3_or_5_alive_voters(cluster):
    voters, learners, members = cluster
    # A view with no transient states: everyone alive or long gone.
    members = {n: m for n, m in members.items() if m.state == "alive" or NOW - m.since > 100}
    if len(alive_voters(voters, members)) < quorum(len(voters)):
        return
    for _ in range(40):
        change = next_conf_change("n1", voters, learners, members, NOW, "c", config=CFG)
        if change is None:
            break
        apply(change, voters, learners)
    n_alive = len(
        [n for n, m in members.items() if m.state == "alive"]
        + (["n1"] if "n1" not in members else [])
    )
    assert voters == alive_voters(voters, members)  # every dead voter removed
    assert len(voters) == voter_goal(n_alive, CFG)
    assert len(voters) in (1, 3, 5)
    alive_ids = {n for n, m in members.items() if m.state == "alive"} | {"n1"}
    assert voters | learners == alive_ids  # every alive member in, every dead one out


# ---- bootstrap -----------------------------------------------------------------------------


def test_a_peer_with_raft_state_resumes_whatever_it_sees():
    assert bootstrap_action("n9", True, {"n1": None}, 0.0, CFG).action == RESUME
    assert bootstrap_action("n9", True, {"n1": "c"}, 99.0, CFG).action == RESUME


def test_a_new_peer_joins_a_cluster_in_view():
    b = bootstrap_action("n0", False, {"n1": "c", "n2": None}, 0.0, CFG)
    assert (b.action, b.cluster_id) == (JOIN, "c")


def test_with_two_clusters_in_view_every_joiner_picks_the_same():
    peers = {"n1": "b", "n2": "a", "n3": "b", "n4": "a"}
    assert {bootstrap_action(me, False, peers, 9.0, CFG).cluster_id for me in ("x", "y", "n0")} == {
        "a"
    }
    peers["n5"] = "b"
    assert bootstrap_action("x", False, peers, 9.0, CFG).cluster_id == "b"


def test_new_peers_wait_out_the_window_then_only_the_lowest_founds():
    ids = ["n3", "n1", "n2"]
    for me in ids:
        peers = {p: None for p in ids if p != me}
        assert bootstrap_action(me, False, peers, 1.0, CFG).action == WAIT
    actions = {
        me: bootstrap_action(me, False, {p: None for p in ids if p != me}, 3.0, CFG).action
        for me in ids
    }
    assert actions == {"n1": FOUND, "n2": WAIT, "n3": WAIT}


def test_a_lone_peer_founds_after_the_window():
    assert bootstrap_action("solo", False, {}, 0.5, CFG).action == WAIT
    assert bootstrap_action("solo", False, {}, 3.0, CFG).action == FOUND


@settings(max_examples=200, deadline=None)
@given(st.sets(st.text("abcdef", min_size=1, max_size=4), min_size=1, max_size=8))
def test_peers_that_all_see_each_other_found_exactly_one_cluster(ids):
    founders = [
        me
        for me in ids
        if bootstrap_action(me, False, {p: None for p in ids if p != me}, 5.0, CFG).action == FOUND
    ]
    assert founders == [min(ids)]
