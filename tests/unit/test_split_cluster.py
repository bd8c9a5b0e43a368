"""Split models in the cluster floor: the controller pairs only peers of one RPC version
(and the status says why another is skipped), the plan's splits survive the Raft log and
snapshots, the reconciler runs the RPC server on helpers and starts a primary only once
its helpers' servers answer, and gossip carries the RPC version."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from aivailable.cluster import state as cs
from aivailable.cluster.controller import ControllerConfig, decide
from aivailable.cluster.payload import PeerPayload, node_payload, read_payload
from aivailable.cluster.reconciler import (
    Running,
    plan_steps,
    rpc_server_wanted,
    split_step,
)
from aivailable.cluster.state import ClusterState, CommandError, ModelRecord
from aivailable.cluster.status import cluster_status
from aivailable.cluster.view import NodeView, ReadModel, rpc_pairing
from placement import Gpu, Plan
from placement.split import Part, Split

MIB = 1 << 20
CFG = ControllerConfig(suspect_grace_s=5.0)
# [30 layers of 3 MiB, output 30 MiB, compute 16 MiB, compute with logits 100 MiB, 256 MiB]
PROFILE = (*([3 * MIB] * 30), 30 * MIB, 16 * MIB, 100 * MIB, 256 * MIB)
NEED = sum(PROFILE[:31]) + 100 * MIB + 256 * MIB  # one device: 476 MiB


def node(nid: str, mib: int, version: str | None = "7.0.0", ready=False) -> NodeView:
    gpus = (Gpu(f"{nid}/gpu0", "fake", "Small", mib * MIB),)
    return NodeView(
        nid, "alive", 0.0, PeerPayload("", "c", gpus, rpc_version=version, rpc_ready=ready)
    )


def record(split="auto") -> ModelRecord:
    return ModelRecord(
        "big",
        "/m/big.gguf",
        1,
        512,
        vram=NEED,
        split_overhead=372 * MIB,
        split=split,
        profile=PROFILE,
    )


def test_a_model_no_node_fits_is_split_over_peers_of_one_version():
    plan = decide([record()], [node("a", 448), node("b", 448), node("c", 448)], None, 0.0, CFG)
    (split,) = plan.splits
    assert len(split.nodes) == 2 and plan.assignments == ()


def test_version_skew_never_pairs_and_the_status_says_why():
    nodes = [node("a", 448), node("b", 448, "6.0.0"), node("c", 448, None)]
    version, skipped = rpc_pairing(nodes)
    assert version == "7.0.0"
    assert "6.0.0 differs" in skipped["b"] and "no llama.cpp RPC" in skipped["c"]
    plan = decide([record()], nodes, None, 0.0, CFG)
    assert plan.splits == () and plan.unplaced  # a cannot split with anyone
    plan = decide([record()], [*nodes, node("d", 448)], None, 0.0, CFG)
    assert set(plan.splits[0].nodes) == {"a", "d"}
    # the status shows each node's version, pairing and why it was skipped
    view = ReadModel("a")
    view._nodes = {n.id: n for n in nodes}  # the read model as gossip would have filled it
    status = cluster_status("a", "a", 1, ClusterState(), view)
    rpc = {n["id"]: n["rpc"] for n in status["nodes"]}
    assert rpc["a"] == {"version": "7.0.0", "server": False, "paired": True}
    assert rpc["b"]["paired"] is False and "differs" in rpc["b"]["skipped"]
    assert status["rpc"]["version"] == "7.0.0" and set(status["rpc"]["skipped"]) == {"b", "c"}


def test_never_and_a_one_node_fit_leave_it_unsplit():
    assert decide([record("never")], [node("a", 448), node("b", 448)], None, 0.0, CFG).splits == ()
    plan = decide([record()], [node("a", 448), node("b", 1024)], None, 0.0, CFG)
    assert plan.splits == () and plan.assignments[0].node == "b"


def test_a_dead_helper_is_replaced_and_the_split_is_stable_otherwise():
    nodes = [node("a", 448), node("b", 448), node("c", 448)]
    plan = decide([record()], nodes, None, 0.0, CFG)
    assert decide([record()], nodes, plan, 1.0, CFG) is None  # nothing changed
    helper = plan.splits[0].helpers[0]
    dead = [replace(n, state="dead") if n.id == helper else n for n in nodes]
    again = decide([record()], dead, plan, 2.0, CFG)
    assert helper not in again.splits[0].nodes
    assert again.splits[0].primary == plan.splits[0].primary


def split_plan() -> Plan:
    parts = (Part("a", "a/gpu0", 20, 300 * MIB), Part("b", "b/gpu0", 11, 420 * MIB))
    return Plan(splits=(Split("big", "a", parts),))


def test_splits_survive_the_log_and_snapshots():
    state = ClusterState()
    assert state.apply(cs.encode_deploy("big", "/m/big.gguf", split="always")).ok
    assert state.models["big"].split == "always"
    assert state.apply(cs.encode_plan(split_plan(), 1)).ok
    assert state.plan == split_plan()
    assert state.apply(
        cs.encode_model_file("big", "/m/big.gguf", "ab" * 32, 10, NEED, 1, PROFILE)
    ).ok
    assert state.models["big"].profile == PROFILE
    again = ClusterState()
    again.restore(state.snapshot())
    assert again.plan == state.plan and again.models == state.models
    bad = msgpack.packb({"v": 1, "t": cs.DEPLOY, "name": "x", "source": "/x", "split": "maybe"})
    assert not state.apply(bad).ok
    with pytest.raises(CommandError):
        cs.plan_from_wire({"s": [["big", "a", []]]})


def test_the_primary_starts_once_its_helpers_answer_and_restarts_on_a_new_split():
    models = {"big": record()}
    plan = split_plan()
    (split,) = plan.splits
    steps = plan_steps("a", (), models, {}, (), plan.splits, rpc_ready=())
    assert steps == []  # b's RPC server is not up yet
    (start,) = plan_steps("a", (), models, {}, (), plan.splits, rpc_ready={"b"})
    assert start.rpc_helpers == ("b",) and start.host_layers == 20
    assert start.tensor_split == (11.0,) and start.gpus == ("gpu0",)
    running = {
        "big": Running("/m/big.gguf", ("gpu0",), "ready", 512, ("chat", None), start.split_key)
    }
    assert plan_steps("a", (), models, running, (), plan.splits, rpc_ready=()) == []
    moved = Split("big", "a", (split.parts[0], Part("c", "c/gpu0", 11, 420 * MIB)))
    steps = plan_steps("a", (), models, running, (), (moved,), rpc_ready={"c"})
    assert [s.action for s in steps] == ["stop", "start"]
    assert rpc_server_wanted("b", plan.splits, models)
    assert not rpc_server_wanted("a", plan.splits, models)
    assert not rpc_server_wanted("b", plan.splits, {})


def test_a_gpu_primary_puts_its_own_layers_last():
    parts = (Part("b", "b/gpu0", 11, 1), Part("a", "a/gpu0", 20, 1))
    step = split_step("a", Split("big", "a", parts), record())
    assert step.host_layers == 0 and step.tensor_split == (11.0, 20.0)


def test_gossip_carries_the_rpc_version_and_readiness():
    payload = node_payload("h:1", "c", [], {}, [], rpc_version="7.0.0", rpc_ready=True)
    read = read_payload("n", payload)
    assert (read.rpc_version, read.rpc_ready) == ("7.0.0", True)
    assert read_payload("n", node_payload("h:1", "c", [], {}, [])).rpc_version is None
