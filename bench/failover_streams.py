"""What clients see when a host fails, and a lone peer's cold start (bench/failover.py's
sections d, e and f).

  d. kill -9 one of two hosts under 6 streaming clients through "route": client-visible
     failures (target 0) and the longest gap between two tokens any client saw.
  e. SIGSTOP one of two hosts for 10 s under the same load: client-visible failures and
     the slowest request.
  f. cold start: a brand-new lone peer (its own key and data dir, the model cached): seconds
     from Popen to /v1/models listing the model and to its first answer (target 2 s).

Clients stream chats (max_tokens 24) with plain HTTP one after another and note every
token's arrival. A failure is an HTTP error, an error event in the stream, a stream that
ends without [DONE], or a broken connection. Asserts nothing about time.
"""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from aivailable.local_peers import PeerProcess, get_json

MODEL = "smollm2-135m"
CLIENTS = 6
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from one to twenty."}],
    "max_tokens": 24,
    "stream": True,
}


class StreamingClient:
    """Streams chats to `url` one after another until stopped; keeps what it saw."""

    def __init__(self, url: str):
        self.url = url
        self.requests: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StreamingClient:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.requests.append(self._one())

    def _one(self) -> dict:
        start = time.monotonic()
        last, gap, done, error = start, 0.0, False, ""
        req = urllib.request.Request(
            self.url + "/v1/chat/completions",
            json.dumps(CHAT).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                for line in resp:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        done = True
                    elif b'"error"' in data:
                        error = data.decode(errors="replace")[:200]
        except urllib.error.HTTPError as exc:
            error = f"{exc.code}: {exc.read()[:200].decode(errors='replace')}"
        except Exception as exc:  # reset, timeout: the client saw a failure
            error = repr(exc)[:200]
        if not done and not error:
            error = "the stream ended without [DONE]"
        return {"start": start, "seconds": time.monotonic() - start, "gap": gap, "error": error}


def ready_hosts(route: PeerProcess) -> list[str]:
    for m in get_json(route.url + "/cluster/status")["models"]:
        if m["name"] == MODEL:
            return sorted(p["node"] for p in m["placements"] if p["state"] == "ready")
    return []


def streams_trial(cluster, fault: str, wait) -> dict:
    """`cluster`: bench/failover.py's Cluster with 2 replicas deployed; `fault`: kill | stop."""
    route = cluster.route
    wait("two ready replicas", lambda: len(ready_hosts(route)) == 2, 180, cluster.peers)
    victim = cluster.by_name(ready_hosts(route)[0])
    clients = [StreamingClient(route.url).start() for _ in range(CLIENTS)]
    time.sleep(3)
    t0 = time.monotonic()
    if fault == "kill":
        victim.signal(signal.SIGKILL)
        victim.proc.wait(10)
        time.sleep(10)
    else:
        victim.signal(signal.SIGSTOP)
        time.sleep(10)
        victim.signal(signal.SIGCONT)
        time.sleep(3)
    for c in clients:
        c.stop()
    during = [r for c in clients for r in c.requests if r["start"] + r["seconds"] >= t0]
    if fault == "kill":
        victim.start()
    cluster.wait_alive_and_two(wait)
    failed = [r["error"] for r in during if r["error"]]
    return {
        "fault": fault,
        "victim": victim.name,
        "requests": len(during),
        "failed": len(failed),
        "errors": failed[:3],
        "longest_gap_s": max((r["gap"] for r in during), default=None),
        "slowest_s": max((r["seconds"] for r in during), default=None),
    }


def cold_start_trial(base: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(dir=base, prefix="cold-"))
    peer = PeerProcess(tmp, "solo", "--gpu", "fake:GTX 1080:8GiB", "--n-ctx", "512")
    body = json.dumps({**CHAT, "stream": False, "max_tokens": 4}).encode()
    t0 = time.monotonic()
    peer.start()
    listed = answered = None
    try:
        while time.monotonic() - t0 < 60 and answered is None:
            try:
                if listed is None:
                    models = get_json(peer.url + "/v1/models", timeout=1)["data"]
                    if any(m["id"] == MODEL for m in models):
                        listed = time.monotonic() - t0
                req = urllib.request.Request(
                    peer.url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=10) as resp:
                    if resp.status == 200:
                        answered = time.monotonic() - t0
            except Exception:  # not up yet, or 503 while loading
                time.sleep(0.02)
    finally:
        peer.stop(timeout=15)
    return {"listed_s": listed, "first_answer_s": answered}
