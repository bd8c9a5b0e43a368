"""The controller: decide() re-places what must move and nothing else; the leader-only loop."""

import asyncio
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable import cluster_state as cs
from aivailable.cluster_state import ClusterState, ModelRecord
from aivailable.controller import (
    DEFAULT_MODEL_NAME,
    Controller,
    ControllerConfig,
    MemberClock,
    NodeStatus,
    Trigger,
    caught_up_learners,
    decide,
    model_file_updates,
    model_vram,
    raft_conf_hooks,
    registry_updates,
    usable_nodes,
)
from aivailable.membership_policy import MemberInfo
from placement import Gpu

GIB = 1 << 30
CFG = ControllerConfig(suspect_grace_s=5.0)
SHA = "ab" * 32


def node(nid: str, *gib: int, state="alive", since=0.0, files=()) -> NodeStatus:
    gpus = tuple(Gpu(f"{nid}/gpu{i}", "fake", f"Fake {g}G", g * GIB) for i, g in enumerate(gib))
    return NodeStatus(nid, state, since, gpus, "c", tuple(files))


def model(name: str, vram_gib: float, replicas=1, priority=0) -> ModelRecord:
    return ModelRecord(
        name,
        f"/m/{name}.gguf",
        replicas,
        2048,
        priority,
        vram=int(vram_gib * GIB),
        split_overhead=0,
    )


def test_first_plan_places_everything_and_an_unchanged_world_decides_nothing():
    nodes = [node("a", 8), node("b", 12), node("c")]
    models = [model("m1", 2, replicas=2), model("m2", 3)]
    plan = decide(models, nodes, None, 0.0, CFG)
    assert plan is not None and not plan.unplaced
    assert sorted(a.model for a in plan.assignments) == ["m1", "m1", "m2"]
    assert len({a.node for a in plan.for_model("m1")}) == 2
    assert decide(models, nodes, plan, 1.0, CFG) is None


def test_only_the_dead_nodes_instances_move():
    nodes = [node("a", 8), node("b", 8), node("c", 8), node("d", 8)]
    models = [model(f"m{i}", 2) for i in range(6)] + [model("r", 1, replicas=2)]
    plan = decide(models, nodes, None, 0.0, CFG)
    victim = plan.assignments[0].node
    nodes = [n if n.id != victim else node(victim, 8, state="dead", since=10.0) for n in nodes]
    new = decide(models, nodes, plan, 10.0, CFG)
    assert new is not None and not new.unplaced
    survivors = {a for a in plan.assignments if a.node != victim}
    assert survivors <= set(new.assignments)
    assert all(a.node != victim for a in new.assignments)
    assert len(new.assignments) == len(plan.assignments)


def test_a_suspect_node_keeps_its_instances_for_the_grace_then_loses_them():
    models = [model("m", 2)]
    plan = decide(models, [node("a", 8), node("b", 4)], None, 0.0, CFG)
    host = plan.assignments[0].node
    other = "b" if host == "a" else "a"
    sizes = {"a": 8, "b": 4}
    view = [node(host, sizes[host], state="suspect", since=100.0), node(other, sizes[other])]
    assert decide(models, view, plan, 104.0, CFG) is None
    moved = decide(models, view, plan, 105.0, CFG)
    assert [a.node for a in moved.assignments] == [other]


def test_usable_nodes_drops_dead_left_and_old_suspects():
    view = [
        node("a", 1),
        node("b", 1, state="suspect", since=9.0),
        node("c", 1, state="suspect", since=0.0),
        node("d", 1, state="dead"),
        node("e", 1, state="left"),
    ]
    assert [n.id for n in usable_nodes(view, 10.0, 5.0)] == ["a", "b"]


def test_a_model_that_fits_nowhere_is_reported_unplaced():
    plan = decide([model("huge", 100)], [node("a", 8)], None, 0.0, CFG)
    assert plan.assignments == () and plan.unplaced[0].model == "huge"


@dataclass(frozen=True)
class FakeEstimate:
    total: int
    split_overhead: int


