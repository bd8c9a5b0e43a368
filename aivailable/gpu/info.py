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
    index: int = 0  # the vendor's own device index (for CUDA/HIP_VISIBLE_DEVICES, main_gpu)

    def with_id(self, gpu_id: str) -> GpuInfo:
        return replace(self, id=gpu_id)
