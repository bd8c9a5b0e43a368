"""The load counters each peer gossips: read from its metrics at a bounded rate, and another
peer's malformed ones are dropped, never trusted."""

from types import SimpleNamespace

from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.api.cluster_load import LoadApi, LoadGossip, load_snapshot
from aivailable.metrics import Metrics


def test_the_snapshot_counts_completion_tokens_requests_and_ttft():
    metrics = Metrics()
    metrics.tokens.labels("m", "completion").inc(5)
    metrics.tokens.labels("m", "prompt").inc(50)
    metrics.requests.labels("chat", "m", "200").inc()
    metrics.requests.labels("responses", "m", "200").inc()
    metrics.ttft.labels("m").observe(0.25)
    assert load_snapshot(metrics) == {"m": {"t": 5, "r": 2, "fs": 250, "fc": 1}}


async def test_counters_are_read_at_most_every_interval_and_bad_ones_dropped():
    now = [0.0]
    sent = []
    metrics = Metrics()
    members = [
        SimpleNamespace(id="b", state="alive", payload={"load": {"m": {"t": 3, "r": "x"}}}),
        SimpleNamespace(id="c", state="dead", payload={"load": {"m": {"t": 9}}}),
        SimpleNamespace(id="d", state="alive", payload={"load": ["junk"]}),
    ]
    inner = SimpleNamespace(set_payload=sent.append, members=lambda: members)
    gossip = LoadGossip(inner, metrics, every_s=2.0, clock=lambda: now[0])
    gossip.set_payload({"a": 1})
    metrics.tokens.labels("m", "completion").inc(5)
    now[0] = 1.0
    gossip.set_payload({"a": 1})
    assert sent[0] == sent[1] == {"a": 1, "load": {}}  # unchanged: no new broadcast
    now[0] = 2.0
    gossip.set_payload({"a": 1})
    assert sent[2]["load"]["m"]["t"] == 5
    app = build_app(Metrics(), lambda: True, [LoadApi(gossip, "a").routes()])
    async with TestClient(TestServer(app)) as client:
        body = await (await client.get("/cluster/load")).json()
    assert [n["id"] for n in body["nodes"]] == ["a", "b", "d"]
    assert body["nodes"][1]["models"] == {"m": {"t": 3}} and body["nodes"][2]["models"] == {}
