"""The peer process: one TaskGroup owns the HTTP server, discovery, gossip, Raft, the
controller, the reconciler and the model workers (DESIGN.md rule 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from aivailable.api.app import build_app
from aivailable.api.openai_api import OpenAIApi
from aivailable.cluster.node import ClusterNode, EngineBuilder
from aivailable.config import Config
from aivailable.gpu import GpuInfo, cpu_device, probe_all
from aivailable.metrics import Metrics
from peer.auth import PeerAuth, make_peer_session
from peer.crypto import Keyring
from peer.discovery import Discovery
from peer.gossip import Gossip
from peer.secret import cluster_id as secret_cluster_id
from peer.secret import load_or_create_secret

log = logging.getLogger(__name__)
# Seconds requests in flight may take to finish on shutdown: a short answer from a small
# model; a long generation is cut rather than holding a restart up for minutes.
DRAIN_S = 5.0


async def announce_ready(node: ClusterNode, config: Config, announce) -> None:
    """Print the ready line, with a curl example, once a model serves in the cluster."""
    while True:
        ready = [
            m["name"]
            for m in node.status()["models"]
            if any(p["state"] == "ready" for p in m["placements"])
        ]
        if ready:
            break
        await asyncio.sleep(0.25)
    url = f"http://{config.advertise_addr}"
    announce(f"ready: {', '.join(ready)} serving through {url} (dashboard: {url}/)")
    announce(
        f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{ready[0]}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
    )


async def serve(
    config: Config,
    build_engine: EngineBuilder | None = None,
    announce: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the peer until SIGINT/SIGTERM (or `stop` is set); then leave the cluster
    gracefully, stop the model workers and close the server."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    secret = await asyncio.to_thread(load_or_create_secret, config.key_file)
    metrics = Metrics()

    def probe() -> list[GpuInfo]:
        gpus = probe_all(list(config.gpu))
        if config.cpu == "yes" or (config.cpu == "auto" and not gpus):
            gpus.append(cpu_device())
        return gpus

    gpus = await asyncio.to_thread(probe)
    auth = PeerAuth(secret, config.auth)
    serving = False
    async with make_peer_session(auth) as session, asyncio.TaskGroup() as tg:
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
        node = ClusterNode(config, gpus, session, gossip, tg, build_engine, probe)
        openai_api = OpenAIApi(
            node.instances.by_model,
            metrics,
            config.max_tokens_limit,
            config.request_timeout_s,
            owner=config.name,
            forwarder=node.forwarder,
            catalog=node.catalog,
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

        app = build_app(
            metrics,
            lambda: serving,
            [openai_api.routes(), gossip.routes(), *node.routes()],
            on_scrape=refresh_gauges,
            middlewares=[auth.middleware],
            client_max_size=config.raft.max_body_bytes,  # snapshots travel in one request
        )
        # shutdown_timeout: seconds in-flight requests get to finish when the peer stops.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=DRAIN_S
        )
        await runner.setup()
        tasks: list[asyncio.Task] = []
        try:
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
            serving = True
            announce(f"aivailable peer {config.name} up on http://{config.advertise_addr}")
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
            for task in tasks:
                task.cancel()
            await node.stop()
