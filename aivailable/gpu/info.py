"""What a GPU probe reports about one device."""

from __future__ import annotations

from dataclasses import dataclass, replace

from placement.model import Vendor  # one Vendor: placement plans with the same names


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

    def with_id(self, gpu_id: str) -> GpuInfo:
        return replace(self, id=gpu_id)
