"""/v1/models, /api/tags and the deploy list (/cluster/models) read locally or, with
?consistent=1, through the peer's read barrier; each says which in X-Aivailable-Read. A peer
without a leader answers 503, never stale data; credentials are checked before any barrier."""

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aivailable.access.guard import AccessGuard
from aivailable.access.limits import RateLimiter
from aivailable.api.app import build_app
from aivailable.api.cluster_api import ClusterApi
from aivailable.api.ollama_api import OllamaApi
from aivailable.api.openai_api import OpenAIApi
from aivailable.api.reads import READ_HEADER
from aivailable.cluster import keys as k
from aivailable.cluster.errors import no_leader
from aivailable.cluster.state import ClusterState
from aivailable.metrics import Metrics


class Peer:
    """A follower's view: `committed` holds writes the cluster acknowledged that this peer
    has not applied yet; the barrier applies them (as ReadIndex waits for the apply)."""

    def __init__(self, leader: bool = True) -> None:
        self.applied: list[str] = ["old"]
        self.committed: list[str] = ["old", "new"]
        self.leader = leader
        self.barriers = 0

    def catalog(self) -> list[str]:
        return list(self.applied)

    def status(self) -> dict:
        return {"node_id": "b", "models": [{"name": n, "placements": []} for n in self.applied]}

    async def read_barrier(self) -> None:
        self.barriers += 1
        if not self.leader:
            raise no_leader("no leader confirmed the read")
        self.applied = list(self.committed)

    async def deploy(self, *args, **kwargs) -> dict:
        raise AssertionError("not used")

    async def undeploy(self, name: str) -> bool:
        raise AssertionError("not used")


async def serve(peer: Peer, guard: AccessGuard | None = None, barrier: bool = True):
    metrics = Metrics()
    openai = OpenAIApi(
        lambda: {},
        metrics,
        max_tokens_limit=64,
        request_timeout_s=5,
        catalog=peer.catalog,
        read_barrier=peer.read_barrier if barrier else None,
    )
    routes = [openai.routes(), OllamaApi(openai).routes(), ClusterApi(peer).routes()]
    middlewares = [guard.middleware] if guard is not None else []
    client = TestClient(
        TestServer(build_app(metrics, lambda: True, routes, middlewares=middlewares))
    )
    await client.start_server()
    return client


def names(path: str, body: dict) -> list[str]:
    if path.startswith("/v1/"):
        return [m["id"] for m in body["data"]]
    if path.startswith("/api/"):
        return [m["name"].removesuffix(":latest") for m in body["models"]]
    return [m["name"] for m in body["models"]]


LISTINGS = ["/v1/models", "/api/tags", "/cluster/models", "/cluster/status"]


@pytest.mark.parametrize("path", LISTINGS)
async def test_a_plain_read_is_local_and_a_consistent_one_includes_every_acknowledged_write(path):
    peer = Peer()
    client = await serve(peer)
    try:
        local = await client.get(path)
        assert local.status == 200 and local.headers[READ_HEADER] == "local"
        assert set(names(path, await local.json())) == {"old"} and peer.barriers == 0
        fresh = await client.get(path, params={"consistent": "1"})
        assert fresh.status == 200 and fresh.headers[READ_HEADER] == "consistent"
        assert set(names(path, await fresh.json())) == {"old", "new"} and peer.barriers == 1
    finally:
        await client.close()


@pytest.mark.parametrize("path", LISTINGS)
async def test_without_a_leader_a_consistent_read_is_a_clear_503_not_stale_data(path):
    client = await serve(Peer(leader=False))
    try:
        resp = await client.get(path, params={"consistent": "true"})
        assert resp.status == 503 and resp.headers["Retry-After"] == "2"
        body = await resp.json()
        error = body["error"]
        message = error if isinstance(error, str) else error["message"]  # Ollama: a string
        assert "no reachable leader" in message
        if not path.startswith("/api/"):
            assert error["code"] == "no_leader"
        assert READ_HEADER not in resp.headers
    finally:
        await client.close()


async def test_a_peer_without_a_barrier_refuses_a_consistent_model_listing():
    client = await serve(Peer(), barrier=False)
    try:
        resp = await client.get("/v1/models?consistent=1")
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "consistent"
        assert (await client.get("/v1/models")).headers[READ_HEADER] == "local"
    finally:
        await client.close()


async def test_credentials_are_checked_before_the_barrier():
    state = ClusterState()
    secret = k.new_secret()
    record = k.KeyRecord(k.new_key_id(), k.hash_secret(secret), "user")
    assert state.apply(k.encode_key_create(record)).ok
    peer = Peer()
    client = await serve(peer, AccessGuard(True, lambda: state.access, RateLimiter()))
    user = {"Authorization": f"Bearer {secret}"}
    try:
        assert (await client.get("/v1/models?consistent=1")).status == 401
        assert (await client.get("/cluster/models?consistent=1", headers=user)).status == 403
        assert peer.barriers == 0  # refused before any read barrier was asked for
        resp = await client.get("/v1/models?consistent=1", headers=user)
        assert resp.status == 200 and resp.headers[READ_HEADER] == "consistent"
        assert peer.barriers == 1
    finally:
        await client.close()
