"""Simulated GPUs from `--gpu fake:NAME:VRAM`, for demos and tests on machines without one."""

from __future__ import annotations

import re

from aivailable.gpu.info import GpuInfo

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
PREFIX = "fake:"


def parse_size(text: str) -> int:
    """'8GiB' -> 8589934592; '12GB' -> 12e9; '4096MiB' -> 4294967296. A unit is required."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"bad VRAM size {text!r}: use a number and a unit, e.g. 8GiB, 12GB, 4096MiB"
        )
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"bad VRAM size {text!r}: must be more than zero")
    return size


def parse_fake_gpu(spec: str, index: int = 0) -> GpuInfo:
    """'fake:GTX 1080:8GiB' -> a fake GpuInfo. NAME may hold spaces and colons: VRAM is
    what follows the last colon."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        raise ValueError(f"bad GPU spec {spec!r}: expected fake:NAME:VRAM, e.g. fake:GTX 1080:8GiB")
    name, sep, vram = spec[len(PREFIX) :].rpartition(":")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"bad GPU spec {spec!r}: expected fake:NAME:VRAM, e.g. fake:GTX 1080:8GiB")
    try:
        size = parse_size(vram)
    except ValueError as e:
        raise ValueError(f"bad GPU spec {spec!r}: {e}") from None
    return GpuInfo(
        id=f"fake{index}",
        vendor="fake",
        name=name,
        vram_total=size,
        vram_free=size,
        driver="fake",
        compute="fake",
        index=index,
    )
