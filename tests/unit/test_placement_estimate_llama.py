"""placement.estimate() against what llama.cpp itself allocates (its load log), within +-10%.

llama.cpp (llama-cpp-python's build, CPU backend here) loads the model in a child process,
creates one context per configuration, and logs its model buffer, KV cache and compute buffer
sizes; placement_llama_probe reads them. The embedded SmolLM2 model is checked on every run;
synthetic models of published shapes (2 layers deep, zero weights, so they load in seconds:
the compute buffer does not depend on depth, and weights and KV cache scale exactly with it)
in the slow run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from placement import estimate
from tests.unit.placement_gguf import LLAMA2_7B, LLAMA3_8B, LLAMA3_70B, LLAMA32_1B, write_llama_gguf
from tests.unit.placement_llama_probe import measure

TOLERANCE = 0.10

CONFIGS = [
    {"n_ctx": 512},
    {"n_ctx": 2048},
    {"n_ctx": 8192},
    {"n_ctx": 100, "n_parallel": 3},
    {"n_ctx": 1000, "n_parallel": 3},
    {"n_ctx": 2048, "n_parallel": 4, "kv_unified": True},
    {"n_ctx": 4096, "flash_attn": True},
    {"n_ctx": 4096, "flash_attn": True, "cache_type": "q8_0"},
    {"n_ctx": 8192, "flash_attn": True, "cache_type": "q4_0"},
    {"n_ctx": 4096, "n_ubatch": 256},
]


def compare(path: Path, configs: list[dict]) -> list[str]:
    """Every figure off by more than TOLERANCE, as readable lines (empty: all within)."""
    weights, measured = measure(path, configs)
    off = []
    for cfg, got in zip(configs, measured, strict=True):
        args = {k: v for k, v in cfg.items() if k not in ("n_ctx", "n_parallel")}
        e = estimate(path, cfg["n_ctx"], cfg.get("n_parallel", 1), **args)
        # the CPU backend keeps every tensor in its model buffer, input embeddings included
        pairs = {
            "weights": (e.weights + e.host_weights, weights),
            "kv_cache": (e.kv_cache, got["kv_cache"]),
            "compute": (e.compute, got["compute"]),
            "sum": (
                e.weights + e.host_weights + e.kv_cache + e.compute,
                weights + got["kv_cache"] + got["compute"],
            ),
        }
        for what, (ours, theirs) in pairs.items():
            if abs(ours - theirs) > TOLERANCE * theirs:
                off.append(f"{path.name} {cfg} {what}: estimate {ours} vs llama.cpp {theirs}")
    return off


def test_estimate_matches_llama_cpp_on_the_embedded_model(embedded_model):
    assert compare(embedded_model, CONFIGS) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [LLAMA2_7B, LLAMA3_8B, LLAMA3_70B, LLAMA32_1B], ids=lambda s: s.name
)
def test_estimate_matches_llama_cpp_on_larger_model_shapes(tmp_path, shape):
    shallow = dataclasses.replace(shape, n_layer=2)
    # Q4_1: the CPU backend would repack Q4_0 into extra buffers that a GPU never has
    path = write_llama_gguf(tmp_path / f"{shape.name}.gguf", shallow, T.Q4_1, data=True)
    configs = [c for c in CONFIGS if c["n_ctx"] <= 16384 and c["n_ctx"] != 512]
    assert compare(path, configs) == []
