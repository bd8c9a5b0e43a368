"""The one place the cluster's pure steps meet I/O.

- `ControllerRunner`: on the Raft leader, once it has applied an entry of its own term,
  calls `controller.step` and carries out the first action (a proposal or a voter change),
  then asks again, until nothing is left to do.
- `Reconciler`: on every peer, once it has caught up with the leader, carries out
  `reconciler.plan_steps` against `Instances`, fetching a missing model file first and
  retrying a failed instance with backoff.

Both wake on a `Trigger` that gossip events and Raft applies fire (push), and re-check on a
slow tick only to catch anything a lost trigger missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivailable.cluster import controller as ctl
from aivailable.cluster.membership_policy import MembershipConfig
from aivailable.cluster.reconciler import (
    ReconcilerConfig,
    Running,
    Step,
    local_gpu_id,
    plan_steps,
    rpc_server_wanted,
)
from aivailable.cluster.state import ClusterState, ModelRecord
from aivailable.cluster.view import NodeView

log = logging.getLogger(__name__)

# Actions one controller pass may take before it yields: a pass normally takes a few (file
# facts, addresses, one plan, one voter change); this bounds a command the state keeps
# rejecting from looping.
MAX_ACTIONS_PER_PASS = 32
# Seconds between checks whether this peer became a usable leader when nothing wakes the
# runner on a Raft change (a test's stand-in). The peer wires RaftDriver.on_change to the
# trigger instead: polling every 20 ms cost an idle peer 50 wake-ups a second.
READY_CHECK_S = 0.02
DEFAULT_RECONCILER = ReconcilerConfig()


class Trigger:
    """A wake-up call for a loop: gossip changes and Raft applies fire it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()

    async def wait(self, within: float) -> bool:
        """True if fired within `within` seconds (and clears it), False otherwise."""
        try:
            async with asyncio.timeout(within):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


# ---- the controller's runner ----------------------------------------------------------------


def read_local_files(
    models: list[ModelRecord],
    local_path: Callable[[ModelRecord], Path | None],
    estimator: Callable[..., Any] | None = None,
) -> dict[str, ctl.LocalFile]:
    """The size and VRAM estimate (GGUF header) of deployed model files held here whose
    VRAM the log does not record yet. Reads files: the I/O half of the controller."""
    out = {}
    for m in models:
        if m.vram is not None:
            continue
        path = local_path(m)
        if path is None:
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue
        try:
            if estimator is None:
                from placement import estimate as estimator
            est = estimator(path, m.n_ctx, ctl.planned_parallel(m), **ctl.kv_estimate_args(m))
            out[m.name] = ctl.LocalFile(size, est.total, est.split_overhead, _profile(path, m))
        except Exception as exc:  # commit what is certain; the size-based guess stays
            log.warning("cannot estimate %s from %s: %s", m.name, path, exc)
            out[m.name] = ctl.LocalFile(size)
    return out


def _profile(path: Path, m: ModelRecord) -> tuple[int, ...] | None:
    """The record's wire form of placement.estimate.layer_profile (None if unreadable)."""
    try:
        from placement.estimate import layer_profile

        p = layer_profile(path, m.n_ctx, ctl.planned_parallel(m))
    except Exception as exc:
        log.info("no layer profile of %s: %s", m.name, exc)
        return None
    return (*p.layers, p.output, p.compute, p.compute_output, p.overhead)


