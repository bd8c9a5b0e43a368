"""One peer's cluster parts wired together: gossip, Raft, the cluster state, the controller,
the reconciler, model transfer and forwarding.

`ClusterNode` only builds and connects them; each part's logic lives in its own module
(docs/cluster.md draws the picture). `run()` is the node's life in the peer's TaskGroup:
bootstrap (resume, join or found a Raft cluster), then Raft, controller, reconciler and the
gossip payload loop until cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from aivailable.api.cluster_api import ClusterApi
from aivailable.api.errors import ApiError
from aivailable.backends.base import Engine
from aivailable.backends.llama_engine import LlamaEngine, n_gpu_layers_for
from aivailable.cluster_state import ClusterState
from aivailable.cluster_view import (
    PROPOSE_PATH,
    Proposer,
    RaftClusterView,
    address_book,
    apply_entry,
    cluster_status,
    member_infos,
    node_statuses,
    peer_entries,
)
from aivailable.config import Config
from aivailable.controller import (
    Controller,
    MemberClock,
    Trigger,
    caught_up_learners,
    raft_conf_hooks,
)
from aivailable.gpu import GpuInfo
from aivailable.instances import Instances
from aivailable.membership_policy import FOUND, RESUME, WAIT, bootstrap_action
from aivailable.model_transfer import LocalModels, ModelFetcher, ModelTransferApi
from aivailable.reconciler import Reconciler, node_payload
from consensus import FileStorage, HardState
from consensus.driver import MESSAGES_PATH, RaftDriver
from peer.forward import Forwarder, Replica, summarize_availability

log = logging.getLogger(__name__)
# Seconds a parsed gossip view is reused: far below gossip's own propagation time, so no
# decision sees staler news, while a burst of Raft sends or requests parses it once.
ENTRIES_TTL_S = 0.02
# Seconds between re-probes of the real GPUs' free memory: other programs come and go
# slowly; NVML and amdsmi reads cost about a millisecond.
PROBE_INTERVAL_S = 5.0
# Routes that exist only once Raft runs (consensus.driver and cluster_view.Proposer).
LATE_ROUTES = (MESSAGES_PATH, PROPOSE_PATH)
# Seconds between refreshes of this node's gossip payload and checks of the gossip view.
# An instance turning ready reaches gossip, and a member turning dead wakes the controller,
# within this time, so it adds directly to failover (bench/failover.py: 0.5 s cost about
# 0.4 s at p50). A refresh that changes nothing only builds the payload and compares the
# view: Membership.set_payload ignores an unchanged payload, so nothing is sent.
PUBLISH_INTERVAL_S = 0.1


class GossipLike(Protocol):
    """What the node needs of peer.gossip.Gossip."""

    def members(self) -> list[Any]: ...  # MemberViews: id, state, payload; this node included

    def set_payload(self, payload: dict) -> None: ...


# (model, model file, node-local gpu ids, reconciler's launch step or None) -> Engine
EngineBuilder = Callable[[str, Path, tuple[str, ...], Any], Engine]


def llama_builder(config: Config, gpus: list[GpuInfo]) -> EngineBuilder:
    """Real llama.cpp workers: full offload on the assigned real GPUs, else the CPU."""
    by_id = {g.id: g for g in gpus}

    def build(model: str, path: Path, gpu_ids: tuple[str, ...], step: Any) -> Engine:
        assigned = [by_id[g] for g in gpu_ids if g in by_id]
        real = [g for g in assigned if g.vendor in ("nvidia", "amd")]
        env = {}
        if real:
            visible = ",".join(str(g.index) for g in real)
            env["CUDA_VISIBLE_DEVICES" if real[0].vendor == "nvidia" else "HIP_VISIBLE_DEVICES"] = (
                visible
            )
        return LlamaEngine(
            model,
            path,
            n_ctx=getattr(step, "n_ctx", None) or config.n_ctx,
            n_gpu_layers=n_gpu_layers_for(assigned),
            queue_limit=config.queue_limit,
            env=env,
            config=config.engine,
            tensor_split=getattr(step, "tensor_split", None) if len(real) > 1 else None,
        )

    return build


class ClusterNode:
    def __init__(
        self,
        config: Config,
        gpus: list[GpuInfo],
        session: aiohttp.ClientSession,
        gossip: GossipLike,
        tg: asyncio.TaskGroup,
        build_engine: EngineBuilder | None = None,
        probe: Callable[[], list[GpuInfo]] | None = None,
    ):
        """`probe` re-reads the devices (blocking; run in a thread) so that free VRAM taken
        by other programs since start-up is not planned for twice."""
        self.config = config
        self.me = config.name
        self.gpus = gpus
        self._probe = probe
        self.session = session
        self.gossip = gossip
        self.state = ClusterState()
        self.ctrl_wake, self.rec_wake = Trigger(), Trigger()
        self.member_clock = MemberClock()
        self.local_models = LocalModels(config.cache_dir)
        self.cluster_id: str | None = None
        self._driver: RaftDriver | None = None
        self._proposer: Proposer | None = None
        self._ready = asyncio.Event()  # set once Raft runs: status and deploys can be served
        self._last_view: tuple = ()
        self._late_handlers: dict[str, Callable] = {}
        self._leaving = False
        self._entries: list = []
        self._entries_at = float("-inf")

        build = build_engine or llama_builder(config, gpus)
        self.instances = Instances(
            self.local_models.resolve,
            lambda model, path, gpu_ids: build(model, path, gpu_ids, self.reconciler.launch(model)),
            tg,
        )
        self.fetcher = ModelFetcher(self.local_models, session, self._peer_files)
        self.reconciler = Reconciler(
            self.me,
            self.state,
            self.instances,
            self.rec_wake,
            self.fetcher.ensure,
            config.reconciler,
            discover=self.fetcher.discover,
        )
        self.forwarder = Forwarder(
            session, self.replicas_of, self.availability_of, self.me, config.forward
        )
        self._address_of = address_book(
            self.state, lambda: {e.id: e.payload.addr for e in self.entries() if e.payload.addr}
        )

    # ---- views the other parts read ---------------------------------------------------------

    def entries(self):
        """The gossip view with parsed payloads. Raft sends, forwarded requests and status
        all read it, so it is parsed at most once per ENTRIES_TTL_S, not once per call."""
        now = time.monotonic()
        if now - self._entries_at >= ENTRIES_TTL_S:
            self._entries = peer_entries(self.gossip.members(), self.member_clock, now)
            self._entries_at = now
        return self._entries

    def _peer_files(self):
        return [
            (e.id, e.payload.addr, [f[0] for f in e.payload.files])
            for e in self.entries()
            if e.id != self.me and e.state == "alive" and e.payload.addr
        ]

    def replicas_of(self, model: str) -> list[Replica]:
        out = []
        for e in self.entries():
            if e.state not in ("alive", "suspect") or not e.payload.addr:
                continue
            for inst in e.payload.instances:
                if inst.model == model:
                    out.append(
                        Replica(e.id, e.payload.addr, e.id == self.me, inst.state, inst.queue_depth)
                    )
        return out

    def availability_of(self, model: str):
        record = self.state.models.get(model)
        if record is None:
            return summarize_availability(False, ())
        placements = self.state.plan.for_model(model) if self.state.plan else ()
        states = [
            inst.state
            for e in self.entries()
            for inst in e.payload.instances
            if inst.model == model and any(a.node == e.id for a in placements)
        ]
        unplaced = next(
            (
                u.reason
                for u in (self.state.plan.unplaced if self.state.plan else ())
                if u.model == model
            ),
            "",
        )
        return summarize_availability(True, states or (["pending"] if placements else []), unplaced)

    def catalog(self) -> list[str]:
        """Model names clients may ask for: what the cluster deploys."""
        return sorted(self.state.models)

    # ---- HTTP ---------------------------------------------------------------------------------

    def routes(self) -> list[list[web.RouteDef]]:
        """Mounted before run(), since gossip needs the HTTP server to bootstrap: Raft's and
        the proposer's routes are served by delegates until Raft starts (503 before)."""
        return [
            [web.post(path, self._delegate) for path in LATE_ROUTES],
            ModelTransferApi(self.local_models).routes(),
            ClusterApi(self).routes(),
        ]

    async def _delegate(self, request: web.Request) -> web.StreamResponse:
        handler = self._late_handlers.get(request.path)
        if handler is None:
            raise ApiError(
                503,
                "this peer has not joined Raft yet",
                type="service_unavailable",
                code="not_joined",
                retry_after=1,
            )
        return await handler(request)

    async def _until_ready(self) -> None:
        from aivailable.cluster_view import no_leader

        try:
            async with asyncio.timeout(10):
                await self._ready.wait()
        except TimeoutError:
            raise no_leader("this peer is still joining the cluster") from None

    # ClusterView (aivailable.api.cluster_api), backed by RaftClusterView once Raft runs.
    def status(self) -> dict:
        if self._driver is None:
            status = cluster_status(self.me, None, 0, self.state, self.entries())
        else:
            status = self._view.status()
        # This node's own instances in full (pid, restarts, errors), not as gossiped.
        for node in status["nodes"]:
            if node["id"] == self.me:
                node["instances"] = self.reconciler.views()
        return status

    async def read_barrier(self) -> None:
        """A linearizable read (Raft ReadIndex): once this returns, status() reflects every
        write committed anywhere before the call."""
        from aivailable.cluster_view import no_leader
        from consensus import NotLeader

        await self._until_ready()
        raft = self.config.raft
        try:
            async with asyncio.timeout(2 * raft.election_ticks * raft.tick_interval_ms / 1000):
                await self._driver.read_index()
        except (NotLeader, TimeoutError):
            raise no_leader("no leader confirmed the read") from None

    async def deploy(self, name: str, source: str, replicas: int, n_ctx: int) -> dict:
        await self._until_ready()
        return await self._view.deploy(name, source, replicas, n_ctx)

    async def undeploy(self, name: str) -> bool:
        await self._until_ready()
        return await self._view.undeploy(name)

    # ---- life -----------------------------------------------------------------------------------

    def current_gpus(self, own: dict[str, int]) -> list[GpuInfo]:
        """The GPUs with their free VRAM now. A simulated GPU's memory is what our own
        instances were given on it, so the dashboard and status show its use."""
        return [
            dataclasses.replace(g, vram_free=max(0, g.vram_total - own.get(g.id, 0)))
            if g.vendor == "fake"
            else g
            for g in self.gpus
        ]

    def publish(self) -> None:
        """Refresh this node's gossip payload; wake the controller when the view changed."""
        own = self.reconciler.own_vram()
        self.gossip.set_payload(
            node_payload(
                self.config.advertise_addr,
                self.state.cluster_id or self.cluster_id,
                self.current_gpus(own),
                own,
                self.reconciler.views(),
                self.local_models.files(),
            )
        )
        view = tuple((e.id, e.state, e.payload) for e in self.entries())
        if view != self._last_view:
            self._last_view = view
            self.ctrl_wake.fire()
            self.rec_wake.fire()

    async def _publish_loop(self) -> None:
        while not self._leaving:
            self.publish()
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def _probe_loop(self) -> None:
        while self._probe is not None:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                fresh = await asyncio.to_thread(self._probe)
            except Exception:  # a driver hiccup: keep the last reading
                log.exception("GPU probe failed")
                continue
            if [g.id for g in fresh] == [g.id for g in self.gpus]:
                self.gpus = fresh
            else:
                log.warning(
                    "the GPUs changed (%d -> %d devices); restart the peer to use them",
                    len(self.gpus),
                    len(fresh),
                )

    async def _bootstrap(self, storage: FileStorage) -> Any:
        hard, snap, ents = storage.initial_state()
        has_state = snap is not None or bool(ents) or hard != HardState()
        started = time.monotonic()
        while True:
            others = {
                e.id: e.payload.cluster_id
                for e in self.entries()
                if e.id != self.me and e.state == "alive"
            }
            decision = bootstrap_action(self.me, has_state, others, time.monotonic() - started)
            if decision.action != WAIT:
                return decision
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        """Bootstrap, then serve as a cluster member until cancelled."""
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        storage = await asyncio.to_thread(FileStorage, data_dir / "raft")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publish_loop(), name="gossip payload")
                tg.create_task(self._probe_loop(), name="gpu probe")
                decision = await self._bootstrap(storage)
                id_file = data_dir / "cluster_id"
                if decision.action == RESUME:
                    self.cluster_id = id_file.read_text().strip() if id_file.exists() else None
                else:
                    self.cluster_id = (
                        uuid.uuid4().hex if decision.action == FOUND else decision.cluster_id
                    )
                    id_file.write_text(self.cluster_id)
                log.info("%s: %s cluster %s", self.me, decision.action, self.cluster_id)
                self.publish()

                apply = None
                driver = RaftDriver(
                    self.me,
                    storage,
                    self.config.raft,
                    self.session,
                    self._address_of,
                    lambda entry, term: apply(entry, term),
                    voters=(self.me,) if decision.action == FOUND else (),
                    snapshot=self.state.snapshot,
                    restore=self.state.restore,
                )
                proposer = Proposer(driver, self.session, self._address_of)
                apply = apply_entry(self.state, [self.ctrl_wake, self.rec_wake], proposer)
                default = None if self.config.model.lower() in ("", "none") else self.config.model
                controller_config = dataclasses.replace(
                    self.config.controller, default_source=default, default_n_ctx=self.config.n_ctx
                )
                controller = Controller(
                    self.me,
                    self.state,
                    driver.propose,  # the leader proposes on its own log, never forwarded
                    lambda: driver.role == "leader",
                    lambda: driver.term,
                    lambda: node_statuses(self.entries()),
                    self.ctrl_wake,
                    controller_config,
                    local_path=self.local_models.local_path,
                    conf=raft_conf_hooks(driver),
                    members=lambda: member_infos(self.entries()),
                    caught_up=caught_up_learners(driver, controller_config.promote_max_lag),
                    found_cluster_id=self.cluster_id if decision.action == FOUND else None,
                    membership=self.config.membership,
                )
                self._driver, self._proposer = driver, proposer
                self._late_handlers = {
                    r.path: r.handler for r in driver.routes() + proposer.routes()
                }
                self._view = RaftClusterView(
                    self.me, self.state, driver, proposer, self.entries, self.local_models
                )
                self._ready.set()
                tg.create_task(driver.run(), name="raft")
                tg.create_task(controller.run(), name="controller")
                tg.create_task(self.reconciler.run(), name="reconciler")
        finally:
            storage.close()

    async def prepare_to_leave(self) -> None:
        """Stop gossiping our payload (a new payload would undo the leave) and, if this
        node leads Raft, hand leadership to another voter so no election timeout is lost."""
        self._leaving = True
        driver = self._driver
        if driver is None or driver.role != "leader":
            return
        alive = {e.id for e in self.entries() if e.state == "alive"}
        others = sorted(v for v in driver.voters if v != self.me and v in alive)
        if others:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await driver.transfer_leadership(others[0])

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.instances.stop_all()
