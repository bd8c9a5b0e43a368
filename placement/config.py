"""Placement settings (nested by the app's Config) and the step from a GGUF file to a ModelSpec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from placement.estimate import CACHE_TYPES, DEFAULT_OVERHEAD, estimate
from placement.model import ModelSpec
from placement.solve import POLICIES


@dataclass(frozen=True)
class PlacementConfig:
    # "pack": best fit, so large free blocks stay for large models (use every GB of every old
    # GPU); "spread": the least loaded node first, for latency when VRAM is plentiful.
    policy: str = "pack"
    # Move running instances when a from-scratch plan places strictly more (a new higher
    # priority model, a lost node whose model fits only after a shuffle). False: never move.
    rebalance: bool = True
    # Slots per llama.cpp instance (requests it serves at once); each gets n_ctx tokens of KV.
    n_parallel: int = 1
    # KV cache element type. f16 is llama.cpp's default; q8_0 halves the cache at a small
    # quality cost but needs flash attention for the V cache.
    cache_type: str = "f16"
    # llama.cpp's micro-batch in tokens (its default); the compute buffer grows with it.
    n_ubatch: int = 512
    # llama-cpp-python's default is off; on, the compute buffer at long contexts is far smaller.
    flash_attn: bool = False
    # Bytes per process the GPU runtime takes beyond llama.cpp's buffers (CUDA/ROCm context,
    # BLAS workspace); ~150-500 MiB by GPU generation and driver, 256 MiB a middle figure.
    runtime_overhead: int = DEFAULT_OVERHEAD

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"placement policy must be one of {POLICIES}")
        if self.cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type must be one of {sorted(CACHE_TYPES)}")
        if self.n_parallel < 1 or self.n_ubatch < 1 or self.runtime_overhead < 0:
            raise ValueError("n_parallel and n_ubatch must be positive, overhead not negative")


def model_spec(
    name: str,
    gguf_path: str | Path,
    n_ctx: int,
    *,
    replicas: int = 1,
    priority: int = 0,
    config: PlacementConfig = PlacementConfig(),  # noqa: B008 (frozen, so sharing is safe)
) -> ModelSpec:
    """The ModelSpec for one deployed model: its estimate as vram and split overhead."""
    e = estimate(
        gguf_path,
        n_ctx,
        config.n_parallel,
        cache_type=config.cache_type,
        n_ubatch=config.n_ubatch,
        flash_attn=config.flash_attn,
        overhead=config.runtime_overhead,
    )
    return ModelSpec(name, e.total, replicas, priority, split_overhead=e.split_overhead)