class ControllerRunner:
    """Runs on every peer; acts only while `is_ready()` (raft.leader_ready). `propose(bytes)`
    returns once the entry is applied here (or raises, e.g. NotLeader); `change_conf(op,
    node, voter)` likewise for a voter change."""

    def __init__(
        self,
        node_id: str,
        state: ClusterState,
        view: Callable[[], list[NodeView]],
        trigger: Trigger,
        is_ready: Callable[[], bool],
        term: Callable[[], int],
        propose: Callable[[bytes], Awaitable[Any]],
        config: ctl.ControllerConfig = ctl.DEFAULT_CONFIG,
        membership: MembershipConfig | None = None,
        raft_conf: Callable[[], tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
        change_conf: Callable[[str, str, bool], Awaitable[Any]] | None = None,
        caught_up: Callable[[], list[str]] | None = None,
        local_path: Callable[[ModelRecord], Path | None] = lambda m: None,
        found_cluster_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        pushed: bool = False,
    ):
        """`pushed`: the trigger fires on every Raft commit and leader change (the peer
        wires RaftDriver.on_change), so readiness need not be polled."""
        self._check_s = config.tick_s if pushed else READY_CHECK_S
        self.node_id = node_id
        self.state = state
        self._view = view
        self._trigger = trigger
        self._is_ready = is_ready
        self._term = term
        self._propose = propose
        self.config = config
        self._membership = membership or MembershipConfig()
        self._raft_conf = raft_conf
        self._change_conf = change_conf
        self._caught_up = caught_up
        self._local_path = local_path
        self._found_cluster_id = found_cluster_id  # the founder commits it (bootstrap)
        self._clock = clock

    async def run(self) -> None:
        was_ready, last = False, float("-inf")
        while True:
            fired = await self._trigger.wait(self._check_s)
            ready = self._is_ready()
            # A pass on a wake-up, the moment leadership becomes usable (the new leader's
            # no-op applied: no entry fires the trigger for it), and every tick_s.
            due = fired or (ready and not was_ready) or self._clock() - last >= self.config.tick_s
            was_ready = ready
            if not ready or not due:
                continue
            last = self._clock()
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NotLeader, a lost proposal: try again on the next wake
                log.info("controller pass did not complete: %r", exc)

    def context(self) -> ctl.Context:
        voters, learners = self._raft_conf() if self._raft_conf is not None else ((), ())
        return ctl.Context(
            self.node_id,
            self._term(),
            tuple(voters),
            tuple(learners),
            tuple(self._caught_up()) if self._caught_up is not None else None,
            self._found_cluster_id,
            read_local_files(self.state.desired(), self._local_path),
            wall=time.time(),  # scaling's cooldowns, in the clock committed with each change
        )

    def decide(self) -> list[ctl.Action]:
        return ctl.step(
            self._view(), self.state, self._clock(), self.context(), self.config, self._membership
        )

    async def run_pass(self) -> list[ctl.Action]:
        """Do the first action the step asks for, then ask again (each from the view and
        state as they are then), until it asks for nothing new. Returns what was done."""
        done: list[ctl.Action] = []
        while len(done) < MAX_ACTIONS_PER_PASS and self._is_ready():
            todo = [a for a in self.decide() if a not in done]
            if not todo:
                break
            action = todo[0]
            done.append(action)
            async with asyncio.timeout(self.config.propose_timeout_s):
                if isinstance(action, ctl.Propose):
                    log.info("controller: %s", action.why or "proposal")
                    await self._propose(action.data)
                elif self._change_conf is not None:
                    c = action.change
                    log.info("membership: %s %s (%s)", c.op, c.node, c.reason)
                    await self._change_conf(c.op, c.node, c.voter)
        return done


# ---- the reconciler's runner ------------------------------------------------------------

EnsureFile = Callable[[ModelRecord], Awaitable[Path]]
# Checks the sources of deployed models whose checksum nobody knows yet and that this node
# holds locally (models.transfer.ModelFetcher.discover), so they are gossiped and shared.
Discover = Callable[[list[ModelRecord]], Awaitable[None]]


@dataclass
class _Failure:
    error: str
    attempts: int
    retry_at: float


class Reconciler:
    """Runs on every peer. `instances` is the peer's aivailable.cluster.instances.Instances;
    `ensure_file(record)` makes the model file local (models.transfer.ModelFetcher.ensure)
    and raises if it cannot; None leaves fetching to the Instances resolver."""

    def __init__(
        self,
        node_id: str,
        state: ClusterState,
        instances: Any,
        trigger: Trigger,
        ensure_file: EnsureFile | None = None,
        config: ReconcilerConfig = DEFAULT_RECONCILER,
        clock: Callable[[], float] = time.monotonic,
        discover: Discover | None = None,
        ready: Callable[[], bool] = lambda: True,
        rpc_server: Any | None = None,
        rpc_ready: Callable[[], set[str]] = set,
    ):
        """`ready()`: this peer's state may be acted on (raft.caught_up); until it first
        says so, a restarted peer does not act on the old plan it restored.
        `rpc_server`: this peer's llama.cpp RPC server (backends.rpc_server.RpcServerProcess:
        start(), stop(), alive()), run while this node helps a split; None: it helps none.
        `rpc_ready()`: the nodes gossiping a running RPC server."""
        self.rpc_server = rpc_server
        self._rpc_ready = rpc_ready
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
        self._ready = ready
        self._caught_up = False

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
        # split parts: the primary's while it runs, a helper's while its RPC server does
        plan = self.state.plan
        helping = self.rpc_server is not None and self.rpc_server.alive()
        for split in plan.splits_for_node(self.node_id) if plan is not None else ():
            if split.model in self._started or (helping and self.node_id != split.primary):
                for part in split.parts:
                    if part.node == self.node_id:
                        local = local_gpu_id(self.node_id, part.gpu)
                        used[local] = used.get(local, 0) + part.vram
        return used

    def rpc_serving(self) -> bool:
        """The RPC server answers (gossiped: a primary starts only once it does)."""
        return self.rpc_server is not None and self.rpc_server.ready()

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
            options = started.options if started is not None else None
            key = started.split_key if started is not None else ()
            running[model] = Running(inst.source, tuple(inst.gpus), inst.state, n_ctx, options, key)
        for model, step in list(self._started.items()):
            if model in running:
                continue
            if model in self._fetching or model in self._failed:
                state = "failed" if model in self._failed else "pending"
                options = step.options
                running[model] = Running(
                    step.source, step.gpus, state, step.n_ctx, options, step.split_key
                )
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
        if not self._caught_up:
            self._caught_up = self._ready()
            if not self._caught_up:
                return []
        now = self._clock()
        await self._rpc_pass()
        running = self._running()
        # No plan yet (a new cluster): nothing to match, and a preloaded default model
        # stays up for the first plan to adopt.
        steps = (
            plan_steps(
                self.node_id,
                self.state.assignments_for(self.node_id),
                self.state.models,
                running,
                self._retry_due(running, now),
                self.state.plan.splits,
                self._rpc_ready(),
            )
            if self.state.plan is not None
            else []
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

    async def _rpc_pass(self) -> None:
        """Runs the RPC server while this node helps a split, restarts it if it died, and
        stops it once no split needs it. Its start returns once it answers, so a primary
        that sees it ready in gossip finds it serving."""
        if self.rpc_server is None:
            return
        plan = self.state.plan
        wanted = plan is not None and rpc_server_wanted(
            self.node_id, plan.splits, self.state.models
        )
        if wanted and not self.rpc_server.ready():
            try:
                version = await self.rpc_server.start()
                log.info("RPC server %s up (protocol %s)", self.rpc_server.endpoint, version)
            except Exception as exc:  # retried on the next pass
                log.error("RPC server did not start: %s", exc)
        elif not wanted and self.rpc_server.alive():
            await self.rpc_server.stop()
            log.info("RPC server stopped: no split needs this node")

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
