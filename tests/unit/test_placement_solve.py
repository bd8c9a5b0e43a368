"""placement.solve() and placement.diff() on small hand-made clusters."""

from __future__ import annotations

import pytest

from placement import (
    OUT_OF_CAPACITY,
    TOO_FEW_NODES,
    TOO_LARGE,
    Assignment,
    Gpu,
    ModelSpec,
    Node,
    Plan,
    Unplaced,
    diff,
    solve,
)

G = 1 << 30


def node(name: str, *caps: int, vendor: str = "nvidia", cpu: int = 0) -> Node:
    gpus = [Gpu(f"{name}/gpu{i}", vendor, "card", c * G) for i, c in enumerate(caps)]
    if cpu:
        gpus.append(Gpu(f"{name}/cpu", "cpu", "cpu", cpu * G))
    return Node(name, tuple(gpus))


def where(plan: Plan, model: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(a.node, a.gpus) for a in plan.for_model(model)]


def test_a_model_too_big_for_one_gpu_is_split_in_proportion_to_free_memory():
    plan = solve([node("a", 8, 4)], [ModelSpec("m", 9 * G)])
    (a,) = plan.assignments
    assert a.gpus == ("a/gpu0", "a/gpu1")
    assert a.vram == (6 * G, 3 * G)
    assert a.tensor_split == pytest.approx((2 / 3, 1 / 3))


def test_a_split_pays_the_overhead_on_each_extra_gpu():
    spec = ModelSpec("m", 12 * G, split_overhead=G)
    plan = solve([node("a", 8, 8)], [spec])
    assert sum(plan.assignments[0].vram) == 13 * G
    assert solve([node("a", 6, 6)], [spec]).unplaced == (Unplaced("m", 1, TOO_LARGE),)


def test_the_fewest_gpus_are_used_for_a_split():
    plan = solve([node("a", 8, 8, 8, 2)], [ModelSpec("m", 14 * G)])
    assert len(plan.assignments[0].gpus) == 2


def test_one_whole_gpu_anywhere_beats_a_split():
    plan = solve([node("a", 4, 4), node("b", 6)], [ModelSpec("m", 5 * G)])
    assert where(plan, "m") == [("b", ("b/gpu0",))]


def test_an_instance_never_spans_vendors_or_nodes():
    mixed = Node("a", (Gpu("a/n", "nvidia", "x", 4 * G), Gpu("a/r", "amd", "y", 4 * G)))
    plan = solve([mixed, node("b", 4)], [ModelSpec("m", 6 * G)])
    assert plan.unplaced == (Unplaced("m", 1, TOO_LARGE),)


def test_the_cpu_hosts_only_whole_models_and_only_as_a_last_resort():
    nodes = [node("a", 4, cpu=32), node("b", 8)]
    plan = solve(nodes, [ModelSpec("small", 3 * G), ModelSpec("mid", 6 * G)])
    assert where(plan, "small") == [("a", ("a/gpu0",))]
    assert where(plan, "mid") == [("b", ("b/gpu0",))]
    plan = solve([node("a", 4, cpu=32)], [ModelSpec("big", 10 * G)])
    assert where(plan, "big") == [("a", ("a/cpu",))]
    # 4 GiB GPU + 4 GiB cpu would hold 6 GiB only by mixing them: never.
    plan = solve([node("a", 4, cpu=4)], [ModelSpec("m", 6 * G)])
    assert plan.unplaced == (Unplaced("m", 1, TOO_LARGE),)


def test_a_node_without_a_cpu_device_never_runs_models_on_its_cpu():
    plan = solve([node("a", 2)], [ModelSpec("m", 3 * G)])
    assert plan.assignments == () and plan.unplaced[0].reason == TOO_LARGE


def test_first_replicas_before_extra_replicas():
    plan = solve([node("a", 8), node("b", 8)], [ModelSpec("x", 8 * G, 2), ModelSpec("y", 8 * G)])
    assert len(plan.for_model("x")) == 1 and len(plan.for_model("y")) == 1
    assert plan.unplaced == (Unplaced("x", 1, OUT_OF_CAPACITY),)


def test_higher_priority_first():
    models = [ModelSpec("low", 6 * G), ModelSpec("high", 6 * G, priority=5)]
    plan = solve([node("a", 8)], models)
    assert where(plan, "high") and plan.unplaced == (Unplaced("low", 1, OUT_OF_CAPACITY),)


def test_a_new_higher_priority_model_displaces_a_running_lower_one():
    old = solve([node("a", 8)], [ModelSpec("low", 6 * G)])
    models = [ModelSpec("low", 6 * G), ModelSpec("high", 6 * G, priority=1)]
    assert where(solve([node("a", 8)], models, current=old), "high")
    kept = solve([node("a", 8)], models, current=old, rebalance=False)
    assert where(kept, "low") and not where(kept, "high")


