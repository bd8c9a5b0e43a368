"""Synthetic llama-architecture GGUF files written with the gguf package's GGUFWriter.

`write_llama_gguf(..., data=False)` writes the header only (metadata and tensor table): enough
for placement.estimate, a few KB even for a 70B shape. With `data=True` the tensor data follows
as zeros, written sparse (the file takes almost no disk), so llama.cpp itself can load the
model and log its buffer sizes; a `no_vocab` tokenizer keeps the header small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter


@dataclass(frozen=True)
class LlamaShape:
    name: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    tied: bool = False  # no output.weight: the token embeddings double as the output layer


# Shapes of published models (their config.json), for header-only estimates.
LLAMA2_7B = LlamaShape("llama-2-7b", 32000, 4096, 32, 32, 32, 11008)
LLAMA3_8B = LlamaShape("llama-3-8b", 128256, 4096, 32, 32, 8, 14336)
LLAMA3_70B = LlamaShape("llama-3-70b", 128256, 8192, 80, 64, 8, 28672)
LLAMA32_1B = LlamaShape("llama-3.2-1b", 128256, 2048, 16, 32, 8, 8192, tied=True)


def tensor_table(shape: LlamaShape, wtype: GGMLQuantizationType) -> list[tuple[str, tuple, int]]:
    """(name, ggml dims, type) of every tensor of a llama model of this shape."""
    e, kv = shape.n_embd, shape.n_embd // shape.n_head * shape.n_head_kv
    f32 = GGMLQuantizationType.F32
    out = [("token_embd.weight", (e, shape.n_vocab), wtype), ("output_norm.weight", (e,), f32)]
    if not shape.tied:
        out.append(("output.weight", (e, shape.n_vocab), wtype))
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (e,), f32),
            (b + "attn_q.weight", (e, e), wtype),
            (b + "attn_k.weight", (e, kv), wtype),
            (b + "attn_v.weight", (e, kv), wtype),
            (b + "attn_output.weight", (e, e), wtype),
            (b + "ffn_norm.weight", (e,), f32),
            (b + "ffn_gate.weight", (e, shape.n_ff), wtype),
            (b + "ffn_up.weight", (e, shape.n_ff), wtype),
            (b + "ffn_down.weight", (shape.n_ff, e), wtype),
        ]
    return out


def nbytes(dims: tuple, ggml_type: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(dims)) // block * size


def write_llama_gguf(
    path: Path,
    shape: LlamaShape,
    wtype: GGMLQuantizationType = GGMLQuantizationType.Q4_0,
    *,
    n_ctx_train: int = 8192,
    data: bool = False,
) -> Path:
    w = GGUFWriter(str(path), "llama")
    w.add_name(shape.name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.n_vocab)
    w.add_tokenizer_model("none")
    table = tensor_table(shape, wtype)
    for name, dims, ggml_type in table:
        numpy_shape = tuple(reversed(dims))  # GGUFWriter takes numpy order and reverses it
        w.add_tensor_info(
            name, numpy_shape, np.dtype(np.float32), nbytes(dims, ggml_type), ggml_type
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    if data:
        align = w.data_alignment
        size = path.stat().st_size
        start = -(-size // align) * align
        total = sum(-(-nbytes(d, t) // align) * align for _, d, t in table)
        with open(path, "r+b") as f:
            f.truncate(start + total)  # zeros, sparse on disk
    return path
