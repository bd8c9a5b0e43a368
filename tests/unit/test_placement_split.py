"""placement/split.py: split plans over several nodes. Hard rules checked on every plan
(no device over its capacity, every slot placed once, bytes as the profile gives them, at
least two nodes); the fewest nodes against a brute force on small instances; one node
preferred under "auto"; the modes; stable plans; a dead helper re-placed."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement import Gpu, ModelSpec, Node, Plan, solve
from placement.model import TOO_LARGE
from placement.split import (
    LayerProfile,
    Split,
    _fixed,
    _order,
    _parts_bytes,
    devices_of,
    plan_split,
)

MiB = 1 << 20
SMOL = Path.home() / ".cache/aivailable/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def profile(n_layers=6, layer=10 * MiB, output=8 * MiB, compute=4 * MiB, overhead=2 * MiB):
    return LayerProfile((layer,) * n_layers, output, compute, compute + 2 * MiB, overhead)


def single_need(p: LayerProfile) -> int:
    return sum(p.slots) + p.compute_output + p.overhead


def spec(p: LayerProfile, name="m", split="auto", replicas=1, priority=0) -> ModelSpec:
    return ModelSpec(name, single_need(p), replicas, priority, p.compute, split, p)


def nodes_of(*capacities: int, vendor="fake") -> list[Node]:
    return [Node(f"n{i}", (Gpu(f"n{i}/gpu0", vendor, "G", c),)) for i, c in enumerate(capacities)]


def check_rules(plan: Plan, nodes: list[Node], specs: list[ModelSpec]) -> None:
    capacity = {g.id: g.capacity for n in nodes for g in n.gpus}
    for gpu, used in plan.used().items():
        assert used <= capacity[gpu], f"{gpu} over capacity"
    by_name = {s.name: s for s in specs}
    for split in plan.splits:
        p = by_name[split.model].layers
        assert len(split.nodes) >= 2 and split.primary in split.nodes
        assert sum(part.layers for part in split.parts) == len(p.slots)
        assert all(part.layers > 0 for part in split.parts)
        found = {d.gpu: d for ds in devices_of(nodes, {}).values() for d in ds}
        devices = [found[part.gpu] for part in split.parts]
        assert _order(devices, split.primary) == devices  # llama.cpp's layer order
        bytes_ = _parts_bytes(p, devices, [part.layers for part in split.parts])
        assert bytes_ == [part.vram for part in split.parts]
    for s in specs:
        placed = len(plan.for_model(s.name)) + sum(x.model == s.name for x in plan.splits)
        assert placed <= s.replicas
        hosts = [a.node for a in plan.for_model(s.name)]
        hosts += [n for x in plan.splits if x.model == s.name for n in x.nodes]
        assert len(hosts) == len(set(hosts)), "instances of one model share a node"


def brute_force_fits(p: LayerProfile, nodes: list[Node], k: int) -> bool:
    """Some k nodes hold the model split (any primary, any slot counts)."""
    devices = devices_of(nodes, {})
    for chosen in itertools.combinations(sorted(devices), k):
        pool = [d for n in chosen for d in devices[n]]
        for primary in chosen:
            ordered = _order(pool, primary)
            n = len(p.slots)
            for cuts in itertools.combinations(range(n + 1), len(ordered) - 1):
                bounds = (0, *cuts, n)
                counts = [b - a for a, b in itertools.pairwise(bounds)]
                if not all(counts):
                    continue
                used = _parts_bytes(p, ordered, counts)
                if all(u <= d.free for u, d in zip(used, ordered, strict=True)):
                    return True
    return False


def test_a_model_that_fits_one_node_is_not_split():
    p = profile()
    plan = solve(nodes_of(200 * MiB, 50 * MiB), [spec(p)])
    assert plan.splits == () and len(plan.assignments) == 1


def test_too_large_for_any_node_is_split_over_two_in_proportion_to_room():
    p = profile()  # needs 6*10 + 8 + 6 + 2 = 76 MiB on one device
    nodes = nodes_of(50 * MiB, 50 * MiB, 50 * MiB)
    plan = solve(nodes, [spec(p)])
    assert plan.assignments == () and plan.unplaced == ()
    (split,) = plan.splits
    assert len(split.nodes) == 2 and split.primary == "n0"
    assert [part.layers for part in split.parts] == [4, 3]  # the output device pays more
    check_rules(plan, nodes, [spec(p)])


def test_never_leaves_it_unplaced_and_always_splits_what_would_fit():
    p = profile()
    nodes = nodes_of(50 * MiB, 50 * MiB)
    never = solve(nodes, [spec(p, split="never")])
    assert never.splits == () and never.unplaced[0].reason == TOO_LARGE
    big = nodes_of(500 * MiB, 500 * MiB)
    always = solve(big, [spec(p, split="always")])
    assert len(always.splits) == 1 and always.assignments == ()
    check_rules(always, big, [spec(p, split="always")])


def test_the_fewest_nodes_are_used():
    p = profile(n_layers=8)
    nodes = nodes_of(30 * MiB, 30 * MiB, 70 * MiB, 40 * MiB, 30 * MiB)
    (split,) = solve(nodes, [spec(p)]).splits
    assert set(split.nodes) == {"n2", "n3"}


def test_a_gpu_primary_keeps_the_output_head_last():
    p = profile()
    nodes = nodes_of(60 * MiB, 40 * MiB, vendor="nvidia")
    (split,) = solve(nodes, [spec(p)]).splits
    assert split.primary == "n0" and split.parts[-1].node == "n0"


def test_a_dead_helper_is_replaced_and_the_primary_stays():
    p = profile()
    nodes = nodes_of(50 * MiB, 45 * MiB, 40 * MiB)
    plan = solve(nodes, [spec(p)])
    (split,) = plan.splits
    helper = split.helpers[0]
    survivors = [n for n in nodes if n.id != helper]
    again = solve(survivors, [spec(p)], plan)
    (new,) = again.splits
    assert new.primary == split.primary and helper not in new.nodes
    check_rules(again, survivors, [spec(p)])


def test_a_split_goes_to_one_node_once_one_fits_while_it_still_runs():
    p = profile()
    nodes = nodes_of(50 * MiB, 50 * MiB)
    plan = solve(nodes, [spec(p)])
    assert plan.splits
    bigger = [*nodes, Node("n9", (Gpu("n9/gpu0", "fake", "G", 100 * MiB),))]
    moved = solve(bigger, [spec(p)], plan)
    assert moved.splits == () and moved.assignments[0].node == "n9"


def test_plan_round_trips_with_its_splits():
    p = profile()
    plan = solve(nodes_of(50 * MiB, 50 * MiB), [spec(p)])
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Split.from_dict(plan.splits[0].to_dict()) == plan.splits[0]


def test_uniform_profile_from_totals():
    u = LayerProfile.uniform(330 * MiB, 30 * MiB, n_slots=31)
    assert len(u.slots) == 31 and sum(u.slots) <= 300 * MiB


@pytest.mark.skipif(not SMOL.exists(), reason="the embedded model is not fetched")
def test_smollm2_profile_adds_up_to_its_estimate():
    from placement import estimate
    from placement.estimate import layer_profile

    e = estimate(SMOL, 2048, 1)
    lp = layer_profile(SMOL, 2048, 1)
    assert len(lp.layers) == 30
    assert sum(lp.slots) + lp.compute_output + lp.overhead == e.total
    assert lp.compute < lp.compute_output == e.compute


capacities = st.lists(st.integers(5, 120).map(lambda m: m * MiB), min_size=2, max_size=5)
profiles = st.builds(
    profile,
    n_layers=st.integers(2, 6),
    layer=st.integers(1, 20).map(lambda m: m * MiB),
    output=st.integers(1, 20).map(lambda m: m * MiB),
    compute=st.integers(0, 8).map(lambda m: m * MiB),
    overhead=st.integers(0, 4).map(lambda m: m * MiB),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(caps=capacities, p=profiles, mode=st.sampled_from(["auto", "always"]))
def test_properties_rules_fewest_nodes_one_node_first_stable(caps, p, mode):
    nodes = nodes_of(*caps)
    specs = [spec(p, split=mode)]
    plan = solve(nodes, specs)
    check_rules(plan, nodes, specs)
    one_fits = max(caps) >= single_need(p)
    if mode == "auto" and one_fits:
        assert plan.splits == () and len(plan.assignments) == 1
    if plan.splits:
        k = len(plan.splits[0].nodes)
        assert not any(brute_force_fits(p, nodes, j) for j in range(2, k))
    elif not (mode == "auto" and one_fits):
        assert not any(brute_force_fits(p, nodes, j) for j in range(2, len(nodes) + 1))
    assert solve(nodes, specs, plan) == plan  # nothing changed: nothing moves


@settings(max_examples=60, deadline=None)
@given(caps=capacities, p=profiles, small=st.integers(1, 60).map(lambda m: m * MiB))
def test_properties_with_other_models_beside_the_split(caps, p, small):
    nodes = nodes_of(*caps)
    other = ModelSpec("other", small, replicas=2)
    specs = [spec(p, name="big"), other]
    plan = solve(nodes, specs)
    check_rules(plan, nodes, specs)
    assert solve(nodes, specs, plan) == plan


def test_fixed_costs_differ_for_the_output_device():
    p = profile()
    assert _fixed(p, True) - _fixed(p, False) == 2 * MiB
    assert plan_split("m", p, nodes_of(10 * MiB, 10 * MiB), {}) is None
