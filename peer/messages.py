"""The SWIM messages the membership core takes in and puts out (no I/O, no encoding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Member states, as /cluster/status shows them.
ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str  # node id the sender means to reach; another node at that address ignores it
    source: str


@dataclass(frozen=True, slots=True)
class IndirectPing:
    seq: int
    target: str
    target_addr: str
    target_port: int
    source: str
    nack: bool  # Lifeguard: answer with a Nack if the target does not ack in time


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    node: str
    incarnation: int
    addr: str
    port: int
    payload: dict[str, Any] | None  # None: too big for a datagram, fetch it by push-pull


@dataclass(frozen=True, slots=True)
class Suspect:
    node: str
    incarnation: int
    sender: str


@dataclass(frozen=True, slots=True)
class Dead:
    node: str
    incarnation: int
    sender: str  # sender == node means the node left gracefully


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead

# AppData channels (append-only).
RAFT_CHANNEL = 1


@dataclass(frozen=True, slots=True)
class AppData:
    """Another part of the peer's datagram riding the sealed transport (Raft's heartbeats):
    the adapter hands it to that part; the membership core never sees one."""

    channel: int
    body: bytes


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member as exchanged by push-pull."""

    node: str
    addr: str
    port: int
    incarnation: int
    state: str
    payload: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class MemberView:
    """What the rest of the peer sees of a member (the payload must be treated read-only)."""

    id: str
    addr: str
    port: int
    state: str
    incarnation: int
    payload: dict[str, Any]
    since: float = 0.0  # when it entered this state, on the core's clock


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """kind: joined | alive | suspect | dead | left | payload."""

    kind: str
    member: MemberView


@dataclass(frozen=True, slots=True)
class Packet:
    """Core output: send these messages as one compound datagram."""

    addr: str
    port: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class PushPullRequest:
    """Core output: exchange full state with this member over HTTP."""

    addr: str
    port: int


Output = Packet | PushPullRequest
