"""The cluster floor's errors: a `peer.errors.ServiceError` of its own, so cluster/ knows
nothing of the HTTP API above it; api/app.py's error middleware sends it as HTTP."""

from __future__ import annotations

from peer.errors import ServiceError


class ClusterError(ServiceError):
    """A cluster operation that cannot be done now (no leader, not joined) or as asked."""


def no_leader(detail: str) -> ClusterError:
    return ClusterError(
        503,
        f"the cluster has no reachable leader right now ({detail}); try again shortly",
        type="server_error",
        code="no_leader",
        retry_after=2.0,
    )


def not_joined() -> ClusterError:
    return ClusterError(
        503,
        "this peer has not joined Raft yet",
        type="service_unavailable",
        code="not_joined",
        retry_after=1,
    )
