"""One list of this node's GPUs: llama.cpp's registry decides what is usable, NVML and
amdsmi add what they know.

- A registry GPU is a GPU of the node, whether or not a vendor library sees it (an RX 580
  on Vulkan without ROCm). A vendor device at the same PCI id lends it its name, driver,
  compute capability and fresh free memory.
- A card a vendor library sees but no backend of this build drives (a CPU-only wheel on a
  CUDA box, a Kepler card past the build's CUDA archs) is kept, `usable=False`, with the
  reason and the command that builds a llama-cpp-python that can drive it.
- One card seen by two backends (CUDA0 and Vulkan0 of one GTX 1080) is one device: the
  vendor's own backend wins, so its VRAM is never counted twice.
- When the registry cannot be read at all, the vendor devices stay usable as before: a
  broken probe must not take a working GPU away.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from aivailable.gpu.info import GpuInfo, Vendor
from aivailable.gpu.registry import Registry, RegistryDevice

log = logging.getLogger(__name__)

# The backend a vendor's own stack gives; preferred over Vulkan for the same card.
NATIVE_BACKEND = {"nvidia": "CUDA", "amd": "HIP"}
VENDOR_OF_BACKEND: dict[str, Vendor] = {"CUDA": "nvidia", "HIP": "amd"}
_NAME_HINTS: tuple[tuple[tuple[str, ...], Vendor], ...] = (
    (("nvidia", "geforce", "quadro", "tesla", "rtx", "gtx"), "nvidia"),
    (("amd", "radeon", "ati ", "firepro", "instinct"), "amd"),
    (("intel",), "intel"),
)
REBUILD = {
    "nvidia": (
        'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
        "llama-cpp-python (CUDA <= 12 for Kepler/Maxwell), or `make vulkan`"
    ),
    "amd": (
        'CMAKE_ARGS="-DGGML_HIP=on -DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
        "llama-cpp-python (a ROCm that still supports the card), or `make vulkan`"
    ),
}


def vendor_from_name(text: str) -> Vendor:
    low = text.lower()
    for words, vendor in _NAME_HINTS:
        if any(w in low for w in words):
            return vendor
    return "other"


def norm_pci(pci: str) -> str:
    """'00000000:01:00.0' (NVML), '0000:01:00.0' (ggml, amdsmi) -> '0000:01:00.0'."""
    parts = pci.strip().lower().split(":")
    if len(parts) != 3:
        return pci.strip().lower()
    domain, bus, devfn = parts
    try:
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{devfn}"
    except ValueError:
        return pci.strip().lower()


def _match(dev: RegistryDevice, vendors: list[GpuInfo]) -> GpuInfo | None:
    """The vendor device that is this registry device: same PCI id, else (no id known)
    the same backend-local index of the vendor's own backend, else the same name."""
    if dev.pci:
        return next((v for v in vendors if v.pci and norm_pci(v.pci) == norm_pci(dev.pci)), None)
    native = [v for v in vendors if NATIVE_BACKEND.get(v.vendor) == dev.backend]
    if native and dev.ordinal < len(native) and not any(v.pci for v in native):
        return native[dev.ordinal]
    return next((v for v in vendors if v.name and v.name.lower() in dev.description.lower()), None)


def _from_registry(dev: RegistryDevice, vendor_dev: GpuInfo | None) -> GpuInfo:
    key = norm_pci(dev.pci) if dev.pci else f"{dev.backend.lower()}{dev.ordinal}"
    if vendor_dev is None:
        vendor = VENDOR_OF_BACKEND.get(dev.backend) or vendor_from_name(dev.description)
        return GpuInfo(
            id=dev.name,
            vendor=vendor,
            name=dev.description or dev.name,
            vram_total=dev.total,
            vram_free=dev.free,
            driver="",
            compute="",
            index=dev.ordinal,
            backend=dev.backend,
            pci=norm_pci(dev.pci) if dev.pci else "",
            key=key,
        )
    # The vendor library's memory reading is fresh on every probe; the registry's is cached.
    return replace(
        vendor_dev,
        id=dev.name,
        index=dev.ordinal,
        backend=dev.backend,
        pci=vendor_dev.pci or norm_pci(dev.pci),
        key=norm_pci(vendor_dev.pci) if vendor_dev.pci else key,
    )


def _undriven(v: GpuInfo, reg: Registry) -> GpuInfo:
    native = NATIVE_BACKEND.get(v.vendor, "")
    have = ", ".join(b for b in reg.backends if b != "RPC") or "none"
    if native and native in reg.backends:
        why = f"this build's {native} backend does not list it"
        if v.compute:
            why += f" (a driver problem, or compute {v.compute} not compiled into the build)"
    else:
        why = f"this llama.cpp build has no {native or 'backend'} for it (its backends: {have})"
    fix = REBUILD.get(v.vendor, "`make vulkan`")
    return replace(
        v,
        backend=native,
        usable=False,
        reason=f"{why}; rebuild: {fix}",
        key=norm_pci(v.pci) if v.pci else f"{v.vendor}{v.index}",
    )


def merge(reg: Registry, vendors: Sequence[GpuInfo]) -> list[GpuInfo]:
    """Usable registry GPUs (registry order), then the vendor cards no backend drives.
    Ids are left as the registry's names; probe_all numbers them gpu0, gpu1, ..."""
    vendors = list(vendors)
    if reg.error:
        log.warning("llama.cpp's device registry unreadable (%s): trusting NVML/amdsmi", reg.error)
        return [
            replace(v, backend=v.backend or NATIVE_BACKEND.get(v.vendor, ""), key=v.key or v.id)
            for v in vendors
        ]
    out: list[GpuInfo] = []
    claimed: dict[int, int] = {}  # id(vendor device) -> position in out
    # The vendor's own backend first, so it claims its card before Vulkan does.
    order = sorted(reg.gpus, key=lambda d: (d.backend not in NATIVE_BACKEND.values(), d.index))
    for dev in order:
        vdev = _match(dev, [v for v in vendors if id(v) not in claimed])
        if vdev is None and _match(dev, [v for v in vendors if id(v) in claimed]):
            continue  # a card already listed, seen again through a second backend
        if vdev is not None:
            claimed[id(vdev)] = len(out)
        out.append(_from_registry(dev, vdev))
    out.sort(key=lambda g: next(d.index for d in reg.gpus if d.name == g.id))
    out += [_undriven(v, reg) for v in vendors if id(v) not in claimed]
    return out