def test_model_vram_prefers_the_committed_figure_then_the_header_then_the_size():
    rec = ModelRecord("m", "/m.gguf", n_ctx=1000, size=1000 * (1 << 20))
    assert model_vram(rec.__class__(**{**rec.__dict__, "vram": 5, "split_overhead": 2})) == (5, 2)
    seen = []

    def estimator(path, n_ctx):
        seen.append((path, n_ctx))
        return FakeEstimate(777, 11)

    assert model_vram(rec, Path("/x.gguf"), CFG, estimator) == (777, 11)
    assert seen == [(Path("/x.gguf"), 1000)]
    vram, split = model_vram(rec, None, CFG)
    assert (
        vram
        == int(rec.size * CFG.size_factor) + 1000 * CFG.kv_bytes_per_token + CFG.fallback_overhead
    )
    assert split == CFG.fallback_overhead
    # A header that cannot be read falls back to the size rather than failing the plan.
    assert model_vram(rec, Path("/x.gguf"), CFG, lambda p, n: 1 / 0)[0] == vram
    # Bigger files and longer contexts never get smaller estimates.
    bigger = ModelRecord("m", "/m.gguf", n_ctx=4000, size=2 * rec.size)
    assert model_vram(bigger, None, CFG)[0] > vram


def test_model_vram_of_the_real_embedded_model_from_its_header(embedded_model):
    gguf = embedded_model
    rec = ModelRecord("smollm2-135m", "builtin:smollm2-135m", n_ctx=2048, size=gguf.stat().st_size)
    exact, _ = model_vram(rec, gguf, CFG)
    safe, _ = model_vram(rec, None, CFG)
    assert gguf.stat().st_size < exact <= safe


def test_model_file_updates_learn_checksums_from_gossip_and_vram_on_the_leader(tmp_path):
    a = ModelRecord("a", "/m/a.gguf")
    b = ModelRecord("b", "/m/b.gguf")
    done = ModelRecord("c", "/m/c.gguf", sha256=SHA, size=1, vram=10, split_overhead=1)
    nodes = [
        node("n1", 8, files=[(SHA, 1234, "/m/a.gguf")]),
        node("n2", 8, state="dead", files=[(SHA, 9, "/m/b.gguf")]),
    ]
    local = tmp_path / "b.gguf"
    local.write_bytes(b"x" * 100)
    paths = {"b": local}
    cmds = model_file_updates(
        [a, b, done], nodes, lambda m: paths.get(m.name), CFG, lambda p, n: FakeEstimate(50, 5)
    )
    state = ClusterState()
    for rec in (a, b):
        state.apply(cs.encode_deploy(rec.name, rec.source), 1)
    # b: the leader has it but no one has reported its checksum yet (a dead node's word does
    # not count), so only a's facts are known.
    assert [state.apply(c, 1).ok for c in cmds] == [True]
    assert state.models["a"].sha256 == SHA and state.models["a"].size == 1234
    b2 = ModelRecord("b", "/m/b.gguf", sha256=SHA)
    cmds = model_file_updates([b2], [], lambda m: local, CFG, lambda p, n: FakeEstimate(50, 5))
    state.apply(cmds[0], 1)
    assert (state.models["b"].vram, state.models["b"].split_overhead, state.models["b"].size) == (
        50,
        5,
        100,
    )


def test_member_clock_remembers_when_a_state_began():
    clock = MemberClock()
    assert clock.since("a", "alive", 1.0) == 1.0
    assert clock.since("a", "alive", 5.0) == 1.0
    assert clock.since("a", "suspect", 6.0) == 6.0
    assert clock.since("a", "suspect", 9.0) == 6.0
    clock.forget_except([])
    assert clock.since("a", "suspect", 10.0) == 10.0


# ---- seeded random clusters: a dead node's instances move, nothing else does -------------


