"""The reconciler as a pure step, on every peer: this node's part of the committed plan and
what runs now in, the stops and starts out (every stop before any start, so a GPU is freed
before it is filled again). Pure: `runner.Reconciler` carries them out against `Instances`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aivailable.cluster.state import ModelRecord
from placement import Assignment

MIB = 1 << 20


@dataclass(frozen=True)
class ReconcilerConfig:
    # Seconds before a failed instance (or a failed fetch) is tried again; doubles on every
    # failure up to the max. A file that is being copied in, or a GPU that another program
    # frees, recovers on its own; a broken file should not reload in a tight loop.
    retry_s: float = 5.0
    retry_max_s: float = 300.0
    # Seconds between passes when no plan change triggers one: restarts crashed instances
    # and picks up retries.
    tick_s: float = 2.0
    # Bytes kept free on every GPU for other programs, the display and fragmentation: what
    # placement may use is total - used by others - this.
    headroom: int = 256 * MIB
    # Capacity is rounded down to this step so that small VRAM jitter does not change the
    # gossip payload (and trigger a re-plan) every probe.
    capacity_step: int = 64 * MIB


@dataclass(frozen=True)
class Running:
    """What an instance of this node was started with, and how it is doing."""

    source: str
    gpus: tuple[str, ...]  # local gpu ids
    state: str
    n_ctx: int | None = None  # None: not started by the reconciler (unknown)
    options: tuple[str, int | None] | None = None  # (kind, n_parallel) it was started with


@dataclass(frozen=True)
class Step:
    action: str  # "stop" | "start"
    model: str
    source: str = ""
    gpus: tuple[str, ...] = ()  # local gpu ids ("gpu0"), in the assignment's order
    tensor_split: tuple[float, ...] = ()  # proportions per gpu for llama.cpp
    n_ctx: int = 0
    kind: str = "chat"
    n_parallel: int | None = None  # None: the engine's default for this node's device


def local_gpu_id(node_id: str, gpu_id: str) -> str:
    """Plan gpu ids are cluster-wide ("n1/gpu0"); Instances and probes use "gpu0"."""
    prefix = f"{node_id}/"
    return gpu_id[len(prefix) :] if gpu_id.startswith(prefix) else gpu_id


def plan_steps(
    node_id: str,
    wanted: Iterable[Assignment],
    models: Mapping[str, ModelRecord],
    running: Mapping[str, Running],
    retry_due: Iterable[str] = (),
) -> list[Step]:
    """The stops, then the starts, that turn `running` into this node's part of the plan.

    An instance keeps running while its model, GPUs, source and context size are unchanged:
    a new VRAM estimate alone does not reload a model (which is why this compares with what
    runs rather than diffing two plans with placement.diff, whose key includes the bytes).
    A failed instance is restarted only when its model is in `retry_due`. Assignments of a
    model no longer deployed are ignored (the next plan drops them).
    """
    due = set(retry_due)
    want: dict[str, Step] = {}
    for a in wanted:
        record = models.get(a.model)
        if a.node != node_id or record is None:
            continue
        want[a.model] = Step(
            "start",
            a.model,
            record.source,
            tuple(local_gpu_id(node_id, g) for g in a.gpus),
            a.tensor_split if len(a.gpus) > 1 else (),
            record.n_ctx,
            record.kind,
            record.n_parallel,
        )
    stops, starts = [], []
    for model in sorted(running):
        have, need = running[model], want.get(model)
        same = (
            need is not None
            and have.source == need.source
            and have.gpus == need.gpus
            and have.n_ctx in (None, need.n_ctx)
            and have.options in (None, (need.kind, need.n_parallel))
        )
        if not same or (have.state == "failed" and model in due):
            stops.append(Step("stop", model))
    stopped = {s.model for s in stops}
    for model in sorted(want):
        if model not in running or model in stopped:
            starts.append(want[model])
    return stops + starts
