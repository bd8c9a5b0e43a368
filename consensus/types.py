"""The values the Raft core takes in and hands out: entries, messages, hard state, snapshots, Ready.

Pure data, no I/O. Shapes follow etcd-io/raft's raftpb, trimmed to what this core uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# A node's role. Exported from consensus.core (and the package); they live here so that the
# core and its leader-side helper (replication.py) can both name them without a cycle.
FOLLOWER = "follower"
PRE_CANDIDATE = "pre-candidate"
CANDIDATE = "candidate"
LEADER = "leader"

# Entry kinds. "cmd" carries the application's proposed bytes back unchanged; "noop" is the
# entry a new leader appends to commit the entries of earlier terms (paper 5.4.2); "conf"
# carries a membership change (its data is a ConfState encoded by encode_conf).
CMD = "cmd"
NOOP = "noop"
CONF = "conf"


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    kind: str = CMD
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before a message that depends on it leaves (paper Fig. 2)."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """A full cluster configuration: voters count for elections and commits, learners only follow."""

    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()

    def members(self) -> tuple[str, ...]:
        return self.voters + self.learners


def encode_conf(conf: ConfState, op: str, node: str) -> bytes:
    # A conf entry carries the whole resulting configuration, not a delta, so a node that
    # joins later learns the configuration from the latest conf entry or snapshot alone.
    return json.dumps(
        {"op": op, "node": node, "voters": list(conf.voters), "learners": list(conf.learners)},
        sort_keys=True,
    ).encode()


def decode_conf(data: bytes) -> ConfState:
    obj = json.loads(data)
    return ConfState(tuple(obj["voters"]), tuple(obj["learners"]))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State-machine bytes as of `index` (whose entry had `term`) and the configuration then."""

    index: int
    term: int
    conf: ConfState
    data: bytes = b""


# Message types. Wire numbers live in consensus/wire.py (append-only there).
VOTE = "vote"
VOTE_RESP = "vote_resp"
PRE_VOTE = "pre_vote"
PRE_VOTE_RESP = "pre_vote_resp"
APP = "app"
APP_RESP = "app_resp"
HEARTBEAT = "heartbeat"
HEARTBEAT_RESP = "heartbeat_resp"
SNAP = "snap"
TIMEOUT_NOW = "timeout_now"
READ_INDEX = "read_index"  # a follower asks the leader for a read index (dissertation 6.4)
READ_INDEX_RESP = "read_index_resp"
MESSAGE_TYPES = (
    VOTE,
    VOTE_RESP,
    PRE_VOTE,
    PRE_VOTE_RESP,
    APP,
    APP_RESP,
    HEARTBEAT,
    HEARTBEAT_RESP,
    SNAP,
    TIMEOUT_NOW,
    READ_INDEX,
    READ_INDEX_RESP,
)


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft RPC. Field meanings per type follow etcd-raft's raftpb.Message:

    vote/pre_vote: index, log_term = candidate's last log index and term; force = leadership
    transfer (skips the leader lease). app: index, log_term = the entry preceding `entries`;
    commit = leader's commit. app_resp: index = highest index known to match, or the rejected
    index with reject_hint/log_term pointing at where to probe next (fast backtracking).
    heartbeat: commit. snap: snapshot. context: a read request's id, carried by read_index,
    read_index_resp (index = the read index), heartbeat and heartbeat_resp.
    """

    type: str
    src: str
    dst: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    force: bool = False
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the state machine has applied `index`: every
    write committed before read_index(context) was called is at or below it (ReadOnlySafe)."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """What the node needs done, in this order: save, send, apply; then node.advance(rd).

    `storage.save(rd)` persists `snapshot` (if any), then `entries` (an entry at an index
    already stored replaces it and everything after), then `hard_state` (if changed).
    Send `messages` only after save returns. If `restore` is set, load the state machine
    from it first, then apply `committed` in order.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()
    restore: Snapshot | None = None
    read_states: tuple[ReadState, ...] = ()
    # Soft state for observers; not persisted.
    role: str = "follower"
    leader_id: str | None = None
    term: int = 0

    def is_empty(self) -> bool:
        return not (
            self.hard_state
            or self.entries
            or self.snapshot
            or self.messages
            or self.committed
            or self.restore
            or self.read_states
        )


class NotLeader(Exception):
    """Raised by propose on a node that is not the leader; names the leader it knows, if any."""

    def __init__(self, leader_id: str | None):
        super().__init__(f"not the leader; leader is {leader_id!r}")
        self.leader_id = leader_id


class ProposalRejected(Exception):
    """The leader refused a proposal. `retryable` is True for passing conditions (a conf change
    still pending, a brand-new leader, a transfer under way) and False for an invalid change."""

    def __init__(self, reason: str, retryable: bool = False):
        super().__init__(reason)
        self.retryable = retryable
