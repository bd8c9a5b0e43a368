"""The model instances this peer runs: one engine per loaded model, started and stopped here.

The reconciler asks for what the committed plan gives this node (a lone peer is a
cluster of one). This is the one owner of engines, so the API only ever looks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aivailable.backends.base import Engine, EngineFactory, EngineSpec, InstanceState
from aivailable.models import store

log = logging.getLogger(__name__)


@dataclass
class Instance:
    model: str
    source: str
    gpus: tuple[str, ...]
    engine: Engine | None = None  # None while the model file is being fetched ("pending")
    error: str = ""  # why the instance failed, for /cluster/status
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def state(self) -> InstanceState:
        if self.error:
            return InstanceState.FAILED
        return self.engine.state if self.engine is not None else InstanceState.PENDING

    def view(self) -> dict:
        view = {
            "model": self.model,
            "source": self.source,
            "gpus": list(self.gpus),
            "state": self.state,
            "queue_depth": self.engine.queue_depth if self.engine else 0,
            "free_slots": self.engine.free_slots if self.engine else 0,
            "demand": self.engine.signals() if self.engine else None,
        }
        for extra in ("pid", "restarts"):
            value = getattr(self.engine, extra, None)
            if value is not None:
                view[extra] = value
        if self.error:
            view["error"] = self.error
        return view


# Fetches a model source to a local file path (the model store); blocking, run in a thread.
Resolver = Callable[[str], pathlib.Path]


class Instances:
    def __init__(self, resolve: Resolver, factory: EngineFactory, task_group: asyncio.TaskGroup):
        """`factory` builds an engine (loaded in its run()) for a spec; the wiring hands it."""
        self._resolve = resolve
        self._factory = factory
        self._tg = task_group
        self._instances: dict[str, Instance] = {}

    def by_model(self) -> dict[str, Instance]:
        return dict(self._instances)

    def views(self) -> list[dict]:
        return [inst.view() for inst in self._instances.values()]

    def get(self, model: str) -> Instance | None:
        return self._instances.get(model)

    def start(self, model: str, source: str, gpus: tuple[str, ...] = ()) -> Instance:
        """Begin loading a model in the background; its state shows the progress."""
        if model in self._instances:
            return self._instances[model]
        instance = Instance(model, source, gpus)
        self._instances[model] = instance
        instance.task = self._tg.create_task(self._load(instance), name=f"load {model}")
        return instance

    async def _load(self, instance: Instance) -> None:
        """Fetch the model file, then supervise the engine in this TaskGroup until stopped."""
        try:
            path = await asyncio.to_thread(self._resolve, instance.source)
            instance.engine = self._factory(EngineSpec(instance.model, path, instance.gpus))
        except Exception as exc:  # a model that cannot be fetched fails alone, never the peer
            instance.error = str(exc)
            log.error("model %s cannot be loaded: %s", instance.model, exc)
            return
        # The engine's own supervisor restarts a crashed worker; it runs until stop().
        try:
            await instance.engine.run()
        except Exception as exc:  # an engine that breaks fails alone, never the peer
            instance.error = str(exc) or type(exc).__name__
            log.exception("model %s stopped with an error", instance.model)

    async def stop(self, model: str) -> bool:
        instance = self._instances.pop(model, None)
        if instance is None:
            return False
        if instance.engine is not None:
            await instance.engine.stop()
        if instance.task is not None and not instance.task.done():
            instance.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await instance.task
        return True

    async def stop_all(self) -> None:
        for model in list(self._instances):
            await self.stop(model)


def preload_default(source: str | None, local_models: Any, gpus: list, instances: Instances):
    """Cold start: a brand-new peer starts loading the default model while it listens for
    a cluster, if the file is already here, so a lone peer answers about when its worker is
    up rather than after the discovery window, the election and the first plan one after
    another. The reconciler owns it once this peer has caught up: kept if the plan puts the
    model here, stopped otherwise; a peer that finds a cluster to join stops it at once.
    Returns the model's name, or None when nothing was started."""
    if source is None or not local_models.held_locally(source):
        return None
    usable = [g for g in gpus if getattr(g, "usable", True)]
    devices = sorted(usable, key=lambda g: (-g.vram_free, g.id))
    if not devices:
        return None  # no device at all: this peer only routes
    name = store.model_name(source)
    instances.start(name, source, (devices[0].id,))
    log.info("preloading %s while listening for a cluster", name)
    return name
