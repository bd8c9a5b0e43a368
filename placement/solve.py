"""solve(): decide which node and GPUs host each model instance.

Hard rules (DESIGN.md): no GPU over capacity; the replicas of a model on distinct nodes; one
instance may span several GPUs of one node of one vendor (llama.cpp's tensor_split, in
proportion to the GPUs' free bytes), never several nodes; a `cpu` device hosts only whole
instances. Goals, in order: place as many instances as fit (first replicas before extra
replicas, higher priority first); move as little of `current` as possible; keep large free
blocks for large models (policy "pack", best fit) or balance nodes (policy "spread").

How: instances are placed level by level (first replicas by priority, then extra replicas by
priority). Within a level the most instances fit when the smallest ones are taken (an
exchange argument: a smaller instance fits wherever a larger one did), so the solver looks for
the largest k such that the k smallest pack, packing each candidate set largest first, and for
small sets falls back to a bounded exact search. With a `current` plan, every still-valid
instance is kept and only the missing ones are placed. Only if a plan solved from scratch
serves more models (gives an instance to a model that has none) is the plan re-solved,
putting each instance back where it runs when it still fits; as that bar depends on nodes
and models alone, `solve(n, m, solve(n, m, c))` returns the same plan.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from placement.model import (
    OUT_OF_CAPACITY,
    TOO_FEW_NODES,
    TOO_LARGE,
    Assignment,
    ModelSpec,
    Node,
    Plan,
    Unplaced,
)

POLICIES = ("pack", "spread")
EXACT_MAX_ITEMS = 12  # the bounded exact search runs on level sets up to this size...
EXACT_MAX_STEPS = 20_000  # ...and gives up after this many search steps (deterministic)


@dataclass(frozen=True)
class _Group:
    """GPUs of one node that one instance may span: one backend (tensor_split runs within
    one llama.cpp backend; vendor for peers that gossip none); a cpu device stands alone."""

    node: str
    gpus: tuple[str, ...]
    cpu: bool


class _Topology:
    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes = tuple(sorted(nodes, key=lambda n: n.id))
        self.capacity: dict[str, int] = {}
        self.node_of: dict[str, str] = {}
        self.vendor_of: dict[str, str] = {}
        self.groups: list[_Group] = []
        self.node_ids: set[str] = set()
        for node in self.nodes:
            if node.id in self.node_ids:
                raise ValueError(f"node {node.id} given twice")
            self.node_ids.add(node.id)
            by_vendor: dict[str, list[str]] = {}
            for gpu in sorted(node.gpus, key=lambda g: g.id):
                if gpu.id in self.capacity:
                    raise ValueError(f"gpu {gpu.id} given twice")
                self.capacity[gpu.id] = gpu.capacity
                self.node_of[gpu.id] = node.id
                self.vendor_of[gpu.id] = "cpu" if gpu.vendor == "cpu" else gpu.group
                if gpu.vendor == "cpu":
                    self.groups.append(_Group(node.id, (gpu.id,), cpu=True))
                else:
                    by_vendor.setdefault(gpu.group, []).append(gpu.id)
            for vendor in sorted(by_vendor):
                self.groups.append(_Group(node.id, tuple(by_vendor[vendor]), cpu=False))
        self.gpu_groups = [g for g in self.groups if not g.cpu]
        self.gpu_slots = [(gpu, grp.node) for grp in self.gpu_groups for gpu in grp.gpus]
        self.slot_of = {gpu: i for i, (gpu, _) in enumerate(self.gpu_slots)}
        self.group_of = {gpu: i for i, grp in enumerate(self.groups) for gpu in grp.gpus}
        self.cpu_groups = [g for g in self.groups if g.cpu]
        self.node_gpus: dict[str, tuple[str, ...]] = {
            n.id: tuple(g for grp in self.gpu_groups if grp.node == n.id for g in grp.gpus)
            for n in self.nodes
        }
        self._fitting: dict[tuple[int, int], list[int]] = {}

    def fitting_groups(self, spec: ModelSpec) -> list[int]:
        """Indexes of the groups that hold one instance of `spec` when empty, computed once
        per size: a model too large for most nodes need not be tried on each of them again
        for every replica and level (200 models on 1,000 nodes: 1.6 s -> see docs)."""
        key = (spec.vram, spec.split_overhead)
        found = self._fitting.get(key)
        if found is None:
            found = [i for i, g in enumerate(self.groups) if _fits_empty(spec, g, self)]
            self._fitting[key] = found
        return found


class _State:
    """Free bytes per GPU and what is placed so far; cheap to copy for trial packings.

    `by_free` keeps the GPUs (not cpu devices) sorted by (free bytes, slot order), so a best
    fit is a binary search; `group_free` is the free sum of each group (a split's bound).
    """

    def __init__(self, topo: _Topology) -> None:
        self.topo = topo
        self.free = dict(topo.capacity)
        self.nodes_of: dict[str, set[str]] = {}
        self.placed: list[Assignment] = []
        self.by_free = sorted(
            (self.free[gpu], i, gpu, node) for i, (gpu, node) in enumerate(topo.gpu_slots)
        )
        self.group_free = [sum(self.free[g] for g in grp.gpus) for grp in topo.groups]
        # for spread: nodes by free GPU bytes, most first
        self.node_free = {n: sum(self.free[g] for g in gpus) for n, gpus in topo.node_gpus.items()}
        self.by_node = sorted((-free, node) for node, free in self.node_free.items())
        # re-solving around a current plan: its instances not yet placed, and their bytes per GPU
        self.hints: dict[str, list[Assignment]] = {}
        self.reserved: dict[str, int] = {}
        self.pin_first = False  # each level: first put hinted instances back where they run

    def add_hints(self, assignments: Iterable[Assignment]) -> None:
        for a in assignments:
            self.hints.setdefault(a.model, []).append(a)
            for gpu, vram in zip(a.gpus, a.vram, strict=True):
                self.reserved[gpu] = self.reserved.get(gpu, 0) + vram

    def copy(self) -> _State:
        other = _State.__new__(_State)
        other.topo = self.topo
        other.free = dict(self.free)
        other.nodes_of = {m: set(s) for m, s in self.nodes_of.items()}
        other.placed = list(self.placed)
        other.by_free = list(self.by_free)
        other.group_free = list(self.group_free)
        other.node_free = dict(self.node_free)
        other.by_node = list(self.by_node)
        other.hints = {m: list(h) for m, h in self.hints.items()}
        other.reserved = dict(self.reserved)
        other.pin_first = self.pin_first
        return other

    def commit(self, a: Assignment) -> None:
        topo = self.topo
        for gpu, vram in zip(a.gpus, a.vram, strict=True):
            old = self.free[gpu]
            self.free[gpu] = old - vram
            self.group_free[topo.group_of[gpu]] -= vram
            slot = topo.slot_of.get(gpu)
            if slot is not None:
                entry = (old, slot, gpu, a.node)
                del self.by_free[bisect_left(self.by_free, entry)]
                insort(self.by_free, (old - vram, slot, gpu, a.node))
                node_old = self.node_free[a.node]
                self.node_free[a.node] = node_old - vram
                del self.by_node[bisect_left(self.by_node, (-node_old, a.node))]
                insort(self.by_node, (vram - node_old, a.node))
        self.nodes_of.setdefault(a.model, set()).add(a.node)
        self.placed.append(a)
        hints = self.hints.get(a.model)
        if hints:  # this instance is back: release its old place (or, if elsewhere, the first)
            done = hints.pop(hints.index(a) if a in hints else 0)
            for gpu, vram in zip(done.gpus, done.vram, strict=True):
                self.reserved[gpu] -= vram

    def count(self, model: str) -> int:
        return len(self.nodes_of.get(model, ()))


def _proportional(need: int, gpus: Sequence[str], free: dict[str, int]) -> tuple[int, ...]:
    """Split `need` bytes over `gpus` in proportion to their free bytes, never above them."""
    total = sum(free[g] for g in gpus)
    shares = [need * free[g] // total for g in gpus]
    rest = need - sum(shares)
    for i, g in enumerate(gpus):
        if rest == 0:
            break
        add = min(rest, free[g] - shares[i])
        shares[i] += add
        rest -= add
    return tuple(shares)


def _split_in_group(spec: ModelSpec, group: _Group, free: dict[str, int]):
    """Fewest GPUs of the group (largest free first) that hold the instance, and the bytes
    they would have left, or None. The split itself (_proportional) is left to the winner:
    the choice needs only the count and what is left."""
    order = sorted(group.gpus, key=lambda g: (-free[g], g))
    total = 0
    for k, gpu in enumerate(order, start=1):
        total += free[gpu]
        if k >= 2 and total >= spec.need(k):
            return tuple(sorted(order[:k])), total - spec.need(k)
    return None


def _choose(spec: ModelSpec, state: _State, policy: str) -> Assignment | None:
    """The policy's best place for one more instance of `spec`, or None if none fits."""
    topo, free = state.topo, state.free
    taken = state.nodes_of.get(spec.name, ())
    need = spec.vram
    if state.hints:
        sticky = _choose_sticky(spec, state, policy)
        if sticky is not None:
            return sticky
    best = None
    # 1. one whole GPU. pack: least left over (ties: the first in node and GPU order);
    # spread: the node with the most free GPU bytes, there the GPU with the most.
    if policy == "pack":
        by_free = state.by_free
        for i in range(bisect_left(by_free, (need,)), len(by_free)):
            _, _, gpu, node = by_free[i]
            if node not in taken:
                best = (node, (gpu,), (need,))
                break
    else:
        for _, node in state.by_node:
            if node in taken or not topo.node_gpus[node]:
                continue
            gpu = min(topo.node_gpus[node], key=lambda g: (-free[g], g))
            if free[gpu] >= need:
                best = (node, (gpu,), (need,))
                break
    if best is None:
        # 2. split over the fewest GPUs of one node and vendor
        best_key = None
        group_free = state.group_free
        for gi in topo.fitting_groups(spec):
            group = topo.groups[gi]
            if group.cpu or len(group.gpus) < 2 or group_free[gi] < need or group.node in taken:
                continue
            split = _split_in_group(spec, group, free)
            if split is None:
                continue
            gpus, left = split
            key = (len(gpus), left if policy == "pack" else -left, group.node)
            if best_key is None or key < best_key:
                best_key, best = key, (group.node, gpus, None)
        if best is not None:
            node, gpus, _ = best
            best = (node, gpus, _proportional(spec.need(len(gpus)), gpus, free))
    if best is None:
        # 3. a cpu device the node offers, whole instances only
        best_key = None
        for group in topo.cpu_groups:
            gpu = group.gpus[0]
            left = free[gpu] - need
            if left < 0 or group.node in taken:
                continue
            key = (left if policy == "pack" else -left, group.node)
            if best_key is None or key < best_key:
                best_key, best = key, (group.node, (gpu,), (need,))
    if best is None:
        return None
    node, gpus, vram = best
    return Assignment(spec.name, node, gpus, vram)


def _fitting_hint(spec: ModelSpec, state: _State) -> Assignment | None:
    """The first place where this model runs now that still fits one more instance."""
    free, taken = state.free, state.nodes_of.get(spec.name, ())
    for hint in state.hints.get(spec.name, ()):
        fits = all(free[g] >= v for g, v in zip(hint.gpus, hint.vram, strict=True))
        if fits and hint.node not in taken:
            return hint
    return None


def _choose_sticky(spec: ModelSpec, state: _State, policy: str) -> Assignment | None:
    """While re-solving around a current plan: where the instance runs now if that still
    fits; else a whole GPU that displaces the fewest bytes of instances still to come back."""
    hint = _fitting_hint(spec, state)
    if hint is not None:
        return hint
    free, taken = state.free, state.nodes_of.get(spec.name, ())
    best_key, best = None, None
    for slot, (gpu, node) in enumerate(state.topo.gpu_slots):
        left = free[gpu] - spec.vram
        if left < 0 or node in taken:
            continue
        displaced = max(0, state.reserved.get(gpu, 0) - left)
        key = (displaced, left if policy == "pack" else -left, slot)
        if best_key is None or key < best_key:
            best_key, best = key, Assignment(spec.name, node, (gpu,), (spec.vram,))
    return best


def _greedy(items: Sequence[ModelSpec], state: _State, policy: str) -> list[ModelSpec]:
    """Place items in the given order; return those that did not fit."""
    failed = []
    for spec in items:
        a = _choose(spec, state, policy)
        if a is None:
            failed.append(spec)
        else:
            state.commit(a)
    return failed


def _group_room(group: _Group, free: dict[str, int]) -> int:
    return sum(free[g] for g in group.gpus)


def _exact_pack(items: Sequence[ModelSpec], state: _State) -> _State | None:
    """Bounded exhaustive search for a packing of all items (no split overheads), or None.

    With zero split overhead a group of GPUs holds any set of instances whose sizes sum to at
    most its free bytes (proportional splits), so groups act as bins.
    """
    if any(s.split_overhead for s in items):
        return None
    groups = state.topo.groups
    room = [_group_room(g, state.free) for g in groups]
    taken = {m: set(n) for m, n in state.nodes_of.items()}
    order = sorted(items, key=lambda s: (-s.vram, s.name))
    where: list[int] = [-1] * len(order)
    names = [s.name for s in order]
    unique = {n: names.count(n) == 1 for n in names}
    steps = 0

    def search(i: int) -> bool:
        nonlocal steps
        if i == len(order):
            return True
        steps += 1
        if steps > EXACT_MAX_STEPS:
            return False
        spec = order[i]
        tried: set[int] = set()
        nodes = taken.setdefault(spec.name, set())
        for gi, group in enumerate(groups):
            if room[gi] < spec.vram or group.node in nodes:
                continue
            if unique[spec.name]:
                if room[gi] in tried:
                    continue  # a bin with as much room was already tried: same outcome
                tried.add(room[gi])
            room[gi] -= spec.vram
            nodes.add(group.node)
            where[i] = gi
            if search(i + 1):
                return True
            room[gi] += spec.vram
            nodes.discard(group.node)
        return False

    if not search(0):
        return None
    trial = state.copy()
    for spec, gi in zip(order, where, strict=True):
        group = groups[gi]
        fits = [g for g in group.gpus if trial.free[g] >= spec.vram]
        if fits:
            gpu = min(fits, key=lambda g: (trial.free[g], g))
            trial.commit(Assignment(spec.name, group.node, (gpu,), (spec.vram,)))
            continue
        split = _split_in_group(spec, group, trial.free)
        if split is None:
            return None
        gpus = split[0]
        vram = _proportional(spec.need(len(gpus)), gpus, trial.free)
        trial.commit(Assignment(spec.name, group.node, gpus, vram))
    return trial


def _place_level(items: list[ModelSpec], state: _State, policy: str) -> _State:
    """Place as many of one level's instances as fit; return the new state."""
    if not items:
        return state
    if state.pin_first:  # instances that still fit where they run stay there, before the rest
        state = state.copy()
        rest = []
        for spec in sorted(items, key=lambda s: (-s.vram, s.name)):
            hint = _fitting_hint(spec, state)
            if hint is None:
                rest.append(spec)
            else:
                state.commit(hint)
        items = rest
        if not items:
            return state
    largest_first = sorted(items, key=lambda s: (-s.vram, s.name))
    trial = state.copy()
    failed = _greedy(largest_first, trial, policy)
    if not failed:
        return trial
    best, best_k = trial, len(items) - len(failed)
    smallest_first = sorted(items, key=lambda s: (s.vram, s.name))
    room = sum(state.free.values())
    upper, volume = 0, 0
    for spec in smallest_first:
        volume += spec.vram
        if volume > room:
            break
        upper += 1
    lo, hi = best_k + 1, upper
    while lo <= hi:  # the largest k whose k smallest instances pack
        k = (lo + hi) // 2
        subset = smallest_first[:k]
        candidate = state.copy()
        if _greedy(sorted(subset, key=lambda s: (-s.vram, s.name)), candidate, policy):
            candidate = _exact_pack(subset, state) if k <= EXACT_MAX_ITEMS else None
        if candidate is None:
            hi = k - 1
        else:
            best, best_k, lo = candidate, k, k + 1
    if best is not trial:
        placed = {}
        for spec in smallest_first[:best_k]:
            placed[spec.name] = placed.get(spec.name, 0) + 1
        rest = []
        for spec in largest_first:
            if placed.get(spec.name, 0) > 0:
                placed[spec.name] -= 1
            else:
                rest.append(spec)
        _greedy(rest, best, policy)  # whatever else still fits in the gaps
    return best


def _fill(state: _State, specs: Sequence[ModelSpec], policy: str) -> _State:
    """Place the instances `state` lacks, level by level."""
    priorities = sorted({s.priority for s in specs}, reverse=True)
    for p in priorities:
        firsts = [
            s for s in specs if s.priority == p and s.replicas > 0 and not state.count(s.name)
        ]
        state = _place_level(firsts, state, policy)
    for p in priorities:
        extras = [
            s
            for s in specs
            if s.priority == p and state.count(s.name)
            for _ in range(s.replicas - state.count(s.name))
        ]
        state = _place_level(extras, state, policy)
    return state


def _valid(a: Assignment, spec: ModelSpec, topo: _Topology) -> bool:
    if a.node not in topo.node_ids or len(set(a.gpus)) != len(a.gpus):
        return False
    if any(topo.node_of.get(g) != a.node for g in a.gpus):
        return False
    vendors = {topo.vendor_of[g] for g in a.gpus}
    if len(vendors) != 1 or ("cpu" in vendors and len(a.gpus) != 1):
        return False
    return min(a.vram) >= 0 and sum(a.vram) == spec.need(len(a.gpus))


def _keep(current: Plan, specs: dict[str, ModelSpec], state: _State) -> None:
    """Keep every valid instance of `current` that still fits: first replicas, then extras."""
    ordered = sorted(
        (a for a in current.assignments if a.model in specs),
        key=lambda a: (-specs[a.model].priority, a.model, a.node, a.gpus),
    )
    for extra in (False, True):
        for a in ordered:
            spec = specs[a.model]
            count = state.count(a.model)
            if (count > 0) != extra or count >= spec.replicas:
                continue
            if a.node in state.nodes_of.get(a.model, ()) or not _valid(a, spec, state.topo):
                continue
            if all(state.free[g] >= v for g, v in zip(a.gpus, a.vram, strict=True)):
                state.commit(a)


def _served(state: _State, specs: Sequence[ModelSpec]) -> tuple[int, ...]:
    """Models with at least one instance, per priority, highest first (compare as tuples).

    Running instances move only to raise this: to serve a model that would otherwise have no
    instance at all, never just for an extra replica.
    """
    priorities = sorted({s.priority for s in specs}, reverse=True)
    return tuple(
        sum(1 for s in specs if s.priority == p and state.count(s.name)) for p in priorities
    )


def _fits_empty(spec: ModelSpec, group: _Group, topo: _Topology) -> bool:
    if group.cpu or len(group.gpus) == 1:
        return topo.capacity[group.gpus[0]] >= spec.vram
    caps = sorted((topo.capacity[g] for g in group.gpus), reverse=True)
    total = 0
    for k, cap in enumerate(caps, start=1):
        total += cap
        if total >= spec.need(k):
            return True
    return False


def _unplaced(state: _State, specs: Sequence[ModelSpec]) -> tuple[Unplaced, ...]:
    out = []
    topo = state.topo
    for spec in sorted(specs, key=lambda s: s.name):
        missing = spec.replicas - state.count(spec.name)
        if missing <= 0:
            continue
        fitting_nodes = {topo.groups[i].node for i in topo.fitting_groups(spec)}
        if not fitting_nodes:
            reason = TOO_LARGE
        elif len(fitting_nodes) < spec.replicas and state.count(spec.name) > 0:
            reason = TOO_FEW_NODES
        else:
            reason = OUT_OF_CAPACITY
        out.append(Unplaced(spec.name, missing, reason))
    return tuple(out)


def solve(
    nodes: Iterable[Node],
    models: Iterable[ModelSpec],
    current: Plan | None = None,
    *,
    policy: str = "pack",
    rebalance: bool = True,
    split_nodes: Iterable[str] | None = None,
) -> Plan:
    """Place `models` on `nodes` (see _solve_single); a model with a layer profile whose
    `split` allows it may also be split over several nodes (placement/split.py), of
    `split_nodes` only when given (the nodes whose llama.cpp RPC versions pair)."""
    nodes, specs = tuple(nodes), tuple(models)
    splittable = any(s.layers is not None and s.split != "never" for s in specs)
    if not splittable and not (current is not None and current.splits):
        return _solve_single(nodes, specs, current, policy=policy, rebalance=rebalance)
    from placement.split import solve_with_splits

    def single(n, m, c):
        return _solve_single(n, m, c, policy=policy, rebalance=rebalance)

    pairable = frozenset(split_nodes) if split_nodes is not None else None
    return solve_with_splits(nodes, specs, current, single, pairable)


def _solve_single(
    nodes: Iterable[Node],
    models: Iterable[ModelSpec],
    current: Plan | None = None,
    *,
    policy: str = "pack",
    rebalance: bool = True,
) -> Plan:
    """Place `models` on `nodes`, keeping what `current` already placed where it still fits.

    policy: "pack" (best fit; keeps large holes for large models) or "spread" (the least
    loaded node first). rebalance: when a model is left without any instance, also solve from
    scratch and, if that serves more models, re-solve around `current` (moving running
    instances, though reusing their places where they fit); False: valid instances never move.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    topo = _Topology(nodes)
    specs = sorted(models, key=lambda s: s.name)
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise ValueError("model names must be unique")

    kept = _State(topo)
    if current is not None:
        _keep(current, by_name, kept)
    kept = _fill(kept, specs, policy)
    result = kept
    missing = any(kept.count(s.name) == 0 for s in specs if s.replicas > 0)
    if missing and rebalance and current is not None and current.assignments:
        # The bar is a plan solved from scratch: it depends on nodes and models alone, so a
        # plan that met it meets it again next time (solve(n, m, solve(n, m, c)) is a fixpoint).
        fresh = _fill(_State(topo), specs, policy)
        bar = _served(fresh, specs)
        if bar > _served(kept, specs):
            # Solve again around the current plan, for fewer moves: first with each level's
            # running instances pinned where they run, else reusing places as they come up.
            result = fresh
            hints = [
                a
                for a in sorted(current.assignments, key=lambda a: (a.node, a.model, a.gpus))
                if a.model in by_name and _valid(a, by_name[a.model], topo)
            ]
            for pin_first in (True, False):
                around = _State(topo)
                around.add_hints(hints)
                around.pin_first = pin_first
                around = _fill(around, specs, policy)
                if _served(around, specs) >= bar:
                    result = around
                    break
    assignments = tuple(sorted(result.placed, key=lambda a: (a.node, a.model, a.gpus)))
    return Plan(assignments=assignments, unplaced=_unplaced(result, specs))
