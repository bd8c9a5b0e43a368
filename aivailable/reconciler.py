"""The reconciler, on every peer: make this node's model instances match the committed plan.

`plan_steps` is the pure core: this node's assignments and what runs now in, the stops and
starts out (every stop before any start, so a GPU is freed before it is filled again).
`Reconciler` is the thin loop: on every plan change (and a slow tick) it runs those steps
against `Instances`, fetching a missing model file first (model_transfer), and retries a
failed instance with backoff. It also builds this node's gossip payload: its GPUs with the
capacity placement may use, its instance states and the model files it can share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivailable.cluster_state import ClusterState, ModelRecord
from aivailable.controller import Trigger
from placement import Assignment, Gpu

log = logging.getLogger(__name__)

MIB = 1 << 20
PAYLOAD_VERSION = 1


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


@dataclass(frozen=True)
class Step:
    action: str  # "stop" | "start"
    model: str
    source: str = ""
    gpus: tuple[str, ...] = ()  # local gpu ids ("gpu0"), in the assignment's order
    tensor_split: tuple[float, ...] = ()  # proportions per gpu for llama.cpp
    n_ctx: int = 0


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
        )
    stops, starts = [], []
    for model in sorted(running):
        have, need = running[model], want.get(model)
        same = (
            need is not None
            and have.source == need.source
            and have.gpus == need.gpus
            and have.n_ctx in (None, need.n_ctx)
        )
        if not same or (have.state == "failed" and model in due):
            stops.append(Step("stop", model))
    stopped = {s.model for s in stops}
    for model in sorted(want):
        if model not in running or model in stopped:
            starts.append(want[model])
    return stops + starts


# ---- gossip payload ---------------------------------------------------------------------


def gpu_capacity(total: int, free: int, own_used: int, headroom: int, step: int = 64 * MIB) -> int:
    """Bytes placement may use on a GPU: total, minus what other programs hold (used but
    not by our instances), minus headroom; rounded down to `step`."""
    others = max(0, total - free - own_used)
    usable = max(0, total - others - headroom)
    return usable - usable % step if step > 0 else usable


@dataclass(frozen=True)
class InstanceView:
    model: str
    state: str
    queue_depth: int = 0
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeerPayload:
    """What one node gossips about itself (read_payload of node_payload)."""

    addr: str = ""  # HOST:PORT of its HTTP API
    cluster_id: str | None = None
    gpus: tuple[Gpu, ...] = ()  # ids prefixed with the node id, capacity as above
    vram_total: tuple[int, ...] = ()  # per gpu, same order, for the dashboard
    vram_free: tuple[int, ...] = ()
    instances: tuple[InstanceView, ...] = ()
    files: tuple[tuple[str, int, str], ...] = ()  # (sha256, size, source) it can share


def node_payload(
    addr: str,
    cluster_id: str | None,
    gpus: Sequence[Any],
    own_used: Mapping[str, int],
    instances: Iterable[Mapping[str, Any]],
    files: Iterable[tuple[str, int, str]] = (),
    config: ReconcilerConfig = ReconcilerConfig(),
) -> dict:
    """The gossip payload (a msgpack-friendly map). gpus: aivailable.gpu.GpuInfo items (id,
    vendor, name, vram_total, vram_free); own_used: bytes our instances hold per local gpu
    id (Reconciler.own_vram); instances: Instances views (+ pending fetches)."""
    return {
        "v": PAYLOAD_VERSION,
        "addr": addr,
        "cluster": cluster_id,
        "gpus": [
            [
                g.id,
                g.vendor,
                g.name,
                gpu_capacity(
                    g.vram_total,
                    g.vram_free,
                    own_used.get(g.id, 0),
                    config.headroom,
                    config.capacity_step,
                ),
                g.vram_total,
                g.vram_free,
            ]
            for g in gpus
        ],
        "inst": [
            [v["model"], v["state"], int(v.get("queue_depth", 0)), list(v.get("gpus", ()))]
            for v in instances
        ],
        "files": [[sha, size, source] for sha, size, source in files],
    }


def read_payload(node_id: str, payload: Mapping[str, Any] | None) -> PeerPayload:
    """A peer's payload, checked; anything malformed reads as empty (a peer running another
    version never crashes this one, it just offers nothing to place on)."""
    if not isinstance(payload, Mapping) or payload.get("v") != PAYLOAD_VERSION:
        return PeerPayload()
    try:
        gpus, totals, frees = [], [], []
        for gid, vendor, name, capacity, total, free in payload.get("gpus", ()):
            gpus.append(Gpu(f"{node_id}/{gid}", vendor, str(name), int(capacity)))
            totals.append(int(total))
            frees.append(int(free))
        instances = tuple(
            InstanceView(str(m), str(s), int(q), tuple(str(g) for g in gs))
            for m, s, q, gs in payload.get("inst", ())
        )
        files = tuple(
            (str(sha), int(size), str(src)) for sha, size, src in payload.get("files", ())
        )
        cluster = payload.get("cluster")
        return PeerPayload(
            str(payload.get("addr", "")),
            cluster if isinstance(cluster, str) else None,
            tuple(gpus),
            tuple(totals),
            tuple(frees),
            instances,
            files,
        )
    except (TypeError, ValueError):
        return PeerPayload()


# ---- the loop -----------------------------------------------------------------------------

EnsureFile = Callable[[ModelRecord], Awaitable[Path]]
# Checks the sources of deployed models whose checksum nobody knows yet and that this node
# holds locally (model_transfer.ModelFetcher.discover), so they are gossiped and shared.
Discover = Callable[[list[ModelRecord]], Awaitable[None]]


@dataclass
class _Failure:
    error: str
    attempts: int
    retry_at: float


class Reconciler:
    """Runs on every peer. `instances` is the peer's aivailable.instances.Instances;
    `ensure_file(record)` makes the model file local (model_transfer.ModelFetcher.ensure)
    and raises if it cannot; None leaves fetching to the Instances resolver."""

    def __init__(
        self,
        node_id: str,
        state: ClusterState,
        instances: Any,
        trigger: Trigger,
        ensure_file: EnsureFile | None = None,
        config: ReconcilerConfig = ReconcilerConfig(),
        clock: Callable[[], float] = time.monotonic,
        discover: Discover | None = None,
    ):
        self.node_id = node_id
        self.state = state
        self.instances = instances
        self.trigger = trigger
        self._ensure_file = ensure_file
        self._discover = discover
        self._discovering: asyncio.Task | None = None
        self.config = config
        self._clock = clock
        self._started: dict[str, Step] = {}  # what each instance was started with
        self._fetching: dict[str, asyncio.Task] = {}  # model -> fetch-then-start task
        self._failed: dict[str, _Failure] = {}  # models whose start failed, with retry time
        self._attempts: dict[str, int] = {}  # failures in a row, for the backoff
        self._tg: asyncio.TaskGroup | None = None

    # -- what others read

    def launch(self, model: str) -> Step | None:
        """How `model` is (being) started here: gpus, tensor_split, n_ctx. For the engine
        factory, which Instances calls with (model, path, gpus) only."""
        return self._started.get(model)

    def views(self) -> list[dict]:
        """Instance views for gossip and /cluster/status, including fetches in progress and
        fetches that failed."""
        views = list(self.instances.views())
        present = {v["model"] for v in views}
        for model, step in self._started.items():
            if model in present:
                continue
            failure = self._failed.get(model)
            view = {
                "model": model,
                "source": step.source,
                "gpus": list(step.gpus),
                "state": "failed" if failure else "pending",
                "queue_depth": 0,
            }
            if failure:
                view["error"] = failure.error
            views.append(view)
        return views

    def own_vram(self) -> dict[str, int]:
        """Bytes this node's planned instances hold per local gpu id (for gpu_capacity)."""
        used: dict[str, int] = {}
        for a in self.state.assignments_for(self.node_id):
            if a.model in self._started:
                for gpu, vram in zip(a.gpus, a.vram, strict=True):
                    local = local_gpu_id(self.node_id, gpu)
                    used[local] = used.get(local, 0) + vram
        return used

    # -- doing

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                while True:
                    try:
                        await self.reconcile()
                    except Exception:  # an engine that fails to stop must not stop the peer
                        log.exception("reconcile pass failed; trying again")
                    await self.trigger.wait(self.config.tick_s)
            finally:
                for task in self._fetching.values():
                    task.cancel()
                if self._discovering is not None:
                    self._discovering.cancel()
                self._tg = None

    def _running(self) -> dict[str, Running]:
        running = {}
        for model, inst in self.instances.by_model().items():
            started = self._started.get(model)
            n_ctx = started.n_ctx if started is not None else None
            running[model] = Running(inst.source, tuple(inst.gpus), inst.state, n_ctx)
        for model, step in list(self._started.items()):
            if model in running:
                continue
            if model in self._fetching or model in self._failed:
                state = "failed" if model in self._failed else "pending"
                running[model] = Running(step.source, step.gpus, state, step.n_ctx)
            else:  # a fetch that gave up because the model went away: forget it
                del self._started[model]
        return running

    def _retry_due(self, running: Mapping[str, Running], now: float) -> set[str]:
        due = set()
        for model, r in running.items():
            if r.state == "ready":  # it worked: the next failure starts over
                self._attempts.pop(model, None)
                self._failed.pop(model, None)
            if r.state != "failed":
                continue
            failure = self._failed.get(model)
            if failure is None:  # the engine failed after it was started: note it now
                inst = self.instances.get(model)
                failure = self._note_failure(model, getattr(inst, "error", "") or "failed", now)
            if now >= failure.retry_at:
                due.add(model)
        return due

    def _note_failure(self, model: str, error: str, now: float) -> _Failure:
        attempts = self._attempts.get(model, 0) + 1
        self._attempts[model] = attempts
        delay = min(self.config.retry_s * 2 ** (attempts - 1), self.config.retry_max_s)
        failure = _Failure(error, attempts, now + delay)
        self._failed[model] = failure
        return failure

    async def reconcile(self) -> list[Step]:
        """One pass; returns the steps it took. Safe to call any time, any number of times."""
        now = self._clock()
        running = self._running()
        steps = plan_steps(
            self.node_id,
            self.state.assignments_for(self.node_id),
            self.state.models,
            running,
            self._retry_due(running, now),
        )
        for step in steps:
            if step.action == "stop":
                await self._stop(step.model)
            else:
                self._failed.pop(step.model, None)  # retrying: shows "pending" again
                self._start(step)
        for table in (self._failed, self._attempts):
            for model in list(table):
                if model not in self._started:
                    del table[model]
        unknown = [m for m in self.state.desired() if m.sha256 is None]
        busy = self._discovering is not None and not self._discovering.done()
        if unknown and self._discover is not None and self._tg is not None and not busy:
            self._discovering = self._tg.create_task(self._discover(unknown), name="discover")
        return steps

    async def _stop(self, model: str) -> None:
        task = self._fetching.pop(model, None)
        if task is not None:
            task.cancel()
        self._started.pop(model, None)
        if await self.instances.stop(model):
            log.info("stopped %s", model)

    def _start(self, step: Step) -> None:
        self._started[step.model] = step
        if self._ensure_file is None or self._tg is None:
            self._launch(step)
            return
        self._fetching[step.model] = self._tg.create_task(
            self._fetch_then_launch(step), name=f"fetch {step.model}"
        )

    def _launch(self, step: Step) -> None:
        log.info("starting %s on %s", step.model, ", ".join(step.gpus) or "cpu")
        self.instances.start(step.model, step.source, step.gpus)

    async def _fetch_then_launch(self, step: Step) -> None:
        record = self.state.models.get(step.model)
        try:
            if record is None or record.source != step.source:
                return  # undeployed or changed meanwhile: the next pass sorts it out
            await self._ensure_file(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no peer has it and the source fails: retry later
            log.error("cannot get the model file of %s: %s", step.model, exc)
            self._note_failure(step.model, f"cannot get the model file: {exc}", self._clock())
            return
        finally:
            if self._fetching.get(step.model) is asyncio.current_task():
                del self._fetching[step.model]
        if self._started.get(step.model) == step:
            self._launch(step)
