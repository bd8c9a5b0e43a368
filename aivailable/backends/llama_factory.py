"""The real engine factory: a llama.cpp worker per instance, on the GPUs it was given.

Which devices a worker sees is set through its environment, chosen here and only here
from each device's llama.cpp backend: CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES,
GGML_VK_VISIBLE_DEVICES. Every backend the node has but the instance was not given is
hidden, so a build with CUDA and Vulkan never spreads one model over both views of a
card. Every layer is offloaded when the instance has a GPU; simulated (fake) GPUs and the
CPU device run the model on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from aivailable.backends.base import Engine, EngineFactory, EngineSpec
from aivailable.backends.llama_engine import EngineConfig, LlamaEngine
from aivailable.gpu.info import GpuInfo

# The variable that pins a worker to some of a backend's devices, by the backend's index.
VISIBLE_ENV = {
    "CUDA": "CUDA_VISIBLE_DEVICES",
    "HIP": "HIP_VISIBLE_DEVICES",
    "Vulkan": "GGML_VK_VISIBLE_DEVICES",
}
# What hides every device of a backend: CUDA and ggml-vulkan read "" as none; ROCm stops
# at the first invalid index (an empty HIP_VISIBLE_DEVICES is not documented as none).
HIDE_ALL = {"CUDA": "", "HIP": "-1", "Vulkan": ""}
_LEGACY_BACKEND = {"nvidia": "CUDA", "amd": "HIP"}  # GpuInfo made before backends existed
_NOT_GPU = ("", "CPU", "fake")


def backend_of(gpu: GpuInfo) -> str:
    return gpu.backend or _LEGACY_BACKEND.get(gpu.vendor, "")


def is_offload_gpu(gpu: GpuInfo) -> bool:
    """A device llama.cpp offloads layers to: usable and driven by a GPU backend."""
    return gpu.usable and backend_of(gpu) not in _NOT_GPU


def n_gpu_layers_for(gpus: Sequence[GpuInfo]) -> int:
    """-1 (offload every layer) on a real, usable GPU, 0 (CPU only) otherwise.
    Fake GPUs are for placement demos; their models still run on the CPU."""
    return -1 if any(is_offload_gpu(g) for g in gpus) else 0


def _pin(backend: str, index: int, parent: Mapping[str, str]) -> str | None:
    """The value naming device `index` of `backend` for a child. The probe saw the devices
    through the parent's own list, if it set one: index N is that list's Nth entry."""
    listed = parent.get(VISIBLE_ENV[backend])
    if listed is not None:
        entries = [e for e in listed.replace(",", " ").split() if e]
        return entries[index] if index < len(entries) else None
    if backend == "Vulkan":
        # Without a list, ggml's VulkanN skips CPU-type devices (lavapipe) and duplicates:
        # N is not the loader's index, so leave the worker the default set (docs/devices.md).
        return None
    return str(index)


def device_env(
    gpus: Sequence[GpuInfo],
    node_gpus: Sequence[GpuInfo] = (),
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment that shows a worker only `gpus` of the node's devices ({} when
    the node has no GPU backend at all)."""
    parent = os.environ if parent is None else parent
    mine = [g for g in gpus if is_offload_gpu(g)]
    present = {backend_of(g) for g in [*node_gpus, *mine] if is_offload_gpu(g)}
    env: dict[str, str] = {}
    for backend in sorted(present & VISIBLE_ENV.keys()):
        wanted = [g.index for g in mine if backend_of(g) == backend]
        pins = [_pin(backend, i, parent) for i in wanted]
        if wanted and None in pins:
            continue  # cannot name them: the default set, as the probe saw it
        env[VISIBLE_ENV[backend]] = ",".join(p for p in pins if p) if wanted else HIDE_ALL[backend]
    return env


def llama_factory(
    gpus: Sequence[GpuInfo], n_ctx: int, queue_limit: int, config: EngineConfig
) -> EngineFactory:
    """Real llama.cpp workers: full offload on the assigned real GPUs, else the CPU.
    `n_ctx` is the node's default context (a deploy's own wins)."""
    by_id = {g.id: g for g in gpus}

    def build(spec: EngineSpec) -> Engine:
        assigned = [by_id[g] for g in spec.gpus if g in by_id]
        if spec.rpc_servers:
            return split_engine(spec, assigned, n_ctx, queue_limit, config, gpus)
        several = sum(is_offload_gpu(g) for g in assigned) > 1
        return LlamaEngine(
            spec.model,
            spec.path,
            n_ctx=spec.n_ctx or n_ctx,
            n_gpu_layers=n_gpu_layers_for(assigned),
            queue_limit=queue_limit,
            env=device_env(assigned, gpus),
            config=config,
            tensor_split=(spec.tensor_split or None) if several else None,
            n_parallel=spec.n_parallel,
            kind=spec.kind,
            kv_type=spec.kv_type,
        )

    return build


def split_layers(path, host_layers: int, shares: Sequence[float]) -> tuple[int, tuple[float, ...]]:
    """(n_gpu_layers, tensor_split) for a split's primary. The plan counts layer slots of
    its own profile (n_layer + 1 with the output head); scaled to this file's n_layer, the
    first `host_layers` stay on the CPU and the rest go to the devices in `shares`' order."""
    from placement.gguf_header import read_header

    header = read_header(path, check_data=False)
    slots = int(header.arch_value("block_count", 0)) + 1
    planned = host_layers + sum(shares)
    host = round(host_layers * slots / planned) if planned else 0
    return slots - host, tuple(shares)


def split_engine(
    spec: EngineSpec,
    assigned: Sequence[GpuInfo],
    n_ctx: int,
    queue_limit: int,
    config: EngineConfig,
    node_gpus: Sequence[GpuInfo] = (),
) -> Engine:
    """The primary's worker of a split instance: its layers here (a real GPU's, or the
    CPU's first layers), the rest on the helpers' RPC servers through the tunnels. On a
    GPU, the node's other backends are hidden (one card seen by CUDA and Vulkan must not
    take two shares); a CPU host leaves the environment as it is (the engine reads an
    empty one as a CPU host and computes its layers on every core)."""
    n_gpu_layers, shares = split_layers(spec.path, spec.host_layers, spec.tensor_split)
    on_gpu = any(is_offload_gpu(g) for g in assigned)
    return LlamaEngine(
        spec.model,
        spec.path,
        n_ctx=spec.n_ctx or n_ctx,
        n_gpu_layers=n_gpu_layers,
        queue_limit=queue_limit,
        env=device_env(assigned, node_gpus if on_gpu else ()),
        config=config,
        tensor_split=shares,
        n_parallel=spec.n_parallel,
        kind=spec.kind,
        rpc_servers=spec.rpc_servers,
    )
