"""/cluster/status and /cluster/models: the cluster's view and its desired state.

`GET /cluster/status` and `GET /cluster/models` (the deploy list) read this peer's state, or,
with `?consistent=1`, linearizably through the view's read barrier (aivailable/api/reads.py).

`ClusterView` is what the peer process offers this API: the gossip view and the
committed plan (aivailable/cluster/raft.py's RaftClusterView). A lone peer is a cluster
of one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from aivailable.access.guard import KEY_RECORD
from aivailable.api.body import read_json
from aivailable.api.errors import ApiError, bad_request, not_found
from aivailable.api.reads import marked, read_mode
from aivailable.models import hub, sources
from aivailable.models.check import refuse_reason
from aivailable.models.store import model_name
from placement.estimate import KV_TYPES

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ClusterView(Protocol):
    def status(self) -> dict: ...

    # Optional: a linearizable read barrier (Raft ReadIndex) for `GET /cluster/status?consistent=1`.
    # async def read_barrier(self) -> None: ...

    async def deploy(
        self, name: str, source: str, replicas: int, n_ctx: int, **options: Any
    ) -> dict: ...

    async def undeploy(self, name: str) -> bool: ...


def parse_deploy(body: object, max_ctx: int = 131072) -> tuple[str, str, int, int]:
    """Check a deploy request: {"name", "source", "replicas", "n_ctx"} (and the options
    `deploy_options` reads)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise bad_request(
            "'source' is required: builtin:NAME, hf://ORG/REPO:QUANT, hf://ORG/REPO/FILE.gguf, "
            "https://.../FILE.gguf or a GGUF path",
            param="source",
        )
    if sources.is_remote(source):
        try:
            sources.parse_remote(source)
        except sources.ModelSourceError as exc:
            raise bad_request(str(exc), param="source") from None
    name = body.get("name")
    if name is None:
        name = model_name(source)
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise bad_request(
            "'name' must be 1-128 letters, digits, '.', '_', ':' or '-'", param="name"
        )
    replicas = body.get("replicas", 1)
    lowest = 0 if body.get("min_replicas") == 0 else 1  # a scaled deploy may start at zero
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not lowest <= replicas <= 64:
        raise bad_request(f"'replicas' must be an integer from {lowest} to 64", param="replicas")
    n_ctx = body.get("n_ctx", 2048)
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or not 128 <= n_ctx <= max_ctx:
        raise bad_request(f"'n_ctx' must be an integer from 128 to {max_ctx}", param="n_ctx")
    return name, source, replicas, n_ctx


def deploy_options(body: dict) -> dict:
    """`kind` ("chat" or "embedding"), `n_parallel` (slots per instance; placement plans
    the KV cache of that many sequences) and `split` ("auto": over several nodes through
    llama.cpp RPC when no one node fits; "always"; "never")."""
    kind = body.get("kind", "chat")
    if kind not in ("chat", "embedding"):
        raise bad_request("'kind' must be 'chat' or 'embedding'", param="kind")
    n_parallel = body.get("n_parallel")
    if n_parallel is not None and (
        not isinstance(n_parallel, int) or isinstance(n_parallel, bool) or not 1 <= n_parallel <= 64
    ):
        raise bad_request("'n_parallel' must be an integer from 1 to 64", param="n_parallel")
    split = body.get("split", "auto")
    if split not in ("auto", "never", "always"):
        raise bad_request("'split' must be 'auto', 'never' or 'always'", param="split")
    options = {"kind": kind, "n_parallel": n_parallel, "split": split, **scaling_options(body)}
    if "kv_type" in body:  # KV cache type; without it the leader's default, f16
        if body["kv_type"] not in KV_TYPES:
            raise bad_request(f"'kv_type' must be one of {', '.join(KV_TYPES)}", param="kv_type")
        options["kv_type"] = body["kv_type"]
    return options


def _int_field(body: dict, key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi
    ):
        raise bad_request(f"'{key}' must be an integer from {lo} to {hi}", param=key)
    return value


def scaling_options(body: dict) -> dict:
    """Demand scaling (cluster/scaling.py): `min_replicas`/`max_replicas` (either makes the
    replicas follow the load; `replicas` alone keeps a fixed count), `priority` (higher
    keeps VRAM first), `idle_unload_s` (seconds without requests before going to min;
    default 300, negative: never)."""
    lo = _int_field(body, "min_replicas", 0, 64)
    hi = _int_field(body, "max_replicas", 1, 64)
    if lo is not None and hi is not None and lo > hi:
        raise bad_request("'min_replicas' is above 'max_replicas'", param="min_replicas")
    priority = _int_field(body, "priority", -1000, 1000)
    idle = body.get("idle_unload_s")
    if idle is not None and (
        not isinstance(idle, int | float) or isinstance(idle, bool) or idle > 1 << 31
    ):
        raise bad_request("'idle_unload_s' must be a number of seconds", param="idle_unload_s")
    out = {"min_replicas": lo, "max_replicas": hi, "idle_unload_s": idle}
    if priority is not None:
        out["priority"] = priority
    return {k: v for k, v in out.items() if v is not None}


class ClusterApi:
    def __init__(
        self, view: ClusterView, downloads: Callable[[], list[dict]] = hub.DOWNLOADS.snapshot
    ):
        self._view = view
        self._downloads = downloads  # this process's model downloads in progress

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/cluster/status", self.status),
            web.get("/cluster/models", self.models),
            web.post("/cluster/models", self.deploy),
            web.delete("/cluster/models/{name}", self.undeploy),
        ]

    async def status(self, request: web.Request) -> web.Response:
        """`?consistent=1`: include every write acknowledged before the request (a Raft read
        barrier first); otherwise this peer's local view. `linearizable` and the
        X-Aivailable-Read header say which."""
        mode = await read_mode(request, getattr(self._view, "read_barrier", None))
        body = {
            **self._view.status(),
            "downloads": self._downloads(),
            "linearizable": mode == "consistent",
        }
        return marked(web.json_response(body), mode)

    async def models(self, request: web.Request) -> web.Response:
        """The deploy list: every deployed model with its placements, as in the status."""
        mode = await read_mode(request, getattr(self._view, "read_barrier", None))
        body = {"models": self._view.status()["models"], "linearizable": mode == "consistent"}
        return marked(web.json_response(body), mode)

    async def deploy(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        name, source, replicas, n_ctx = parse_deploy(body)
        options = deploy_options(body)
        why = await asyncio.to_thread(refuse_reason, source)
        if why is not None:  # the reason may name a local path: admins (and loopback) only
            key = request.get(KEY_RECORD)
            shown = why if key is None or key.role == "admin" else "this model source is refused"
            raise bad_request(shown, param="source", code="bad_source")
        result = await self._view.deploy(name, source, replicas, n_ctx, **options)
        return web.json_response(result, status=202)

    async def undeploy(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not await self._view.undeploy(name):
            raise not_found(f"the model '{name}' is not deployed", param="name")
        return web.json_response({"name": name, "deleted": True})


__all__ = ["ApiError", "ClusterApi", "ClusterView", "parse_deploy"]
