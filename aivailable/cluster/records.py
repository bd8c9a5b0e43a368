"""The records the replicated state holds of each model, and the field checks that build
them from a command or a snapshot (state.py applies them). Pure: no clock, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from placement.estimate import KV_TYPES

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_REPLICAS = 64
MAX_TEXT = 4096  # longest source / address / id string accepted in a command
# Seconds an idle scaled model stays loaded unless its deploy says otherwise: Ollama's
# keep_alive default, which its users are used to.
DEFAULT_IDLE_UNLOAD_S = 300.0
MAX_IDLE_UNLOAD_S = float(1 << 31)


class CommandError(ValueError):
    """A command that does not decode or is not well formed."""


class SnapshotError(ValueError):
    """Snapshot bytes that cannot be restored; the state is left unchanged."""


@dataclass(frozen=True)
class ModelRecord:
    """A desired model: what `deploy` asked for plus what is known of its file."""

    name: str
    source: str
    replicas: int = 1
    n_ctx: int = 2048
    priority: int = 0
    sha256: str | None = None  # of the GGUF file, once someone has resolved the source
    size: int | None = None  # bytes of the file
    vram: int | None = None  # placement.estimate(...).total, once a leader had the file
    split_overhead: int | None = None  # extra bytes per extra GPU when split
    kind: str = "chat"  # "chat" generates text; "embedding" serves /v1/embeddings
    n_parallel: int | None = None  # slots per instance; None: the engine's default
    kv_type: str = "f16"  # KV cache element type: f16, q8_0 or q4_0 (issue 22)
    # Demand scaling (cluster/scaling.py): None for both keeps `replicas` fixed. Otherwise
    # the replicas follow the load between min and max; `replicas` is where they start.
    min_replicas: int | None = None
    max_replicas: int | None = None
    # Seconds without a request before a scaled model goes down to min (0 unloads at once;
    # negative: never). Ollama's keep_alive on a request overrides it for that model.
    idle_unload_s: float = DEFAULT_IDLE_UNLOAD_S
    # Over several nodes through llama.cpp RPC: "auto" (only when no one node fits),
    # "always" (tests, demos), "never".
    split: str = "auto"
    # Per-slot bytes for split plans, once a leader read the header (placement.estimate.
    # layer_profile): [layer bytes..., output, compute, compute_output, overhead].
    profile: tuple[int, ...] | None = None

    @property
    def scaled(self) -> bool:
        return self.min_replicas is not None

    def to_wire(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "replicas": self.replicas,
            "n_ctx": self.n_ctx,
            "priority": self.priority,
            "sha256": self.sha256,
            "size": self.size,
            "vram": self.vram,
            "split_overhead": self.split_overhead,
            "kind": self.kind,
            "n_parallel": self.n_parallel,
            "kv_type": self.kv_type,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "idle_unload_s": self.idle_unload_s,
            "split": self.split,
            "profile": list(self.profile) if self.profile is not None else None,
        }


@dataclass(frozen=True)
class ScaleRecord:
    """What demand scaling last committed for a model: the count, when, and why."""

    wanted: int
    at: float = 0.0  # the leader's wall clock (seconds since the epoch)
    reason: str = ""
    previous: int | None = None  # the count before this change

    def to_wire(self) -> dict:
        return {
            "wanted": self.wanted,
            "at": self.at,
            "reason": self.reason,
            "previous": self.previous,
        }


def _bounds(fields: dict, replicas: int) -> tuple[int | None, int | None, int]:
    """(min, max, starting replicas) of a deploy: `replicas` (default 1) clamped to the
    bounds. Either bound alone implies the other: min alone scales up to max(min,
    replicas, 1); max alone down to 1 (0 only when asked for)."""
    lo, hi = fields.get("min_replicas"), fields.get("max_replicas")
    if lo is None and hi is None:
        return None, None, replicas
    lo = _int(lo if lo is not None else min(1, hi), "min_replicas", 0, MAX_REPLICAS)
    hi = _int(hi if hi is not None else max(lo, replicas, 1), "max_replicas", 1, MAX_REPLICAS)
    if lo > hi:
        raise CommandError(f"min_replicas {lo} is above max_replicas {hi}")
    return lo, hi, max(lo, min(hi, replicas))


def _seconds(value: Any, what: str) -> float:
    """Seconds, the default for None; any negative reads as -1 (never)."""
    if value is None:
        return DEFAULT_IDLE_UNLOAD_S
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise CommandError(f"{what} must be a number of seconds")
    if value > MAX_IDLE_UNLOAD_S:
        raise CommandError(f"{what} out of range: {value}")
    return float(value) if value >= 0 else -1.0


def _model_record(fields: dict, measured: bool = False) -> ModelRecord:
    """A ModelRecord from a deploy command's fields, checked, with the defaults a deploy
    leaves out. `measured`: also what a leader measured of the file (a snapshot carries
    it; a deploy command may not set it)."""
    replicas = _int(fields.get("replicas", 1), "replicas", 0, MAX_REPLICAS)
    lo, hi, replicas = _bounds(fields, replicas)
    if lo is None and replicas < 1:
        raise CommandError("replicas out of range: 0 (a fixed deploy needs 1; use min_replicas 0)")
    return ModelRecord(
        name=_name(fields.get("name")),
        source=_text(fields.get("source"), "source"),
        replicas=replicas,
        n_ctx=_int(fields.get("n_ctx", 2048), "n_ctx", 1, 1 << 24),
        priority=_int(fields.get("priority", 0), "priority", -(1 << 31), 1 << 31),
        sha256=_sha(fields.get("sha256")),
        size=_opt_int(fields.get("size"), "size"),
        vram=_opt_int(fields.get("vram"), "vram") if measured else None,
        split_overhead=_opt_int(fields.get("split_overhead"), "split_overhead")
        if measured
        else None,
        kind=_kind(fields.get("kind", "chat")),
        n_parallel=_opt_int(fields.get("n_parallel"), "n_parallel"),
        kv_type=_kv_type(fields.get("kv_type", "f16")),
        min_replicas=lo,
        max_replicas=hi,
        idle_unload_s=_seconds(fields.get("idle_unload_s"), "idle_unload_s"),
        split=_split(fields.get("split", "auto")),
        profile=_profile(fields.get("profile")) if measured else None,
    )


# ---- field checks -----------------------------------------------------------------------


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list | tuple):
        raise CommandError(f"{what} must be a list")
    return list(value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise CommandError(f"{what} must be a non-empty string")
    return value


def _int(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandError(f"{what} must be an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CommandError(f"{what} out of range: {value}")
    return value


def _kind(value: Any) -> str:
    if value not in ("chat", "embedding"):
        raise CommandError(f"kind must be chat or embedding, not {value!r}")
    return value


def _split(value: Any) -> str:
    if value not in ("auto", "never", "always"):
        raise CommandError(f"split must be auto, never or always, not {value!r}")
    return value


def _profile(value: Any) -> tuple[int, ...] | None:
    """[layer bytes..., output, compute, compute_output, overhead]: 1 layer at least."""
    if value is None:
        return None
    items = tuple(_int(v, "profile bytes", 0) for v in _list(value, "profile"))
    if len(items) < 5:
        raise CommandError("a layer profile needs a layer, output, compute buffers, overhead")
    return items


def _kv_type(value: Any) -> str:
    if value not in KV_TYPES:
        raise CommandError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {value!r}")
    return value


def _opt_int(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what, 0)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not MODEL_NAME.match(value):
        raise CommandError(f"bad model name {value!r}")
    return value


def _sha(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not SHA256_HEX.match(value):
        raise CommandError("sha256 must be 64 lowercase hex digits")
    return value
