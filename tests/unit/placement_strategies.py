"""Random clusters and model lists for the placement tests (hypothesis strategies and seeded)."""

from __future__ import annotations

from random import Random

from hypothesis import strategies as st

from placement import Gpu, ModelSpec, Node

GIB = 1 << 30
UNIT = GIB // 4  # sizes are multiples of 256 MiB, so ties and exact fits happen often


@st.composite
def nodes_st(draw, max_nodes: int = 6, min_nodes: int = 0) -> list[Node]:
    count = draw(st.integers(min_nodes, max_nodes))
    nodes = []
    for i in range(count):
        gpus = []
        for j in range(draw(st.integers(0, 3))):
            vendor = draw(st.sampled_from(["nvidia", "nvidia", "amd", "fake"]))
            cap = draw(st.integers(0, 48)) * UNIT
            gpus.append(Gpu(f"n{i}/gpu{j}", vendor, f"{vendor}-{j}", cap))
        if draw(st.integers(0, 4)) == 0:
            gpus.append(Gpu(f"n{i}/cpu", "cpu", "cpu", draw(st.integers(0, 64)) * UNIT))
        nodes.append(Node(f"n{i}", tuple(gpus)))
    return nodes


@st.composite
def models_st(draw, max_models: int = 10, overhead: bool = True) -> list[ModelSpec]:
    count = draw(st.integers(0, max_models))
    return [
        ModelSpec(
            f"m{i}",
            vram=draw(st.integers(1, 64)) * UNIT,
            replicas=draw(st.integers(0, 3)),
            priority=draw(st.integers(0, 2)),
            split_overhead=draw(st.sampled_from([0, 0, UNIT])) if overhead else 0,
        )
        for i in range(count)
    ]


def random_instance(
    rng: Random, max_nodes: int = 6, max_models: int = 10
) -> tuple[list[Node], list[ModelSpec]]:
    """A seeded random instance: up to max_nodes mixed nodes, up to max_models models."""
    nodes = []
    for i in range(rng.randint(1, max_nodes)):
        gpus = []
        for j in range(rng.randint(1, 3)):
            vendor = rng.choice(["nvidia", "nvidia", "amd"])
            gpus.append(Gpu(f"n{i}/gpu{j}", vendor, vendor, rng.randint(2, 24) * UNIT))
        if rng.random() < 0.15:
            gpus.append(Gpu(f"n{i}/cpu", "cpu", "cpu", rng.randint(8, 64) * UNIT))
        nodes.append(Node(f"n{i}", tuple(gpus)))
    models = [
        ModelSpec(f"m{i}", vram=rng.randint(1, 40) * UNIT, replicas=rng.randint(1, 3))
        for i in range(rng.randint(1, max_models))
    ]
    return nodes, models
