"""The real engine factory: a llama.cpp worker per instance, on the GPUs it was given.

Which devices a worker sees is set through its environment (CUDA_VISIBLE_DEVICES for
NVIDIA, HIP_VISIBLE_DEVICES for AMD), and every layer is offloaded when it has a real GPU;
simulated (fake) GPUs and the CPU device run the model on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from aivailable.backends.base import Engine, EngineFactory, EngineSpec
from aivailable.backends.llama_engine import EngineConfig, LlamaEngine
from aivailable.gpu.info import GpuInfo

REAL_VENDORS = ("nvidia", "amd")


def n_gpu_layers_for(gpus: Sequence[GpuInfo]) -> int:
    """-1 (offload every layer) on a node with a real GPU, 0 (CPU only) otherwise.
    Fake GPUs are for placement demos; their models still run on the CPU."""
    return -1 if any(gpu.vendor in REAL_VENDORS for gpu in gpus) else 0


def device_env(gpus: Sequence[GpuInfo]) -> dict[str, str]:
    """The environment that shows a worker only its real GPUs ({} when it has none)."""
    real = [g for g in gpus if g.vendor in REAL_VENDORS]
    if not real:
        return {}
    name = "CUDA_VISIBLE_DEVICES" if real[0].vendor == "nvidia" else "HIP_VISIBLE_DEVICES"
    return {name: ",".join(str(g.index) for g in real)}


def llama_factory(
    gpus: Sequence[GpuInfo], n_ctx: int, queue_limit: int, config: EngineConfig
) -> EngineFactory:
    """Real llama.cpp workers: full offload on the assigned real GPUs, else the CPU.
    `n_ctx` is the node's default context (a deploy's own wins)."""
    by_id = {g.id: g for g in gpus}

    def build(spec: EngineSpec) -> Engine:
        assigned = [by_id[g] for g in spec.gpus if g in by_id]
        several = sum(g.vendor in REAL_VENDORS for g in assigned) > 1
        return LlamaEngine(
            spec.model,
            spec.path,
            n_ctx=spec.n_ctx or n_ctx,
            n_gpu_layers=n_gpu_layers_for(assigned),
            queue_limit=queue_limit,
            env=device_env(assigned),
            config=config,
            tensor_split=(spec.tensor_split or None) if several else None,
            n_parallel=spec.n_parallel,
            kind=spec.kind,
        )

    return build
