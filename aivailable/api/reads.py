"""Local or linearizable reads of the cluster's state, and how a response says which.

A read with `?consistent=1` (or `true`) first runs the peer's read barrier (Raft ReadIndex,
`ClusterNode.read_barrier`): a follower asks the leader for its commit index, the leader
confirms it still leads with a heartbeat round, and the follower waits until it has applied
that index. What it then serves includes every write acknowledged before the read began. A
peer that cannot reach a leader answers 503 `no_leader` (with Retry-After), never stale data.
Without the parameter the peer answers from its local state at once, which may lag behind.

Every such response carries `X-Aivailable-Read: local | consistent`. The access guard runs
before the handler, so credentials are checked before any barrier is asked for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from aivailable.api.errors import bad_request

READ_HEADER = "X-Aivailable-Read"
LOCAL, CONSISTENT = "local", "consistent"
Barrier = Callable[[], Awaitable[None]]


def wants_consistent(request: web.Request) -> bool:
    return request.query.get("consistent", "").lower() in ("1", "true")


async def read_mode(request: web.Request, barrier: Barrier | None) -> str:
    """LOCAL, or CONSISTENT once the barrier passed. Raises the barrier's 503 when no leader
    confirms the read, and 400 on a peer that has no barrier to offer."""
    if not wants_consistent(request):
        return LOCAL
    if barrier is None:
        raise bad_request("this peer cannot serve consistent reads", param="consistent")
    await barrier()  # the cluster's no_leader (a ServiceError) goes to the edge as it is
    return CONSISTENT


def marked(response: web.Response, mode: str) -> web.Response:
    response.headers[READ_HEADER] = mode
    return response
