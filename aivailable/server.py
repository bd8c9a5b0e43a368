"""The peer process: one TaskGroup that owns the HTTP server, the model instances and,
in a cluster, discovery, gossip and Raft (DESIGN.md rule 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from aivailable import store
from aivailable.api.app import build_app
from aivailable.api.cluster_api import ClusterApi
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.llama_engine import LlamaEngine
from aivailable.config import Config
from aivailable.gpu import GpuInfo, probe_all
from aivailable.instances import EngineFactory, Instances
from aivailable.metrics import Metrics

log = logging.getLogger(__name__)


def gpu_view(gpu: GpuInfo) -> dict:
    return {
        "id": gpu.id,
        "vendor": gpu.vendor,
        "name": gpu.name,
        "vram_total": gpu.vram_total,
        "vram_free": gpu.vram_free,
    }


class SingleNodeView:
    """The cluster as seen by a peer that is alone: itself, its GPUs, its instances."""

    def __init__(self, config: Config, gpus: list[GpuInfo], instances: Instances):
        self._config = config
        self._gpus = gpus
        self._instances = instances

    def status(self) -> dict:
        views = self._instances.views()
        node = {
            "id": self._config.name,
            "addr": self._config.advertise_addr,
            "state": "alive",
            "gpus": [gpu_view(g) for g in self._gpus],
            "instances": views,
        }
        models = [
            {
                "name": v["model"],
                "source": v["source"],
                "replicas": 1,
                "placements": [{"node": self._config.name, "gpus": v["gpus"], "state": v["state"]}],
            }
            for v in views
        ]
        return {
            "node_id": self._config.name,
            "leader": self._config.name,
            "term": 0,
            "nodes": [node],
            "models": models,
        }

    async def deploy(self, name: str, source: str, replicas: int, n_ctx: int) -> dict:
        instance = self._instances.start(name, source, tuple(g.id for g in self._gpus[:1]))
        return {"name": name, "source": source, "replicas": 1, "state": instance.state}

    async def undeploy(self, name: str) -> bool:
        return await self._instances.stop(name)


def llama_factory(config: Config, gpus: list[GpuInfo]) -> EngineFactory:
    real_gpu = any(g.vendor in ("nvidia", "amd") for g in gpus)

    def build(model: str, path, gpu_ids: tuple[str, ...]) -> LlamaEngine:
        return LlamaEngine(
            model,
            path,
            n_ctx=config.n_ctx,
            n_gpu_layers=-1 if real_gpu else 0,
            queue_limit=config.queue_limit,
        )

    return build


async def serve(
    config: Config,
    factory: EngineFactory | None = None,
    announce: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the peer until SIGINT/SIGTERM (or `stop` is set), then shut down cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    metrics = Metrics()
    gpus = await asyncio.to_thread(probe_all, list(config.gpu))
    for gpu in gpus:
        metrics.vram.labels(gpu.id, gpu.name, "total").set(gpu.vram_total)
        metrics.vram.labels(gpu.id, gpu.name, "free").set(gpu.vram_free)
    serving = False
    async with asyncio.TaskGroup() as tg:
        instances = Instances(
            lambda source: store.resolve(source, config.cache_dir).path,
            factory or llama_factory(config, gpus),
            tg,
        )
        view = SingleNodeView(config, gpus, instances)
        openai_api = OpenAIApi(
            instances.by_model,
            metrics,
            config.max_tokens_limit,
            config.request_timeout_s,
            owner=config.name,
        )

        def refresh_gauges() -> None:
            for name, inst in instances.by_model().items():
                metrics.queue_depth.labels(name).set(inst.engine.queue_depth if inst.engine else 0)
                metrics.engine_restarts.labels(name).set(getattr(inst.engine, "restarts", 0))

        app = build_app(
            metrics,
            lambda: serving,
            [openai_api.routes(), ClusterApi(view).routes()],
            on_scrape=refresh_gauges,
        )
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.bind, config.port, reuse_address=True)
            await site.start()
            for source in config.model:
                instances.start(store.model_name(source), source, tuple(g.id for g in gpus[:1]))
            serving = True
            url = f"http://{config.advertise_addr}"
            announce(
                f"aivailable peer {config.name} serving on {url} "
                f"(models: {', '.join(config.model) or 'none'})"
            )
            announce(
                f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
                f'-d \'{{"model": "smollm2-135m", "messages": '
                f'[{{"role": "user", "content": "Hello!"}}]}}\''
            )
            await stop.wait()
            log.info("shutting down")
        finally:
            serving = False
            await instances.stop_all()
            await runner.cleanup()
