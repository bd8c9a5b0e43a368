"""The replicated state machine: commands, fencing, determinism, snapshots, bad bytes."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.cluster import state as cs
from aivailable.cluster.state import ClusterState, SnapshotError
from placement import Assignment, Plan, Unplaced

SHA = "ab" * 32


def plan_of(*items: tuple[str, str, tuple[str, ...], tuple[int, ...]]) -> Plan:
    return Plan(assignments=tuple(Assignment(*i) for i in items))


def test_deploy_then_undeploy():
    s = ClusterState()
    r = s.apply(cs.encode_deploy("m1", "builtin:smollm2-135m", replicas=2, n_ctx=1024), term=1)
    assert r.ok and r.changed and r.kind == "deploy"
    rec = s.models["m1"]
    assert (rec.source, rec.replicas, rec.n_ctx, rec.priority) == (
        "builtin:smollm2-135m",
        2,
        1024,
        0,
    )
    assert s.models_version == 1
    # The same deploy again changes nothing.
    assert not s.apply(cs.encode_deploy("m1", "builtin:smollm2-135m", 2, 1024), 1).changed
    assert s.apply(cs.encode_undeploy("m1"), 1).changed
    assert s.models == {}
    r = s.apply(cs.encode_undeploy("m1"), 1)
    assert r.ok and not r.changed  # undeploying nothing: accepted, reports no change


def test_deploy_rejects_bad_fields_and_changes_nothing():
    s = ClusterState()
    before = s.snapshot()
    for bad in (
        cs.encode_deploy("bad name!", "x"),
        cs.encode_deploy("m", ""),
        cs.encode_deploy("m", "x", replicas=0),
        cs.encode_deploy("m", "x", replicas=65),
        cs.encode_deploy("m", "x", sha256="XYZ"),
        cs.encode_deploy("m", "x", size=-1),
    ):
        r = s.apply(bad, 1)
        assert not r.ok and r.kind == "deploy" and r.error
    assert s.snapshot() == before


def test_a_plan_from_an_older_term_is_fenced_off():
    s = ClusterState()
    p5 = plan_of(("m", "n1", ("n1/gpu0",), (100,)))
    p4 = plan_of(("m", "n2", ("n2/gpu0",), (100,)))
    assert s.apply(cs.encode_plan(p5, term=5), term=5).changed
    r = s.apply(cs.encode_plan(p4, term=4), term=6)
    assert not r.ok and "stale" in r.error
    assert s.plan == p5 and s.plan_term == 5 and s.plan_version == 1
    # The same leader's later plan, and a newer leader's, are taken.
    p5b = plan_of(("m", "n3", ("n3/gpu0",), (100,)))
    assert s.apply(cs.encode_plan(p5b, term=5), term=5).changed
    assert s.apply(cs.encode_plan(p4, term=7), term=7).changed
    assert s.plan == p4 and s.plan_term == 7 and s.plan_version == 3


def test_a_plan_claiming_a_term_newer_than_its_entry_is_rejected():
    s = ClusterState()
    r = s.apply(cs.encode_plan(plan_of(("m", "n1", ("g",), (1,))), term=9), term=3)
    assert not r.ok and s.plan is None and s.plan_term == 0


def test_plan_roundtrip_keeps_unplaced():
    plan = Plan(
        assignments=(Assignment("m", "n1", ("n1/gpu0", "n1/gpu1"), (10, 20)),),
        unplaced=(Unplaced("big", 1, "larger than any node"),),
    )
    s = ClusterState()
    s.apply(cs.encode_plan(plan, 1), 1)
    assert s.plan == plan
    assert s.assignments_for("n1") == plan.assignments and s.assignments_for("n2") == ()


def test_default_model_is_deployed_once_and_undeploy_sticks():
    s = ClusterState()
    assert not s.default_applied
    assert s.apply(
        cs.encode_deploy("smollm2-135m", "builtin:smollm2-135m", default=True), 1
    ).changed
    assert s.default_applied and "smollm2-135m" in s.models
    s.apply(cs.encode_undeploy("smollm2-135m"), 1)
    assert s.default_applied and s.models == {}


def test_default_deploy_leaves_a_hand_deployed_model_alone():
    s = ClusterState()
    s.apply(cs.encode_deploy("smollm2-135m", "builtin:smollm2-135m", replicas=3), 1)
    s.apply(cs.encode_deploy("smollm2-135m", "builtin:smollm2-135m", default=True), 1)
    assert s.default_applied and s.models["smollm2-135m"].replicas == 3


def test_model_file_facts_apply_only_to_the_same_source():
    s = ClusterState()
    s.apply(cs.encode_deploy("m", "/models/a.gguf", n_ctx=2048), 1)
    assert s.apply(cs.encode_model_file("m", "/models/a.gguf", SHA, 1000, 5000, 300), 1).changed
    rec = s.models["m"]
    assert (rec.sha256, rec.size, rec.vram, rec.split_overhead) == (SHA, 1000, 5000, 300)
    # A replica-count change keeps what is known of the file.
    s.apply(cs.encode_deploy("m", "/models/a.gguf", replicas=2, n_ctx=2048), 1)
    assert s.models["m"].vram == 5000 and s.models["m"].sha256 == SHA
    # A different context size keeps the checksum but needs a new VRAM estimate.
    s.apply(cs.encode_deploy("m", "/models/a.gguf", replicas=2, n_ctx=4096), 1)
    assert s.models["m"].sha256 == SHA and s.models["m"].vram is None
    # Facts about an older source arrive late: ignored.
    s.apply(cs.encode_deploy("m", "/models/b.gguf"), 1)
    assert s.models["m"].sha256 is None
    r = s.apply(cs.encode_model_file("m", "/models/a.gguf", SHA, 1000), 1)
    assert not r.ok and s.models["m"].sha256 is None
    # A conflicting checksum for a known file is refused.
    s.apply(cs.encode_model_file("m", "/models/b.gguf", SHA, 1000), 1)
    assert not s.apply(cs.encode_model_file("m", "/models/b.gguf", "cd" * 32, 1000), 1).ok


def test_init_and_node_registry():
    s = ClusterState()
    assert s.apply(cs.encode_init("c-1"), 1).changed
    assert not s.apply(cs.encode_init("c-1"), 1).changed
    assert not s.apply(cs.encode_init("c-2"), 1).ok and s.cluster_id == "c-1"
    assert s.apply(cs.encode_node_addr("n1", "10.0.0.1:8000"), 1).changed
    assert not s.apply(cs.encode_node_addr("n1", "10.0.0.1:8000"), 1).changed
    assert s.apply(cs.encode_node_forget("n1"), 1).changed and s.nodes == {}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",  # a list, not a map
        msgpack.packb({"v": 2, "t": 2}),  # a protocol this build does not speak
        msgpack.packb({"v": 1, "t": 99}),  # an unknown command type
        msgpack.packb({"v": 1, "t": True}),
        msgpack.packb({"v": 1, "t": 4, "term": 1, "plan": {"a": [["m", "n"]]}}),
        msgpack.packb({"v": 1, "t": 4, "term": 1, "plan": {"a": [["m", "n", ["g"], []]]}}),
        msgpack.packb({"v": 1, "t": 4, "term": 1, "plan": [1, 2]}),
        msgpack.packb({"v": 1, "t": 5, "name": "m"}),
        msgpack.packb({1: 2}),
    ],
)
def test_bad_bytes_are_rejected_without_a_crash(data):
    s = ClusterState()
    s.apply(cs.encode_deploy("m", "x"), 1)
    before = s.snapshot()
    r = s.apply(data, 1)
    assert not r.ok and r.error
    assert s.snapshot() == before


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_apply(data):
    s = ClusterState()
    before = s.snapshot()
    r = s.apply(data, 1)
    if not r.ok:
        assert s.snapshot() == before


# ---- seeded random command sequences: determinism and snapshots -------------------------

NAMES = ["m1", "m2", "m3"]
SOURCES = ["builtin:smollm2-135m", "/models/a.gguf", "/models/b.gguf"]
NODES = ["n1", "n2", "n3"]

assignments = st.builds(
    lambda m, n, g, v: Assignment(m, n, (f"{n}/gpu{g}",), (v,)),
    st.sampled_from(NAMES),
    st.sampled_from(NODES),
    st.integers(0, 1),
    st.integers(0, 1 << 33),
)
plans = st.builds(
    lambda a, u: Plan(tuple(a), tuple(u)),
    st.lists(assignments, max_size=4),
    st.lists(
        st.builds(Unplaced, st.sampled_from(NAMES), st.integers(1, 3), st.just("x")), max_size=1
    ),
)
commands = st.one_of(
    st.builds(
        cs.encode_deploy,
        st.sampled_from(NAMES),
        st.sampled_from(SOURCES),
        st.integers(1, 3),
        st.sampled_from([512, 2048]),
        st.integers(-1, 1),
        st.sampled_from([None, SHA]),
        st.sampled_from([None, 1000]),
        st.booleans(),
    ),
    st.builds(cs.encode_undeploy, st.sampled_from(NAMES)),
    st.builds(cs.encode_plan, plans, st.integers(0, 6)),
    st.builds(
        cs.encode_model_file,
        st.sampled_from(NAMES),
        st.sampled_from(SOURCES),
        st.just(SHA),
        st.integers(0, 10**9),
        st.sampled_from([None, 123456]),
        st.sampled_from([None, 99]),
    ),
    st.builds(cs.encode_node_addr, st.sampled_from(NODES), st.sampled_from(["a:1", "b:2"])),
    st.builds(cs.encode_node_forget, st.sampled_from(NODES)),
    st.builds(cs.encode_init, st.sampled_from(["c1", "c2"])),
    st.binary(max_size=8),
)
# Each command paired with the term of its log entry; Raft log terms never decrease.
logs = st.lists(st.tuples(commands, st.integers(0, 1)), max_size=30).map(
    lambda items: [
        (cmd, 1 + sum(step for _, step in items[: i + 1])) for i, (cmd, _) in enumerate(items)
    ]
)


def run_log(state: ClusterState, log) -> list:
    return [state.apply(cmd, term) for cmd, term in log]


@settings(max_examples=80, deadline=None)
@given(logs)
def test_same_commands_give_the_same_state_and_snapshot_bytes(log):
    a, b = ClusterState(), ClusterState()
    results_a, results_b = run_log(a, log), run_log(b, log)
    assert results_a == results_b
    assert a.snapshot() == b.snapshot()
    assert a.to_wire() == b.to_wire()


@settings(max_examples=80, deadline=None)
@given(logs, st.data())
def test_restore_of_a_snapshot_then_continue_equals_continue(log, data):
    cut = data.draw(st.integers(0, len(log)))
    whole = ClusterState()
    run_log(whole, log)
    first = ClusterState()
    run_log(first, log[:cut])
    resumed = ClusterState()
    resumed.restore(first.snapshot())
    assert resumed.snapshot() == first.snapshot()
    assert run_log(resumed, log[cut:]) == run_log(first, log[cut:])
    assert resumed.snapshot() == whole.snapshot() == first.snapshot()
    assert resumed.plan == whole.plan and resumed.models == whole.models


@settings(max_examples=80, deadline=None)
@given(logs)
def test_accepted_plans_never_go_back_in_term(log):
    s = ClusterState()
    last = 0
    for cmd, term in log:
        s.apply(cmd, term)
        assert s.plan_term >= last
        last = s.plan_term


def test_restore_of_bad_bytes_leaves_the_state_alone():
    s = ClusterState()
    s.apply(cs.encode_deploy("m", "x"), 1)
    before = s.snapshot()
    for bad in (
        b"junk",
        msgpack.packb({"v": 1, "models": [{"name": "bad name!"}]}),
        msgpack.packb([]),
    ):
        with pytest.raises(SnapshotError):
            s.restore(bad)
        assert s.snapshot() == before
