"""An instance's lifecycle: the transitions between its states (h11-style). Pure.

The states (`backends.base.InstanceState`) are DESIGN.md's (`pending`, `loading`, `ready`,
`failed`, `stopping`; only `ready` takes requests). An engine moves from one to the next only along `TRANSITIONS`;
`advance(old, new)` checks a move and raises `IllegalTransition` for any other, so a bug that
skips a state (ready while never loaded, pending straight to ready) shows where it happens.
"""

from __future__ import annotations

from aivailable.backends.base import InstanceState

S = InstanceState
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.PENDING: frozenset({S.LOADING, S.FAILED, S.STOPPING}),
    S.LOADING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    # A worker that crashes is restarted by the engine's supervisor: ready -> loading.
    S.READY: frozenset({S.LOADING, S.FAILED, S.STOPPING}),
    S.FAILED: frozenset({S.LOADING, S.STOPPING}),
    S.STOPPING: frozenset({S.PENDING}),
}


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
