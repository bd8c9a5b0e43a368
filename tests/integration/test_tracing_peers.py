"""One trace across two real peer processes (`aivailable up --otlp-endpoint`), the host
running the real model: a forwarded /v1/responses request leaves the entry peer's server,
admission and forward spans and the host's server, queue wait, prefill and decode spans, with
the engine's token counts, at an OTLP/HTTP collector on loopback."""

from __future__ import annotations

import http.server
import threading
from types import SimpleNamespace

import pytest

from tests.integration.test_access_peers import http as call
from tests.integration.test_access_peers import poll
from tests.integration.test_cluster_peers import Cluster
from tests.unit.test_responses_peers import check_span_tree, otlp_spans

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


class Collector(http.server.ThreadingHTTPServer):
    """OTLP/HTTP traces on 127.0.0.1, decoded into the spans it received."""

    def __init__(self):
        self.spans: list[SimpleNamespace] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def of(self, trace_id: str) -> list[SimpleNamespace]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        spans = otlp_spans(body)
        with self.server.lock:
            self.server.spans += spans
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_one_trace_across_real_peers(tmp_path, collector):
    url = f"http://127.0.0.1:{collector.server_address[1]}"
    cluster = Cluster(tmp_path)
    try:
        host, entry = cluster.start(
            {
                "host": ["--gpu", "fake:GTX 1080:8GiB", "--otlp-endpoint", url],
                "entry": ["--cpu", "no", "--otlp-endpoint", url],  # it only routes
            }
        )
        for peer in (host, entry):
            peer.wait_healthy()
        deploy = {"source": "builtin:smollm2-135m", "replicas": 1}
        poll(lambda: call("POST", host.url + "/cluster/models", deploy)[0] < 300, 60, "deploy")
        host.wait_model_ready(MODEL, 240)

        def routed() -> bool:
            return any(
                p["state"] == "ready"
                for m in entry.status()["models"]
                if m["name"] == MODEL
                for p in m["placements"]
            )

        entry.wait_until(routed, 60, "the entry peer to see the replica")
        trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
        status, body, headers = call(
            "POST",
            entry.url + "/v1/responses",
            {"model": MODEL, "input": "Say hi.", "max_output_tokens": 8},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
            timeout=120,
        )
        assert status == 200 and headers["X-Aivailable-Replica"] == "host"
        wanted = {("entry", n) for n in ("POST /v1/responses", "admission", "forward")} | {
            ("host", n) for n in ("POST /v1/responses", "queue wait", "prefill", "decode")
        }
        # Each peer exports in batches, every 0.5 s.
        poll(lambda: wanted <= {(s.node, s.name) for s in collector.of(trace_id)}, 30, "spans")
        check_span_tree(collector.of(trace_id), body)
        assert body["usage"]["output_tokens"] > 0
    finally:
        cluster.stop_all()
