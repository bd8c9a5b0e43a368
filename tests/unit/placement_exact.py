"""Reference solvers for judging placement.solve(): an exact one and first-fit decreasing.

Both count first replicas only (one instance per model), on instances without split overhead.
Then a node's GPUs of one vendor act as one bin whose size is the sum of their capacities:
an instance may be split over them in any proportion (llama.cpp's tensor_split), so a set of
instances fits iff their sizes sum to at most the bin, and no instance spans two bins. A cpu
device is a bin of its own.
"""

from __future__ import annotations

from functools import cache

from placement import ModelSpec, Node


def bins(nodes: list[Node]) -> list[int]:
    """Sizes of the bins: one per node and GPU vendor, one per cpu device."""
    out = []
    for node in nodes:
        by_vendor: dict[str, int] = {}
        for gpu in node.gpus:
            if gpu.vendor == "cpu":
                out.append(gpu.capacity)
            else:
                by_vendor[gpu.vendor] = by_vendor.get(gpu.vendor, 0) + gpu.capacity
        out.extend(by_vendor.values())
    return out


def max_first_replicas(nodes: list[Node], models: list[ModelSpec]) -> int:
    """The most models that can have an instance at once (exhaustive branch and bound)."""
    if any(m.split_overhead for m in models):
        raise ValueError("the exact solver assumes no split overhead")
    sizes = tuple(sorted((m.vram for m in models if m.replicas > 0), reverse=True))

    @cache
    def best(i: int, rooms: tuple[int, ...]) -> int:
        if i == len(sizes):
            return 0
        # skipping item i is always allowed
        result = best(i + 1, rooms)
        for j, room in enumerate(rooms):
            if room >= sizes[i] and (j == 0 or rooms[j - 1] != room):
                rest = tuple(sorted(rooms[:j] + (room - sizes[i],) + rooms[j + 1 :]))
                result = max(result, 1 + best(i + 1, rest))
                if result == len(sizes) - i:
                    break  # every remaining item placed: cannot do better
        return result

    return best(0, tuple(sorted(bins(nodes))))


def first_fit_decreasing(nodes: list[Node], models: list[ModelSpec]) -> int:
    """First replicas placed by first-fit decreasing over the same bins (the usual baseline)."""
    rooms = bins(nodes)
    placed = 0
    for size in sorted((m.vram for m in models if m.replicas > 0), reverse=True):
        for j, room in enumerate(rooms):
            if room >= size:
                rooms[j] -= size
                placed += 1
                break
    return placed
