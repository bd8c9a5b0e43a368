"""estimate(): the VRAM one llama.cpp instance of a GGUF model needs, from its header alone.

Reads only the GGUF header (metadata and tensor table, a few MB at most), never the weights,
so it works on a 70B file as fast as on a 100 MB one, and on header-only files.

What llama.cpp allocates on the GPU(s) for a fully offloaded model (its load log prints each):
- weights ("CUDA0 model buffer size"): every tensor but the input token embeddings, which
  stay in host memory; a model with tied embeddings (no output.weight) needs them on the GPU
  as the output layer, so then every tensor counts.
- KV cache ("llama_kv_cache: size"): layers x cells x (K row + V row), cells = n_parallel x
  n_ctx rounded up to 256 (the total rounded, with a unified cache), rows in the cache type (f16, q8_0 = 34/32 bytes, q4_0 =
  18/32 bytes per element).
- compute buffer ("compute buffer size"): the peak of one micro-batch (n_ubatch tokens, f32):
  either the logits (n_vocab) or, without flash attention, the attention scores of every
  head plus the mask over the n_kv cells one sequence sees; plus a few activations.
- overhead: the GPU runtime's own context and workspaces per process (CUDA/ROCm context,
  cuBLAS/hipBLAS), which llama.cpp does not log; 256 MiB is a typical figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from placement.gguf_header import GgufFormatError, GgufHeader, read_header

MIB = 1 << 20
DEFAULT_OVERHEAD = 256 * MIB  # per process: GPU runtime context + BLAS workspace, not logged
CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this
CACHE_TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
}

# The cache types a deploy may name ("kv_type"): llama-server's -ctk/-ctv choices that
# halve (q8_0) or quarter (q4_0) the cache per slot, with f16 the default.
KV_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class Estimate:
    weights: int  # bytes of weights on the GPU(s)
    kv_cache: int  # bytes of KV cache
    compute: int  # bytes of llama.cpp's compute buffer
    total: int  # weights + kv_cache + compute + overhead: what to reserve on one GPU
    overhead: int = 0  # bytes the GPU runtime itself takes per process
    host_weights: int = 0  # bytes of weights kept in host RAM (input embeddings)
    # compute buffer of a device that holds layers but not the output head (no logits):
    # what each helper of a split needs (placement/split.py)
    compute_body: int = 0

    @property
    def split_overhead(self) -> int:
        """Extra bytes per additional GPU when split: each holds a compute buffer and context."""
        return self.compute + self.overhead


def _row_bytes(ggml_type: GGMLQuantizationType, n: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return -(-n // block) * size


def _per_layer(value, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value] if len(value) == n_layer else [max(value)] * n_layer
    return [int(value)] * n_layer


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def estimate(
    gguf: str | Path | GgufHeader,
    n_ctx: int,
    n_parallel: int = 1,
    *,
    cache_type: str = "f16",
    n_ubatch: int = 512,
    flash_attn: bool = False,
    kv_unified: bool = False,
    overhead: int = DEFAULT_OVERHEAD,
) -> Estimate:
    """Bytes one llama.cpp instance needs with n_parallel slots of n_ctx tokens each.

    `gguf` is the model file's path, or its header if already read. The instance is to be
    started with a context of n_ctx * n_parallel and n_parallel sequences (llama-server
    `-c n_ctx*n_parallel -np n_parallel`), with `n_ubatch`, `flash_attn`, `kv_unified` and
    K and V cache types `cache_type` (q8_0/q4_0 V caches need flash attention in llama.cpp).
    """
    if n_ctx <= 0 or n_parallel <= 0 or n_ubatch <= 0:
        raise ValueError("n_ctx, n_parallel and n_ubatch must be positive")
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"cache_type must be one of {sorted(CACHE_TYPES)}")
    # header-only files are fine here: only the header is read
    header = gguf if isinstance(gguf, GgufHeader) else read_header(gguf, check_data=False)
    hv = header.arch_value
    n_layer = int(hv("block_count", 0))
    n_embd = int(hv("embedding_length", 0))
    if n_layer <= 0 or n_embd <= 0:
        raise GgufFormatError(f"{header.architecture}: block_count/embedding_length missing")
    n_head = _per_layer(hv("attention.head_count", 1), n_layer)
    n_head_kv = _per_layer(hv("attention.head_count_kv", hv("attention.head_count", 1)), n_layer)
    n_ff = max(_per_layer(hv("feed_forward_length", 4 * n_embd), n_layer))
    head_k = int(hv("attention.key_length", n_embd // max(max(n_head), 1)))
    head_v = int(hv("attention.value_length", head_k))
    n_vocab = int(hv("vocab_size", 0) or header.metadata.get("tokenizer.ggml.tokens", 0))
    if not n_vocab and "token_embd.weight" in header.tensors:
        n_vocab = header.tensors["token_embd.weight"].shape[-1]

    # weights on the GPU: all but the input embeddings, unless they double as the output layer
    unknown = [name for name, t in header.tensors.items() if t.nbytes is None]
    if unknown:
        raise GgufFormatError(f"unknown ggml type of tensor {unknown[0]!r}")
    all_weights = sum(t.nbytes for t in header.tensors.values())
    embd = header.tensors.get("token_embd.weight")
    host = embd.nbytes if embd is not None and "output.weight" in header.tensors else 0
    weights = all_weights - host

    # KV cache: one K and one V row per cell and layer
    # (each sequence's context is padded, or the whole one when the cache is unified)
    cells = _pad(n_ctx * n_parallel, CTX_PAD) if kv_unified else _pad(n_ctx, CTX_PAD) * n_parallel
    ctype = CACHE_TYPES[cache_type]
    kv_cache = sum(
        cells * (_row_bytes(ctype, head_k * kv) + _row_bytes(ctype, head_v * kv))
        for kv in n_head_kv
    )

    # compute buffer: the peak of one ubatch, in f32 values per token (fitted to llama.cpp's
    # graph allocator): logits, or attention scores of every head + mask + activations, or
    # the feed-forward step; flash attention never stores the scores and uses an f16 mask.
    n_kv = cells if kv_unified else cells // n_parallel
    ubatch = min(n_ubatch, n_ctx * n_parallel)  # llama.cpp caps the batch at the context
    n_embd_kv = head_k * max(n_head_kv)
    body = []
    if flash_attn:
        body.append(n_kv // 2 + 3 * n_ff + 4 * n_embd)
    else:
        body.append(n_kv * (max(n_head) + 1) + 5 * n_embd + 2 * n_embd_kv)
        body.append(n_kv + 3 * n_ff + 2 * n_embd)
    steps = [n_vocab + 3 * n_embd, *body]
    if not flash_attn and n_vocab <= 3 * n_ff:  # the logits land above the FFN's freed buffers
        steps.append(n_vocab + 2 * n_ff)
    compute = 4 * ubatch * max(steps)

    total = weights + kv_cache + compute + overhead
    return Estimate(
        weights,
        kv_cache,
        compute,
        total,
        overhead=overhead,
        host_weights=host,
        compute_body=4 * ubatch * max(body),
    )


def layer_profile(
    gguf: str | Path | GgufHeader,
    n_ctx: int,
    n_parallel: int = 1,
    **options,
):
    """The per-slot bytes of one instance for split plans (placement.split.LayerProfile):
    each repeating layer's weights and KV cache, the output head, the compute buffers.
    `options` as for estimate()."""
    from placement.split import LayerProfile

    header = gguf if isinstance(gguf, GgufHeader) else read_header(gguf, check_data=False)
    e = estimate(header, n_ctx, n_parallel, **options)
    n_layer = int(header.arch_value("block_count", 0))
    weights = [0] * n_layer
    output = 0
    for name, t in header.tensors.items():
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            if index < n_layer:
                weights[index] += t.nbytes
        elif name.startswith("output"):
            output += t.nbytes
    if "output.weight" not in header.tensors and "token_embd.weight" in header.tensors:
        output += header.tensors["token_embd.weight"].nbytes  # tied: a copy on that device
    kv = [e.kv_cache // n_layer] * n_layer
    kv[0] += e.kv_cache - sum(kv)
    return LayerProfile(
        tuple(w + k for w, k in zip(weights, kv, strict=True)),
        output,
        compute=e.compute_body,
        compute_output=e.compute,
        overhead=e.overhead,
    )
