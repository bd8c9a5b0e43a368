"""GPU probes: what devices this node has, their VRAM, driver and architecture.

    from aivailable.gpu import GpuInfo, probe_all, parse_fake_gpu
    gpus = probe_all(["fake:GTX 1080:8GiB"])   # llama.cpp's GPUs, undriven cards, then fakes

The installed llama.cpp build's own device registry (gpu/registry.py) says which GPUs are
usable; NVML and amdsmi enrich them and add the cards the build cannot drive, with
`usable=False` and the reason (gpu/devices.py). Ids are "gpu0", "gpu1", ... in that order
(the CPU device is "cpu"); the peer prefixes its node id ("n1/gpu0"). `index` is the
backend's own device number, `key` a stable id (the PCI id where known).
"""

from __future__ import annotations

import os
from dataclasses import replace

from aivailable.gpu import amd, devices, nvml, registry
from aivailable.gpu.fake import parse_fake_gpu, parse_size
from aivailable.gpu.info import GpuInfo, Vendor

__all__ = ["GpuInfo", "Vendor", "cpu_device", "parse_fake_gpu", "parse_size", "probe_all"]


def probe_all(
    fake_specs: list[str] | tuple[str, ...] = (),
    *,
    real: bool = True,
    include_cpu: bool = False,
    reg: registry.Registry | None = None,
) -> list[GpuInfo]:
    """Probe real GPUs (unless `real` is False) and add the fake ones.

    Raises ValueError for a bad fake spec; a missing vendor library is never an error.
    `include_cpu` appends the CPU as a device with the machine's RAM, for nodes that may
    run models on the CPU. `reg`: llama.cpp's registry (default: read in a child process
    once per process). Unusable cards are in the list; callers place only `usable` ones.
    """
    fakes = [
        replace(parse_fake_gpu(spec, i), backend="fake", key=f"fake{i}")
        for i, spec in enumerate(fake_specs)
    ]
    found = []
    if real:
        found = devices.merge(
            reg if reg is not None else registry.cached(), nvml.probe() + amd.probe()
        )
    found = [gpu.with_id(f"gpu{i}") for i, gpu in enumerate(found + fakes)]
    if include_cpu:
        found.append(cpu_device())
    return found


def cpu_device() -> GpuInfo:
    """The CPU as a device: RAM total and available (Linux /proc/meminfo, else sysconf)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return GpuInfo("cpu", "cpu", "CPU", total, free, "", "", 0, backend="CPU", key="cpu")
