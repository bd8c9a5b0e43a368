"""Who votes in Raft, who only follows, and who founds a brand-new cluster. Pure functions.

Voters: the first peers become voters, 3 of them, or 5 once at least 5 peers are alive;
everyone else joins as a learner (it gets the log, serves, but does not count for a
quorum). A voter gossip calls dead is replaced by promoting a caught-up learner, and
removed once it has been dead past a timeout so the quorum stays reachable. One change
at a time: the leader's Raft core refuses a second while the first is uncommitted, and
this policy proposes one per call.

Raft ids are not node names (aivailable/cluster/identity.py): each gossip member advertises
its Raft id, `NAME@MEMBER`, bound to its raft directory. A node that advertises a new id
while an old id of its name is still in the configuration lost its Raft state (wiped,
replaced): the old id is retired first (removed: no process answers for it any more, and
none ever will, so it cannot vote twice), then the new id is added as a learner and
promoted once caught up, like any new member.

Bootstrap: a peer with persisted Raft state resumes from it. A brand-new peer joins a
cluster it can see in gossip; if it sees none, after a discovery window the lowest node
id among the alive peers without a cluster founds one and the others join it. See
docs/cluster.md for the limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aivailable.cluster.identity import node_of

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"


@dataclass(frozen=True)
class MembershipConfig:
    # Voters while fewer than `large_voters` peers are alive. 3 survives one failure; more
    # voters would only slow every commit on a small LAN cluster.
    small_voters: int = 3
    # Voters once at least this many peers are alive: 5 survives two failures at once,
    # which matters once a lab has enough old machines that two can die together.
    large_voters: int = 5
    # Seconds a voter must have been dead (or gone from gossip) before it is removed from
    # the configuration. Long enough that a reboot (1-2 min) or a short partition does not
    # churn the voter set; short enough that a dead machine stops counting for quorum
    # before a second one fails. Learners are removed after the same time.
    dead_member_timeout_s: float = 300.0
    # Seconds a brand-new peer listens for an existing cluster before one is founded.
    # SWIM needs a few gossip rounds (about 1 s on a LAN) to hear everyone mDNS found.
    discovery_window_s: float = 3.0


@dataclass(frozen=True)
class MemberInfo:
    """One gossip member as the policy needs it."""

    state: str  # alive | suspect | dead | left
    since: float  # seconds (the caller's clock) when it entered this state
    cluster_id: str | None = None  # the cluster it belongs to or is joining, from its payload
    member: str | None = None  # the Raft id it advertises (None: its node name, an older peer)


@dataclass(frozen=True)
class ConfChange:
    """Arguments for RaftNode.propose_conf_change(op, node, voter)."""

    op: str  # "add" | "promote" | "remove"
    node: str
    voter: bool = True  # for "add": False adds a learner
    reason: str = ""


def quorum(n_voters: int) -> int:
    return n_voters // 2 + 1


def voter_goal(alive_members: int, config: MembershipConfig = MembershipConfig()) -> int:
    """How many voters to aim for with this many alive members: 3 or 5, never more than
    there are members, and odd (an even count tolerates no more failures than one less)."""
    target = config.large_voters if alive_members >= config.large_voters else config.small_voters
    goal = max(1, min(target, alive_members))
    return goal if goal % 2 == 1 else goal - 1


def by_raft_id(
    members: Mapping[str, MemberInfo], configured: Iterable[str]
) -> dict[str, MemberInfo]:
    """Gossip members (by node name) keyed by the Raft id each advertises. A member that
    advertises none (an older peer, or a payload not read yet) stands for the configured id
    of its name, if there is one (a voter whose payload is late must not look absent), else
    for its name."""
    out: dict[str, MemberInfo] = {}
    for info in members.values():
        if info.member:
            out[info.member] = info
    claimed = set()
    for raft_id in configured:
        node = node_of(raft_id)
        info = members.get(node)
        if raft_id not in out and info is not None and info.member is None:
            out[raft_id] = info
            claimed.add(node)
    for name, info in members.items():
        if info.member is None and name not in claimed:
            out.setdefault(name, info)
    return out


def next_conf_change(
    leader: str,
    voters: Iterable[str],
    learners: Iterable[str],
    members: Mapping[str, MemberInfo],
    now: float,
    cluster_id: str | None = None,
    caught_up: Iterable[str] | None = None,
    config: MembershipConfig = MembershipConfig(),
) -> ConfChange | None:
    """The one configuration change the leader should propose now, or None.

    voters/learners: the Raft configuration (Raft ids); members: gossip's view by node name,
    each with the Raft id it advertises (`member`; none: the name is the id). A Raft id no
    member advertises counts as dead since forever, and one whose node now advertises
    another id as replaced; caught_up: learners whose log is close enough to the
    leader's to be promoted without stalling commits (None: all); cluster_id: only gossip
    members advertising it are added (a peer of another cluster is never pulled in).
    In order: retire a replaced id; remove a member dead past the timeout; promote a
    learner while alive voters are below the goal; add alive members not yet in the
    configuration as learners; turn a surplus voter into a learner once every voter is
    alive.
    """
    voters = sorted(set(voters))
    learners = sorted(set(learners) - set(voters))
    caught = set(learners) if caught_up is None else set(caught_up)
    advertised = {name: info.member for name, info in members.items()}
    members = by_raft_id(members, (*voters, *learners))

    def replaced(node: str) -> bool:
        """Its node now advertises another Raft id: its Raft state is gone for good."""
        now_id = advertised.get(node_of(node))
        return node != leader and node not in members and now_id not in (None, node)

    def alive(node: str) -> bool:
        if node == leader:
            return True  # the leader runs this; it is alive whatever gossip last said
        info = members.get(node)
        return info is not None and info.state in (ALIVE, SUSPECT)

    def dead_past_timeout(node: str) -> bool:
        if node == leader:
            return False
        info = members.get(node)
        if info is None:
            return True
        if info.state == LEFT:
            return True  # it said goodbye: no reason to wait
        return info.state == DEAD and now - info.since >= config.dead_member_timeout_s

    alive_voters = [v for v in voters if alive(v)]
    # 0. Retire a replaced id. It is dead already (no process answers for it), so removing it
    # never lowers the number of alive voters: with 3 voters, 2 alive remain, a quorum of 2.
    # Retiring before adding the new id keeps "one change at a time" and the new id out of
    # the quorum until it has caught up as a learner.
    for node in voters:
        if replaced(node) and len(voters) > 1 and len(alive_voters) >= quorum(len(voters) - 1):
            return ConfChange("remove", node, reason=f"{node_of(node)} rejoined as a new member")
    for node in learners:
        if replaced(node):
            return ConfChange("remove", node, reason=f"{node_of(node)} rejoined as a new member")
    # 1. Remove the dead. Removing a dead voter never lowers the number of alive voters, so
    # the new quorum is reachable whenever the old one was; the check keeps that explicit.
    for node in voters:
        if dead_past_timeout(node) and len(voters) > 1:
            remaining = len(voters) - 1
            if len(alive_voters) >= quorum(remaining):
                return ConfChange("remove", node, reason="voter dead past the timeout")
    for node in learners:
        if dead_past_timeout(node):
            return ConfChange("remove", node, reason="learner dead past the timeout")

    in_config = set(voters) | set(learners)
    joining = sorted(
        n
        for n, info in members.items()
        if n not in in_config
        and info.state == ALIVE
        and (cluster_id is None or info.cluster_id == cluster_id)
    )
    alive_members = len([n for n in in_config if alive(n)]) + len(joining)
    goal = voter_goal(alive_members, config)
    # 2. Promote: restore fault tolerance first. Prefer learners gossip calls alive (not
    # merely suspect), then the lowest id, so every leader picks the same one.
    if len(alive_voters) < goal:
        candidates = [n for n in learners if n in caught and alive(n)]
        candidates.sort(key=lambda n: (n in members and members[n].state != ALIVE, n))
        if candidates:
            return ConfChange("promote", candidates[0], reason="fewer alive voters than the goal")
    # 3. Let joiners in, as learners; promotion follows on a later call.
    if joining:
        return ConfChange("add", joining[0], voter=False, reason="new member")
    # 4. Shrink a surplus (after a dead voter came back, or members left) once all voters are
    # alive, so one more failure cannot leave too few: the highest id that is not the leader
    # goes; the caller adds it back as a learner on the next call.
    healthy = [
        v for v in voters if v == leader or members.get(v, MemberInfo(DEAD, 0)).state == ALIVE
    ]
    if len(healthy) == len(voters) and len(voters) > goal:
        surplus = [v for v in voters if v != leader]
        if surplus:
            return ConfChange("remove", surplus[-1], reason="more voters than the goal")
    return None


# ---- bootstrap of a brand-new cluster ------------------------------------------------------


@dataclass(frozen=True)
class Bootstrap:
    action: str  # "resume" | "join" | "found" | "wait"
    cluster_id: str | None = None  # for "join": the cluster to join
    reason: str = ""


RESUME, JOIN, FOUND, WAIT = "resume", "join", "found", "wait"


def bootstrap_action(
    me: str,
    has_raft_state: bool,
    peers: Mapping[str, str | None],
    waited_s: float,
    config: MembershipConfig = MembershipConfig(),
) -> Bootstrap:
    """What a starting peer does. peers: the alive gossip members other than me, each with
    the cluster id it advertises (None: it has none yet); waited_s: seconds since this peer
    began listening.

    resume: Raft state on disk: rebuild RaftNode from storage alone (its configuration is
      there); never bootstrap again, or a restarted peer would found a second cluster.
    join: advertise the cluster id in gossip and start RaftNode with no voters; the
      leader adds it as a learner (`next_conf_change`). With several clusters in view, the
      one most peers belong to, ties to the smallest id, so every joiner picks the same.
    found: start RaftNode with voters=(me,) and commit state.encode_init(new id).
    wait: ask again later.
    """
    if has_raft_state:
        return Bootstrap(RESUME, reason="persisted Raft state")
    counts: dict[str, int] = {}
    for cid in peers.values():
        if cid is not None:
            counts[cid] = counts.get(cid, 0) + 1
    if counts:
        best = min(counts, key=lambda c: (-counts[c], c))
        return Bootstrap(JOIN, best, reason="a cluster is in view")
    if waited_s < config.discovery_window_s:
        return Bootstrap(WAIT, reason="listening for an existing cluster")
    if me <= min(peers, default=me):
        return Bootstrap(FOUND, reason="lowest id among peers without a cluster")
    return Bootstrap(WAIT, reason=f"{min(peers)} founds the cluster")
