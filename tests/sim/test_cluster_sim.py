"""The whole cluster floor under faults, in virtual time (tests/sim/cluster_sim.py).

After every step, checked inside the simulation: no committed plan puts a GPU over capacity,
replicas of a model sit on distinct nodes, no node of another cluster is in any plan. After
the faults stop: within a bounded virtual time every deployed model that fits is served, all
peers hold one state (one plan), and no deployed model is lost. Without faults, a model that
has a ready replica never has none unless capacity forced the move.

A failing example replays exactly: hypothesis prints the seed and the schedule, and
`ClusterSim(seed, ...)` with the same schedule does the same thing. The long run (docs/
cluster.md): SIM_EXAMPLES=20000 pytest tests/sim/test_cluster_sim.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sim.cluster_sim import GIB, ClusterSim

GPUS = {"n1": [8], "n2": [8], "n3": [12], "n4": [16]}
VOTERS = ("n1", "n2", "n3")
STRANGERS = {"x1": [80]}  # another cluster with the same key, in plain view
IDS = list(GPUS)
# name: (GiB, replicas, priority). "huge" fits only on the stranger's GPU.
MODELS = {
    "a": (2, 2, 0),
    "b": (5, 1, 1),
    "c": (3, 2, 0),
    "d": (7, 1, 2),
    "e": (1, 1, 0),
    "huge": (20, 1, 0),
}
EXAMPLES = int(os.environ.get("SIM_EXAMPLES", "1000"))
# Virtual seconds the cluster gets after the faults stop: detection (SWIM: a few seconds),
# an election (about a second), a plan and a load (1 s) each, with room to spare.
SETTLE_S = 60.0

op = st.one_of(
    st.tuples(st.just("run"), st.floats(0.05, 4.0)),
    st.tuples(st.just("deploy"), st.sampled_from(sorted(MODELS))),
    st.tuples(st.just("crash"), st.sampled_from(IDS)),
    st.tuples(st.just("restart"), st.sampled_from(IDS)),
    st.tuples(st.just("pause"), st.sampled_from(IDS), st.floats(0.5, 8.0)),
    st.tuples(st.just("partition"), st.integers(1, len(IDS) - 1)),
    st.tuples(st.just("heal")),
    st.tuples(st.just("loss"), st.sampled_from([0.0, 0.05, 0.3])),
)


def new_sim(seed: int) -> ClusterSim:
    sim = ClusterSim(seed, GPUS, VOTERS, strangers=STRANGERS)
    assert sim.run_until_true(lambda: sim.leader() is not None, 10.0) is not None
    return sim


def deploy(sim: ClusterSim, name: str) -> None:
    vram, replicas, priority = MODELS[name]
    sim.deploy(name, vram, replicas, priority)


def apply(sim: ClusterSim, action: tuple) -> None:
    kind, *args = action
    if kind == "run":
        sim.run_until(sim.now + args[0])
    elif kind == "deploy":
        deploy(sim, args[0])
    elif kind == "crash" and not sim.nodes[args[0]].crashed:
        sim.crash(args[0])
    elif kind == "restart" and sim.nodes[args[0]].crashed:
        sim.restart(args[0])
    elif kind == "pause" and not sim.nodes[args[0]].crashed:
        sim.pause(args[0], args[1])
    elif kind == "partition":
        sim.heal()
        sim.partition(IDS[: args[0]] + ["x1"], IDS[args[0] :])
    elif kind == "heal":
        sim.heal()
    elif kind == "loss":
        sim.loss = args[0]


def end_faults(sim: ClusterSim) -> None:
    sim.heal()
    sim.loss = 0.0
    for nid in IDS:
        if sim.nodes[nid].crashed:
            sim.restart(nid)


@pytest.mark.slow  # about a minute for 1,000 examples on one core
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.integers(0, 1 << 32), st.lists(op, max_size=14))
def test_faults_never_break_a_plan_and_the_cluster_heals(seed, schedule):
    sim = new_sim(seed)
    deploy(sim, "a")
    for action in schedule:
        apply(sim, action)  # every beat checks the plan invariants (cluster_sim.Violation)
    end_faults(sim)
    waited = sim.run_until_true(lambda: not sim.settled(), SETTLE_S, step=0.25)
    assert waited is not None, f"seed {seed}: not settled: {sim.settled()}"


@pytest.mark.slow
@settings(max_examples=max(20, EXAMPLES // 5), deadline=None, derandomize=True)
@given(st.integers(0, 1 << 32), st.lists(st.sampled_from(sorted(MODELS)), max_size=6))
def test_without_faults_a_served_model_is_never_left_without_a_ready_replica(seed, names):
    sim = new_sim(seed)
    served: dict[str, set[str]] = {}  # model -> its ready hosts at the last check

    def check() -> None:
        leader = sim.leader()
        for model in sim.deployed:
            hosts = {
                p.id
                for p in sim.live_members()
                if model in p.instances and p.instances[model].state == "ready"
            }
            before = served.get(model, set())
            if before and not hosts:
                # Allowed only when capacity forbade keeping it: no old host has room left.
                vram = MODELS[model][0] * GIB
                plan = leader.state.plan
                for host in before:
                    free = {g: sim.peers[host].gpus[g] for g in sim.peers[host].gpus}
                    for a in plan.assignments:
                        for gpu, v in zip(a.gpus, a.vram, strict=True):
                            node, local = gpu.split("/", 1)
                            if node == host:
                                free[local] -= v
                    assert max(free.values()) < vram, f"{model} lost all replicas at {sim.now}"
            served[model] = hosts

    for name in names:
        deploy(sim, name)
        for _ in range(40):
            sim.run_until(sim.now + 0.05)
            check()
    assert sim.run_until_true(lambda: not sim.settled(), SETTLE_S, step=0.25) is not None


def test_a_stranger_is_seen_but_never_used_and_a_dead_host_is_replaced():
    sim = new_sim(7)
    deploy(sim, "huge")  # fits only the stranger's 80 GiB GPU: it stays unplaced
    assert sim.run_until_true(lambda: "huge" in sim.deployed and not sim.settled(), 10) is not None
    assert sim.run_until_true(lambda: sim.leader().state.plan is not None, 10) is not None
    assert sim.leader().state.plan.unplaced[0].model == "huge"
    deploy(sim, "d")
    served = lambda: sim.ready_count("d") == 1 and not sim.settled()  # noqa: E731
    assert sim.run_until_true(served, SETTLE_S) is not None
    plan = sim.leader().state.plan
    host = plan.for_model("d")[0].node
    assert host != "x1"
    assert sim.leader().view.other_clusters("c1") == {"c2": ["x1"]}
    sim.crash(host)
    assert sim.run_until_true(served, SETTLE_S) is not None
    new_host = sim.leader().state.plan.for_model("d")[0].node
    assert new_host not in (host, "x1") and sim.ready_count("d") == 1


def test_the_same_seed_replays_exactly():
    def run(seed: int) -> tuple:
        sim = new_sim(seed)
        for action in [("deploy", "a"), ("run", 2.0), ("crash", "n1"), ("run", 6.0)]:
            apply(sim, action)
        return sim.now, sim.leader().id, sim.leader().state.snapshot(), len(sim.log)

    assert run(3) == run(3)
