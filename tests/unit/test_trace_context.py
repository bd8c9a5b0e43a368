"""W3C traceparent: kept when valid, started when absent or broken, sent on every hop and
written in each peer's access log."""

import logging
from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.metrics import Metrics
from peer import trace
from peer.forward import TRACEPARENT_KEY, Forwarder

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_valid_headers_are_kept_and_others_replaced():
    assert trace.accepted_or_new(VALID) == VALID
    for bad in (None, "", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "ff-" + VALID[3:], "junk"):
        fresh = trace.accepted_or_new(bad)
        assert trace.parse(fresh) is not None and fresh.endswith("-00")  # new, not sampled
    assert trace.trace_id(VALID) == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_the_forwarder_sends_the_requests_traceparent_once():
    forwarder = Forwarder(None, lambda m: [], lambda m: None, "entry")
    request = {TRACEPARENT_KEY: VALID}
    headers = {"TraceParent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "Accept": "x"}
    sent = forwarder._upstream_headers(SimpleNamespace(headers=headers, get=request.get))
    assert sent["traceparent"] == VALID and "TraceParent" not in sent and sent["Accept"] == "x"


async def test_the_access_log_carries_the_trace_id(caplog):
    async def hello(request):
        return web.json_response({"trace": request[TRACEPARENT_KEY]})

    app = build_app(Metrics(), lambda: True, [[web.get("/v1/hello", hello)]])
    async with TestClient(TestServer(app)) as client:
        with caplog.at_level(logging.INFO, logger="aivailable.access"):
            resp = await client.get("/v1/hello", headers={"traceparent": VALID})
            assert (await resp.json())["trace"] == VALID
    assert "trace=4bf92f3577b34da6a3ce929d0e0e4736" in caplog.text
