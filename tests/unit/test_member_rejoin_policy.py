"""A wiped member rejoins under a new Raft id: the policy retires the old id, adds the new one
as a learner, then promotes it; the Raft id is bound to the raft directory (identity.py)."""

import pytest

from aivailable.cluster.identity import (
    RAFT_ID_FILE,
    RaftIdError,
    node_of,
    raft_id_for,
    raft_identity,
)
from aivailable.cluster.membership_policy import (
    MemberInfo,
    MembershipConfig,
    by_raft_id,
    next_conf_change,
    quorum,
)
from aivailable.cluster.payload import node_payload, read_payload
from consensus import FileStorage, StorageError

CFG = MembershipConfig(dead_member_timeout_s=60.0)
NOW = 1000.0
OLD, NEW = "1111111111111111", "2222222222222222"
N1, N2 = raft_id_for("n1", "a" * 16), raft_id_for("n2", "b" * 16)
N3_OLD, N3_NEW = raft_id_for("n3", OLD), raft_id_for("n3", NEW)


def member(raft_id, state="alive", cluster="c"):
    return MemberInfo(state, 0.0, cluster, raft_id)


def settle(voters, learners, members, caught_up=None, steps=10):
    """Apply the policy's changes one at a time, as the leader does; returns them."""
    changes = []
    for _ in range(steps):
        change = next_conf_change("n1" if "n1" in voters else N1, voters, learners, members, NOW,
                                  "c", caught_up=caught_up, config=CFG)  # fmt: skip
        if change is None:
            return changes
        changes.append(change)
        if change.op == "remove":
            voters.discard(change.node)
            learners.discard(change.node)
        elif change.op == "promote":
            learners.discard(change.node)
            voters.add(change.node)
        else:
            learners.add(change.node)
        # Never fewer alive voters than a quorum of the configuration.
        alive = {members[n].member or n for n in members if members[n].state == "alive"}
        assert len([v for v in voters if v in alive or v == N1]) >= quorum(len(voters))
    raise AssertionError(f"no fixed point: {changes}")


def test_names_and_ids():
    assert node_of(N3_OLD) == "n3" and node_of("n3") == "n3"
    assert node_of("lab@box@" + OLD) == "lab@box"  # a name may hold the separator
    assert node_of("n3@not-a-member") == "n3@not-a-member"  # no member part: the id is a name


def test_a_wiped_voter_is_retired_then_added_as_a_learner_then_promoted():
    voters, learners = {N1, N2, N3_OLD}, set()
    members = {"n1": member(N1), "n2": member(N2), "n3": member(N3_NEW)}
    changes = settle(voters, learners, members)
    assert [(c.op, c.node, c.voter) for c in changes] == [
        ("remove", N3_OLD, True),
        ("add", N3_NEW, False),
        ("promote", N3_NEW, True),
    ]
    assert "rejoined as a new member" in changes[0].reason
    assert voters == {N1, N2, N3_NEW} and learners == set()


def test_the_new_id_is_promoted_only_once_caught_up():
    voters, learners = {N1, N2}, {N3_NEW}
    members = {"n1": member(N1), "n2": member(N2), "n3": member(N3_NEW)}
    assert settle(voters, learners, members, caught_up=()) == []
    assert [c.op for c in settle(voters, learners, members, caught_up=(N3_NEW,))] == ["promote"]


def test_a_legacy_id_under_the_node_name_is_retired_the_same_way():
    # A raft directory from before member ids voted as "n3"; wiped, it comes back as n3@NEW.
    voters, learners = {"n1", "n2", "n3"}, set()
    members = {"n1": member(None), "n2": member(None), "n3": member(N3_NEW)}
    changes = settle(voters, learners, members)
    assert [(c.op, c.node) for c in changes] == [
        ("remove", "n3"),
        ("add", N3_NEW),
        ("promote", N3_NEW),
    ]


def test_a_replaced_id_is_not_retired_if_that_would_lose_the_quorum():
    # n2 is dead too: 1 alive voter of 3; removing n3's old id leaves 2 voters, quorum 2.
    voters = {N1, N2, N3_OLD}
    members = {"n1": member(N1), "n2": member(N2, "dead"), "n3": member(N3_NEW)}
    change = next_conf_change(N1, voters, set(), members, NOW, "c", config=CFG)
    assert change is not None and change.node != N3_OLD
    assert (change.op, change.node, change.voter) == ("add", N3_NEW, False)  # harmless


def test_a_replaced_learner_is_retired():
    voters, learners = {N1, N2, "n4@" + "c" * 16}, {N3_OLD}
    members = {"n1": member(N1), "n2": member(N2), "n4": member("n4@" + "c" * 16)}
    members["n3"] = member(N3_NEW)
    change = next_conf_change(N1, voters, learners, members, NOW, "c", config=CFG)
    assert (change.op, change.node) == ("remove", N3_OLD)


def test_a_voter_whose_payload_is_not_read_yet_is_not_taken_for_absent():
    # Just restarted: gossip knows n3 but not yet its payload (member None).
    voters = {N1, N2, N3_OLD}
    members = {"n1": member(N1), "n2": member(N2), "n3": MemberInfo("alive", 0.0, None)}
    assert next_conf_change(N1, voters, set(), members, NOW, "c", config=CFG) is None
    assert set(by_raft_id(members, voters)) == {N1, N2, N3_OLD}


def test_a_restarted_member_with_its_directory_is_left_alone():
    voters = {N1, N2, N3_OLD}
    members = {"n1": member(N1), "n2": member(N2), "n3": member(N3_OLD)}
    assert next_conf_change(N1, voters, set(), members, NOW, "c", config=CFG) is None


def test_the_payload_carries_the_raft_id():
    payload = node_payload("127.0.0.1:1", "c", [], {}, [], member=N3_NEW)
    assert read_payload("n3", payload).member == N3_NEW
    del payload["member"]  # an older peer
    assert read_payload("n3", payload).member is None


def test_the_raft_id_is_bound_to_the_raft_directory(tmp_path):
    raft = tmp_path / "raft"
    storage = FileStorage(raft)
    first = raft_identity(raft, "n3", storage.member_id, has_state=False)
    assert first == raft_id_for("n3", storage.member_id) and node_of(first) == "n3"
    storage.close()
    # The same directory: the same id, whatever the name now is.
    assert raft_identity(raft, "renamed", FileStorage(raft).member_id, has_state=True) == first
    # A wiped directory: a new member id, hence a new Raft id.
    for f in raft.iterdir():
        f.unlink()
    again = raft_identity(raft, "n3", FileStorage(raft).member_id, has_state=False)
    assert again != first and node_of(again) == "n3"


def test_a_directory_from_before_member_ids_keeps_voting_under_the_node_name(tmp_path):
    raft = tmp_path / "raft"
    storage = FileStorage(raft)  # Raft state written by an older version: no raft_id file
    assert not (raft / RAFT_ID_FILE).exists()
    assert raft_identity(raft, "n3", storage.member_id, has_state=True) == "n3"
    # ... and on every later start, although the member file now exists.
    assert raft_identity(raft, "n3", storage.member_id, has_state=True) == "n3"
    assert (raft / RAFT_ID_FILE).read_text().strip() == "n3"


def test_a_damaged_raft_id_file_is_refused_with_what_to_do(tmp_path):
    raft = tmp_path / "raft"
    raft.mkdir()
    (raft / RAFT_ID_FILE).write_text("\n")
    with pytest.raises(RaftIdError, match="delete the whole directory") as refused:
        raft_identity(raft, "n3", OLD, has_state=True)
    assert isinstance(refused.value, StorageError)  # `aivailable up` prints it as such
