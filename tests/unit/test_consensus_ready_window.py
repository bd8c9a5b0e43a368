"""What arrives between ready() and advance() waits for the next Ready.

RaftDriver awaits save() in a thread; meanwhile it steps peers' messages, ticks and takes
proposals. advance(rd) must acknowledge exactly what rd held, so anything that happened in
between is saved (and its messages sent) in a later Ready, never skipped and never early.
"""

from __future__ import annotations

from random import Random

from consensus import MemoryStorage, RaftNode
from consensus.types import APP, VOTE, VOTE_RESP, Message
from tests.sim.raft_net import SyncNetwork


def cmds(rd) -> list[bytes]:
    return [e.data for e in rd.entries if e.kind == "cmd"]


def test_a_proposal_inside_the_window_is_saved_by_the_next_ready():
    net = SyncNetwork()
    leader = net.elect("n1")
    leader.propose(b"a")
    rd = leader.ready()
    leader.propose(b"b")  # a client's request while save(rd) is under way
    net.storages["n1"].save(rd)
    leader.advance(rd)
    assert cmds(rd) == [b"a"]
    later = leader.ready()
    assert cmds(later) == [b"b"]
    assert all(m.type != APP or b"b" not in [e.data for e in m.entries] for m in rd.messages)


def test_a_vote_granted_inside_the_window_leaves_only_with_its_hard_state():
    node = RaftNode("n2", MemoryStorage(), voters=("n1", "n2", "n3"), rng=Random(0))
    node.tick()
    rd = node.ready()
    node.step(Message(VOTE, "n3", "n2", term=5, index=0, log_term=0))  # while saving rd
    node.advance(rd)
    assert all(m.type != VOTE_RESP for m in rd.messages)
    later = node.ready()
    assert later.hard_state is not None and (later.hard_state.term, later.hard_state.vote) == (
        5,
        "n3",
    )
    assert [(m.type, m.dst, m.reject) for m in later.messages] == [(VOTE_RESP, "n3", False)]


def test_entries_appended_inside_the_window_are_saved_and_acknowledged_later():
    net = SyncNetwork()
    leader = net.elect("n1")
    follower = net["n2"]
    appends = []
    for data in (b"x", b"y"):
        leader.propose(data)
        appends += [m for m in net.collect("n1") if m.type == APP and m.dst == "n2"]
    follower.step(appends[0])
    rd = follower.ready()
    follower.step(appends[1])  # arrives while rd is being saved
    net.storages["n2"].save(rd)
    follower.advance(rd)
    later = follower.ready()
    assert cmds(rd) == [b"x"] and cmds(later) == [b"y"]
    assert max(m.index for m in rd.messages) == follower.last_index - 1
    # y is acknowledged only by the Ready that saves it.
    assert max(m.index for m in later.messages) == follower.last_index
