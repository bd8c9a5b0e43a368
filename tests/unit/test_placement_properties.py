"""Properties of placement.solve() on random clusters (hypothesis): DESIGN.md's hard rules,
determinism, stability under unchanged input, node loss and node join, and diff()."""

from __future__ import annotations

import os
from collections import Counter
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement import (
    OUT_OF_CAPACITY,
    TOO_FEW_NODES,
    TOO_LARGE,
    Gpu,
    ModelSpec,
    Node,
    Plan,
    diff,
    solve,
)
from tests.unit.placement_strategies import models_st, nodes_st

# PLACEMENT_EXAMPLES raises the count for a long soak; 150 keeps the suite quick.
EXAMPLES = int(os.environ.get("PLACEMENT_EXAMPLES", "150"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
POLICY = st.sampled_from(["pack", "spread"])


def check_hard_rules(nodes: list[Node], models: list[ModelSpec], plan: Plan) -> None:
    gpus = {g.id: (n.id, g) for n in nodes for g in n.gpus}
    specs = {m.name: m for m in models}
    for gpu_id, used in plan.used().items():
        assert used <= gpus[gpu_id][1].capacity, f"{gpu_id} over capacity"
    for a in plan.assignments:
        spec = specs[a.model]
        assert all(gpus[g][0] == a.node for g in a.gpus), "an instance spans nodes"
        vendors = {gpus[g][1].vendor for g in a.gpus}
        assert len(vendors) == 1, "an instance spans vendors"
        if vendors == {"cpu"}:
            assert len(a.gpus) == 1, "cpu device split"
        assert len(set(a.gpus)) == len(a.gpus)
        assert min(a.vram) >= 0 and sum(a.vram) == spec.need(len(a.gpus))
    placed = Counter(a.model for a in plan.assignments)
    for name, count in placed.items():
        hosts = [a.node for a in plan.for_model(name)]
        assert len(set(hosts)) == len(hosts), f"two replicas of {name} on one node"
        assert count <= specs[name].replicas
    missing = {u.model: u for u in plan.unplaced}
    for m in models:
        got = placed.get(m.name, 0)
        if got < m.replicas:
            u = missing[m.name]
            assert u.missing_replicas == m.replicas - got
            assert u.reason in (TOO_LARGE, OUT_OF_CAPACITY, TOO_FEW_NODES)
        else:
            assert m.name not in missing


def fits_some_empty_node(spec: ModelSpec, node: Node) -> bool:
    """Independent check: could one instance go on this node if it were empty?"""
    if any(g.capacity >= spec.vram for g in node.gpus):
        return True
    for vendor in {g.vendor for g in node.gpus} - {"cpu"}:
        caps = sorted((g.capacity for g in node.gpus if g.vendor == vendor), reverse=True)
        if any(sum(caps[:k]) >= spec.need(k) for k in range(2, len(caps) + 1)):
            return True
    return False


@SETTINGS
@given(nodes_st(), models_st(), POLICY)
def test_hard_rules_hold(nodes, models, policy):
    check_hard_rules(nodes, models, solve(nodes, models, policy=policy))


@SETTINGS
@given(nodes_st(), models_st())
def test_reasons_say_why(nodes, models):
    plan = solve(nodes, models)
    for u in plan.unplaced:
        spec = next(m for m in models if m.name == u.model)
        hosts = [n for n in nodes if fits_some_empty_node(spec, n)]
        if u.reason == TOO_LARGE:
            assert not hosts
        else:
            assert hosts
        if u.reason == TOO_FEW_NODES:
            assert len(hosts) < spec.replicas


@SETTINGS
@given(nodes_st(), models_st(), POLICY, st.integers(0, 2**32))
def test_deterministic_whatever_the_input_order(nodes, models, policy, seed):
    rng = Random(seed)
    shuffled_nodes = [Node(n.id, tuple(rng.sample(n.gpus, len(n.gpus)))) for n in nodes]
    rng.shuffle(shuffled_nodes)
    shuffled_models = rng.sample(models, len(models))
    plan = solve(nodes, models, policy=policy)
    assert solve(shuffled_nodes, shuffled_models, policy=policy) == plan
    assert solve(nodes, models, policy=policy) == plan


@SETTINGS
@given(nodes_st(), models_st(), POLICY)
def test_unchanged_input_gives_the_identical_plan(nodes, models, policy):
    plan = solve(nodes, models, policy=policy)
    again = solve(nodes, models, current=plan, policy=policy)
    assert again == plan
    assert diff(plan, again) == {}


@SETTINGS
@given(nodes_st(min_nodes=1), models_st(), models_st(), POLICY, st.data())
def test_a_plan_reached_after_any_change_is_stable(nodes, models_a, models_b, policy, data):
    before = solve(nodes, models_a, policy=policy)
    gone = data.draw(st.sampled_from(nodes)).id
    rest = [n for n in nodes if n.id != gone]
    for now_nodes, now_models in ((nodes, models_b), (rest, models_a), (rest, models_b)):
        plan = solve(now_nodes, now_models, current=before, policy=policy)
        assert solve(now_nodes, now_models, current=plan, policy=policy) == plan


@SETTINGS
@given(nodes_st(min_nodes=1), models_st(), POLICY, st.data())
def test_removing_a_node_moves_only_its_instances(nodes, models, policy, data):
    plan = solve(nodes, models, policy=policy)
    gone = data.draw(st.sampled_from(nodes)).id
    rest = [n for n in nodes if n.id != gone]
    survivors = {a for a in plan.assignments if a.node != gone}

    strict = solve(rest, models, current=plan, policy=policy, rebalance=False)
    check_hard_rules(rest, models, strict)
    assert survivors <= set(strict.assignments)

    # With rebalancing (the default) survivors may move only to serve more models: a model
    # left without any instance (by priority), never just for an extra replica.
    after = solve(rest, models, current=plan, policy=policy)
    check_hard_rules(rest, models, after)
    if not survivors <= set(after.assignments):
        assert served(after, models) > served(strict, models)


def served(plan: Plan, models: list[ModelSpec]) -> tuple[int, ...]:
    return placed_by_level(plan, models)[: len({m.priority for m in models})]


def placed_by_level(plan: Plan, models: list[ModelSpec]) -> tuple[int, ...]:
    count = Counter(a.model for a in plan.assignments)
    levels = sorted({m.priority for m in models}, reverse=True)
    firsts = [sum(min(count[m.name], 1) for m in models if m.priority == p) for p in levels]
    extras = [sum(max(count[m.name] - 1, 0) for m in models if m.priority == p) for p in levels]
    return (*firsts, *extras)


@SETTINGS
@given(nodes_st(), models_st(), POLICY, st.integers(1, 48))
def test_a_joining_node_moves_nothing_unless_something_was_unplaced(nodes, models, policy, cap):
    plan = solve(nodes, models, policy=policy)
    new = Node("zz-new", (Gpu("zz-new/gpu0", "nvidia", "new", cap << 28),))
    after = solve([*nodes, new], models, current=plan, policy=policy)
    check_hard_rules([*nodes, new], models, after)
    if not plan.unplaced:
        assert after == plan
    else:
        assert placed_by_level(after, models) >= placed_by_level(plan, models)
        moved = set(plan.assignments) - set(after.assignments)
        if moved:
            assert served(after, models) > served(plan, models)


@SETTINGS
@given(nodes_st(), models_st(), models_st(), POLICY)
def test_diff_turns_the_old_plan_into_the_new(nodes, models_a, models_b, policy):
    old = solve(nodes, models_a, policy=policy)
    new = solve(nodes, models_b, current=old, policy=policy)
    changes = diff(old, new)
    running = set(old.assignments)
    for node, d in changes.items():
        kinds = [kind for kind, _ in d.steps()]
        assert kinds == sorted(kinds, key=lambda k: k != "stop"), "a start before a stop"
        assert all(a.node == node for a in (*d.stop, *d.start))
        assert set(d.stop) <= running
        running -= set(d.stop)
        assert not set(d.start) & running
        running |= set(d.start)
    assert running == set(new.assignments)


@pytest.mark.parametrize("policy", ["pack", "spread"])
def test_plans_survive_a_round_trip_through_dicts(policy):
    nodes = [Node("a", (Gpu("a/0", "nvidia", "x", 8 << 30), Gpu("a/1", "nvidia", "x", 8 << 30)))]
    plan = solve(nodes, [ModelSpec("m", 12 << 30), ModelSpec("z", 90 << 30)], policy=policy)
    assert Plan.from_dict(plan.to_dict()) == plan
