"""A linearizability checker for recorded histories: Wing & Gong's search with Lowe's memoization
(as in Knossos and porcupine).

A history is a list of Operations, each with the time the client invoked it and the time it
returned, or no return time when its outcome is unknown (a timeout, a crash: it may have taken
effect at any point after its invocation, or never). The history is linearizable when every
completed operation can be placed at one instant between its invocation and its return, and
some of the unknown ones anywhere after theirs, so that the placed sequence is a legal run of
the sequential model with the results the clients saw.

A model is `init` (a hashable state), `step(state, op) -> (legal, new_state)` and `pure(op)`:
whether op never changes the state (a read). A pure op that is legal where the search stands is
placed there for good, without trying it later too: moving a read earlier to where it is legal
keeps any valid order valid, and it saves the search from trying every subset of concurrent
writes before it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Operation:
    call: float
    ret: float | None  # None: the outcome is unknown
    kind: str
    arg: Any = None
    result: Any = None


@dataclass(frozen=True)
class Model:
    init: Hashable
    step: Callable[[Hashable, Operation], tuple[bool, Hashable]]
    pure: Callable[[Operation], bool] = lambda op: False


class _Event:
    __slots__ = ("op_id", "is_call", "match", "prev", "next")

    def __init__(self, op_id: int, is_call: bool):
        self.op_id, self.is_call = op_id, is_call
        self.match: _Event | None = None  # a call's return event, if the op completed
        self.prev: _Event | None = None
        self.next: _Event | None = None


def _event_list(history: list[Operation]) -> _Event:
    """A doubly linked list of call and return events in time order, behind a head sentinel.
    At equal times returns come first: an operation that returned at t precedes one called at t."""
    keyed = []
    for i, op in enumerate(history):
        keyed.append((op.call, 1, i, True))
        if op.ret is not None:
            if op.ret < op.call:
                raise ValueError(f"operation {i} returns before it is called")
            keyed.append((op.ret, 0, i, False))
    keyed.sort()
    head = _Event(-1, False)
    calls: dict[int, _Event] = {}
    last = head
    for _, _, i, is_call in keyed:
        e = _Event(i, is_call)
        if is_call:
            calls[i] = e
        else:
            calls[i].match = e
        e.prev, last.next, last = last, e, e
    return head


def _lift(call: _Event) -> None:
    for e in (call, call.match):
        if e is not None:
            e.prev.next = e.next
            if e.next is not None:
                e.next.prev = e.prev


def _unlift(call: _Event) -> None:
    for e in (call.match, call):
        if e is not None:
            e.prev.next = e
            if e.next is not None:
                e.next.prev = e


def is_linearizable(history: list[Operation], model: Model) -> bool:
    head = _event_list(history)
    pending_completed = sum(1 for op in history if op.ret is not None)
    state = model.init
    linearized = 0  # a bit per operation placed so far
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Event, Hashable, bool]] = []  # (placed call, state before, for good)
    entry = head.next
    while pending_completed:
        if entry is head.next:
            pure = _legal_pure_call(head, history, model, state)
            if pure is not None:
                stack.append((pure, state, True))
                linearized |= 1 << pure.op_id
                pending_completed -= pure.match is not None
                _lift(pure)
                entry = head.next
                continue
        if entry is not None and entry.is_call:
            op = history[entry.op_id]
            legal, after = model.step(state, op)
            placed = linearized | (1 << entry.op_id)
            if legal and (placed, after) not in seen:
                seen.add((placed, after))
                stack.append((entry, state, False))
                state, linearized = after, placed
                pending_completed -= entry.match is not None
                _lift(entry)
                entry = head.next
                continue
            entry = entry.next
            continue
        # A return (or the end) reached with its operation not placed: undo the last choice
        # (and the reads placed for good after it).
        while True:
            if not stack:
                return False
            entry, state, for_good = stack.pop()
            linearized &= ~(1 << entry.op_id)
            pending_completed += entry.match is not None
            _unlift(entry)
            if not for_good:
                break
        entry = entry.next
    return True


def _legal_pure_call(head: _Event, history, model: Model, state) -> _Event | None:
    """The first pure operation that could be placed now and is legal in `state`."""
    e = head.next
    while e is not None and e.is_call:
        op = history[e.op_id]
        if model.pure(op) and model.step(state, op)[0]:
            return e
        e = e.next
    return None


def drop_unobserved(history: list[Operation]) -> list[Operation]:
    """For a register: drop what cannot matter, so unknown outcomes do not blow up the search
    (each one doubles it). An unknown read tells nothing; an unknown write whose value no read
    returned may as well never have happened, and leaving it out never hides a violation."""
    seen = {op.result for op in history if op.kind == "read" and op.ret is not None}
    return [op for op in history if op.ret is not None or (op.kind == "write" and op.arg in seen)]


# ---- models


def register_model(initial: Any = None) -> Model:
    """One value: write(v) sets it, read() returns it."""

    def step(state, op: Operation):
        if op.kind == "write":
            return True, op.arg
        if op.kind == "read":
            return op.ret is None or op.result == state, state  # an unknown read shows nothing
        raise ValueError(op.kind)

    return Model(initial, step, lambda op: op.kind == "read")


def deployment_model() -> Model:
    """The cluster's deployment map as a set of names: deploy(name) adds it; undeploy(name)
    returns whether it was there (a 404 is False) and removes it; read() returns the set."""

    def step(state: frozenset, op: Operation):
        if op.kind == "deploy":
            return True, state | {op.arg}
        if op.kind == "undeploy":
            existed = op.arg in state
            return (op.ret is None or op.result == existed), state - {op.arg}
        if op.kind == "read":
            return (op.ret is None or frozenset(op.result) == state), state
        raise ValueError(op.kind)

    return Model(frozenset(), step, lambda op: op.kind == "read")


def deployment_map_model() -> Model:
    """The deployment map with values: name -> the value a deploy set (an upsert).

    deploy((name, value)) sets it; undeploy(name) removes it and returns whether it was there
    (200 True, a 404 False); read() returns the map as a frozenset of (name, value) pairs.
    The state is a frozenset of pairs too, so it hashes."""

    def step(state: frozenset, op: Operation):
        if op.kind == "deploy":
            name, value = op.arg
            return True, frozenset(p for p in state if p[0] != name) | {(name, value)}
        if op.kind == "undeploy":
            existed = any(p[0] == op.arg for p in state)
            after = frozenset(p for p in state if p[0] != op.arg)
            return (op.ret is None or op.result == existed), after
        if op.kind == "read":
            return (op.ret is None or op.result == state), state
        raise ValueError(op.kind)

    return Model(frozenset(), step, lambda op: op.kind == "read")


def first_violation(history: list[Operation], model: Model) -> list[Operation] | None:
    """For a failure message: the shortest prefix (operations by call time) that is not
    linearizable, or None when the whole history is. Its last operations are where to look.
    A prefix keeps whole operations (their results as seen), so it is a history of its own."""
    ordered = sorted(history, key=lambda op: op.call)
    if is_linearizable(ordered, model):
        return None
    lo, hi = 0, len(ordered)  # ordered[:lo] linearizable (or empty), ordered[:hi] not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if is_linearizable(ordered[:mid], model):
            lo = mid
        else:
            hi = mid
    return ordered[:hi]
