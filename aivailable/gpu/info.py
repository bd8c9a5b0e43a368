"""What a GPU probe reports about one device, and whether its readings say it is unwell."""

from __future__ import annotations

from dataclasses import dataclass, replace

from placement.model import Vendor  # one Vendor: placement plans with the same names

# Temperature (°C) taken as too hot when the vendor library gives no limit of its own.
HOT_C = 95


@dataclass(frozen=True)
class GpuInfo:
    id: str  # this node's name for the device, "gpu0", "gpu1", ...; the peer prefixes its node id
    vendor: Vendor
    name: str  # marketing name, e.g. "NVIDIA GeForce GTX 1080"
    vram_total: int  # bytes
    vram_free: int  # bytes, at probe time (other programs' use already subtracted)
    driver: str  # driver version, "" if unknown
    compute: str  # NVIDIA compute capability "6.1", AMD architecture "gfx906", "" if unknown
    index: int = 0  # the backend's own device index (the N of CUDA/HIP/GGML_VK_VISIBLE_DEVICES)
    backend: str = ""  # llama.cpp backend that drives it: "CUDA", "HIP", "Vulkan", "Metal", "CPU"
    usable: bool = True  # False: this llama.cpp build cannot drive it; never placed on
    reason: str = ""  # why it is not usable, with the rebuild command ("" when usable)
    pci: str = ""  # PCI bus id "0000:01:00.0" (lower case), "" when unknown
    key: str = ""  # stable across restarts: the PCI id, else backend + index ("vulkan0")
    # Readings from NVML or amdsmi, at probe time; None where the card or library gives
    # none (old cards answer NotSupported), and for cards only llama.cpp sees.
    temperature: int | None = None  # °C
    temp_limit: int | None = None  # °C at which the card slows itself down
    utilization: int | None = None  # % of the last sample period the GPU was busy
    ecc: bool | None = None  # ECC memory enabled
    ecc_errors: int | None = None  # uncorrected ECC errors since the driver loaded

    def with_id(self, gpu_id: str) -> GpuInfo:
        return replace(self, id=gpu_id)

    @property
    def health(self) -> str:
        return health(self.temperature, self.temp_limit, self.ecc_errors)


def health(temperature: int | None, limit: int | None, ecc_errors: int | None) -> str:
    """ "" for a card whose readings show nothing wrong (or that has none), else why not:
    uncorrected ECC errors (its memory corrupts data), or a temperature at its limit."""
    problems = []
    if ecc_errors:
        problems.append(f"{ecc_errors} uncorrected ECC error{'s' if ecc_errors > 1 else ''}")
    hot = limit if limit else HOT_C
    if temperature is not None and temperature >= hot:
        problems.append(f"{temperature} °C, at or over its limit of {hot} °C")
    return "; ".join(problems)
