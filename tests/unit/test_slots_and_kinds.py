"""Slots and kinds travel from a deploy to the engine: the replicated record, the gossip
payload, the replica order of forwarding and the reconciler's restart decision."""

import pytest

from aivailable.api.cluster_api import deploy_options
from aivailable.api.errors import ApiError
from aivailable.cluster import state as cs
from aivailable.cluster.payload import node_payload, read_payload
from aivailable.cluster.reconciler import Running, plan_steps
from peer.availability import Replica, order_replicas
from placement import Assignment


def test_a_deploy_records_kind_and_slots_and_a_snapshot_keeps_them():
    state = cs.ClusterState()
    state.apply(cs.encode_deploy("emb", "builtin:smollm2-135m", kind="embedding", n_parallel=2), 1)
    record = state.models["emb"]
    assert (record.kind, record.n_parallel) == ("embedding", 2)
    restored = cs.ClusterState()
    restored.restore(state.snapshot())
    assert restored.models["emb"] == record
    bad = state.apply(cs.encode_deploy("x", "builtin:smollm2-135m", kind="image"), 1)
    assert not bad.ok and "kind" in bad.error
    # An old command without the fields: a chat model with the engine's default slots.
    state.apply(cs.encode_deploy("plain", "builtin:smollm2-135m"), 1)
    assert (state.models["plain"].kind, state.models["plain"].n_parallel) == ("chat", None)


def test_deploy_options_are_checked():
    assert deploy_options({}) == {"kind": "chat", "n_parallel": None, "split": "auto"}
    assert deploy_options({"kind": "embedding", "n_parallel": 8, "split": "always"}) == {
        "kind": "embedding",
        "n_parallel": 8,
        "split": "always",
    }
    for body, param in (
        ({"kind": "x"}, "kind"),
        ({"split": "sometimes"}, "split"),
        ({"n_parallel": 0}, "n_parallel"),
        ({"n_parallel": True}, "n_parallel"),
    ):
        with pytest.raises(ApiError) as info:
            deploy_options(body)
        assert info.value.param == param


def test_free_slots_cross_gossip_and_old_payloads_still_read():
    views = [{"model": "m", "state": "ready", "queue_depth": 3, "free_slots": 5, "gpus": ["gpu0"]}]
    payload = read_payload("n1", node_payload("h:1", "c", [], {}, views))
    (inst,) = payload.instances
    assert (inst.queue_depth, inst.free_slots, inst.gpus) == (3, 5, ("gpu0",))
    old = node_payload("h:1", "c", [], {}, views)
    old["inst"] = [entry[:4] for entry in old["inst"]]  # a peer of the previous version
    assert read_payload("n1", old).instances[0].free_slots == 0


def test_forwarding_prefers_the_replica_with_the_most_free_slots():
    busy = Replica("a", "a:1", False, "ready", queue_depth=1, free_slots=1)
    roomy = Replica("b", "b:1", False, "ready", queue_depth=2, free_slots=6)
    assert [r.node_id for r in order_replicas([busy, roomy])] == ["b", "a"]
    # What this peer sent since the last gossip counts against the free slots.
    assert [r.node_id for r in order_replicas([busy, roomy], {"b": 6})] == ["a", "b"]
    # This peer's own replica comes first only while it can start the request at once
    # (issue 22): a full one loses to a remote free slot, and is first again among equals.
    mine = Replica("me", "me:1", True, "ready", queue_depth=9, free_slots=0)
    assert order_replicas([busy, roomy, mine])[0] is roomy
    assert order_replicas([busy, roomy, mine], routing="local_first")[0] is mine
    idle = Replica("me", "me:1", True, "ready", queue_depth=0, free_slots=1)
    assert order_replicas([busy, roomy, idle])[0] is idle


def test_a_change_of_kind_or_slots_restarts_the_instance():
    models = {"m": cs.ModelRecord("m", "/m.gguf", kind="chat", n_parallel=4)}
    wanted = [Assignment("m", "n1", ("n1/gpu0",), (100,))]
    same = {"m": Running("/m.gguf", ("gpu0",), "ready", 2048, ("chat", 4))}
    assert plan_steps("n1", wanted, models, same) == []
    for options in (("embedding", 4), ("chat", 8)):
        running = {"m": Running("/m.gguf", ("gpu0",), "ready", 2048, options)}
        steps = plan_steps("n1", wanted, models, running)
        assert [(s.action, s.model) for s in steps] == [("stop", "m"), ("start", "m")]
        assert (steps[1].kind, steps[1].n_parallel) == ("chat", 4)
