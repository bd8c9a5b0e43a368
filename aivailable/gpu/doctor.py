"""`aivailable doctor`: what this machine's llama.cpp build can drive, and why not the rest."""

from __future__ import annotations

import os
from collections.abc import Sequence

from aivailable.gpu.info import GpuInfo
from aivailable.gpu.registry import DEVICE_ENV, Registry

GIB = 1 << 30


def report(reg: Registry, gpus: Sequence[GpuInfo]) -> str:
    """The registry's view, then each card: usable with its backend, or the reason."""
    lines = []
    if reg.error:
        lines.append(f"llama.cpp's device registry: unreadable ({reg.error})")
    else:
        lines.append(f"llama.cpp build: {reg.library}")
        lines.append(f"  backends: {', '.join(reg.backends) or 'none'}")
        for d in reg.devices:
            lines.append(
                f"  {d.name:10} {d.kind:5} {d.total / GIB:7.2f} GiB  {d.description}"
                + (f"  [{d.pci}]" if d.pci else "")
            )
        if "Vulkan" in reg.backends and not any(d.backend == "Vulkan" for d in reg.devices):
            lines.append(
                "  Vulkan lists no device: ggml passes over CPU-type devices (lavapipe) unless "
                "GGML_VK_VISIBLE_DEVICES names them"
            )
    env = {k: os.environ[k] for k in DEVICE_ENV if k in os.environ}
    if env:
        lines.append("  under " + " ".join(f"{k}={v}" for k, v in env.items()))
    lines.append("GPUs of this node:")
    if not gpus:
        lines.append("  none: models run on the CPU")
    for g in gpus:
        mem = f"{g.vram_free / GIB:.2f} / {g.vram_total / GIB:.2f} GiB free"
        if g.usable:
            lines.append(f"  {g.id} {g.name}: usable via {g.backend or '?'} ({mem}) key {g.key}")
        else:
            lines.append(f"  {g.id} {g.name}: NOT usable: {g.reason}")
        if seen := readings(g):
            lines.append(f"    {seen}")
        if g.health:
            lines.append(f"    UNHEALTHY: {g.health}")
    return "\n".join(lines)


def readings(g: GpuInfo) -> str:
    """What NVML/amdsmi read of the card, e.g. '64 °C (slows at 90 °C), 12% busy, ECC on:
    0 uncorrected errors'; "" when they read nothing (a card only llama.cpp sees)."""
    parts = []
    if g.temperature is not None:
        parts.append(
            f"{g.temperature} °C" + (f" (slows at {g.temp_limit} °C)" if g.temp_limit else "")
        )
    if g.utilization is not None:
        parts.append(f"{g.utilization}% busy")
    if g.ecc is not None:
        errors = "" if g.ecc_errors is None else f": {g.ecc_errors} uncorrected errors"
        parts.append(f"ECC {'on' if g.ecc else 'off'}{errors if g.ecc else ''}")
    return ", ".join(parts)
