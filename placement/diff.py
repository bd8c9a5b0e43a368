"""diff(): what each node must stop and start to go from one plan to the next.

An instance whose model, node, GPUs and per-GPU bytes are all unchanged is left running; any
other change is a stop of the old instance and a start of the new one. Per node, every stop
comes before every start, so a GPU is freed before it is filled again.
"""

from __future__ import annotations

from dataclasses import dataclass

from placement.model import Assignment, Plan


@dataclass(frozen=True)
class NodeDiff:
    node: str
    stop: tuple[Assignment, ...] = ()
    start: tuple[Assignment, ...] = ()

    def steps(self) -> tuple[tuple[str, Assignment], ...]:
        """("stop", a)... then ("start", a)...: the order the node's reconciler runs them."""
        return tuple(("stop", a) for a in self.stop) + tuple(("start", a) for a in self.start)


def _key(a: Assignment) -> tuple:
    return (a.model, a.gpus, a.vram)


def diff(old: Plan | None, new: Plan) -> dict[str, NodeDiff]:
    """Per node id (sorted), the instances to stop and to start; nodes without change are left out."""
    old_assignments = old.assignments if old is not None else ()
    before: dict[str, set[Assignment]] = {}
    after: dict[str, set[Assignment]] = {}
    for a in old_assignments:
        before.setdefault(a.node, set()).add(a)
    for a in new.assignments:
        after.setdefault(a.node, set()).add(a)
    out: dict[str, NodeDiff] = {}
    for node in sorted(before.keys() | after.keys()):
        was, will = before.get(node, set()), after.get(node, set())
        stop = tuple(sorted(was - will, key=_key))
        start = tuple(sorted(will - was, key=_key))
        if stop or start:
            out[node] = NodeDiff(node, stop, start)
    return out
