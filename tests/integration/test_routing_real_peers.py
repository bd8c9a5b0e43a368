"""No refusal while a slot is free anywhere, on real peers (issue 22): two `aivailable up`
processes with a simulated GPU each, the embedded model on both with one slot; while one
replica's slot is held by a long stream, a request to that replica's peer is served by the
other replica (as gossip's free slots tell it), not queued behind the stream or refused."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.integration.test_cluster_peers import GPUS, all_alive, http, ready_on, wait_all

pytestmark = pytest.mark.slow

MODEL = "smol"


def open_stream(url: str, text: str):
    """A streamed chat of up to 400 tokens, left open: it holds its replica's slot."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 400,
        "stream": True,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        method="POST",
    )
    return urllib.request.urlopen(req, timeout=120)


def test_a_full_replicas_peer_has_the_free_replica_serve_the_request(cluster):
    peers = cluster.start({"a": GPUS["a"], "b": GPUS["b"]})
    wait_all(peers, all_alive({"a", "b"}), "two alive peers")
    a, b = cluster.peers["a"], cluster.peers["b"]
    deploy = {"name": MODEL, "source": "builtin:smollm2-135m", "replicas": 2, "n_ctx": 1024}
    deploy["n_parallel"] = 1
    status, result = http(
        "POST",
        a.url + "/cluster/models",
        json.dumps(deploy).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 202, result
    a.wait_until(lambda: sorted(ready_on(a, MODEL)) == ["a", "b"], 180, "both replicas ready")

    # Hold a's one slot with a stream a serves itself (a conversation whose prefix ranks a
    # first; one that ranks b goes there while b is free, so try a few).
    holder = None
    for i in range(12):
        resp = open_stream(a.url, f"Tell me a long story about lighthouse number {i}.")
        if resp.headers.get("X-Aivailable-Replica") is None:
            holder = resp
            break
        resp.close()
    assert holder is not None, "no conversation was served by a's own replica"
    try:
        b.wait_until(lambda: free_slots(b, "a") == 0, 10, "gossip shows a's slot taken")
        hi = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        req = urllib.request.Request(
            a.url + "/v1/chat/completions",
            json.dumps(hi).encode(),
            {"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["choices"][0]["message"]["content"]
            # Served by b's replica, not queued behind the stream on a's.
            assert resp.headers.get("X-Aivailable-Replica") == "b"
    finally:
        holder.close()


def free_slots(observer, node: str) -> int | None:
    for n in observer.status()["nodes"]:
        if n["id"] == node:
            for inst in n.get("instances", []):
                if inst.get("model") == MODEL:
                    return inst.get("free_slots")
    return None
