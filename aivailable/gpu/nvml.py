"""NVIDIA GPUs through NVML (the nvidia-ml-py package, imported as `pynvml`).

No package, no libnvidia-ml.so or no driver all mean the same: no NVIDIA GPUs here.
"""

from __future__ import annotations

import contextlib
import logging

from aivailable.gpu.info import GpuInfo

log = logging.getLogger(__name__)


def _text(value: object) -> str:
    # Old pynvml returns bytes, new returns str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def probe() -> list[GpuInfo]:
    try:
        import pynvml
    except Exception as e:  # not installed, or broken: no NVIDIA GPUs
        log.debug("NVML unavailable: %s", e)
        return []
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no library or no driver (NVMLError_LibraryNotFound, ...)
        log.debug("NVML init failed: %s", e)
        return []
    try:
        return _devices(pynvml)
    except Exception as e:
        log.warning("NVML probe failed: %s", e)
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _devices(pynvml) -> list[GpuInfo]:
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        driver = ""
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as e:  # one broken device (fallen off the bus) hides only itself
            log.warning("NVIDIA GPU %d cannot be read: %s", index, e)
            continue
        try:
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            compute = f"{major}.{minor}"
        except Exception:
            compute = ""
        try:  # the PCI id matches this card to llama.cpp's device (aivailable/gpu/devices.py)
            pci = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
        except Exception:
            pci = ""
        gpus.append(
            GpuInfo(
                id=f"nvidia{index}",
                vendor="nvidia",
                name=name,
                vram_total=int(memory.total),
                vram_free=int(memory.free),
                driver=driver,
                compute=compute,
                index=index,
                pci=pci,
            )
        )
    return gpus