def test_making_room_for_a_new_model_moves_as_few_instances_as_it_can():
    nodes = [node(n, 10) for n in "abcd"]
    models = [ModelSpec(n, 4 * G) for n in "PQRSTU"]
    old = solve(nodes, models, policy="spread")  # two nodes with two, two with one
    new = solve(nodes, [*models, ModelSpec("M", 9 * G)], current=old)
    assert not new.unplaced  # M needs a whole node: one single instance must move over
    assert len(set(old.assignments) - set(new.assignments)) == 1


def test_most_models_fit_when_the_small_ones_go_first():
    # One 10 GiB model or three 3 GiB ones: the three count more.
    models = [ModelSpec("big", 10 * G), *(ModelSpec(f"s{i}", 3 * G) for i in range(3))]
    plan = solve([node("a", 10)], models)
    assert {a.model for a in plan.assignments} == {"s0", "s1", "s2"}


def test_replicas_go_to_distinct_nodes():
    plan = solve([node("a", 24), node("b", 4)], [ModelSpec("m", 2 * G, replicas=3)])
    assert sorted(a.node for a in plan.assignments) == ["a", "b"]
    assert plan.unplaced == (Unplaced("m", 1, TOO_FEW_NODES),)


def test_pack_keeps_the_large_hole_for_a_large_model():
    nodes = [node("a", 4), node("b", 8)]
    first = solve(nodes, [ModelSpec("small", 3 * G)])
    assert where(first, "small") == [("a", ("a/gpu0",))]
    both = solve(nodes, [ModelSpec("small", 3 * G), ModelSpec("large", 7 * G)], current=first)
    assert not both.unplaced and set(first.assignments) <= set(both.assignments)


def test_spread_balances_nodes_and_pack_fills_one():
    nodes, models = [node("a", 8), node("b", 8)], [ModelSpec("x", 2 * G), ModelSpec("y", 2 * G)]
    assert len({a.node for a in solve(nodes, models, policy="spread").assignments}) == 2
    assert len({a.node for a in solve(nodes, models, policy="pack").assignments}) == 1


def test_a_shrunken_gpu_or_a_changed_model_is_placed_again():
    nodes = [node("a", 8), node("b", 8)]
    old = solve(nodes, [ModelSpec("m", 6 * G)])
    (host,) = where(old, "m")
    shrunk = [node(n.id, 4 if n.id == host[0] else 8) for n in nodes]
    moved = solve(shrunk, [ModelSpec("m", 6 * G)], current=old)
    assert where(moved, "m") and where(moved, "m") != [host]
    grown = solve(nodes, [ModelSpec("m", 7 * G)], current=old)
    assert grown.assignments[0].vram == (7 * G,)


def test_fewer_replicas_or_fewer_models_stop_only_what_is_dropped():
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    old = solve(nodes, [ModelSpec("m", 2 * G, replicas=3), ModelSpec("z", 2 * G)])
    new = solve(nodes, [ModelSpec("m", 2 * G, replicas=2)], current=old)
    assert len(new.assignments) == 2 and set(new.assignments) <= set(old.assignments)
    changes = diff(old, new)
    assert sum(len(d.start) for d in changes.values()) == 0
    assert sum(len(d.stop) for d in changes.values()) == 2


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        solve([node("a", 8)], [], policy="random")
    with pytest.raises(ValueError):
        solve([node("a", 8), node("a", 4)], [])
    with pytest.raises(ValueError):
        solve([node("a", 8)], [ModelSpec("m", G), ModelSpec("m", 2 * G)])
    with pytest.raises(ValueError):
        Gpu("x", "3dfx", "voodoo", G)  # type: ignore[arg-type]


def test_an_empty_cluster_places_nothing_and_says_why():
    plan = solve([], [ModelSpec("m", G, replicas=2)])
    assert plan == Plan((), (Unplaced("m", 2, TOO_LARGE),))
    assert solve([node("a", 8)], []) == Plan()


def test_diff_restarts_an_instance_whose_split_changed():
    a1 = Assignment("m", "a", ("a/gpu0", "a/gpu1"), (6 * G, 3 * G))
    a2 = Assignment("m", "a", ("a/gpu0", "a/gpu1"), (5 * G, 4 * G))
    keep = Assignment("k", "b", ("b/gpu0",), (G,))
    changes = diff(Plan((a1, keep)), Plan((a2, keep)))
    assert list(changes) == ["a"]
    assert changes["a"].steps() == (("stop", a1), ("start", a2))
    assert diff(None, Plan((keep,)))["b"].start == (keep,)
