"""Requests held for a model with no ready replica: a model scaled to zero, or one whose
next replica is still loading. Instead of a 503, the request waits; while it does, this
peer says so in its gossip payload (`waiting`), and the leader's scaling step places a
model scaled to zero when it reads that (cluster/scaling.py). The wait is bounded by the
queue bound a chat user tolerates plus the load time the model is expected to take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aivailable.cluster.state import ModelRecord

# Seconds between looks at the read model while a request waits: gossip refreshes payloads
# every 0.1 s, so a replica that turned ready is seen within a tick or two.
POLL_S = 0.1
# Bytes per second a model file is assumed to load at (page cache or a local SSD, into
# llama.cpp's mmap) plus a fixed start-up: SmolLM2 (98 MB) loads in about a second.
LOAD_BYTES_PER_S = 500 << 20
LOAD_FIXED_S = 3.0
# Seconds a wait goes on while the committed plan says the model cannot be placed, before
# it gives up (503): a pass or two of the controller, so a plan from before the scaling
# decision (or before a yield freed VRAM) is not taken for the answer.
UNPLACEABLE_GRACE_S = 2.0


def expected_load_s(record: ModelRecord) -> float:
    """Seconds a new instance of `record` is expected to take to turn ready."""
    size = record.size if record.size is not None else 1 << 30
    return LOAD_FIXED_S + size / LOAD_BYTES_PER_S


class ReplicaWaiter:
    def __init__(
        self,
        models: Callable[[], dict[str, ModelRecord]],
        has_ready: Callable[[str], bool],
        changed: Callable[[], None],
        max_queue_wait: float,
        unplaceable: Callable[[str], bool] = lambda model: False,
    ) -> None:
        """`models`: the deployed models; `has_ready(model)`: a ready replica is known (here
        or in gossip); `changed`: republish the payload; `max_queue_wait`: seconds;
        `unplaceable(model)`: the committed plan leaves every wanted replica unplaced."""
        self._unplaceable = unplaceable
        self._models = models
        self._has_ready = has_ready
        self._changed = changed
        self.max_queue_wait = max_queue_wait
        self.waiting: dict[str, int] = {}  # model -> requests held now (gossiped)

    def bound_s(self, model: str) -> float:
        record = self._models().get(model)
        return self.max_queue_wait + (expected_load_s(record) if record is not None else 0.0)

    async def wait(self, model: str) -> bool:
        """Hold until `model` has a ready replica: True, or False when it is not deployed
        or none turned ready within the bound."""
        if model not in self._models():
            return False
        if self._has_ready(model):
            return True
        started = time.monotonic()
        deadline = started + self.bound_s(model)
        self.waiting[model] = self.waiting.get(model, 0) + 1
        self._changed()
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                if self._has_ready(model):
                    return True
                if model not in self._models():
                    return False
                if time.monotonic() - started >= UNPLACEABLE_GRACE_S and self._unplaceable(model):
                    return False  # no VRAM for it anywhere: the 503 says why
            return False
        finally:
            self.waiting[model] -= 1
            if not self.waiting[model]:
                del self.waiting[model]
            self._changed()
