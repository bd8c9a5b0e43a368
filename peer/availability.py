"""Which replica serves a forwarded request, and what a client hears when none can. Pure.

- `order_replicas`: the ready replicas, best first (by prefix affinity, free slots, load);
- `summarize_availability` / `ModelAvailability`: why a model has no ready replica, as the
  error a client gets (`NoReadyReplica`, a 503 naming the model's state, or a 404);
- `ForwardError`: forwarding's own error, a `peer.errors.ServiceError` (status and
  OpenAI-style body), so peer/ needs nothing of the API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from peer.affinity import affinity_order
from peer.errors import ServiceError


@dataclass(frozen=True)
class Replica:
    """One instance of a model somewhere in the cluster, as the gossip view shows it."""

    node_id: str
    addr: str  # "host:port" of that peer's HTTP API
    local: bool  # hosted by this very peer
    state: str  # instance state: pending, loading, ready, failed, stopping
    queue_depth: int = 0  # requests waiting or running there, as last gossiped
    member_state: str = "alive"  # the host as gossip sees it: alive or suspect
    free_slots: int = 0  # requests it would start at once, as last gossiped
    # It would queue a request rather than refuse it (429). Known live only for this
    # peer's own instance; a remote one's refusal is learnt by trying it.
    admits: bool = True


# How a peer picks among the ready replicas (ForwardConfig.routing):
# "affinity": by the conversation's prefix, under a load bound (peer/affinity.py);
# "least_loaded": the most free slots, this peer's own first among equals;
# "local_first": this peer's own whatever its load (before issue 22; kept to compare);
# "affinity_bounded": affinity where the load bound alone moves a conversation: its home
# under the bound queues the turn rather than give it to another replica's free slot.
ROUTINGS = ("affinity", "least_loaded", "local_first", "affinity_bounded")
AFFINITY_ROUTINGS = ("affinity", "affinity_bounded")


def order_replicas(
    replicas: Iterable[Replica],
    inflight: Mapping[str, int] | None = None,
    key: str | None = None,
    routing: str = "least_loaded",
) -> list[Replica]:
    """The ready replicas, best first. Hosts gossip calls alive come before suspect ones
    (a host under suspicion only when nothing else is); among them:

    - with a `key` and "affinity" routing, the key's ranking under the load bound
      (peer/affinity.py), those with a free slot first;
    - else those with a free slot (free slots less what this peer has sent there since)
      before those that would queue the request, before this peer's own when it would
      refuse it; then this node's own, the most free capacity, the least loaded, node id.
      "local_first" puts this node's own first whatever its load.

    `inflight` adds the requests this peer has sent to each node since gossip last
    reported its queue depth, so a burst between two gossip rounds still spreads out
    instead of piling on the replica that happened to look idle.
    """
    inflight = inflight or {}
    ready = [r for r in replicas if r.state == "ready"]

    def free(r: Replica) -> int:
        return r.free_slots - inflight.get(r.node_id, 0)

    def load(r: Replica) -> int:
        return r.queue_depth + inflight.get(r.node_id, 0)

    def tier(r: Replica) -> int:
        if routing == "local_first":
            return 0
        return 0 if free(r) > 0 else 1 if r.admits else 2

    if key is not None and routing in AFFINITY_ROUTINGS:
        alive = [r for r in ready if r.member_state == "alive" and r.admits]
        head = affinity_order(
            key,
            alive,
            lambda r: r.node_id,
            load,
            lambda r: free(r) > 0,
            room_first=routing == "affinity",
        )
        rest = [r for r in ready if r not in head]
    else:
        head, rest = [], ready
    return head + sorted(
        rest,
        key=lambda r: (
            r.member_state != "alive",
            tier(r),
            not r.local,
            -free(r),
            load(r),
            r.node_id,
        ),
    )


class ForwardError(ServiceError):
    """A request that cannot be forwarded (peer/errors.py's status and OpenAI-style body)."""

    TYPE = "server_error"


# What the client should wait before asking again, by model state, in seconds: a model
# loads in seconds; a pending one first has to fetch its file; an unplaced one waits for
# the controller to find room (a node joining, another model removed).
_RETRY_AFTER_S = {
    "loading": 2.0,
    "pending": 5.0,
    "stopping": 2.0,
    "failed": 10.0,
    "unplaced": 30.0,
    "unreachable": 2.0,
    "unknown": 2.0,
}
# When replicas are in different states, the most hopeful one names the model's state.
_HOPE = ("ready", "loading", "pending", "stopping", "failed")


@dataclass(frozen=True)
class ModelAvailability:
    """Why a model has no ready replica, for the 503 the client gets.

    state: "loading" | "pending" | "stopping" | "failed" (its replicas' best state),
    "unplaced" (the controller found no room; `reason` says why), "unreachable" (ready
    replicas exist but none answered), "unknown" (this peer has no cluster view yet),
    or "absent" (no such model is deployed: 404, not 503).
    """

    state: str
    reason: str = ""
    retry_after: float | None = None  # seconds; None: the state's default above

    def error(self, model: str) -> ForwardError:
        if self.state == "absent":
            return ForwardError(
                404,
                f"the model '{model}' does not exist"
                + (f" (deployed: {self.reason})" if self.reason else ""),
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        if self.state == "unplaced":
            message = f"the model '{model}' is not placed on any node"
        elif self.state == "unreachable":
            message = f"no replica of the model '{model}' answered"
        else:
            message = f"no ready replica of the model '{model}': it is {self.state}"
        if self.reason:
            message += f": {self.reason}"
        retry = self.retry_after if self.retry_after is not None else _RETRY_AFTER_S.get(self.state)
        return NoReadyReplica(model, self.state, self.reason, message, retry or 2.0)


class NoReadyReplica(ForwardError):
    """503 whose error body also names the model's state and the reason, as data."""

    def __init__(self, model: str, state: str, reason: str, message: str, retry_after: float):
        super().__init__(
            503,
            message,
            type="service_unavailable",
            param="model",
            code=f"model_{state}",
            retry_after=retry_after,
        )
        self.model = model
        self.state = state
        self.reason = reason

    def body(self) -> dict:
        body = super().body()
        body["error"].update(model=self.model, state=self.state, reason=self.reason or None)
        return body


def summarize_availability(
    deployed: bool, placement_states: Iterable[str], unplaced_reason: str = ""
) -> ModelAvailability:
    """The model's availability from the committed plan and the instance states in gossip.

    For the peer process to build `availability_of` from its cluster view.
    """
    if not deployed:
        return ModelAvailability("absent")
    states = set(placement_states)
    if not states:
        if unplaced_reason:
            return ModelAvailability("unplaced", unplaced_reason)
        return ModelAvailability("pending", "waiting for the controller to place it")
    best = min(states, key=lambda s: _HOPE.index(s) if s in _HOPE else len(_HOPE))
    if best == "ready":  # ready somewhere, yet not in replicas_of: gossip is behind
        return ModelAvailability("unreachable", "its ready replicas did not answer")
    return ModelAvailability(best, unplaced_reason)
