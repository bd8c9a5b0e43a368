"""The dashboard charts the cluster, not one peer: two peers' engines serve requests, each
peer gossips its counters (api/cluster_load.py), and the page on one of them sums both, shows
each model's replicas with their demand, and the usage ledger's table. Headless Chromium over
in-process peers (FakeEngines); a screenshot of the charts with that data is kept."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.access.ledger import UsageApi
from aivailable.api.app import build_app
from aivailable.api.cluster_load import LoadApi, LoadGossip
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster.payload import node_payload, read_payload
from aivailable.cluster.state import ClusterState
from aivailable.cluster.status import gpu_views
from aivailable.cluster.usage import UsageRow, encode_usage_add
from aivailable.gpu import GpuInfo
from aivailable.metrics import Metrics
from tests.e2e.cdp import Browser

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


class Wire:
    """Gossip between the two peers, reduced to what they last set."""

    def __init__(self):
        self.payloads: dict[str, dict] = {}

    def for_node(self, node: str):
        wire = self

        class Gossip:
            def set_payload(self, payload):
                wire.payloads[node] = payload

            def members(self):
                return [
                    SimpleNamespace(id=n, state="alive", payload=p)
                    for n, p in wire.payloads.items()
                ]

        return Gossip()


GIB = 1 << 30
# peer-a's devices: a Vulkan card with NVML/amdsmi readings, a hot CUDA one, and one its
# llama.cpp build cannot drive; shown as gossip carries them (payload -> status).
GPUS = [
    GpuInfo(
        "gpu0",
        "amd",
        "RX 580",
        8 * GIB,
        6 * GIB,
        "",
        "",
        0,
        "Vulkan",
        temperature=64,
        utilization=30,
    ),
    GpuInfo("gpu1", "nvidia", "Tesla P40", 24 * GIB, 24 * GIB, "", "", 0, "CUDA", temperature=96),
    GpuInfo(
        "gpu2", "nvidia", "GTX 780", 3 * GIB, 3 * GIB, "", "", 1, "CUDA", False, "no CUDA here"
    ),
]


def gpu_entries() -> dict:
    payload = read_payload("peer-a", node_payload("peer-a:1", None, GPUS, {}, []))
    unusable = [{"id": i, "vendor": v, "name": n, "reason": r} for i, v, n, r in payload.unusable]
    return {"gpus": gpu_views(payload), "unusable_gpus": unusable}


def status() -> dict:
    """Both peers and the model's two replicas, as /cluster/status shows them."""
    node = lambda n, q: {  # noqa: E731
        "id": n,
        "addr": f"{n}:1",
        "state": "alive",
        "gpus": [],
        **(gpu_entries() if n == "peer-a" else {}),
        "instances": [{"model": "fake", "state": "ready", "queue_depth": q, "free_slots": 1}],
    }
    placements = [{"node": n, "gpus": [], "state": "ready"} for n in ("peer-a", "peer-b")]
    return {
        "node_id": "peer-a",
        "leader": "peer-a",
        "term": 1,
        "nodes": [node("peer-a", 1), node("peer-b", 2)],
        "models": [{"name": "fake", "replicas": 2, "placements": placements}],
    }


