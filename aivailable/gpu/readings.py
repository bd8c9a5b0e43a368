"""Vendor readings that change over time (temperature, utilisation, ECC errors): read one
by one so that a card answering NotSupported to one loses only that one, bounded for
gossip, and steadied so that an idle card's 1 °C wobble does not re-gossip the node.

    read(pynvml, "nvmlDeviceGetTemperature", handle, 0)  # the value, or None on any error
    steady(previous_gpus, fresh_gpus)                   # fresh, small moves held back
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from aivailable.gpu.info import GpuInfo

log = logging.getLogger(__name__)

# A reading is re-published once it moved this far from the last one published.
TEMP_STEP_C = 5
UTIL_STEP = 10
# Bounds of a gossiped reading: anything else is nonsense or a counter to cap.
TEMP_RANGE = (-40, 200)
ECC_MAX = 65535  # "this many or more": keeps its msgpack form at 3 bytes


def read(module: Any, name: str, *args: Any) -> Any:
    """module.name(*args), or None when it raises (NVMLError_NotSupported,
    AmdSmiLibraryException) or an old library lacks it: all mean unknown."""
    try:
        return getattr(module, name)(*args)
    except Exception as e:
        log.debug("%s unavailable: %s", name, e)
        return None


def as_int(value: Any, lo: int, hi: int) -> int | None:
    """An int reading clamped into [lo, hi]; None for anything that is not a number
    (amdsmi's "N/A", a bool, None)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return max(lo, min(hi, int(value)))


def celsius(value: Any) -> int | None:
    """°C; amdsmi documents millidegrees (some versions give degrees): no card runs at
    1000 °C, so a value that large is millidegrees."""
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) >= 1000:
        value = value / 1000
    return as_int(value, *TEMP_RANGE)


def _held(old: int | None, new: int | None, step: int) -> int | None:
    if old is None or new is None or abs(new - old) >= step:
        return new
    return old


def steady(previous: Sequence[GpuInfo], fresh: Sequence[GpuInfo]) -> list[GpuInfo]:
    """`fresh`, with a temperature or utilisation that moved less than its step since
    `previous` (same ids) left at the previous value, unless that changes the card's
    health: the gossip payload then stays the same and nothing is re-sent."""
    before = {g.id: g for g in previous}
    out = []
    for g in fresh:
        old = before.get(g.id)
        if old is not None:
            held = replace(
                g,
                temperature=_held(old.temperature, g.temperature, TEMP_STEP_C),
                utilization=_held(old.utilization, g.utilization, UTIL_STEP),
            )
            g = held if held.health == g.health else g
        out.append(g)
    return out
