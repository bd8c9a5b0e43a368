"""The controller: the pure step re-places what must move and nothing else; its runner acts
only as a leader that has applied an entry of its own term, one action at a time."""

import asyncio
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.cluster import state as cs
from aivailable.cluster.controller import (
    DEFAULT_MODEL_NAME,
    PLANNED_PARALLEL,
    ChangeConf,
    Context,
    ControllerConfig,
    LocalFile,
    Propose,
    decide,
    keep_until_ready,
    model_file_updates,
    model_vram,
    registry_updates,
    step,
    usable_nodes,
)
from aivailable.cluster.payload import InstanceView, PeerPayload
from aivailable.cluster.raft import caught_up_learners, raft_conf_hooks
from aivailable.cluster.runner import ControllerRunner, Trigger, read_local_files
from aivailable.cluster.state import ClusterState, ModelRecord
from aivailable.cluster.view import NodeView
from placement import Assignment, Gpu, Plan

GIB = 1 << 30
CFG = ControllerConfig(suspect_grace_s=5.0)
SHA = "ab" * 32


def node(
    nid: str, *gib: int, state="alive", since=0.0, files=(), cluster="c", ready=(), addr=""
) -> NodeView:
    gpus = tuple(Gpu(f"{nid}/gpu{i}", "fake", f"Fake {g}G", g * GIB) for i, g in enumerate(gib))
    instances = tuple(InstanceView(m, "ready") for m in ready)
    payload = PeerPayload(addr, cluster, gpus, instances=instances, files=tuple(files))
    return NodeView(nid, state, since, payload)


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
    assert model_vram(rec, LocalFile(rec.size, 777, 11), CFG) == (777, 11)
    vram, split = model_vram(rec, None, CFG)
    # The KV cache of every slot the instance will have.
    kv = 1000 * PLANNED_PARALLEL * CFG.kv_bytes_per_token
    assert vram == int(rec.size * CFG.size_factor) + kv + CFG.fallback_overhead
    assert split == CFG.fallback_overhead
    # A header that could not be read falls back to the size rather than failing the plan.
    assert model_vram(rec, LocalFile(rec.size), CFG)[0] == vram
    # Bigger files and longer contexts never get smaller estimates.
    bigger = ModelRecord("m", "/m.gguf", n_ctx=4000, size=2 * rec.size)
    assert model_vram(bigger, None, CFG)[0] > vram
    # Fewer slots asked for, a smaller KV cache planned.
    assert (
        model_vram(ModelRecord("m", "/m.gguf", n_ctx=1000, size=rec.size, n_parallel=1), None, CFG)[
            0
        ]
        < vram
    )


def test_read_local_files_estimates_from_the_header_and_survives_a_broken_one(tmp_path):
    local = tmp_path / "m.gguf"
    local.write_bytes(b"x" * 100)
    recs = [ModelRecord("m", "/m.gguf", n_ctx=1000), ModelRecord("n", "/n.gguf")]
    seen = []

    def estimator(path, n_ctx, n_parallel):
        seen.append((path, n_ctx, n_parallel))
        return FakeEstimate(777, 11)

    got = read_local_files(recs, lambda m: local if m.name == "m" else None, estimator)
    # The KV cache is planned for the slots the engine will load: a GPU node's default...
    assert got == {"m": LocalFile(100, 777, 11)} and seen == [(local, 1000, PLANNED_PARALLEL)]
    # ...or what the deploy asked for.
    read_local_files(
        [ModelRecord("m", "/m.gguf", n_ctx=1000, n_parallel=2)], lambda m: local, estimator
    )
    assert seen[-1] == (local, 1000, 2)
    got = read_local_files(recs[:1], lambda m: local, lambda p, n, k: 1 / 0)
    assert got == {"m": LocalFile(100)}


def test_model_vram_of_the_real_embedded_model_from_its_header(embedded_model):
    gguf = embedded_model
    rec = ModelRecord("smollm2-135m", "builtin:smollm2-135m", n_ctx=2048, size=gguf.stat().st_size)
    exact, _ = model_vram(rec, read_local_files([rec], lambda m: gguf)["smollm2-135m"], CFG)
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
    cmds = model_file_updates([a, b, done], nodes, {"b": LocalFile(100, 50, 5)})
    state = ClusterState()
    for rec in (a, b):
        state.apply(cs.encode_deploy(rec.name, rec.source), 1)
    # b: the leader has it but no one has reported its checksum yet (a dead node's word does
    # not count), so only a's facts are known.
    assert [state.apply(c, 1).ok for c in cmds] == [True]
    assert state.models["a"].sha256 == SHA and state.models["a"].size == 1234
    b2 = ModelRecord("b", "/m/b.gguf", sha256=SHA)
    cmds = model_file_updates([b2], [], {"b": LocalFile(100, 50, 5)})
    state.apply(cmds[0], 1)
    assert (state.models["b"].vram, state.models["b"].split_overhead, state.models["b"].size) == (
        50,
        5,
        100,
    )


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
    view = [n if n.id != victim else replace(n, state="dead", since=1.0) for n in nodes]
    new = decide(models, view, plan, 2.0, CFG) or plan
    assert all(a.node != victim for a in new.assignments)
    kept = {a for a in plan.assignments if a.node != victim}
    if not new.unplaced:
        # Everything still fits: survivors stay exactly where they were.
        assert kept <= set(new.assignments)
    else:
        # Something no longer fits: moving a survivor is allowed only to place strictly more,
        # or more models (first replicas go before extra replicas: the victim's model may take
        # the room of another model's second replica).
        assert (
            kept <= set(new.assignments)
            or len(new.assignments) > len(kept)
            or len({a.model for a in new.assignments}) > len({a.model for a in kept})
        )
    # And with nobody dead, the plan stands.
    assert decide(models, nodes, plan, 3.0, CFG) is None


