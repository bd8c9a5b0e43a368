"""/cluster/status and /cluster/models: the cluster's view and its desired state.

`ClusterView` is what the peer process offers this API: in single-node mode it is
this node alone; in a cluster it is the gossip view and the committed plan.
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from aiohttp import web

from aivailable.api.errors import ApiError, bad_request, not_found
from aivailable.store import model_name

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ClusterView(Protocol):
    def status(self) -> dict: ...

    # Optional: a linearizable read barrier (Raft ReadIndex) for `GET /cluster/status?consistent=1`.
    # async def read_barrier(self) -> None: ...

    async def deploy(self, name: str, source: str, replicas: int, n_ctx: int) -> dict: ...

    async def undeploy(self, name: str) -> bool: ...


def parse_deploy(body: object, max_ctx: int = 131072) -> tuple[str, str, int, int]:
    """Check a deploy request: {"name", "source", "replicas", "n_ctx"}."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise bad_request("'source' is required: builtin:NAME or a GGUF path", param="source")
    name = body.get("name")
    if name is None:
        name = model_name(source)
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise bad_request(
            "'name' must be 1-128 letters, digits, '.', '_', ':' or '-'", param="name"
        )
    replicas = body.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 64:
        raise bad_request("'replicas' must be an integer from 1 to 64", param="replicas")
    n_ctx = body.get("n_ctx", 2048)
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or not 128 <= n_ctx <= max_ctx:
        raise bad_request(f"'n_ctx' must be an integer from 128 to {max_ctx}", param="n_ctx")
    return name, source, replicas, n_ctx


class ClusterApi:
    def __init__(self, view: ClusterView):
        self._view = view

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/cluster/status", self.status),
            web.post("/cluster/models", self.deploy),
            web.delete("/cluster/models/{name}", self.undeploy),
        ]

    async def status(self, request: web.Request) -> web.Response:
        """`?consistent=1`: include every write acknowledged before the request (a Raft read
        barrier first); otherwise this peer's local view. `linearizable` says which."""
        linearizable = request.query.get("consistent", "") in ("1", "true")
        if linearizable:
            barrier = getattr(self._view, "read_barrier", None)
            if barrier is None:
                raise bad_request("this peer cannot serve consistent reads", param="consistent")
            await barrier()
        return web.json_response({**self._view.status(), "linearizable": linearizable})

    async def deploy(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from exc
        name, source, replicas, n_ctx = parse_deploy(body)
        result = await self._view.deploy(name, source, replicas, n_ctx)
        return web.json_response(result, status=202)

    async def undeploy(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not await self._view.undeploy(name):
            raise not_found(f"the model '{name}' is not deployed", param="name")
        return web.json_response({"name": name, "deleted": True})


__all__ = ["ApiError", "ClusterApi", "ClusterView", "parse_deploy"]
