"""Split plans: one model instance over devices of several nodes, through llama.cpp RPC.

Pure: no I/O, no clock, no randomness (DESIGN.md rule 1).

A split instance has one primary node, which runs the model worker, and helper devices on
other nodes, reached through their peers' RPC servers. llama.cpp gives each device a
contiguous run of layer slots (the n_layer repeating layers, then the output head as one
more slot); each device holds the weights and the KV cache of its layers and a compute
buffer of its own. So a part needs: the bytes of its slots + its compute buffer + the
per-process runtime overhead.

Layer order follows llama.cpp: on a primary whose device is the host (vendor cpu or fake:
a CPU build), its layers come first, the helpers' after (RPC devices in --rpc order, the
output head on the last); on a primary with real GPUs, the helpers' layers come first and
the primary's GPUs last, so the logits stay local.

Rules: no device over its free bytes; the fewest nodes that fit (at least two); shares in
proportion to each device's room; a valid current split is kept as it is (stable plans);
a dead helper's split is re-planned around its surviving nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from placement.model import OUT_OF_CAPACITY, TOO_LARGE, ModelSpec, Node, Plan, Unplaced

SPLIT_MODES = ("auto", "never", "always")
MAX_DEVICES = 16  # llama.cpp's LLAMA_MAX_DEVICES (and GGML_RPC_MAX_SERVERS)
HOST_VENDORS = ("cpu", "fake")  # the device is the host's memory: layers on the CPU


@dataclass(frozen=True)
class LayerProfile:
    """What each layer slot of one instance takes, from the GGUF header."""

    layers: tuple[int, ...]  # bytes per repeating layer: its weights + its KV cache
    output: int  # bytes of the output head (the last slot)
    compute: int  # compute buffer of a device without the output head
    compute_output: int  # compute buffer of the device with the output head (logits)
    overhead: int = 0  # bytes the GPU runtime takes per process (a helper is one)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or min(self.layers) < 0 or min(self.output, self.compute) < 0:
            raise ValueError("a layer profile needs layers and non-negative sizes")

    @property
    def slots(self) -> tuple[int, ...]:
        return (*self.layers, self.output)

    @classmethod
    def uniform(cls, vram: int, split_overhead: int, n_slots: int = 33) -> LayerProfile:
        """A stand-in from the totals alone (no header read yet): equal slots."""
        body = max(vram - split_overhead, n_slots)
        return cls((body // n_slots,) * (n_slots - 1), body // n_slots, split_overhead, 0, 0)


@dataclass(frozen=True)
class Part:
    node: str
    gpu: str  # device id on that node
    layers: int  # layer slots it holds (the output head counts as one)
    vram: int  # bytes on that device

    def to_dict(self) -> dict:
        return {"node": self.node, "gpu": self.gpu, "layers": self.layers, "vram": self.vram}


@dataclass(frozen=True)
class Split:
    model: str
    primary: str  # the node that runs the worker
    parts: tuple[Part, ...]  # in llama.cpp's layer order

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.node for p in self.parts))

    @property
    def helpers(self) -> tuple[str, ...]:
        return tuple(n for n in self.nodes if n != self.primary)

    def primary_first(self) -> bool:
        return self.parts[0].node == self.primary

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "primary": self.primary,
            "parts": [p.to_dict() for p in self.parts],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Split:
        parts = tuple(
            Part(p["node"], p["gpu"], int(p["layers"]), int(p["vram"])) for p in data["parts"]
        )
        return cls(data["model"], data["primary"], parts)


@dataclass(frozen=True)
class _Device:
    node: str
    gpu: str
    vendor: str
    free: int


def _fixed(profile: LayerProfile, last: bool) -> int:
    return (profile.compute_output if last else profile.compute) + profile.overhead


def _order(devices: Sequence[_Device], primary: str) -> list[_Device]:
    """llama.cpp's layer order (see the module docstring)."""
    mine = [d for d in devices if d.node == primary]
    others = sorted((d for d in devices if d.node != primary), key=lambda d: (d.node, d.gpu))
    if mine and mine[0].vendor in HOST_VENDORS:
        return mine + others
    return others + mine


def _parts_bytes(profile: LayerProfile, devices: Sequence[_Device], counts: Sequence[int]):
    """Bytes each device holds for contiguous runs of `counts` slots, in order."""
    slots, out, at = profile.slots, [], 0
    last = max(i for i, c in enumerate(counts) if c > 0)
    for i, c in enumerate(counts):
        body = sum(slots[at : at + c])
        out.append(body + _fixed(profile, i == last) if c else 0)
        at += c
    return out


