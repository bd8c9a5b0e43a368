"""One peer's cluster parts together: gossip -> the read model -> the controller and
reconciler runners -> instances; Raft; model fetches; forwarding. server.py builds it and
hands it its `NodeConfig` and an engine factory; the HTTP routes over it are built there too.

`run()` is the node's life in the peer's TaskGroup: bootstrap (resume, join or found a Raft
cluster), then Raft, the runners and the gossip event feed until cancelled. docs/cluster.md
draws the picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from aivailable.backends.base import Engine, EngineFactory, EngineSpec
from aivailable.cluster.controller import ControllerConfig
from aivailable.cluster.errors import no_leader, not_joined
from aivailable.cluster.identity import raft_identity
from aivailable.cluster.instances import Instances, preload_default
from aivailable.cluster.keys import stamp
from aivailable.cluster.membership_policy import (
    FOUND,
    JOIN,
    RESUME,
    WAIT,
    MembershipConfig,
    bootstrap_action,
)
from aivailable.cluster.on_demand import ReplicaWaiter
from aivailable.cluster.payload import node_payload, read_payload
from aivailable.cluster.raft import (
    PROPOSE_PATH,
    Proposer,
    RaftClusterView,
    address_book,
    apply_entry,
    caught_up,
    caught_up_learners,
    leader_ready,
    listen_raft_datagrams,
    raft_conf_hooks,
    raft_datagrams,
)
from aivailable.cluster.reconciler import ReconcilerConfig
from aivailable.cluster.runner import ControllerRunner, Reconciler, Trigger
from aivailable.cluster.split_side import SplitSide
from aivailable.cluster.state import ClusterState
from aivailable.cluster.status import cluster_status
from aivailable.cluster.view import ReadModel
from aivailable.gpu import GpuInfo
from aivailable.gpu.readings import steady
from aivailable.models.transfer import LocalModels, ModelFetcher
from consensus import FileStorage, HardState, NotLeader
from consensus.driver import MESSAGES_PATH, RaftConfig, RaftDriver
from peer.availability import Replica
from peer.forward import ForwardConfig, Forwarder
from peer.upstream import UpstreamPool

log = logging.getLogger(__name__)
# Seconds a brand-new peer listens before it preloads its cached default model: a peer
# joining with --join has heard the cluster by then (a push-pull on a LAN takes
# milliseconds), so only a peer likely to be alone pays for the load.
PRELOAD_AFTER_S = 0.3
# Seconds between re-probes of the real GPUs' free memory: other programs come and go
# slowly; NVML and amdsmi reads (memory, temperature, utilisation, ECC) cost about a millisecond.
PROBE_INTERVAL_S = 5.0
# Routes that exist only once Raft runs (consensus.driver and cluster.view.Proposer).
LATE_ROUTES = (MESSAGES_PATH, PROPOSE_PATH)
# Seconds between refreshes of this node's own gossip payload: an instance turning ready
# reaches gossip within this time. A refresh that changes nothing costs building the payload
# only: Membership.set_payload ignores an unchanged payload, so nothing is sent. Other
# members' changes need no polling: gossip events push them into the read model.
PUBLISH_INTERVAL_S = 0.1
# Seconds between republishing an unchanged payload of a peer that hosts nothing (routing
# only, or no model placed here): ten a second cost an idle peer a tenth of its CPU.
PUBLISH_IDLE_S = 1.0
# Seconds between full resyncs of the read model from gossip's member list: only a safety
# net for events a slow subscriber dropped (gossip counts them in events_dropped).
RESYNC_INTERVAL_S = 5.0


class GossipLike(Protocol):
    """What the node needs of peer.gossip.Gossip."""

    def members(self) -> list[Any]: ...  # MemberViews: id, state, since, payload

    def subscribe(self) -> Any: ...  # async iterator of MemberEvent(kind, member); close()

    def set_payload(self, payload: dict) -> None: ...

    def report_unreachable(self, node_id: str) -> None: ...


@dataclass(frozen=True)
class NodeConfig:
    """The cluster floor's own settings; the wiring (server.py) fills them from the peer's
    Config, so cluster/ never reads the whole of it."""

    name: str  # this node's name in gossip and the cluster
    advertise_addr: str  # "host:port" other peers reach this one's HTTP API at
    data_dir: Path  # raft/ and cluster_id live here
    cache_dir: Path | None = None  # the model cache; None: the store's default
    # The model source a brand-new peer preloads if the file is here; None: none. (The
    # controller deploys it on a new cluster: controller.default_source.)
    default_model: str | None = None
    raft: RaftConfig = field(default_factory=RaftConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    reconciler: ReconcilerConfig = field(default_factory=ReconcilerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    # Seconds a request may wait for a replica to turn ready, besides its expected load
    # time: the engine's max_queue_wait, the bound a chat user tolerates (llama_engine.py).
    max_queue_wait: float = 15.0


class ClusterNode:
    def __init__(
        self,
        config: NodeConfig,
        gpus: list[GpuInfo],
        session: aiohttp.ClientSession,
        gossip: GossipLike,
        tg: asyncio.TaskGroup,
        engine_factory: EngineFactory,
        probe: Callable[[], list[GpuInfo]] | None = None,
        upstream: UpstreamPool | None = None,
        split: SplitSide | None = None,
    ):
        """`engine_factory` builds the engine of an instance this node runs (the wiring's
        choice: llama.cpp workers, or fakes in tests). `probe` re-reads the devices (blocking; run in a thread) so that free VRAM taken
        by other programs since start-up is not planned for twice. `upstream` carries
        forwarded requests (signed, as `session` signs the rest); None: unsigned, for tests."""
        self.config = config
        self.me = config.name
        self.gpus = gpus
        self._probe = probe
        self.session = session
        self.gossip = gossip
        self.state = ClusterState()
        self.view = ReadModel(self.me)
        # Fired on each read-model change: controller, reconciler, the ready line (server.py)
        self.ctrl_wake, self.rec_wake, self.view_wake = Trigger(), Trigger(), Trigger()
        self.local_models = LocalModels(config.cache_dir)
        self.cluster_id: str | None = None
        # This peer's Raft id (identity.py): bound to its raft directory, set in run().
        self.raft_id: str | None = None
        self._driver: RaftDriver | None = None
        self._proposer: Proposer | None = None
        # The ClusterView backed by Raft, once it runs; self.view is the one read model.
        self._raft: RaftClusterView | None = None
        self._ready = asyncio.Event()  # set once Raft runs: status and deploys can be served
        self._late_handlers: dict[str, Callable] = {}
        self._leaving = False
        self._others_logged: set[str] = set()

        self._engine_factory = engine_factory
        # split models: this peer's RPC server and its tunnels (none: it takes no part)
        self.split = split or SplitSide(None)
        self.split.bind(self._node_addr, self._worker_pids)
        self.instances = Instances(self.local_models.resolve, self._engine, tg)
        self.fetcher = ModelFetcher(
            self.local_models, session, lambda: self.view.peer_files(self.our_cluster())
        )
        self.reconciler = Reconciler(
            self.me,
            self.state,
            self.instances,
            self.rec_wake,
            self.fetcher.ensure,
            config.reconciler,
            discover=self.fetcher.discover,
            ready=self.caught_up,
            rpc_server=self.split.server,
            rpc_ready=self._rpc_ready,
        )
        self.forwarder = Forwarder(
            upstream or UpstreamPool(),
            self.replicas_of,
            self.availability_of,
            self.me,
            config.forward,
            member_state=self.member_state,
            report_unreachable=gossip.report_unreachable,
        )
        self.waiter = ReplicaWaiter(
            lambda: self.state.models,
            self.has_ready,
            self.publish,
            config.max_queue_wait,
            self.unplaceable,
        )
        self._address_of = address_book(self.state, self.view.addresses, self.view.node_of_member)

    def _engine(self, spec: EngineSpec) -> Engine:
        """The engine of an instance, as the reconciler started it (gpus, context, split,
        slots, kind); a preloaded model has the node's defaults."""
        step = self.reconciler.launch(spec.model)
        if step is not None:
            spec = dataclasses.replace(
                spec,
                n_ctx=step.n_ctx or None,
                tensor_split=step.tensor_split,
                n_parallel=step.n_parallel,
                kind=step.kind,
                kv_type=step.kv_type,
            )
            if step.rpc_helpers:  # a split's primary: tunnels to the helpers' RPC servers
                spec = dataclasses.replace(
                    spec,
                    rpc_servers=self.split.endpoints(step.rpc_helpers),
                    host_layers=step.host_layers,
                )
        return self._engine_factory(spec)

    def _worker_pids(self) -> set[int]:
        pids = (getattr(i.engine, "pid", None) for i in self.instances.by_model().values())
        return {pid for pid in pids if pid}

    def _node_addr(self, node_id: str) -> str | None:
        node = self.view.node(node_id)
        return node.addr if node is not None and node.addr else None

    def _rpc_ready(self) -> set[str]:
        """Nodes of this cluster whose RPC server runs now (their gossip says so)."""
        return {
            n.id
            for n in self.view.members(self.our_cluster())
            if n.state == "alive" and n.rpc_ready
        }

    # ---- what the other parts read ------------------------------------------------------------

    def our_cluster(self) -> str | None:
        return self.state.cluster_id or self.cluster_id

    def unplaceable(self, model: str) -> bool:
        """The committed plan leaves every wanted replica of `model` unplaced."""
        plan, wanted = self.state.plan, 0
        if model in self.state.models:
            wanted = self.state.wanted_replicas(model)
        if plan is None or wanted == 0:
            return False
        return any(u.model == model and u.missing_replicas >= wanted for u in plan.unplaced)

    def has_ready(self, model: str) -> bool:
        """A ready replica of `model` is known, here or on a reachable peer in gossip, and
        the committed plan keeps it: one the plan dropped is about to stop (scaled down),
        though gossip may still call it ready for a round."""
        planned = {a.node for a in self.state.plan.for_model(model)} if self.state.plan else set()
        local = self.instances.get(model)
        if local is not None and local.state == "ready" and self.me in planned:
            return True
        return any(r.state == "ready" and r.node_id in planned for r in self.replicas_of(model))

    def replicas_of(self, model: str) -> list[Replica]:
        return self.view.replicas_of(model, self.our_cluster())

    def availability_of(self, model: str):
        return self.view.availability_of(model, self.state)

    def member_state(self, node_id: str) -> str:
        """Gossip's state of a node now: the forwarder abandons a replica it calls dead."""
        node = self.view.node(node_id)
        return node.state if node is not None else "dead"

    def catalog(self) -> list[str]:
        """Model names clients may ask for: what the cluster deploys, and what this peer
        serves itself (a preloaded default model before the cluster's first plan)."""
        ready = {m for m, i in self.instances.by_model().items() if i.state == "ready"}
        return sorted(set(self.state.models) | ready)

    # ---- HTTP ---------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        """Mounted before run(), since gossip needs the HTTP server to bootstrap: Raft's and
        the proposer's routes are served by delegates until Raft starts (503 before)."""
        return [web.post(path, self._delegate) for path in LATE_ROUTES] + self.split.routes()

    async def _delegate(self, request: web.Request) -> web.StreamResponse:
        handler = self._late_handlers.get(request.path)
        if handler is None:
            raise not_joined()
        return await handler(request)

    def caught_up(self) -> bool:
        """Raft runs here and this peer has applied an entry of the current leader's term: its
        state is not an old one replayed from its own log (a restarted peer)."""
        return self._driver is not None and caught_up(self._driver)

    async def _until_ready(self) -> None:
        try:
            async with asyncio.timeout(10):
                await self._ready.wait()
        except TimeoutError:
            raise no_leader("this peer is still joining the cluster") from None

    # ClusterView (aivailable.api.cluster_api), backed by RaftClusterView once Raft runs.
    def status(self) -> dict:
        if self._raft is None:
            status = cluster_status(self.me, None, 0, self.state, self.view)
        else:
            status = self._raft.status()
        # This node's own instances in full (pid, restarts, errors), not as gossiped.
        for node in status["nodes"]:
            if node["id"] == self.me:
                node["instances"] = [
                    {**v, "demand": asdict(v["demand"]) if v.get("demand") else None}
                    for v in self.reconciler.views()
                ]
        return status

    async def read_barrier(self) -> None:
        """A linearizable read (Raft ReadIndex): once this returns, status() reflects every
        write committed anywhere before the call."""
        await self._until_ready()
        raft = self.config.raft
        try:
            async with asyncio.timeout(2 * raft.election_ticks * raft.tick_interval_ms / 1000):
                await self._driver.read_index()
        except (NotLeader, TimeoutError):
            raise no_leader("no leader confirmed the read") from None

    async def deploy(
        self, name: str, source: str, replicas: int, n_ctx: int, **options: Any
    ) -> dict:
        await self._until_ready()
        return await self._raft.deploy(name, source, replicas, n_ctx, **options)

    async def undeploy(self, name: str) -> bool:
        await self._until_ready()
        return await self._raft.undeploy(name)

    async def propose(self, data: bytes) -> int:
        """Commit a command from any peer (the API keys' create and revoke use it)."""
        await self._until_ready()
        assert self._proposer is not None
        return await self._proposer.propose(data)

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
        """Refresh this node's gossip payload and its own entry in the read model."""
        own = self.reconciler.own_vram()
        payload = node_payload(
            self.config.advertise_addr,
            self.our_cluster(),
            self.current_gpus(own),
            own,
            self.reconciler.views(),
            self.local_models.files(),
            self.config.reconciler.headroom,
            self.config.reconciler.capacity_step,
            member=self.raft_id,
            rpc_version=self.split.version,
            rpc_ready=self.reconciler.rpc_serving(),
            waiting=self.waiter.waiting,
        )
        self.gossip.set_payload(payload)
        if self.view.set_own(read_payload(self.me, payload), time.monotonic()):
            self._changed()

    def _changed(self) -> None:
        for trigger in (self.ctrl_wake, self.rec_wake, self.view_wake):
            trigger.fire()

    async def _publish_loop(self) -> None:
        while not self._leaving:
            self.publish()
            # Queue depths and free slots change by the request and steer every peer's
            # routing: fresh while this peer hosts an instance. Without one the payload
            # changes only with a GPU probe or a start, which publish themselves soon enough.
            busy = bool(self.instances.by_model())
            await asyncio.sleep(PUBLISH_INTERVAL_S if busy else PUBLISH_IDLE_S)

    async def _event_loop(self) -> None:
        """Gossip events -> the read model -> wake the runners (push, not poll)."""
        events = self.gossip.subscribe()
        self._resync()
        last = time.monotonic()
        try:
            while True:
                try:
                    async with asyncio.timeout(RESYNC_INTERVAL_S):
                        event = await anext(events)
                except TimeoutError:
                    event = None
                now = time.monotonic()
                mine = event is None or event.member.id == self.me
                if not mine and self.view.update([event.member], now):
                    self._note_other_cluster(event.member.id)
                    self._changed()
                if now - last >= RESYNC_INTERVAL_S:
                    last = now
                    self._resync()
        finally:
            events.close()

    def _resync(self) -> None:
        others = [m for m in self.gossip.members() if m.id != self.me]
        if self.view.update(others, time.monotonic(), full=True):
            self._changed()
        # A member first heard of before this peer knew its own cluster was not told of
        # then, and may send no event again: say it here (once per member).
        for member in others:
            self._note_other_cluster(member.id)

    def _note_other_cluster(self, node_id: str) -> None:
        node = self.view.node(node_id)
        ours = self.our_cluster()
        other = node is not None and ours and node.cluster_id not in (None, ours)
        if other and node.state == "alive" and node_id not in self._others_logged:
            self._others_logged.add(node_id)
            log.warning(
                "%s belongs to another cluster (%s) that shares this key; it is ignored. "
                "To merge it, clear its raft state and restart it without it",
                node_id,
                node.cluster_id,
            )

    async def _probe_loop(self) -> None:
        while self._probe is not None:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                fresh = await asyncio.to_thread(self._probe)
            except Exception:  # a driver hiccup: keep the last reading
                log.exception("GPU probe failed")
                continue
            if [g.id for g in fresh] == [g.id for g in self.gpus]:
                # a temperature's small wobble is held back: the payload, unchanged, is not re-sent
                self.gpus = steady(self.gpus, fresh)
            else:
                log.warning(
                    "the GPUs changed (%d -> %d devices); restart the peer to use them",
                    len(self.gpus),
                    len(fresh),
                )

    def _preload(self) -> str | None:
        return preload_default(
            self.config.default_model, self.local_models, self.gpus, self.instances
        )

    async def _bootstrap(self, has_state: bool) -> tuple[Any, str | None]:
        """The bootstrap decision, and the model preloaded meanwhile (a brand-new peer that
        has seen no cluster for PRELOAD_AFTER_S: a joiner with --join sees it sooner)."""
        started = time.monotonic()
        preloaded, tried = None, has_state
        while True:
            others = {
                n.id: n.cluster_id
                for n in self.view.nodes()
                if n.id != self.me and n.state == "alive"
            }
            waited = time.monotonic() - started
            decision = bootstrap_action(self.me, has_state, others, waited)
            if decision.action != WAIT:
                return decision, preloaded
            if not tried and waited >= PRELOAD_AFTER_S:
                tried, preloaded = True, self._preload()
            await asyncio.sleep(0.1)

    async def run(self) -> None:
        """Bootstrap, then serve as a cluster member until cancelled."""
        # This node in its own read model (and gossip) at once: /healthz is already ok, so
        # /cluster/status must list it while the raft directory is read. Its Raft id
        # follows in the next payload (the policy reads a payload without one as not read yet).
        self.publish()
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        storage = await asyncio.to_thread(FileStorage, data_dir / "raft")
        try:
            hard, snap, ents = storage.initial_state()
            has_state = snap is not None or bool(ents) or hard != HardState()
            self.raft_id = await asyncio.to_thread(
                raft_identity, storage.path, self.me, storage.member_id, has_state
            )
            log.info("%s: Raft id %s", self.me, self.raft_id)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publish_loop(), name="gossip payload")
                tg.create_task(self._event_loop(), name="gossip events")
                tg.create_task(self._probe_loop(), name="gpu probe")
                decision, preloaded = await self._bootstrap(has_state)
                if preloaded is not None and decision.action == JOIN:
                    await self.instances.stop(preloaded)  # the cluster's plan decides
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
                    self.raft_id,
                    storage,
                    self.config.raft,
                    self.session,
                    self._address_of,
                    lambda entry, term: apply(entry, term),
                    voters=(self.raft_id,) if decision.action == FOUND else (),
                    snapshot=self.state.snapshot,
                    restore=self.state.restore,
                    datagram=raft_datagrams(
                        self.gossip, self.view.node_of_member, self.view.reads_raft_datagrams
                    ),
                )
                listen_raft_datagrams(self.gossip, driver)
                if tuple(driver.voters) == (self.raft_id,):
                    driver.node.campaign()  # the only voter: no election timeout to wait
                proposer = Proposer(driver, self.session, self._address_of)
                apply = apply_entry(self.state, [self.ctrl_wake, self.rec_wake], proposer)
                driver.on_change(self.ctrl_wake.fire)  # leadership usable: plan at once
                controller_config = self.config.controller
                voters_of, change_conf = raft_conf_hooks(driver)
                controller = ControllerRunner(
                    self.raft_id,
                    self.state,
                    self.view.nodes,
                    self.ctrl_wake,
                    lambda: leader_ready(driver),
                    lambda: driver.term,
                    # The leader proposes on its own log, never forwarded; ids stop replays.
                    lambda data: driver.propose(stamp(data)),
                    controller_config,
                    self.config.membership,
                    voters_of,
                    change_conf,
                    caught_up_learners(driver, controller_config.promote_max_lag),
                    local_path=self.local_models.local_path,
                    found_cluster_id=self.cluster_id if decision.action == FOUND else None,
                    pushed=True,
                )
                self._driver, self._proposer = driver, proposer
                self._late_handlers = {
                    r.path: r.handler for r in driver.routes() + proposer.routes()
                }
                self._raft = RaftClusterView(
                    self.me, self.state, driver, proposer, self.view, self.local_models
                )
                self._ready.set()
                tg.create_task(driver.run(), name="raft")
                tg.create_task(controller.run(), name="controller")
                tg.create_task(self.split.run(), name="split")  # before the reconciler
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
        alive = {n.id for n in self.view.nodes() if n.state == "alive"}
        others = sorted(
            v for v in driver.voters if v != driver.id and self.view.node_of_member(v) in alive
        )
        if others:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await driver.transfer_leadership(others[0])

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.instances.stop_all()
