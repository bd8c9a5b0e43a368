"""Pure: the records of the SWIM core (peer/membership.py): a member as this node knows it, a
probe in flight, an indirect probe run for another member, and the counters exported as
metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peer.messages import MemberView


@dataclass(slots=True)
class Member:
    id: str
    addr: str
    port: int
    incarnation: int
    state: str
    since: float  # when the state last changed
    payload: dict[str, Any] = field(default_factory=dict)
    payload_stale: bool = False  # incarnation known from a payload-less alive; fetch pending

    def view(self) -> MemberView:
        return MemberView(
            self.id, self.addr, self.port, self.state, self.incarnation, self.payload, self.since
        )


@dataclass(slots=True)
class Probe:
    seq: int
    target: str
    ack_deadline: float
    end: float
    indirect_sent: bool = False
    acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class Relay:
    """An indirect probe we run on behalf of another member."""

    addr: str
    port: int
    seq: int
    deadline: float
    nack: bool


@dataclass(slots=True)
class Counters:
    """Plain counters the peer exports as metrics."""

    probes: int = 0
    probes_failed: int = 0
    indirect_probes: int = 0
    suspicions: int = 0
    refutations: int = 0
    declared_dead: int = 0
    packets_out: int = 0
    messages_in: int = 0
