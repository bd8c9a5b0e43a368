"""The peer process: one TaskGroup owns the HTTP server, discovery, gossip, Raft, the
controller, the reconciler and the model workers (DESIGN.md rule 3).

The one place that builds the parts and hands them to each other (docs/contracts.md, the
floors): each part gets its own small config from the peer's `Config`, and the cluster gets
its engine factory from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from aivailable.access.guard import AccessGuard, UsageGossip, body_limits, usage_metrics
from aivailable.access.keys_api import KeysApi, bootstrap_admin_key
from aivailable.access.ledger import LedgerGate, UsageApi, UsageBook
from aivailable.access.limits import RateLimiter
from aivailable.api.app import build_app
from aivailable.api.cluster_api import ClusterApi
from aivailable.api.cluster_load import LoadApi, LoadGossip
from aivailable.api.ollama_api import OllamaApi
from aivailable.api.openai_api import OpenAIApi
from aivailable.api.responses_api import ResponsesApi
from aivailable.api.responses_store import PeerResponses
from aivailable.api.tracing import Tracing
from aivailable.backends.base import EngineFactory
from aivailable.backends.llama_factory import llama_factory
from aivailable.backends.rpc_server import RpcServerProcess, library_rpc_version
from aivailable.cluster.node import ClusterNode, NodeConfig
from aivailable.cluster.split_side import SplitSide
from aivailable.config import Config
from aivailable.gpu import GpuInfo, cpu_device, probe_all
from aivailable.metrics import Metrics
from aivailable.models import hub
from aivailable.models.transfer import ModelTransferApi
from peer.auth import PeerAuth, machine_identity, make_peer_session
from peer.crypto import Keyring
from peer.discovery import Discovery
from peer.gossip import Gossip
from peer.secret import cluster_id as secret_cluster_id
from peer.secret import load_or_create_secret
from peer.tls import DualSite, client_tls_context, peer_contexts, write_credentials
from peer.upstream import UpstreamPool

log = logging.getLogger(__name__)
# Seconds requests in flight may take to finish on shutdown: a short answer from a small
# model; a long generation is cut rather than holding a restart up for minutes.
DRAIN_S = 5.0


def split_side(config: Config, real_engines: bool, auth: PeerAuth, tls) -> SplitSide:
    """This peer's part in split models: an RPC server child (loopback only, its tensor
    cache in the data dir) and tunnels signed by `auth` inside the peer TLS `tls`, for
    peers that run real llama.cpp workers."""
    if not real_engines:
        return SplitSide(None)
    server = RpcServerProcess(
        config.data_dir / "rpc-cache",
        log_path=config.data_dir / "rpc-server.log",
    )
    return SplitSide(server, auth, tls)


async def probe_rpc_version(split: SplitSide, config: Config, publish: Callable[[], None]):
    """The RPC protocol version of this peer's llama.cpp, from a short-lived server's
    HELLO answer (a second or so, so not before the peer serves); then gossiped."""
    try:
        version = await library_rpc_version(config.data_dir / "rpc-probe")
    except Exception as exc:  # no RPC here: this peer takes no part in splits
        log.warning("llama.cpp RPC unavailable: %s", exc)
        return
    split.version = str(version) if version is not None else None
    log.info("llama.cpp RPC protocol %s", split.version)
    publish()


def node_config(config: Config) -> NodeConfig:
    """The cluster floor's settings out of the peer's Config."""
    default = None if config.model.lower() in ("", "none") else config.model
    return NodeConfig(
        name=config.name,
        advertise_addr=config.advertise_addr,
        data_dir=config.data_dir,
        cache_dir=config.cache_dir,
        default_model=default,
        raft=config.raft,
        forward=config.forward,
        reconciler=config.reconciler,
        controller=dataclasses.replace(
            config.controller, default_source=default, default_n_ctx=config.n_ctx
        ),
        membership=config.membership,
        max_queue_wait=config.engine.max_queue_wait,
    )


async def announce_ready(node: ClusterNode, config: Config, announce) -> None:
    """Print the ready line, with a curl example, once a model serves in the cluster."""
    while True:
        # The instance states in gossip, not node.status(): building the whole status four
        # times a second cost a peer with no model (which never gets here) its idle CPU.
        states = node.view.instance_states(node.our_cluster())
        ready = sorted({model for (_, model), state in states.items() if state == "ready"})
        if ready:
            break
        # Woken by read-model changes (a gossiped instance turning ready is one), not a
        # 4 Hz poll, which was a few wake-ups a second forever on a peer that serves none.
        await node.view_wake.wait(5.0)
    url = f"{'https' if config.tls_cert else 'http'}://{config.advertise_addr}"
    announce(f"ready: {', '.join(ready)} serving through {url} (dashboard: {url}/)")
    key = ' -H "Authorization: Bearer $AIVAILABLE_API_KEY"' if config.auth_on else ""
    announce(
        f"try: curl {url}/v1/chat/completions{key} -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{ready[0]}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
    )


async def serve(
    config: Config,
    engine_factory: EngineFactory | None = None,
    announce: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the peer until SIGINT/SIGTERM (or `stop` is set); then leave the cluster
    gracefully, stop the model workers and close the server. `engine_factory`: None for
    llama.cpp workers on this machine's devices (tests hand fakes)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.offline:
        hub.force_offline()  # the store reads it for every model this process resolves
    secret = await asyncio.to_thread(load_or_create_secret, config.key_file)
    metrics = Metrics()

    def probe() -> list[GpuInfo]:
        gpus = probe_all(list(config.gpu))
        # A card this build cannot drive is no GPU to run on: "auto" still adds the CPU.
        if config.cpu == "yes" or (config.cpu == "auto" and not any(g.usable for g in gpus)):
            gpus.append(cpu_device())
        return gpus

    gpus = await asyncio.to_thread(probe)
    # Signed peer requests name the peer they are for: this machine at this port.
    identity = machine_identity(config.port, config.bind, config.advertise_host)
    auth = PeerAuth(secret, config.auth, identity=identity)
    limiter = RateLimiter()  # per-key use, shared with the other peers through gossip
    tls_server = tls_client = None
    if config.access.peer_tls:
        cert, key = await asyncio.to_thread(write_credentials, secret, config.data_dir / "tls")
        tls_server, tls_client = peer_contexts(cert, key)
        if config.tls_cert is not None:  # clients may use TLS too; peers name PEER_SNI
            tls_server = client_tls_context(config.tls_cert, config.tls_key, tls_server)
    serving = False
    async with (
        make_peer_session(auth, tls_client) as session,
        UpstreamPool(auth, tls_client) as upstream,
        asyncio.TaskGroup() as tg,
    ):
        gossip = Gossip(
            config.gossip,
            config.name,
            config.bind,
            config.port,
            Keyring.from_secret(secret),
            session,
            seeds=list(config.join),
            advertise_host=config.advertise_host,
        )
        # Each payload carries per-key use (the limits) and load counters (the dashboard).
        load_gossip = LoadGossip(UsageGossip(gossip, limiter, config.name), metrics)
        node = ClusterNode(
            node_config(config),
            gpus,
            session,
            load_gossip,
            tg,
            engine_factory or llama_factory(gpus, config.n_ctx, config.queue_limit, config.engine),
            probe,
            upstream,
            split=(split := split_side(config, engine_factory is None, auth, tls_client)),
        )
        guard = AccessGuard(
            config.auth_on, lambda: node.state.access, limiter, caught_up=node.caught_up
        )
        keys_api = KeysApi(lambda: node.state.access, node.propose, limiter)
        usage_book = UsageBook()  # what this peer's callers used, until it is committed
        usage_api = UsageApi(
            lambda: node.state.usage,
            lambda: {k: r.name for k, r in node.state.access.keys.items()},
            node.read_barrier,
        )
        refresh_key_gauges = usage_metrics(metrics.registry, limiter, lambda: node.state.access)
        # Spans only with --otlp-endpoint: otherwise the parts are handed over unwrapped.
        tracing = Tracing(config.otlp_endpoint, config.name) if config.otlp_endpoint else None
        lookup, forwarder = node.instances.by_model, node.forwarder
        gate = LedgerGate(guard, usage_book)
        if tracing is not None:
            lookup, forwarder = tracing.lookup(lookup), tracing.forwarder(forwarder)
            gate = tracing.gate(gate)
        openai_api = OpenAIApi(
            lookup,
            metrics,
            config.max_tokens_limit,
            config.request_timeout_s,
            owner=config.name,
            forwarder=forwarder,
            catalog=node.catalog,
            read_barrier=node.read_barrier,
            gate=gate,
            wait_for_replica=node.waiter.wait,
        )

        def model_info(name: str) -> dict:
            record = node.state.models.get(name)
            if record is None:
                return {}
            return {
                "size": record.size,
                "sha256": record.sha256,
                "n_ctx": record.n_ctx,
                # Scaled models unload after their idle time (/api/ps's expires_at).
                "idle_unload_s": record.idle_unload_s if record.scaled else None,
            }

        ollama_api = OllamaApi(openai_api, model_info)
        responses_api = ResponsesApi(
            openai_api,
            metrics,
            config.request_timeout_s,
            config.name,
            peers=PeerResponses(session, node.view.addresses),
        )

        def refresh_gauges() -> None:
            own = node.reconciler.own_vram()
            for gpu in node.current_gpus(own):
                metrics.vram.labels(gpu.id, gpu.name, "total").set(gpu.vram_total)
                metrics.vram.labels(gpu.id, gpu.name, "free").set(gpu.vram_free)
            for name, inst in node.instances.by_model().items():
                engine = inst.engine
                metrics.queue_depth.labels(name).set(engine.queue_depth if engine else 0)
                metrics.engine_restarts.labels(name).set(getattr(engine, "restarts", 0))
            for counter, value in gossip.metrics_snapshot().items():
                metrics.gossip.labels(counter).set(value)
            for area, value in auth.refused.items():  # e.g. a stranger's push-pull
                metrics.gossip.labels(f"peer_auth_refused_{area}").set(value)
            if isinstance(site, DualSite):  # a stranger's TLS handshakes
                metrics.gossip.labels("peer_auth_refused_tls").set(site.refused_tls)
            refresh_key_gauges()

        app = build_app(
            metrics,
            lambda: serving,
            [
                openai_api.routes(),
                ollama_api.routes(),
                responses_api.routes(),
                gossip.routes(),
                node.routes(),
                ModelTransferApi(node.local_models).routes(),
                ClusterApi(node).routes(),
                keys_api.routes(),
                usage_api.routes(),
                LoadApi(load_gossip, config.name).routes(),
            ],
            on_scrape=refresh_gauges,
            # Cheapest refusals first, all before a body is read: size, signature, key.
            middlewares=[
                *([tracing.middleware] if tracing is not None else []),
                body_limits(config.access, config.raft.max_body_bytes),
                auth.middleware,
                guard.middleware,
            ],
            client_max_size=config.raft.max_body_bytes,  # snapshots travel in one request
            cors_origins=config.cors_origins,
        )
        # shutdown_timeout: seconds in-flight requests get to finish when the peer stops.
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=DRAIN_S,
            keepalive_timeout=config.access.idle_timeout_s,  # also bounds the header read
        )
        await runner.setup()
        tasks: list[asyncio.Task] = []
        try:
            if tls_server is not None:  # plain HTTP for clients, TLS for peers, one port
                site = DualSite(
                    runner, config.bind, config.port, tls_server, config.access.idle_timeout_s
                )
                await site.start()
                tasks.append(tg.create_task(site.serve(), name="http accept"))
            else:
                site = web.TCPSite(runner, config.bind, config.port, reuse_address=True)
                await site.start()
            tasks.append(tg.create_task(gossip.run(), name="gossip"))
            if config.mdns:
                discovery = Discovery(
                    config.name,
                    secret_cluster_id(secret),
                    config.advertise_host,
                    config.port,
                    gossip.peer_found,
                )
                tasks.append(tg.create_task(discovery.run(), name="mdns"))
            tasks.append(tg.create_task(node.run(), name="cluster"))
            if split.server is not None:
                probing = probe_rpc_version(split, config, node.publish)
                tasks.append(tg.create_task(probing, name="rpc version"))
            usage_flush = usage_book.run(node.propose, config.access.usage_flush_s)
            tasks.append(tg.create_task(usage_flush, name="usage ledger"))
            if config.auth_on:
                first_key = bootstrap_admin_key(
                    config.admin_key_path,
                    lambda: node.state.access,
                    # The leader makes it (the founder, on a new cluster): one key, in
                    # the data dir of the peer the operator started first.
                    lambda: (
                        node.state.cluster_id is not None
                        and node.status().get("leader") == config.name
                    ),
                    node.propose,
                    announce,
                )
                tasks.append(tg.create_task(first_key, name="admin key"))
            serving = True
            scheme = "https" if config.tls_cert else "http"
            announce(f"aivailable peer {config.name} up on {scheme}://{config.advertise_addr}")
            tasks.append(tg.create_task(announce_ready(node, config, announce), name="ready"))
            await stop.wait()
            log.info("shutting down: leaving the cluster")
        finally:
            # Leave in the order that costs the others least: hand over Raft leadership,
            # tell gossip we leave ("left" at once, not "dead" later), let requests in
            # flight finish, then stop the loops and the model workers.
            serving = False
            await node.prepare_to_leave()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await gossip.leave()
            await runner.cleanup()
            with contextlib.suppress(Exception):  # the last use, while Raft still runs
                async with asyncio.timeout(2):
                    await usage_book.flush(node.propose)
            for task in tasks:
                task.cancel()
            if tracing is not None:  # the last spans leave before the exporter stops
                await asyncio.to_thread(tracing.shutdown)
            hub.DOWNLOADS.cancel_all()  # their threads would hold the process's exit up
            await node.stop()
