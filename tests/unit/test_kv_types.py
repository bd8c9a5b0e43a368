"""KV cache types per deploy (issue 22): the field from the API to the worker's argv, and
the VRAM planned for it."""

import pytest

from aivailable.api.cluster_api import deploy_options
from aivailable.api.errors import ApiError
from aivailable.backends.llama_engine import LlamaEngine
from aivailable.cluster import controller as ctl
from aivailable.cluster import state as cs
from aivailable.cluster.reconciler import Running, plan_steps
from placement import Assignment, estimate


def test_the_api_takes_the_three_types_and_refuses_others():
    assert deploy_options({"kv_type": "q8_0"})["kv_type"] == "q8_0"
    assert "kv_type" not in deploy_options({})  # the leader's default: f16
    for bad in ("q5_1", "F16", 8, None):
        with pytest.raises(ApiError) as info:
            deploy_options({"kv_type": bad})
        assert info.value.param == "kv_type"


def test_the_state_records_it_and_a_changed_type_drops_the_measured_vram():
    state = cs.ClusterState()
    state.apply(cs.encode_deploy("m", "builtin:smollm2-135m"), 1)
    assert state.models["m"].kv_type == "f16"  # an old command: f16
    state.models["m"] = cs.replace(state.models["m"], vram=123)
    state.apply(cs.encode_deploy("m", "builtin:smollm2-135m", kv_type="f16"), 1)
    assert state.models["m"].vram == 123  # same configuration: still measured
    state.apply(cs.encode_deploy("m", "builtin:smollm2-135m", kv_type="q4_0"), 1)
    assert state.models["m"].kv_type == "q4_0" and state.models["m"].vram is None
    assert cs.ModelRecord(**{**state.models["m"].to_wire()}).kv_type == "q4_0"
    result = state.apply(cs.encode_deploy("bad", "builtin:smollm2-135m", kv_type="q2"), 1)
    assert not result.ok and "kv_type" in result.error


def test_a_new_type_restarts_the_instance_with_it():
    record = cs.ModelRecord("m", "/m.gguf", kv_type="q8_0")
    wanted = [Assignment("m", "n1", ("n1/gpu0",), (1,))]
    running = {"m": Running("/m.gguf", ("gpu0",), "ready", 2048, ("chat", None))}
    steps = plan_steps("n1", wanted, {"m": record}, running)
    assert [(s.action, s.kv_type) for s in steps] == [("stop", "f16"), ("start", "q8_0")]
    same = {"m": Running("/m.gguf", ("gpu0",), "ready", 2048, ("chat", None, "q8_0"))}
    assert plan_steps("n1", wanted, {"m": record}, same) == []


def test_the_planned_vram_shrinks_with_the_cache(embedded_model):
    f16 = cs.ModelRecord("m", "/none.gguf", n_ctx=4096, size=1 << 30)
    q8 = cs.replace(f16, kv_type="q8_0")
    q4 = cs.replace(f16, kv_type="q4_0")
    guesses = [ctl.model_vram(r)[0] for r in (f16, q8, q4)]
    assert guesses[0] > guesses[1] > guesses[2]
    # From the header: a quantized cache runs with flash attention (smaller compute too).
    by_type = {
        t: estimate(embedded_model, 4096, 8, **ctl.kv_estimate_args(cs.replace(f16, kv_type=t)))
        for t in ("f16", "q8_0", "q4_0")
    }
    assert by_type["q8_0"].kv_cache * 64 == by_type["f16"].kv_cache * 34
    assert by_type["q4_0"].kv_cache * 64 == by_type["f16"].kv_cache * 18
    assert by_type["f16"].total > by_type["q8_0"].total > by_type["q4_0"].total


def test_the_worker_is_started_with_it():
    engine = LlamaEngine("m", "/m.gguf", kv_type="q4_0")
    argv = engine._command()
    assert argv[argv.index("--kv-type") + 1] == "q4_0"
    assert "--kv-type" not in LlamaEngine("m", "/m.gguf")._command()
