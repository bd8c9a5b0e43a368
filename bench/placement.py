"""Benchmark placement.solve(): time, quality against an exact solver and first-fit decreasing,
VRAM utilisation.

    python bench/placement.py [--quick] [--seed N]

Clusters are mixes of old and new GPUs (GTX 1080 ... RTX 3090, RX 580, MI25), 1-4 per node,
some nodes of two vendors; models are 0.5-40 GiB with 1-2 replicas, asked for at about 110%
of the cluster's VRAM so that some must stay unplaced. Times are wall-clock per solve() call
(median and 95th percentile over repeats) on this machine; they are reported, never asserted.
Writes bench/results/placement.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from random import Random

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from placement import Gpu, ModelSpec, Node, solve  # noqa: E402
from tests.unit.placement_exact import first_fit_decreasing, max_first_replicas  # noqa: E402
from tests.unit.placement_strategies import random_instance  # noqa: E402

GIB = 1 << 30
CARDS = [  # (vendor, name, usable GiB after the runtime's own share and headroom)
    ("nvidia", "GTX 1080", 7),
    ("nvidia", "GTX 1080 Ti", 10),
    ("nvidia", "RTX 2080", 7),
    ("nvidia", "Tesla P40", 22),
    ("nvidia", "RTX 3090", 22),
    ("nvidia", "Tesla V100", 15),
    ("amd", "RX 580", 7),
    ("amd", "Instinct MI25", 15),
]
MODEL_SIZES_GIB = [0.5, 1, 1.5, 2, 3, 4.5, 5, 6, 8, 9, 12, 14, 18, 20, 26, 40]


def cluster(rng: Random, n_nodes: int, n_models: int) -> tuple[list[Node], list[ModelSpec]]:
    nodes = []
    for i in range(n_nodes):
        main_vendor = rng.choice(["nvidia", "nvidia", "amd"])
        vendor_cards = [c for c in CARDS if c[0] == main_vendor]
        gpus = []
        for j in range(rng.randint(1, 4)):
            vendor, name, gib = rng.choice(vendor_cards if rng.random() < 0.9 else CARDS)
            gpus.append(Gpu(f"n{i:03}/gpu{j}", vendor, name, gib * GIB))
        nodes.append(Node(f"n{i:03}", tuple(gpus)))
    capacity = sum(g.capacity for n in nodes for g in n.gpus)
    models = []
    for k in range(n_models):
        size = int(rng.choice(MODEL_SIZES_GIB) * GIB)
        models.append(ModelSpec(f"m{k:03}", size, rng.choice([1, 1, 2]), rng.choice([0, 0, 1])))
    # scale the asks to about 110% of the cluster
    demand = sum(m.vram * m.replicas for m in models)
    factor = 1.1 * capacity / demand
    models = [
        ModelSpec(m.name, max(GIB // 4, int(m.vram * factor)), m.replicas, m.priority)
        for m in models
    ]
    return nodes, models


def timed(fn, repeats: int) -> tuple[float, float, float, object]:
    """(median wall ms, worst wall ms, median CPU ms, result). The CPU time of this process
    is what to compare on a shared machine: wall time also counts waiting for a core."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    return (
        statistics.median(walls) * 1000,
        max(walls) * 1000,
        statistics.median(cpus) * 1000,
        result,
    )


def first_replicas(plan) -> int:
    return len({a.model for a in plan.assignments})