# ---- the step and its runner ------------------------------------------------------------


def ctx(**kw) -> Context:
    return Context("a", 3, **{"voters": ("a",), **kw})


def plan_of(actions) -> Plan | None:
    for a in actions:
        if isinstance(a, Propose) and cs.decode(a.data)["t"] == cs.SET_PLAN:
            return cs.plan_from_wire(cs.decode(a.data)["plan"])
    return None


def test_the_step_founds_then_deploys_the_default_then_plans_and_adds_a_learner():
    state = ClusterState()
    nodes = [node("a", 8), node("b", 8)]
    first = step(nodes, state, 0.0, ctx(found_cluster_id="c"))
    assert [cs.decode(a.data)["t"] for a in first] == [cs.INIT]
    state.apply(first[0].data, 3)
    second = step(nodes, state, 0.0, ctx())
    assert [cs.decode(a.data)["t"] for a in second] == [cs.DEPLOY]
    state.apply(second[0].data, 3)
    third = step(nodes, state, 0.0, ctx())
    assert [a.model for a in plan_of(third).assignments] == [DEFAULT_MODEL_NAME]
    assert third[-1] == ChangeConf(third[-1].change) and third[-1].change.node == "b"


def test_a_voter_whose_payload_is_not_read_yet_is_not_removed():
    state = ClusterState()
    state.apply(cs.encode_init("c"), 1)
    state.apply(cs.encode_deploy("m", "/m/m.gguf"), 1)
    # "b" is a voter alive in gossip whose payload this fresh view has not read yet.
    nodes = [node("a", 8), NodeView("b", "alive", 0.0), node("c", 8)]
    actions = step(
        nodes, state, 1000.0, ctx(voters=("a", "b", "c")), replace(CFG, default_source=None)
    )
    changes = [a.change for a in actions if isinstance(a, ChangeConf)]
    assert all(c.node != "b" for c in changes)


def test_a_node_of_another_cluster_is_never_placed_on_nor_added():
    state = ClusterState()
    state.apply(cs.encode_init("c"), 1)
    state.apply(cs.encode_deploy("m", "/m/m.gguf", replicas=2), 1)
    nodes = [node("a", 8), node("x", 80, cluster="other"), node("y", 80, cluster=None)]
    actions = step(nodes, state, 0.0, ctx(), replace(CFG, default_source=None))
    plan = plan_of(actions)
    assert [a.node for a in plan.assignments] == ["a"] and plan.unplaced[0].missing_replicas == 1
    assert not [a for a in actions if isinstance(a, ChangeConf)]


def test_a_voluntary_move_never_leaves_a_model_without_a_ready_replica():
    models = [model("m", 2)]
    old = Plan((Assignment("m", "a", ("a/gpu0",), (2 * GIB,)),))
    # A new plan moves m from a to b; m's ready replica on a has room to stay until b's
    # is ready, so it does.
    nodes = [node("a", 8, ready=["m"]), node("b", 8)]
    forced = Plan((Assignment("m", "b", ("b/gpu0",), (2 * GIB,)),))
    kept = keep_until_ready(forced, old, nodes, {"m": models[0]})
    assert sorted(a.node for a in kept.assignments) == ["a", "b"]
    # Once b's replica is ready the extra one goes.
    nodes = [node("a", 8, ready=["m"]), node("b", 8, ready=["m"])]
    done = keep_until_ready(forced, kept, nodes, {"m": models[0]})
    assert [a.node for a in done.assignments] == ["b"]
    # No room left on a (another model took its GPU): the move goes ahead.
    full = Plan((*forced.assignments, Assignment("x", "a", ("a/gpu0",), (7 * GIB,))))
    nodes = [node("a", 8, ready=["m"]), node("b", 8)]
    models = {"m": models[0], "x": model("x", 7)}
    tight = keep_until_ready(full, old, nodes, models)
    assert tight == full
    # A suspect host past the grace loses its place in the plan, but keeps serving (and
    # its assignment) until the successor is ready; a dead one does not.
    nodes = [node("a", 8, ready=["m"], state="suspect", since=0.0), node("b", 8)]
    plan = decide([models["m"]], nodes, old, 100.0, CFG)
    assert sorted(a.node for a in plan.assignments) == ["a", "b"]
    nodes = [node("a", 8, ready=["m"], state="dead"), node("b", 8)]
    assert [a.node for a in decide([models["m"]], nodes, old, 100.0, CFG).assignments] == ["b"]


