"""The placement problem's values: what the cluster offers, what is asked for, what was decided.

All are frozen dataclasses so that plans compare with `==`, hash, and can be committed to the
Raft log as they are (`Plan.to_dict` / `Plan.from_dict` give msgpack-friendly maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from placement.split import LayerProfile, Split

# "intel" and "other": cards only llama.cpp's Vulkan backend drives (an Arc, lavapipe).
Vendor = Literal["nvidia", "amd", "intel", "other", "cpu", "fake"]
VENDORS = ("nvidia", "amd", "intel", "other", "cpu", "fake")

# Why an instance could not be placed (Unplaced.reason). Stable strings: the dashboard shows them.
TOO_LARGE = "larger than any node"
OUT_OF_CAPACITY = "out of capacity"
TOO_FEW_NODES = "fewer nodes than replicas"


@dataclass(frozen=True)
class Gpu:
    id: str  # unique in the cluster, e.g. "n1/gpu0"
    vendor: Vendor
    name: str
    capacity: int  # bytes this system may use: total - held by others - headroom
    # llama.cpp backend ("CUDA", "HIP", "Vulkan", ...): one instance spans GPUs of one
    # backend only; "" (older peers) groups by vendor as before.
    backend: str = ""

    @property
    def group(self) -> str:
        return self.backend or self.vendor

    def __post_init__(self) -> None:
        if self.vendor not in VENDORS:
            raise ValueError(f"gpu {self.id}: unknown vendor {self.vendor!r}")
        if self.capacity < 0:
            raise ValueError(f"gpu {self.id}: negative capacity")


@dataclass(frozen=True)
class Node:
    id: str
    gpus: tuple[Gpu, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vram: int  # bytes one instance needs on one device (placement.estimate(...).total)
    replicas: int = 1
    priority: int = 0  # higher is placed first
    # Extra bytes per additional GPU when one instance is split over several GPUs of a node:
    # every GPU holds its own compute buffer (placement.estimate(...).compute is a good value).
    split_overhead: int = 0
    # Over several nodes through llama.cpp RPC (placement/split.py): "auto" when no one node
    # fits, "always" (tests, demos), "never". Only with `layers`, the per-slot bytes.
    split: str = "auto"
    layers: LayerProfile | None = None

    def __post_init__(self) -> None:
        if self.split not in ("auto", "never", "always"):
            raise ValueError(f"model {self.name}: split must be auto, never or always")
        if self.vram < 0 or self.split_overhead < 0:
            raise ValueError(f"model {self.name}: negative vram")
        if self.replicas < 0:
            raise ValueError(f"model {self.name}: negative replicas")

    def need(self, n_gpus: int) -> int:
        """Bytes one instance takes in all when split over n_gpus GPUs."""
        return self.vram + (n_gpus - 1) * self.split_overhead


@dataclass(frozen=True)
class Assignment:
    model: str
    node: str
    gpus: tuple[str, ...]  # gpu ids on that node; several = llama.cpp tensor_split
    vram: tuple[int, ...]  # bytes on each of those gpus, same order

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "vram", tuple(self.vram))
        if len(self.gpus) != len(self.vram) or not self.gpus:
            raise ValueError(f"assignment of {self.model}: gpus and vram must pair up")

    @property
    def tensor_split(self) -> tuple[float, ...]:
        """Proportions for llama.cpp's tensor_split, in the order of `gpus`."""
        total = sum(self.vram) or 1
        return tuple(v / total for v in self.vram)


@dataclass(frozen=True)
class Unplaced:
    model: str
    missing_replicas: int
    reason: str  # one of TOO_LARGE, OUT_OF_CAPACITY, TOO_FEW_NODES


@dataclass(frozen=True)
class Plan:
    assignments: tuple[Assignment, ...] = ()
    unplaced: tuple[Unplaced, ...] = ()
    splits: tuple[Split, ...] = ()  # instances over several nodes (placement/split.py)

    def splits_for_node(self, node_id: str) -> tuple[Split, ...]:
        """The splits this node takes part in, as primary or helper."""
        return tuple(s for s in self.splits if node_id in s.nodes)

    def for_node(self, node_id: str) -> tuple[Assignment, ...]:
        return tuple(a for a in self.assignments if a.node == node_id)

    def for_model(self, model: str) -> tuple[Assignment, ...]:
        return tuple(a for a in self.assignments if a.model == model)

    def used(self) -> dict[str, int]:
        """Bytes planned on each gpu id that hosts something."""
        out: dict[str, int] = {}
        for a in self.assignments:
            for gpu, vram in zip(a.gpus, a.vram, strict=True):
                out[gpu] = out.get(gpu, 0) + vram
        for s in self.splits:
            for p in s.parts:
                out[p.gpu] = out.get(p.gpu, 0) + p.vram
        return out

    def to_dict(self) -> dict:
        return {
            "assignments": [
                {"model": a.model, "node": a.node, "gpus": list(a.gpus), "vram": list(a.vram)}
                for a in self.assignments
            ],
            "unplaced": [
                {"model": u.model, "missing_replicas": u.missing_replicas, "reason": u.reason}
                for u in self.unplaced
            ],
            **({"splits": [s.to_dict() for s in self.splits]} if self.splits else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        from placement.split import Split

        return cls(
            assignments=tuple(
                Assignment(a["model"], a["node"], tuple(a["gpus"]), tuple(a["vram"]))
                for a in data.get("assignments", ())
            ),
            unplaced=tuple(
                Unplaced(u["model"], u["missing_replicas"], u["reason"])
                for u in data.get("unplaced", ())
            ),
            splits=tuple(Split.from_dict(s) for s in data.get("splits", ())),
        )
