"""AMD GPUs through amdsmi (ROCm's SMI library).

Without libamd_smi.so, `import amdsmi` prints to stdout and raises (KeyError in some
versions): both are contained here, and mean no AMD GPUs. A failed import is remembered
so periodic probes do not retry it. Temperature, activity and ECC are read one by one
(a consumer card has no ECC, an Instinct no edge sensor): each failure leaves only that
reading unknown.
"""

from __future__ import annotations

import contextlib
import io
import logging

from aivailable.gpu.info import GpuInfo
from aivailable.gpu.readings import ECC_MAX, as_int, celsius, read

log = logging.getLogger(__name__)

_import_failure: str | None = None  # why amdsmi could not be imported, once it failed


def _load_amdsmi():
    global _import_failure
    if _import_failure is not None:
        return None
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            import amdsmi
    except (Exception, SystemExit) as e:
        _import_failure = f"{type(e).__name__}: {e}; {chatter.getvalue().strip()}".strip("; ")
        log.debug("amdsmi unavailable: %s", _import_failure)
        return None
    return amdsmi


def probe() -> list[GpuInfo]:
    amdsmi = _load_amdsmi()
    if amdsmi is None:
        return []
    try:
        amdsmi.amdsmi_init()
    except Exception as e:  # no amdgpu driver loaded
        log.debug("amdsmi init failed: %s", e)
        return []
    try:
        return _devices(amdsmi)
    except Exception as e:
        log.warning("amdsmi probe failed: %s", e)
        return []
    finally:
        with contextlib.suppress(Exception):
            amdsmi.amdsmi_shut_down()


def _vram(amdsmi, handle) -> tuple[int, int]:
    """(total, free) in bytes; newer amdsmi has memory_total/usage, older only vram_usage (MB)."""
    try:
        vram = amdsmi.AmdSmiMemoryType.VRAM
        total = int(amdsmi.amdsmi_get_gpu_memory_total(handle, vram))
        used = int(amdsmi.amdsmi_get_gpu_memory_usage(handle, vram))
    except (AttributeError, TypeError):
        usage = amdsmi.amdsmi_get_gpu_vram_usage(handle)
        total = int(usage["vram_total"]) << 20
        used = int(usage["vram_used"]) << 20
    return total, max(0, total - used)


def _devices(amdsmi) -> list[GpuInfo]:
    gpus = []
    for index, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
        try:
            asic = amdsmi.amdsmi_get_gpu_asic_info(handle)
            total, free = _vram(amdsmi, handle)
        except Exception as e:  # one broken device hides only itself
            log.warning("AMD GPU %d cannot be read: %s", index, e)
            continue
        try:
            driver = str(amdsmi.amdsmi_get_gpu_driver_info(handle).get("driver_version", ""))
        except Exception:
            driver = ""
        try:  # the PCI id matches this card to llama.cpp's device (aivailable/gpu/devices.py)
            pci = str(amdsmi.amdsmi_get_gpu_device_bdf(handle))
        except Exception:
            pci = ""
        gpus.append(
            GpuInfo(
                id=f"amd{index}",
                vendor="amd",
                name=str(asic.get("market_name") or "AMD GPU"),
                vram_total=total,
                vram_free=free,
                driver=driver,
                compute=str(asic.get("target_graphics_version") or ""),
                index=index,
                pci=pci,
                **readings(amdsmi, handle),
            )
        )
    return gpus


def _temperatures(amdsmi, handle) -> tuple[int | None, int | None]:
    """(now, critical limit) of the edge sensor, else of the hotspot one (Instinct cards
    have no edge sensor): both of one sensor, so that they compare."""
    kinds = getattr(amdsmi, "AmdSmiTemperatureType", None)
    metrics = getattr(amdsmi, "AmdSmiTemperatureMetric", None)
    if kinds is None or metrics is None:
        return None, None

    def metric(sensor, name):
        value = read(amdsmi, "amdsmi_get_temp_metric", handle, sensor, getattr(metrics, name, None))
        return celsius(value)

    for sensor in (getattr(kinds, "EDGE", None), getattr(kinds, "HOTSPOT", None)):
        now = metric(sensor, "CURRENT")
        if now is not None:
            return now, metric(sensor, "CRITICAL") or None
    return None, None


def readings(amdsmi, handle) -> dict:
    """The GpuInfo reading fields amdsmi gives for this card."""
    activity = read(amdsmi, "amdsmi_get_gpu_activity", handle)
    busy = activity.get("gfx_activity") if isinstance(activity, dict) else None  # or "N/A"
    mask = as_int(read(amdsmi, "amdsmi_get_gpu_ecc_enabled", handle), 0, 2**64)
    ecc = None if mask is None else mask != 0  # a bit per block with ECC on
    errors = None
    if ecc:
        counts = read(amdsmi, "amdsmi_get_gpu_total_ecc_count", handle)
        if isinstance(counts, dict):
            errors = as_int(counts.get("uncorrectable_count"), 0, ECC_MAX)
    temperature, limit = _temperatures(amdsmi, handle)
    return {
        "temperature": temperature,
        "temp_limit": limit,
        "utilization": as_int(busy, 0, 100),
        "ecc": ecc,
        "ecc_errors": errors,
    }
