"""NVIDIA GPUs through NVML (the nvidia-ml-py package, imported as `pynvml`).

No package, no libnvidia-ml.so or no driver all mean the same: no NVIDIA GPUs here.
Temperature, utilisation and ECC are read one by one: an old card answers NotSupported
to some (a GeForce has no ECC), which leaves only that reading unknown.
"""

from __future__ import annotations

import contextlib
import logging

from aivailable.gpu.info import GpuInfo
from aivailable.gpu.readings import ECC_MAX, TEMP_RANGE, as_int, read

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
                **readings(pynvml, handle),
            )
        )
    return gpus


def readings(pynvml, handle) -> dict:
    """The GpuInfo reading fields NVML gives for this card (nvml.h's constants where the
    module lacks them: temperature sensor 0 is the GPU, threshold 1 the slowdown one)."""
    const = lambda name, default: getattr(pynvml, name, default)  # noqa: E731
    temp = read(pynvml, "nvmlDeviceGetTemperature", handle, const("NVML_TEMPERATURE_GPU", 0))
    limit = read(
        pynvml,
        "nvmlDeviceGetTemperatureThreshold",
        handle,
        const("NVML_TEMPERATURE_THRESHOLD_SLOWDOWN", 1),
    )
    rates = read(pynvml, "nvmlDeviceGetUtilizationRates", handle)
    mode = read(pynvml, "nvmlDeviceGetEccMode", handle)  # [current, pending]
    ecc = bool(mode[0]) if isinstance(mode, list | tuple) and mode else None
    errors = None
    if ecc:  # volatile: since the driver loaded, what matters for the card now
        errors = read(
            pynvml,
            "nvmlDeviceGetTotalEccErrors",
            handle,
            const("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
            const("NVML_VOLATILE_ECC", 0),
        )
    return {
        "temperature": as_int(temp, *TEMP_RANGE),
        "temp_limit": as_int(limit, *TEMP_RANGE) or None,
        "utilization": as_int(getattr(rates, "gpu", None), 0, 100),
        "ecc": ecc,
        "ecc_errors": as_int(errors, 0, ECC_MAX),
    }