@st.composite
def worlds(draw):
    n_nodes = draw(st.integers(3, 6))
    nodes = [
        node(f"n{i}", *draw(st.lists(st.sampled_from([4, 8, 12, 24]), min_size=1, max_size=2)))
        for i in range(n_nodes)
    ]
    models = [
        model(
            f"m{i}",
            draw(st.sampled_from([0.5, 1, 2, 3])),
            replicas=draw(st.integers(1, 2)),
            priority=draw(st.integers(0, 2)),
        )
        for i in range(draw(st.integers(1, 6)))
    ]
    return nodes, models, draw(st.integers(0, n_nodes - 1))


@settings(max_examples=60, deadline=None)
@given(worlds())
def test_losing_a_node_moves_only_its_instances(world):
    nodes, models, victim_index = world
    plan = decide(models, nodes, None, 0.0, CFG)
    victim = nodes[victim_index].id
    view = [n if n.id != victim else NodeStatus(n.id, "dead", 1.0, n.gpus) for n in nodes]
    new = decide(models, view, plan, 2.0, CFG) or plan
    assert all(a.node != victim for a in new.assignments)
    kept = {a for a in plan.assignments if a.node != victim}
    if not new.unplaced:
        # Everything still fits: survivors stay exactly where they were.
        assert kept <= set(new.assignments)
    else:
        # Something no longer fits: moving a survivor is allowed only to place strictly more.
        assert kept <= set(new.assignments) or len(new.assignments) > len(kept)
    # And with nobody dead, the plan stands.
    assert decide(models, nodes, plan, 3.0, CFG) is None


# ---- the loop ------------------------------------------------------------------------------


class Harness:
    def __init__(self, nodes, leader=True):
        self.state = ClusterState()
        self.proposed: list[bytes] = []
        self.conf_changes: list[tuple] = []
        self.leader = leader
        self.view = nodes
        self.trigger = Trigger()
        self.voters, self.learners = ("a",), ()
        self.members = {n.id: MemberInfo(n.state, 0.0, "c") for n in nodes}

    async def propose(self, data: bytes):
        self.proposed.append(data)
        return self.state.apply(data, term=3)

    async def conf(self, op, node, voter):
        self.conf_changes.append((op, node, voter))
        if op == "add":
            self.learners += (node,)

    def controller(self, **kw) -> Controller:
        return Controller(
            "a",
            self.state,
            self.propose,
            lambda: self.leader,
            lambda: 3,
            lambda: self.view,
            self.trigger,
            ControllerConfig(**{"tick_s": 0.05, **kw}),
            conf=(lambda: (self.voters, self.learners), self.conf),
            members=lambda: self.members,
        )


async def test_step_deploys_the_default_once_commits_a_plan_and_then_rests():
    h = Harness([node("a", 8), node("b", 8)])
    c = h.controller()
    await c.step()
    kinds = [cs.decode(p)["t"] for p in h.proposed]
    assert kinds[0] == cs.DEPLOY and cs.SET_PLAN in kinds
    assert h.state.default_applied and DEFAULT_MODEL_NAME in h.state.models
    assert [a.model for a in h.state.plan.assignments] == [DEFAULT_MODEL_NAME]
    assert h.state.plan_term == 3
    assert h.conf_changes == [("add", "b", False)]
    n = len(h.proposed)
    await c.step()
    assert len(h.proposed) == n  # nothing changed: nothing proposed
    # Undeploying the default sticks: the next pass plans it away and does not bring it back.
    h.state.apply(cs.encode_undeploy(DEFAULT_MODEL_NAME), 3)
    await c.step()
    assert DEFAULT_MODEL_NAME not in h.state.models and h.state.plan.assignments == ()


async def test_a_dead_host_is_replanned_on_the_next_step():
    h = Harness([node("a", 8), node("b", 8)])
    c = h.controller(default_source=None)
    h.state.apply(cs.encode_deploy("m", "/m/m.gguf", replicas=1), 1)
    await c.step()
    host = h.state.plan.assignments[0].node
    h.view = [n if n.id != host else NodeStatus(host, "dead", 0.0, n.gpus) for n in h.view]
    await c.step()
    assert [a.node for a in h.state.plan.assignments] == ["b" if host == "a" else "a"]


