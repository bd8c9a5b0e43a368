"""Demand scaling on real peers: `aivailable up` processes with simulated GPUs and the real
SmolLM2 on the CPU (issue 21). A load step on a min 1, max 2 deploy brings a second replica
that takes a share of the requests, and idle brings it back to one; a min 0 model unloads
after its idle time, and the next request, from the openai client and from an Ollama
client with keep_alive, gets its answer; a low-priority idle model yields its VRAM to a busy
high-priority one.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.integration.test_cluster_peers import MODEL_SOURCE, all_alive, http, leader_of, wait_all

pytestmark = pytest.mark.slow

# One SmolLM2 instance at n_ctx 256 and 4 slots (about 470 MiB exact, 620 MiB as estimated
# before the leader holds the file) fits a 1 GiB GPU (768 MiB usable), two never do.
GPUS = {"a": ["--gpu", "fake:Small:1GiB"], "b": ["--gpu", "fake:Small:1GiB"]}


def deploy(peer, **body) -> dict:
    status, result = http(
        "POST",
        peer.url + "/cluster/models",
        json.dumps({"source": MODEL_SOURCE, "n_ctx": 256, "n_parallel": 4, **body}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 202, result
    return result


def scaling(peer, model: str) -> dict:
    for m in peer.status()["models"]:
        if m["name"] == model:
            return {
                **m.get("scaling", {}),
                "ready": [p["node"] for p in m["placements"] if p["state"] == "ready"],
            }
    return {}


def chat(peer, model: str, timeout: float = 120) -> tuple[int, dict]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count to ten"}],
        "max_tokens": 24,
    }
    return http(
        "POST",
        peer.url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        timeout=timeout,
    )


class Load:
    """`streams` threads sending chats one after another until stopped."""

    def __init__(self, peers, model: str, streams: int):
        self.stop = threading.Event()
        self.codes: list[int] = []
        self.threads = [
            threading.Thread(target=self._run, args=(peers[i % len(peers)], model), daemon=True)
            for i in range(streams)
        ]
        for t in self.threads:
            t.start()

    def _run(self, peer, model):
        while not self.stop.is_set():
            try:
                code, _ = chat(peer, model, timeout=60)
            except OSError:
                code = 0
            self.codes.append(code)
            if code != 200:
                time.sleep(1)

    def end(self):
        self.stop.set()
        for t in self.threads:
            t.join(90)


def instance_rpm(peer, model: str) -> dict[str, float]:
    """Requests per minute each node's instance of `model` measured, as gossiped."""
    out = {}
    for node in peer.status()["nodes"]:
        for inst in node["instances"]:
            if inst["model"] == model and inst.get("demand"):
                out[node["id"]] = inst["demand"]["rpm"]
    return out


def test_a_load_step_adds_a_replica_that_serves_and_idle_takes_it_away(cluster):
    peers = cluster.start(GPUS)
    wait_all(peers, all_alive({"a", "b"}), "two alive peers")
    leader_of(peers)
    a = cluster.peers["a"]
    deploy(a, name="s", min_replicas=1, max_replicas=2, idle_unload_s=20)
    a.wait_until(lambda: len(scaling(a, "s")["ready"]) == 1, 180, "one replica")
    load = Load(peers, "s", 10)  # 10 streams on one 4-slot CPU replica
    try:
        a.wait_until(lambda: len(scaling(a, "s")["ready"]) == 2, 150, "a second replica")
        last = scaling(a, "s")["last_decision"]
        assert last["from"] == 1 and last["to"] == 2 and last["reason"], last
        a.wait_until(
            lambda: len([v for v in instance_rpm(a, "s").values() if v > 0]) == 2,
            60,
            "both replicas serving",
        )
    finally:
        load.end()
    assert load.codes.count(200) > 0
    # No request for idle_unload_s: back to its min.
    a.wait_until(lambda: len(scaling(a, "s")["ready"]) == 1, 90, "back to one replica")
    assert scaling(a, "s")["wanted"] == 1


def test_min_zero_unloads_and_comes_back_for_openai_and_ollama_clients(cluster):
    openai = pytest.importorskip("openai")
    peers = cluster.start(GPUS)
    wait_all(peers, all_alive({"a", "b"}), "two alive peers")
    leader_of(peers)
    a, b = cluster.peers["a"], cluster.peers["b"]
    deploy(a, name="z", min_replicas=0, max_replicas=1, idle_unload_s=5)
    a.wait_until(lambda: len(scaling(a, "z")["ready"]) == 1, 180, "loaded at first")
    a.wait_until(
        lambda: scaling(a, "z")["wanted"] == 0 and not scaling(a, "z")["ready"],
        60,
        "unloaded when idle",
    )
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="none", timeout=120)
    reply = client.chat.completions.create(
        model="z", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
    )
    assert reply.choices[0].message.content
    assert "waiting" in scaling(a, "z")["last_decision"]["reason"]
    a.wait_until(lambda: not scaling(a, "z")["ready"], 60, "unloaded again")
    body = {
        "model": "z",
        "prompt": "Say hi",
        "stream": False,
        "keep_alive": "1m",
        "options": {"num_predict": 8},
    }
    status, answer = http(
        "POST",
        a.url + "/api/generate",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        timeout=120,
    )
    assert status == 200 and answer["done"] is True, answer
    ps = http(
        "GET", next(p for p in peers if scaling(a, "z")["ready"] == [p.name]).url + "/api/ps"
    )[1]
    assert ps["models"] and ps["models"][0]["expires_at"] > "2000"


def test_a_low_priority_idle_model_yields_to_a_busy_high_priority_one(cluster):
    peers = cluster.start(GPUS)
    wait_all(peers, all_alive({"a", "b"}), "two alive peers")
    leader_of(peers)
    a = cluster.peers["a"]
    deploy(a, name="lo", min_replicas=0, max_replicas=1, priority=0, idle_unload_s=3600)
    a.wait_until(lambda: len(scaling(a, "lo")["ready"]) == 1, 180, "lo loaded")
    deploy(a, name="hi", min_replicas=1, max_replicas=2, priority=5)
    a.wait_until(lambda: len(scaling(a, "hi")["ready"]) == 1, 180, "hi loaded")
    load = Load(peers, "hi", 10)
    try:
        a.wait_until(lambda: len(scaling(a, "hi")["ready"]) == 2, 180, "hi on both GPUs")
    finally:
        load.end()
    lo = scaling(a, "lo")
    assert lo["ready"] == [] and "yielded VRAM to hi" in lo["last_decision"]["reason"], lo