def run_size(n_nodes: int, n_models: int, clusters: int, repeats: int, seed: int) -> dict:
    rng = Random(seed)
    keys = ("fresh", "worst", "cpu", "same", "node_lost", "moved", "spread", "util", "placed")
    keys += ("ffd",)
    rows = {k: [] for k in keys}
    for _ in range(clusters):
        nodes, models = cluster(rng, n_nodes, n_models)
        wall, worst, cpu, plan = timed(lambda n=nodes, m=models: solve(n, m), repeats)
        rows["fresh"].append(wall)
        rows["worst"].append(worst)
        rows["cpu"].append(cpu)
        rows["same"].append(timed(lambda n=nodes, m=models, p=plan: solve(n, m, p), repeats)[2])
        rest = nodes[1:]
        lost = timed(lambda r=rest, m=models, p=plan: solve(r, m, p), repeats)
        rows["node_lost"].append(lost[2])
        survivors = {a for a in plan.assignments if a.node != nodes[0].id}
        rows["moved"].append(len(survivors - set(lost[3].assignments)))
        spread = timed(lambda n=nodes, m=models: solve(n, m, policy="spread"), repeats)
        rows["spread"].append(spread[2])
        capacity = sum(g.capacity for n in nodes for g in n.gpus)
        rows["util"].append(sum(plan.used().values()) / capacity)
        rows["placed"].append(first_replicas(plan) / len(models))
        # against first-fit decreasing: without priorities, which FFD does not know
        flat = [ModelSpec(m.name, m.vram, m.replicas) for m in models]
        ffd = first_fit_decreasing(nodes, flat)
        rows["ffd"].append(first_replicas(solve(nodes, flat)) / ffd if ffd else 1.0)
    return {
        "nodes": n_nodes,
        "models": n_models,
        "clusters": clusters,
        "solve_cpu_ms_median": statistics.median(rows["cpu"]),
        "solve_wall_ms_median": statistics.median(rows["fresh"]),
        "solve_wall_ms_worst": max(rows["worst"]),
        "resolve_unchanged_cpu_ms": statistics.median(rows["same"]),
        "resolve_node_lost_cpu_ms": statistics.median(rows["node_lost"]),
        "node_lost_other_instances_moved": statistics.mean(rows["moved"]),
        "solve_spread_cpu_ms": statistics.median(rows["spread"]),
        "vram_utilisation": statistics.mean(rows["util"]),
        "first_replicas_placed": statistics.mean(rows["placed"]),
        "first_replicas_vs_ffd": statistics.mean(rows["ffd"]),
    }


def run_quality(count: int, seed: int) -> dict:
    rng = Random(seed)
    at_opt = ffd_at_opt = 0
    worst = ffd_worst = 1.0
    for _ in range(count):
        nodes, models = random_instance(rng)
        best = max_first_replicas(nodes, models)
        got = first_replicas(solve(nodes, models))
        ffd = first_fit_decreasing(nodes, models)
        at_opt += got == best
        ffd_at_opt += ffd == best
        if best:
            worst, ffd_worst = min(worst, got / best), min(ffd_worst, ffd / best)
    return {
        "instances": count,
        "solve_at_optimum": at_opt / count,
        "solve_worst_ratio": worst,
        "ffd_at_optimum": ffd_at_opt / count,
        "ffd_worst_ratio": ffd_worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clusters and repeats")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    clusters, repeats, quality_n = (2, 3, 500) if args.quick else (5, 7, 5000)
    sizes = [(10, 20), (50, 100), (200, 400)]
    results = [run_size(n, m, clusters, repeats, args.seed) for n, m in sizes]
    quality = run_quality(quality_n, args.seed)

    print(
        f"{'nodes x models':>15} {'cpu ms':>7} {'wall ms':>8} {'worst':>7} {'same':>6} "
        f"{'-1 node':>7} {'moved':>5} {'spread':>7} {'VRAM used':>9} {'placed':>7} {'vs FFD':>7}"
    )
    for r in results:
        print(
            f"{r['nodes']:>7} x {r['models']:<5} {r['solve_cpu_ms_median']:7.1f} "
            f"{r['solve_wall_ms_median']:8.1f} {r['solve_wall_ms_worst']:7.1f} "
            f"{r['resolve_unchanged_cpu_ms']:6.1f} {r['resolve_node_lost_cpu_ms']:7.1f} "
            f"{r['node_lost_other_instances_moved']:5.1f} "
            f"{r['solve_spread_cpu_ms']:7.1f} {r['vram_utilisation']:9.1%} "
            f"{r['first_replicas_placed']:7.1%} {r['first_replicas_vs_ffd']:7.3f}"
        )
    print(
        "(ms: median per solve() call; cpu = this process's CPU time, wall = elapsed, worst ="
        " slowest wall;\n same = re-solve with the plan as current, -1 node = after losing a"
        " node, moved = other nodes' instances it moved; spread = policy spread;\n placed ="
        " models with an instance; vs FFD = that, over first-fit decreasing's, without priorities)"
    )
    print(
        f"\nquality on {quality['instances']} random instances (<= 6 nodes, <= 10 models), "
        f"first replicas placed vs exact optimum:\n"
        f"  solve: at optimum {quality['solve_at_optimum']:.2%}, worst {quality['solve_worst_ratio']:.2f}"
        f"   first-fit decreasing: at optimum {quality['ffd_at_optimum']:.2%}, "
        f"worst {quality['ffd_worst_ratio']:.2f}"
    )
    out = ROOT / "bench" / "results" / "placement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"sizes": results, "quality": quality, "quick": args.quick}, indent=2)
    )
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