async def test_run_acts_only_while_leader_and_wakes_on_the_trigger():
    h = Harness([node("a", 8)], leader=False)
    c = h.controller(tick_s=60.0)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(c.run())
        h.trigger.fire()
        await asyncio.sleep(0.05)
        assert h.proposed == []
        h.leader = True
        h.trigger.fire()
        for _ in range(500):
            if h.state.plan is not None:
                break
            await asyncio.sleep(0.01)
        assert h.state.plan is not None and h.state.default_applied
        task.cancel()


async def test_a_failing_proposal_does_not_stop_the_loop():
    h = Harness([node("a", 8)])
    calls = 0

    async def flaky(data):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("not leader any more")
        return h.state.apply(data, 3)

    h.propose = flaky
    c = h.controller()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(c.run())
        for _ in range(200):
            if h.state.plan is not None:
                break
            await asyncio.sleep(0.01)
        task.cancel()
    assert calls >= 2 and h.state.plan is not None


async def test_trigger_wait_times_out_and_clears():
    t = Trigger()
    assert not await t.wait(0.01)
    t.fire()
    assert await t.wait(1.0)
    assert not await t.wait(0.01)


@pytest.mark.parametrize("state", ["dead", "left"])
def test_gone_nodes_do_not_count(state):
    assert usable_nodes([node("x", 8, state=state)], 0.0, 5.0) == []


def test_registry_updates_record_changed_addresses_of_alive_members():
    nodes = [
        NodeStatus("a", "alive", 0.0, addr="10.0.0.1:8000"),
        NodeStatus("b", "alive", 0.0, addr="10.0.0.2:8000"),
        NodeStatus("c", "dead", 0.0, addr="10.0.0.3:8000"),
        NodeStatus("d", "alive", 0.0, addr="10.0.0.4:8000"),
    ]
    cmds = registry_updates(nodes, {"a": "10.0.0.1:8000", "b": "old:1"}, members=("a", "b", "c"))
    assert [cs.decode(c)["node"] for c in cmds] == ["b"]
    assert len(registry_updates(nodes, {})) == 3


class FakeRaftDriver:
    def __init__(self):
        self.calls = []
        self.voters, self.learners = ("a",), ("b", "c")
        progress = {
            "a": SimpleNamespace(match=500),
            "b": SimpleNamespace(match=450),
            "c": SimpleNamespace(match=10),
        }
        self.node = SimpleNamespace(progress=progress, last_index=500)

    def __getattr__(self, op):
        async def call(node):
            self.calls.append((op, node))

        return call


async def test_raft_hooks_map_changes_onto_the_driver():
    d = FakeRaftDriver()
    conf, change = raft_conf_hooks(d)
    assert conf() == (("a",), ("b", "c"))
    for op, node, voter in [
        ("add", "x", False),
        ("add", "y", True),
        ("promote", "b", True),
        ("remove", "c", True),
    ]:
        await change(op, node, voter)
    assert d.calls == [("add_learner", "x"), ("add_voter", "y"), ("promote", "b"), ("remove", "c")]
    assert caught_up_learners(d, 100)() == ["b"]


def test_a_header_that_cannot_be_read_commits_the_checksum_but_no_vram(tmp_path):
    local = tmp_path / "m.gguf"
    local.write_bytes(b"x" * 10)
    nodes = [node("n1", 8, files=[(SHA, 10, "/m/m.gguf")])]

    def broken(path, n_ctx):
        raise ValueError("not a GGUF file")

    cmds = model_file_updates([ModelRecord("m", "/m/m.gguf")], nodes, lambda m: local, CFG, broken)
    assert [(c["sha256"], c["vram"]) for c in map(cs.decode, cmds)] == [(SHA, None)]
    known = ModelRecord("m", "/m/m.gguf", sha256=SHA, size=10)
    assert model_file_updates([known], nodes, lambda m: local, CFG, broken) == []