class Harness:
    def __init__(self, nodes, ready=True):
        self.state = ClusterState()
        self.proposed: list[bytes] = []
        self.conf_changes: list[tuple] = []
        self.ready = ready
        self.view = nodes
        self.trigger = Trigger()
        self.voters, self.learners = ("a",), ()

    async def propose(self, data: bytes):
        self.proposed.append(data)
        return self.state.apply(data, term=3)

    async def conf(self, op, node, voter):
        self.conf_changes.append((op, node, voter))
        if op == "add":
            self.learners += (node,)

    def controller(self, **kw) -> ControllerRunner:
        return ControllerRunner(
            "a",
            self.state,
            lambda: self.view,
            self.trigger,
            lambda: self.ready,
            lambda: 3,
            self.propose,
            ControllerConfig(**{"tick_s": 0.05, **kw}),
            raft_conf=lambda: (self.voters, self.learners),
            change_conf=self.conf,
        )


async def test_a_pass_deploys_the_default_once_commits_a_plan_and_then_rests():
    h = Harness([node("a", 8), node("b", 8)])
    c = h.controller()
    await c.run_pass()
    kinds = [cs.decode(p)["t"] for p in h.proposed]
    assert kinds[0] == cs.DEPLOY and cs.SET_PLAN in kinds
    assert h.state.default_applied and DEFAULT_MODEL_NAME in h.state.models
    assert [a.model for a in h.state.plan.assignments] == [DEFAULT_MODEL_NAME]
    assert h.state.plan_term == 3
    assert h.conf_changes == [("add", "b", False)]
    n = len(h.proposed)
    assert await c.run_pass() == []  # nothing changed: nothing proposed
    assert len(h.proposed) == n
    # Undeploying the default sticks: the next pass plans it away and does not bring it back.
    h.state.apply(cs.encode_undeploy(DEFAULT_MODEL_NAME), 3)
    await c.run_pass()
    assert DEFAULT_MODEL_NAME not in h.state.models and h.state.plan.assignments == ()


async def test_each_action_is_decided_from_the_view_as_it_is_then():
    h = Harness([node("a", 8), node("b", 8)])
    c = h.controller(default_source=None)
    h.state.apply(cs.encode_deploy("m", "/m/m.gguf", replicas=1), 1)
    first_host = None

    async def propose(data):
        nonlocal first_host
        h.proposed.append(data)
        result = h.state.apply(data, 3)
        if first_host is None and h.state.plan is not None:
            # The host dies right after the plan commits, within the same pass.
            first_host = h.state.plan.assignments[0].node
            h.view = [replace(n, state="dead") if n.id == first_host else n for n in h.view]
        return result

    h.propose = propose
    await c.run_pass()
    assert [a.node for a in h.state.plan.assignments] == ["b" if first_host == "a" else "a"]


async def test_run_acts_only_once_ready_and_wakes_on_the_trigger():
    h = Harness([node("a", 8)], ready=False)
    c = h.controller(tick_s=60.0)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(c.run())
        h.trigger.fire()
        await asyncio.sleep(0.05)
        assert h.proposed == []  # a leader that has not applied its own no-op waits
        h.ready = True  # no trigger: becoming ready is enough
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
        node("a", addr="10.0.0.1:8000"),
        node("b", addr="10.0.0.2:8000"),
        node("c", state="dead", addr="10.0.0.3:8000"),
        node("d", addr="10.0.0.4:8000"),
    ]
    cmds = registry_updates(nodes, {"a": "10.0.0.1:8000", "b": "old:1"}, members=("a", "b", "c"))
    assert [cs.decode(c)["node"] for c in cmds] == ["b"]
    # A registered node the configuration no longer has is forgotten.
    cmds = registry_updates(nodes, {"a": "10.0.0.1:8000", "gone": "10.0.0.7:8000"}, ("a",))
    assert [(cs.TYPE_NAMES[cs.decode(c)["t"]], cs.decode(c)["node"]) for c in cmds] == [
        ("node_forget", "gone")
    ]
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
    nodes = [node("n1", 8, files=[(SHA, 10, "/m/m.gguf")])]
    unreadable = {"m": LocalFile(10)}
    cmds = model_file_updates([ModelRecord("m", "/m/m.gguf")], nodes, unreadable)
    assert [(c["sha256"], c["vram"]) for c in map(cs.decode, cmds)] == [(SHA, None)]
    known = ModelRecord("m", "/m/m.gguf", sha256=SHA, size=10)
    assert model_file_updates([known], nodes, unreadable) == []
