"""The usage ledger: booked where Metered charges, committed once per flush, applied once,
kept in snapshots, read by admins per key and by each key for itself."""

from types import SimpleNamespace

import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer

from aivailable.access.guard import KEY_RECORD
from aivailable.access.ledger import LedgerGate, UsageApi, UsageBook
from aivailable.api.app import build_app
from aivailable.api.inference import OpenGate
from aivailable.api.openai_api import OpenAIApi
from aivailable.api.responses_api import ResponsesApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster.state import ClusterState
from aivailable.cluster.usage import UsageRow, encode_usage_add
from aivailable.metrics import Metrics
from peer.auth import FORWARDED_HEADER
from peer.usage import Usage

DAY = 1_765_000_000.0  # 2025-12-06 UTC


def test_adds_apply_once_and_survive_a_snapshot():
    state = ClusterState()
    cmd = msgpack.unpackb(encode_usage_add([UsageRow("k1", "m", "2025-12-06", 2, 10, 5)]))
    cmd["pid"] = "ab" * 16
    data = msgpack.packb(cmd)
    assert state.apply(data).ok
    assert not state.apply(data).ok  # a retried proposal: same id, applied once
    state.apply(encode_usage_add([UsageRow("k1", "m", "2025-12-06", 1, 1, 1)]))
    (row,) = state.usage.query()
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (3, 11, 6)
    restored = ClusterState()
    restored.restore(state.snapshot())
    assert restored.usage.query() == state.usage.query()


def test_malformed_rows_change_nothing():
    state = ClusterState()
    bad = encode_usage_add([UsageRow("k1", "m", "2025-13-45", 1, 1, 1)])
    assert not state.apply(bad).ok and state.usage.query() == []
    negative = encode_usage_add([UsageRow("k1", "m", "2025-12-06", -1, 1, 1)])
    assert not state.apply(negative).ok


def test_old_days_leave_by_the_commands_days():
    state = ClusterState()
    state.apply(encode_usage_add([UsageRow("k", "m", "2024-01-01", 1, 1, 1)]))
    state.apply(encode_usage_add([UsageRow("k", "m", "2025-12-06", 1, 1, 1)]))
    assert [r.day for r in state.usage.query()] == ["2025-12-06"]


async def test_a_failed_flush_retries_the_same_proposal():
    book = UsageBook(clock=lambda: DAY)
    book.book("k1", "m", 3, 4)
    sent: list[bytes] = []

    async def flaky(data: bytes):
        sent.append(data)
        if len(sent) == 1:
            raise TimeoutError("no leader")

    assert not await book.flush(flaky)
    book.book("k1", "m", 1, 1)  # new use waits for the next batch
    assert await book.flush(flaky)
    assert sent[0] == sent[1]
    assert await book.flush(flaky) and len(sent) == 3
    state = ClusterState()
    for data in sent:
        state.apply(data)
    (row,) = state.usage.query()
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (2, 4, 5)


def test_only_the_entry_peer_books():
    book = UsageBook(clock=lambda: DAY)
    gate = LedgerGate(OpenGate(), book)
    parsed = SimpleNamespace(model="m")
    entry = {KEY_RECORD: SimpleNamespace(id="k1")}
    entry_request = SimpleNamespace(headers={}, get=entry.get)
    host_request = SimpleNamespace(headers={FORWARDED_HEADER: "n1"}, get={}.get)
    gate.charge(entry_request, parsed, Usage(5, 7))
    gate.charge(host_request, parsed, Usage(5, 7))
    assert book.pending() == [UsageRow("k1", "m", "2025-12-06", 1, 5, 7)]


@pytest.fixture
async def peer():
    engine = FakeEngine("fake", reply="one two three")
    await engine.start()
    instances = {"fake": SimpleNamespace(engine=engine, error="", state="ready")}
    metrics = Metrics()
    book = UsageBook(clock=lambda: DAY)
    api = OpenAIApi(lambda: instances, metrics, 64, 5, gate=LedgerGate(OpenGate(), book))
    state = ClusterState()

    async def propose(data: bytes):
        state.apply(data)

    usage = UsageApi(lambda: state.usage, lambda: {})
    responses = ResponsesApi(api, metrics, 5, "n1")
    app = build_app(metrics, lambda: True, [api.routes(), responses.routes(), usage.routes()])
    client = TestClient(TestServer(app))
    await client.start_server()
    yield SimpleNamespace(client=client, book=book, propose=propose)
    await client.close()


async def test_ledger_counts_equal_the_engines_usage_through_every_api(peer):
    c = peer.client
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    answers = [
        await (await c.post("/v1/chat/completions", json=chat)).json(),
        await (await c.post("/v1/completions", json={"model": "fake", "prompt": "x"})).json(),
        await (await c.post("/v1/responses", json={"model": "fake", "input": "hi"})).json(),
    ]
    prompt = sum(
        a["usage"].get("prompt_tokens", a["usage"].get("input_tokens", 0)) for a in answers
    )
    completion = sum(
        a["usage"].get("completion_tokens", a["usage"].get("output_tokens", 0)) for a in answers
    )
    assert await peer.book.flush(peer.propose)
    report = await (await c.get("/cluster/usage")).json()
    (row,) = report["data"]
    assert row["key"] == "-" and row["model"] == "fake" and row["day"] == "2025-12-06"
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
        3,
        prompt,
        completion,
    )
    assert report["by_model"][0]["requests"] == 3
    own = await (await c.get("/v1/usage?since=2025-12-01")).json()
    assert own["data"] == report["data"]
    assert (await c.get("/cluster/usage?since=2025-12-07")).status == 200
    assert (await (await c.get("/cluster/usage?since=2025-12-07")).json())["data"] == []
    assert (await c.get("/cluster/usage?since=yesterday")).status == 400