async def test_the_page_charts_both_peers_and_shows_usage(tmp_path):
    wire = Wire()
    apis, gossips = [], []
    for name in ("peer-a", "peer-b"):
        engine = FakeEngine(
            "fake", reply="one two three four five six seven eight", token_delay=0.005
        )
        await engine.start()
        metrics = Metrics()
        instances = {"fake": SimpleNamespace(engine=engine, error="", state="ready")}
        apis.append(OpenAIApi(lambda i=instances: i, metrics, 64, 5))
        gossips.append(LoadGossip(wire.for_node(name), metrics, every_s=0))
    ledger = ClusterState()
    ledger.apply(encode_usage_add([UsageRow("a1b2c3d4e5f6", "fake", "2026-12-07", 7, 70, 56)]))

    async def cluster_status(request):
        return web.json_response(status())

    app = build_app(
        Metrics(),
        lambda: True,
        [
            apis[0].routes(),
            LoadApi(gossips[0], "peer-a").routes(),
            UsageApi(lambda: ledger.usage, lambda: {"a1b2c3d4e5f6": "course"}).routes(),
            [web.get("/cluster/status", cluster_status)],
        ],
    )
    peer_b = build_app(Metrics(), lambda: True, [apis[1].routes()])
    servers = [TestServer(app, host="127.0.0.1"), TestServer(peer_b, host="127.0.0.1")]
    for server in servers:
        await server.start_server()
    stop = asyncio.Event()

    async def traffic():
        """Requests on both peers, and each peer republishing its payload, as node.py does."""
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                for server, gossip in zip(servers, gossips, strict=True):
                    url = str(server.make_url("/v1/chat/completions"))
                    async with session.post(url, json=chat) as resp:
                        assert resp.status == 200
                    gossip.set_payload({"addr": "x"})
                await asyncio.sleep(0.2)

    driver = asyncio.create_task(traffic())
    try:
        async with Browser(tmp_path / "profile") as page:
            await page.open(str(servers[0].make_url("/")))
            cluster = "document.querySelector('#charts svg.rate[data-model=\"cluster\"]')"
            await page.wait_for(f"Number({cluster}?.dataset.points) >= 12", 60, "cluster points")
            await page.wait_for(f"Number({cluster}.dataset.max) > 0", 30, "a token rate")
            # The cluster's rate is both peers': more than either peer's own share.
            sums = await page.js(
                "(() => { const p = previous.sums.fake; return [p.t, p.r, p.fc]; })()"
            )
            own = sum(
                s.value
                for f in apis[0]._metrics.registry.collect()
                for s in f.samples
                if s.name == "aivailable_tokens_total" and s.labels.get("kind") == "completion"
            )
            assert sums[0] > own > 0 and sums[1] > 0 and sums[2] > 0
            queue = await page.js(
                "document.querySelector('#charts .card[data-model=\"cluster\"]').textContent"
            )
            assert "queue depth now 3" in queue and "time to first token" in queue
            replicas = await page.js(
                "[...document.querySelectorAll('#models .replica')].map(r => r.textContent)"
            )
            assert any("peer-b" in r and "queue 2" in r for r in replicas)
            gpus = await page.js(
                "Object.fromEntries([...document.querySelectorAll('#nodes [data-gpu]')]"
                ".map(g => [g.dataset.gpu, g.textContent]))"
            )
            assert "RX 580 (amd) Vulkan · usable · 2.0 GiB / 8.0 GiB" in gpus["peer-a/gpu0"]
            assert (
                "64 °C · 30% busy" in gpus["peer-a/gpu0"] and "unhealthy" not in gpus["peer-a/gpu0"]
            )
            assert "Tesla P40 (nvidia) CUDA · usable" in gpus["peer-a/gpu1"]
            assert "unhealthy: 96 °C, at or over its limit of 95 °C" in gpus["peer-a/gpu1"]
            assert gpus["peer-a/gpu2"] == "GTX 780 (nvidia) not usable: no CUDA here"
            usage = await page.js(
                "[...document.querySelectorAll('#usage tr td')].map(td => td.textContent)"
            )
            assert usage == ["2026-12-07", "a1b2c3d4e5f6 (course)", "fake", "7", "70", "56"]
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                width=1280,
                height=1000,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.js("document.getElementById('charts').scrollIntoView(); 1")
            shot = await page.call("Page.captureScreenshot", format="png")
            out = Path(os.environ.get("AIVAILABLE_ARTIFACTS", tmp_path)) / "dashboard-cluster.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            assert out.stat().st_size > 10_000
    finally:
        stop.set()
        await driver
        for server in servers:
            await server.close()
