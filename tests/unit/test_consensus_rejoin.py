"""A wiped member rejoins as a new member (issue 10).

A voter that loses its disk forgets its votes; coming back under the same Raft id it can
vote twice in one term and elect two leaders. FileStorage therefore creates a member id
with its directory: a wiped or replaced directory is a new member, which the leader adds
as a learner and promotes once caught up, after retiring the old identity.
"""

from __future__ import annotations

from random import Random

import pytest

from consensus import LEADER, FileStorage, MemoryStorage, RaftNode, StorageCorrupt
from consensus.types import VOTE, VOTE_RESP
from tests.sim.raft_net import SyncNetwork

VOTERS = ("n1", "n2", "n3")


def test_the_member_id_lives_and_dies_with_the_data_dir(tmp_path):
    first = FileStorage(tmp_path / "raft")
    member = first.member_id
    first.close()
    again = FileStorage(tmp_path / "raft")
    assert again.member_id == member
    again.close()
    (tmp_path / "raft" / "member").unlink()  # as good as a wiped directory
    for f in (tmp_path / "raft").iterdir():
        f.unlink()
    wiped = FileStorage(tmp_path / "raft")
    assert wiped.member_id != member and len(wiped.member_id) == 16
    wiped.close()
    (tmp_path / "raft" / "member").write_text("not-an-id\n")
    with pytest.raises(StorageCorrupt, match="member"):
        FileStorage(tmp_path / "raft")


def node(nid: str, storage) -> RaftNode:
    return RaftNode(
        nid, storage, voters=VOTERS, rng=Random(nid), pre_vote=False, check_quorum=False
    )


def run_ready(n: RaftNode, storage) -> list:
    out = []
    while n.has_ready():
        rd = n.ready()
        storage.save(rd)
        out.extend(rd.messages)
        n.advance(rd)
    return out


def test_a_wiped_voter_under_its_old_id_can_elect_two_leaders_in_one_term():
    # Why the member id exists: this is what it prevents.
    disks = {i: MemoryStorage() for i in VOTERS}
    n1, n2, n3 = (node(i, disks[i]) for i in VOTERS)
    n1.campaign()
    asks = [m for m in run_ready(n1, disks["n1"]) if m.type == VOTE and m.dst == "n3"]
    n3.step(asks[0])  # n1's request to n2 is lost
    for m in run_ready(n3, disks["n3"]):
        n1.step(m)
    assert n1.role == LEADER and n1.term == 1 and disks["n3"].hard_state.vote == "n1"
    # n3's disk is wiped; it comes back empty under the same id.
    disks["n3"] = MemoryStorage()
    n3 = node("n3", disks["n3"])
    n2.campaign()
    for m in run_ready(n2, disks["n2"]):
        if m.dst == "n3":
            n3.step(m)
    for m in run_ready(n3, disks["n3"]):
        assert m.type == VOTE_RESP and not m.reject  # it votes again in term 1
        n2.step(m)
    assert n2.role == LEADER and n2.term == n1.term == 1  # two leaders in term 1


def test_a_wiped_voter_rejoins_as_a_new_learner_then_voter_and_the_old_id_is_retired():
    net = SyncNetwork(ids=VOTERS, check_quorum=True)
    leader = net.elect("n1")
    for i in range(5):
        net.propose("n1", b"before %d" % i)
    net.crash("n3")  # its disk is lost; the peer starts again with a new directory
    fresh = net.add_node("n3-b")  # the new member id that directory got
    net.deliver()
    leader.propose_conf_change("remove", "n3")
    net.deliver()
    assert leader.voters == ("n1", "n2")
    leader.propose_conf_change("add", "n3-b", voter=False)
    net.deliver()
    assert fresh.learners == ("n3-b",) and "n3-b" not in leader.voters  # no vote yet
    assert fresh.last_index == leader.last_index  # caught up as a learner
    leader.propose_conf_change("promote", "n3-b")
    net.deliver()
    assert set(leader.voters) == {"n1", "n2", "n3-b"} and fresh.voters == leader.voters
    # The cluster survives losing another member: n3-b now counts for the quorum.
    net.crash("n2")
    net.propose("n1", b"after")
    assert leader.commit_index == leader.last_index
    assert [e.data for e in net.applied["n3-b"] if e.kind == "cmd"][-1] == b"after"
