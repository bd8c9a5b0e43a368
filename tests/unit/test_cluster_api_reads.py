"""GET /cluster/status?consistent=1 runs the view's read barrier first and says so."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.cluster_api import ClusterApi
from peer.errors import ServiceError


class View:
    def __init__(self) -> None:
        self.barriers = 0
        self.writes_seen = 0
        self.committed = 3  # writes the cluster acknowledged, not yet applied here

    def status(self) -> dict:
        return {"node_id": "a", "writes": self.writes_seen}

    async def read_barrier(self) -> None:
        self.barriers += 1
        self.writes_seen = self.committed  # the barrier waits until they are applied


async def client_for(view) -> TestClient:
    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except ServiceError as exc:
            return exc.response()

    app = web.Application(middlewares=[errors])
    app.add_routes(ClusterApi(view).routes())
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_a_consistent_status_waits_for_the_barrier_and_a_plain_one_is_marked_local():
    view = View()
    client = await client_for(view)
    try:
        plain = await (await client.get("/cluster/status")).json()
        assert plain["linearizable"] is False and plain["writes"] == 0 and view.barriers == 0
        fresh = await (await client.get("/cluster/status?consistent=1")).json()
        assert fresh["linearizable"] is True and fresh["writes"] == 3 and view.barriers == 1
    finally:
        await client.close()


async def test_a_view_without_a_barrier_refuses_a_consistent_read():
    class LocalOnly:
        def status(self) -> dict:
            return {}

    client = await client_for(LocalOnly())
    try:
        resp = await client.get("/cluster/status?consistent=1")
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "consistent"
    finally:
        await client.close()
