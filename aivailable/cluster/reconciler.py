"""The reconciler as a pure step, on every peer: this node's part of the committed plan and
what runs now in, the stops and starts out (every stop before any start, so a GPU is freed
before it is filled again). Pure: `runner.Reconciler` carries them out against `Instances`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aivailable.cluster.state import ModelRecord
from placement import Assignment
from placement.split import Split

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
    options: tuple | None = None  # Step.options it was started with
    split_key: tuple = ()  # the split it was started as (Step.split_key)


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
    # A split's primary: the helper nodes in llama.cpp's --rpc order, the layer slots of
    # [their devices..., this node's gpus...] (as tensor_split), the slots kept on the CPU.
    rpc_helpers: tuple[str, ...] = ()
    host_layers: int = 0
    split_key: tuple = ()  # (node, gpu, layers) of every part: any change restarts it
    kv_type: str = "f16"

    @property
    def options(self) -> tuple:
        """What else than file, GPUs and context an instance is started with: a change
        restarts it. The default cache type is left out, as a peer before it had none."""
        if self.kv_type == "f16":
            return (self.kind, self.n_parallel)
        return (self.kind, self.n_parallel, self.kv_type)


def split_step(node_id: str, split: Split, record: ModelRecord) -> Step:
    """The start of a split instance on its primary (placement/split.py's layer order:
    a host primary's slots first and on the CPU, else the helpers' first)."""
    mine = [p for p in split.parts if p.node == node_id]
    theirs = [p for p in split.parts if p.node != node_id]
    host_first = split.primary_first()
    counts = [p.layers for p in theirs] + ([] if host_first else [p.layers for p in mine])
    return Step(
        "start",
        split.model,
        record.source,
        tuple(local_gpu_id(node_id, p.gpu) for p in mine),
        tuple(float(c) for c in counts),
        record.n_ctx,
        record.kind,
        record.n_parallel,
        rpc_helpers=split.helpers,
        host_layers=sum(p.layers for p in mine) if host_first else 0,
        split_key=tuple((p.node, p.gpu, p.layers) for p in split.parts),
        kv_type=record.kv_type,
    )


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
    splits: Iterable[Split] = (),
    rpc_ready: Iterable[str] = (),
) -> list[Step]:
    """The stops, then the starts, that turn `running` into this node's part of the plan.

    An instance keeps running while its model, GPUs, source and context size are unchanged:
    a new VRAM estimate alone does not reload a model (which is why this compares with what
    runs rather than diffing two plans with placement.diff, whose key includes the bytes).
    A failed instance is restarted only when its model is in `retry_due`. Assignments of a
    model no longer deployed are ignored (the next plan drops them).

    `splits` this node is the primary of start only once every helper's RPC server is
    ready (`rpc_ready`: nodes gossiping a running one), so the load finds them all; one
    already running as planned is left alone meanwhile.
    """
    due, ready = set(retry_due), set(rpc_ready)
    held: set[str] = set()
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
            kv_type=record.kv_type,
        )
    for split in splits:
        record = models.get(split.model)
        if split.primary != node_id or record is None or split.model in want:
            continue
        want[split.model] = split_step(node_id, split, record)
        if not set(split.helpers) <= ready:
            held.add(split.model)
    stops, starts = [], []
    for model in sorted(running):
        have, need = running[model], want.get(model)
        same = (
            need is not None
            and have.source == need.source
            and have.gpus == need.gpus
            and have.n_ctx in (None, need.n_ctx)
            and have.options in (None, need.options)
            and have.split_key == need.split_key
        )
        if not same or (have.state == "failed" and model in due):
            stops.append(Step("stop", model))
    stopped = {s.model for s in stops}
    for model in sorted(want):
        if (model not in running or model in stopped) and model not in held:
            starts.append(want[model])
    return stops + starts


def rpc_server_wanted(node_id: str, splits: Iterable[Split], models: Mapping) -> bool:
    """This node helps a split of a deployed model: its RPC server should run."""
    return any(node_id in s.helpers and s.model in models for s in splits)
