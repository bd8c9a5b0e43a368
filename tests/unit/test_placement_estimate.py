"""placement.estimate() on header-only synthetic GGUF files of published model shapes.

Figures are checked against llama.cpp's own formulas (KV cache: layers x cells x (K + V) rows
in the cache type; weights: the tensor table) and its well-known log figures. The comparison
with what llama.cpp really allocates is in test_placement_estimate_llama.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from placement import Estimate, PlacementConfig, estimate, model_spec
from placement.estimate import DEFAULT_OVERHEAD
from placement.gguf_header import GgufFormatError, read_header
from tests.unit.placement_gguf import (
    LLAMA2_7B,
    LLAMA3_8B,
    LLAMA3_70B,
    LLAMA32_1B,
    LlamaShape,
    nbytes,
    tensor_table,
    write_llama_gguf,
)

MIB, GIB = 1 << 20, 1 << 30
SHAPES = [LLAMA2_7B, LLAMA3_8B, LLAMA3_70B, LLAMA32_1B]
BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # ggml block sizes


@pytest.fixture(scope="module")
def headers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {s.name: write_llama_gguf(root / f"{s.name}.gguf", s) for s in SHAPES}


def kv_formula(shape: LlamaShape, n_ctx: int, n_parallel: int, cache: str) -> int:
    cells = -(-n_ctx // 256) * 256 * n_parallel  # llama.cpp pads each sequence's context to 256
    n_embd_kv = shape.n_embd // shape.n_head * shape.n_head_kv
    return round(shape.n_layer * cells * 2 * n_embd_kv * BYTES_PER_ELEMENT[cache])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("cache", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize(("n_ctx", "n_parallel"), [(4096, 1), (2048, 4), (1000, 3), (131072, 1)])
def test_kv_cache_follows_llama_cpp(headers, shape, cache, n_ctx, n_parallel):
    e = estimate(headers[shape.name], n_ctx, n_parallel, cache_type=cache, flash_attn=True)
    assert e.kv_cache == kv_formula(shape, n_ctx, n_parallel, cache)


def test_kv_cache_matches_llama_cpps_well_known_figures(headers):
    # "KV self size = 2048.00 MiB" for Llama-2-7B at n_ctx 4096; GQA models need a quarter.
    assert estimate(headers["llama-2-7b"], 4096).kv_cache == 2048 * MIB
    assert estimate(headers["llama-3-8b"], 8192).kv_cache == 1024 * MIB
    assert estimate(headers["llama-3-70b"], 8192).kv_cache == 2560 * MIB


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_weights_are_the_tensor_table_less_host_embeddings(headers, shape):
    table = {name: nbytes(dims, t) for name, dims, t in tensor_table(shape, T.Q4_0)}
    e = estimate(headers[shape.name], 4096)
    if shape.tied:  # token_embd doubles as the output layer, so it goes to the GPU too
        assert (e.weights, e.host_weights) == (sum(table.values()), 0)
    else:
        assert e.host_weights == table["token_embd.weight"]
        assert e.weights == sum(table.values()) - table["token_embd.weight"]


def test_a_70b_header_is_read_without_its_37_gib_of_weights(headers):
    path = headers["llama-3-70b"]
    assert path.stat().st_size < 100_000
    e = estimate(path, 8192)
    # llama.cpp prints "model size = 37.22 GiB" for Llama-3.1-70B Q4_0 (a Q6_K output layer).
    assert e.weights + e.host_weights == pytest.approx(37.22 * GIB, rel=0.05)


def test_total_adds_the_parts_and_the_runtime_overhead(headers):
    e = estimate(headers["llama-3-8b"], 8192, 2)
    assert e.overhead == DEFAULT_OVERHEAD
    assert e.total == e.weights + e.kv_cache + e.compute + e.overhead
    assert e.split_overhead == e.compute + e.overhead
    bare = estimate(headers["llama-3-8b"], 8192, 2, overhead=0)
    assert bare.total == e.total - DEFAULT_OVERHEAD


def test_compute_buffer_scales_like_llama_cpps_graph(headers):
    path = headers["llama-2-7b"]
    short, long = estimate(path, 4096).compute, estimate(path, 16384).compute
    # without flash attention the f32 scores of all 32 heads (+ mask) dominate at long context
    assert long - short == pytest.approx(4 * 512 * (16384 - 4096) * (32 + 1), rel=0.01)
    assert estimate(path, 16384, flash_attn=True).compute < long / 4
    assert estimate(path, 16384, n_ubatch=256).compute == pytest.approx(long / 2, rel=0.01)
    # never below the logits of one micro-batch
    assert estimate(path, 512).compute >= 4 * 512 * 32000


def test_bad_files_and_arguments_are_refused(tmp_path, headers):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GgufFormatError):
        estimate(not_gguf, 4096)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(headers["llama-2-7b"].read_bytes()[:2000])
    with pytest.raises(GgufFormatError):
        estimate(cut, 4096)
    with pytest.raises(ValueError):
        estimate(headers["llama-2-7b"], 0)
    with pytest.raises(ValueError):
        estimate(headers["llama-2-7b"], 4096, cache_type="q3_k")


def test_header_reader_gives_the_metadata(headers):
    h = read_header(headers["llama-3-8b"], check_data=False)  # a header-only file
    assert h.architecture == "llama"
    assert h.arch_value("block_count") == 32
    assert h.tensors["token_embd.weight"].shape == (4096, 128256)
    assert estimate(h, 8192, 2) == estimate(headers["llama-3-8b"], 8192, 2)  # a header read once


def test_per_layer_head_counts_shape_the_kv_cache(tmp_path):
    """Variable-GQA models give head counts per layer; the vocabulary size comes from the
    token list, which the header reader only counts."""
    path = tmp_path / "per-layer.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_embedding_length(256)
    w.add_block_count(4)
    w.add_head_count(8)
    w.add_head_count_kv([8, 2, 0, 4])  # 0: a layer without attention
    w.add_token_list([f"t{i}" for i in range(40_000)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    e = estimate(path, 1024, flash_attn=True)
    assert e.kv_cache == 1024 * 2 * (256 // 8) * (8 + 2 + 0 + 4) * 2  # K and V rows, f16
    assert e.compute == 4 * 512 * (40_000 + 3 * 256)  # the logits of one micro-batch


def test_estimate_is_a_plain_value():
    e = Estimate(1, 2, 3, 6)
    assert dataclasses.astuple(e)[:4] == (1, 2, 3, 6)


def test_model_spec_reserves_the_estimate_and_splits_pay_the_per_gpu_part(headers):
    path = headers["llama-3-8b"]
    config = PlacementConfig(n_parallel=2, cache_type="q8_0", flash_attn=True)
    spec = model_spec("l3", path, 8192, replicas=2, priority=1, config=config)
    e = estimate(path, 8192, 2, cache_type="q8_0", flash_attn=True)
    assert (spec.name, spec.vram, spec.replicas, spec.priority) == ("l3", e.total, 2, 1)
    assert spec.split_overhead == e.compute + e.overhead
    with pytest.raises(ValueError):
        PlacementConfig(policy="random")
