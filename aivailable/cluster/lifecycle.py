"""An instance's lifecycle: one set of states and the transitions between them (h11-style).

The states are DESIGN.md's (`pending`, `loading`, `ready`, `failed`, `stopping`; only
`ready` takes requests). An engine moves from one to the next only along `TRANSITIONS`;
`advance(old, new)` checks a move and raises `IllegalTransition` for any other, so a bug that
skips a state (ready while never loaded, pending straight to ready) shows where it happens.
"""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    PENDING = "pending"  # planned here; the model file is being fetched, or stopped
    LOADING = "loading"  # the worker is loading the model
    READY = "ready"  # takes requests
    FAILED = "failed"  # the load or the worker failed; retried with backoff
    STOPPING = "stopping"  # being stopped; takes no new requests


S = InstanceState
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.PENDING: frozenset({S.LOADING, S.FAILED, S.STOPPING}),
    S.LOADING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    # A worker that crashes is restarted by the engine's supervisor: ready -> loading.
    S.READY: frozenset({S.LOADING, S.FAILED, S.STOPPING}),
    S.FAILED: frozenset({S.LOADING, S.STOPPING}),
    S.STOPPING: frozenset({S.PENDING}),
}
SERVING = frozenset({S.READY})


class IllegalTransition(ValueError):
    pass


def advance(old: str, new: str) -> InstanceState:
    """The new state, if `old -> new` is allowed (staying put always is)."""
    try:
        before, after = InstanceState(old), InstanceState(new)
    except ValueError as exc:
        raise IllegalTransition(f"unknown instance state in {old!r} -> {new!r}") from exc
    if after != before and after not in TRANSITIONS[before]:
        raise IllegalTransition(f"an instance cannot go from {old} to {new}")
    return after
