"""The cluster's load, from gossip: each peer adds its own counters to the payload it
gossips, and `GET /cluster/load` lists every live peer's, so the dashboard charts the
cluster's tokens/s, requests and time to first token without scraping any peer's /metrics.

Per model, since the peer started: `t` completion tokens, `r` requests, `fs` the sum of
times to the first token (ms) and `fc` their count. A client takes rates from two readings.
The counters change the payload, and each change is a gossip broadcast, so they are read at
most every `every_s` (2 s) however often the node republishes (every 0.1 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from aivailable.metrics import Metrics

PAYLOAD_FIELD = "load"
MAX_MODELS = 64  # of one peer's payload: a bound on what one peer can make the others keep


def load_snapshot(metrics: Metrics) -> dict[str, dict[str, int]]:
    """This peer's per-model counters, read from its Prometheus registry."""
    out: dict[str, dict[str, int]] = {}

    def entry(model: str) -> dict[str, int]:
        return out.setdefault(model, {"t": 0, "r": 0, "fs": 0, "fc": 0})

    for family in metrics.registry.collect():
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is None:
                continue
            if sample.name == "aivailable_tokens_total" and sample.labels["kind"] == "completion":
                entry(model)["t"] += int(sample.value)
            elif sample.name == "aivailable_requests_total":
                entry(model)["r"] += int(sample.value)
            elif sample.name == "aivailable_time_to_first_token_seconds_sum":
                entry(model)["fs"] += int(sample.value * 1000)
            elif sample.name == "aivailable_time_to_first_token_seconds_count":
                entry(model)["fc"] += int(sample.value)
    return dict(sorted(out.items())[:MAX_MODELS])


class LoadGossip:
    """Wraps the peer's gossip: the payload it sets carries this peer's load counters."""

    def __init__(
        self,
        gossip: Any,
        metrics: Metrics,
        every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._gossip = gossip
        self._metrics = metrics
        self._every_s = every_s
        self._clock = clock
        self._load: dict = {}
        self._read_at = float("-inf")
        self.own: dict = {}

    def set_payload(self, payload: dict) -> None:
        now = self._clock()
        if now - self._read_at >= self._every_s:
            self._load, self._read_at = load_snapshot(self._metrics), now
        self.own = {**payload, PAYLOAD_FIELD: self._load}
        self._gossip.set_payload(self.own)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gossip, name)


def _counters(value: Any) -> dict:
    """A gossiped load, kept only where it is well formed (a peer's payload is its own)."""
    if not isinstance(value, dict):
        return {}
    out = {}
    for model, fields in list(value.items())[:MAX_MODELS]:
        if isinstance(model, str) and isinstance(fields, dict):
            out[model] = {
                k: fields[k] for k in ("t", "r", "fs", "fc") if isinstance(fields.get(k), int)
            }
    return out


class LoadApi:
    """`GET /cluster/load`: every live peer's gossiped counters (admin, as /cluster/ is)."""

    def __init__(self, gossip: LoadGossip, me: str, clock: Callable[[], float] = time.time):
        self._gossip = gossip
        self._me = me
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/cluster/load", self.load)]

    async def load(self, request: web.Request) -> web.Response:
        nodes = [
            {
                "id": self._me,
                "state": "alive",
                "models": _counters(self._gossip.own.get(PAYLOAD_FIELD)),
            }
        ]
        for member in self._gossip.members():
            if member.id == self._me or member.state not in ("alive", "suspect"):
                continue
            payload = member.payload if isinstance(member.payload, dict) else {}
            nodes.append(
                {
                    "id": member.id,
                    "state": member.state,
                    "models": _counters(payload.get(PAYLOAD_FIELD)),
                }
            )
        return web.json_response({"at": self._clock(), "nodes": nodes})