def _proportional(total: int, rooms: Sequence[int]) -> list[int]:
    """Integer shares of `total` in proportion to `rooms` (largest remainder, ties by order)."""
    room = sum(rooms)
    exact = [total * r / room for r in rooms]
    counts = [int(x) for x in exact]
    order = sorted(range(len(rooms)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _assign(profile: LayerProfile, devices: Sequence[_Device]) -> list[int] | None:
    """Slot counts per device (each fits its free bytes), or None. Shares start in
    proportion to each device's room and are evened out one slot at a time."""
    n = len(profile.slots)
    rooms = [max(d.free - _fixed(profile, i == len(devices) - 1), 0) for i, d in enumerate(devices)]
    if sum(rooms) <= 0:
        return None
    if n < len(devices):
        return None
    counts = _proportional(n, rooms)
    for i in range(len(counts)):  # every device of the pool holds a slot at least
        while counts[i] == 0:
            counts[max(range(len(counts)), key=lambda j: (counts[j], -j))] -= 1
            counts[i] += 1
    for _ in range(n * len(devices)):
        used = _parts_bytes(profile, devices, counts)
        over = [u - d.free for u, d in zip(used, devices, strict=True)]
        worst = max(range(len(devices)), key=lambda i: (over[i], -i))
        if over[worst] <= 0:
            return counts
        # room left on each device for one more slot
        slack = [-o - (0 if counts[i] else _fixed(profile, False)) for i, o in enumerate(over)]
        best = max(range(len(devices)), key=lambda i: (slack[i], -i))
        if best == worst or slack[best] <= 0 or counts[worst] <= 1:
            return None
        counts[worst] -= 1
        counts[best] += 1
    return None


def _build(model: str, profile: LayerProfile, devices: list[_Device], primary: str):
    ordered = _order(devices, primary)
    counts = _assign(profile, ordered)
    if counts is None:
        return None
    used = _parts_bytes(profile, ordered, counts)
    parts = tuple(
        Part(d.node, d.gpu, c, u) for d, c, u in zip(ordered, counts, used, strict=True) if c
    )
    split = Split(model, primary, parts)
    if primary not in split.nodes or len(split.nodes) < 2:
        return None
    return split


def devices_of(nodes: Sequence[Node], free: Mapping[str, int]) -> dict[str, list[_Device]]:
    """Per node, the devices a split may use: its GPUs of one group (one llama.cpp
    backend, else vendor: tensor_split runs inside one backend), the one with the most
    free bytes, else its cpu device; each with its free bytes."""
    out: dict[str, list[_Device]] = {}
    for node in sorted(nodes, key=lambda n: n.id):
        by_group: dict[str, list[_Device]] = {}
        for g in sorted(node.gpus, key=lambda g: g.id):
            by_group.setdefault("cpu" if g.vendor == "cpu" else g.group, []).append(
                _Device(node.id, g.id, g.vendor, max(free.get(g.id, g.capacity), 0))
            )
        gpu_groups = [v for v in by_group if v != "cpu"] or list(by_group)
        if gpu_groups:
            best = max(gpu_groups, key=lambda v: (sum(d.free for d in by_group[v]), v))
            out[node.id] = by_group[best]
    return out


def split_valid(split: Split, profile: LayerProfile, devices: Mapping[str, list[_Device]]):
    """The split still fits: every part's device exists with room for its bytes, the
    slots add up, and the bytes are what this profile gives for them."""
    found = {d.gpu: d for ds in devices.values() for d in ds}
    if sum(p.layers for p in split.parts) != len(profile.slots) or len(split.nodes) < 2:
        return False
    ordered = [found.get(p.gpu) for p in split.parts]
    if any(d is None or d.node != p.node for d, p in zip(ordered, split.parts, strict=True)):
        return False
    used = _parts_bytes(profile, ordered, [p.layers for p in split.parts])  # type: ignore[arg-type]
    return all(
        u == p.vram and p.vram <= d.free  # type: ignore[union-attr]
        for u, p, d in zip(used, split.parts, ordered, strict=True)
    )


def plan_split(
    model: str,
    profile: LayerProfile,
    nodes: Sequence[Node],
    free: Mapping[str, int],
    *,
    prefer: Split | None = None,
    avoid: frozenset[str] = frozenset(),
) -> Split | None:
    """One split instance of `model` on the free bytes `free` (gpu id -> bytes; a gpu not
    in it has its whole capacity), on nodes not in `avoid`; None if none fits.

    The fewest nodes that fit, preferring the nodes of `prefer` (a split being re-placed:
    the survivors of a dead helper keep their places where they can), then the nodes with
    the most room; the primary is `prefer`'s primary when it is among them, else the node
    with the most room (another where only that order fits)."""
    devices = {n: ds for n, ds in devices_of(nodes, free).items() if n not in avoid}
    keep = set(prefer.nodes) if prefer is not None else set()
    room = {n: sum(d.free for d in ds) for n, ds in devices.items()}
    ranked = sorted(devices, key=lambda n: (n not in keep, -room[n], n))
    by_room = sorted(devices, key=lambda n: (-room[n], n))
    for k in range(2, len(devices) + 1):
        for chosen in dict.fromkeys((tuple(ranked[:k]), tuple(by_room[:k]))):
            pool = [d for n in chosen for d in devices[n]][:MAX_DEVICES]
            # the primary decides the layer order, and with it which device pays for the
            # logits: prefer's primary, then the most room, then any that fits
            wanted = prefer.primary if prefer is not None else None
            for primary in sorted(chosen, key=lambda n: (n != wanted, -room[n], n)):
                split = _build(model, profile, pool, primary)
                if split is not None:
                    return split
    return None


def _count(model: str, assignments, splits) -> int:
    return sum(a.model == model for a in assignments) + sum(x.model == model for x in splits)


def _take(free: dict[str, int], split: Split) -> None:
    for p in split.parts:
        free[p.gpu] = free.get(p.gpu, 0) - p.vram


def _reduced(nodes: Sequence[Node], free: Mapping[str, int]) -> tuple[Node, ...]:
    """The nodes with each GPU's capacity cut to its free bytes."""
    return tuple(
        Node(n.id, tuple(replace(g, capacity=max(free[g.id], 0)) for g in n.gpus)) for n in nodes
    )


def solve_with_splits(
    nodes: Sequence[Node],
    specs: Sequence[ModelSpec],
    current: Plan | None,
    single: Callable[[Sequence[Node], Sequence[ModelSpec], Plan | None], Plan],
    pairable: frozenset[str] | None = None,
) -> Plan:
    """solve() for models that may be split (`ModelSpec.split`, `ModelSpec.layers`):

    1. valid current splits are kept first (their bytes reserved), so they never move
       while nothing changes;
    2. `single` (the one-node solver) places everything else on what is left; an "auto"
       model that kept a split but now fits one node gets that node instead, found while
       the split's bytes are still reserved (make-before-break);
    3. models still missing instances ("auto") or wanting splits ("always") get split
       plans, highest priority first, each instance on nodes not hosting that model."""
    by_name = {s.name: s for s in specs}
    free = {g.id: g.capacity for n in nodes for g in n.gpus}
    # nodes a split may not use (their RPC version does not pair)
    unpaired = frozenset(n.id for n in nodes if pairable is not None and n.id not in pairable)
    old_splits = current.splits if current is not None else ()
    kept: list[Split] = []
    for old in sorted(old_splits, key=lambda x: (-_prio(by_name, x.model), x.model, x.nodes)):
        spec = by_name.get(old.model)
        if spec is None or spec.layers is None or spec.split == "never":
            continue
        if _count(old.model, (), kept) >= spec.replicas:
            continue
        if unpaired.isdisjoint(old.nodes) and split_valid(
            old, spec.layers, devices_of(nodes, free)
        ):
            kept.append(old)
            _take(free, old)
    singles = [
        replace(s, replicas=max(s.replicas - _count(s.name, (), kept), 0))
        for s in specs
        if s.split != "always"
    ]
    before = Plan(current.assignments) if current is not None else None
    plan = single(_reduced(nodes, free), singles, before)
    assignments = list(plan.assignments)
    for a in assignments:
        for gpu, v in zip(a.gpus, a.vram, strict=True):
            free[gpu] -= v
    for old in list(kept):
        spec = by_name[old.model]
        if spec.split != "auto":
            continue
        one = single(_reduced(nodes, free), [replace(spec, replicas=1)], None).assignments
        if one and one[0].node not in {a.node for a in assignments if a.model == spec.name}:
            kept.remove(old)
            assignments.append(one[0])
            for gpu, v in zip(one[0].gpus, one[0].vram, strict=True):
                free[gpu] -= v
            for p in old.parts:
                free[p.gpu] += p.vram
    splits = list(kept)
    for spec in sorted(specs, key=lambda s: (-s.priority, s.name)):
        if spec.layers is None or spec.split == "never":
            continue
        while _count(spec.name, assignments, splits) < spec.replicas:
            hosting = {a.node for a in assignments if a.model == spec.name}
            hosting |= {n for x in splits if x.model == spec.name for n in x.nodes}
            hosting |= unpaired
            previous = next(
                (x for x in old_splits if x.model == spec.name and x not in splits), None
            )
            new = plan_split(
                spec.name, spec.layers, nodes, free, avoid=frozenset(hosting), prefer=previous
            )
            if new is None:
                break
            splits.append(new)
            _take(free, new)
    placed = {s.name: _count(s.name, assignments, splits) for s in specs}
    unplaced = []
    for spec in sorted(specs, key=lambda s: s.name):
        missing = spec.replicas - placed[spec.name]
        if missing <= 0:
            continue
        reason = next((u.reason for u in plan.unplaced if u.model == spec.name), None)
        if reason is None or spec.split == "always":
            empty = {g.id: g.capacity for n in nodes for g in n.gpus}
            fits = spec.layers is not None and plan_split(
                spec.name, spec.layers, nodes, empty, avoid=unpaired
            )
            reason = OUT_OF_CAPACITY if fits else TOO_LARGE
        unplaced.append(Unplaced(spec.name, missing, reason))
    return Plan(
        assignments=tuple(sorted(assignments, key=lambda a: (a.node, a.model, a.gpus))),
        unplaced=tuple(unplaced),
        splits=tuple(sorted(splits, key=lambda x: (x.model, x.nodes))),
    )


def _prio(by_name: Mapping[str, ModelSpec], model: str) -> int:
    spec = by_name.get(model)
    return spec.priority if spec is not None else 0
