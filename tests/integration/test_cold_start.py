"""Cold start on real processes: a brand-new lone peer preloads its cached default model
while it listens for a cluster, serves it, and the cluster's first plan adopts that worker
instead of reloading it; a peer that then finds the cluster runs no model of its own (a
preload it began before it heard of the cluster is stopped) and joins.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from aivailable.local_peers import PeerProcess
from aivailable.models import store
from peer.secret import load_or_create_secret

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
FLAGS = ["--gpu", "fake:GTX 1080:8GiB", "--n-ctx", "512"]


def chat(peer: PeerProcess) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    req = urllib.request.Request(
        peer.url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.headers.get("X-Aivailable-Replica") or peer.name


def loads(peer: PeerProcess) -> int:
    return peer.log().count(f"model {MODEL}: pending -> loading")


def test_a_lone_peer_serves_its_preloaded_model_and_a_joiner_drops_its_own(tmp_path: Path):
    store.resolve("builtin:" + MODEL)  # cached, as on a machine that ran it before
    key = tmp_path / "cluster.key"
    load_or_create_secret(key)
    a = PeerProcess(tmp_path, "a", "--cluster-key-file", str(key), *FLAGS)
    b = PeerProcess(tmp_path, "b", "--cluster-key-file", str(key), *FLAGS)
    try:
        a.start()
        a.wait_until(lambda: chat(a) == "a", 60, "a first answer")
        assert "preloading" in a.log()
        a.wait_until(
            lambda: (
                [p["state"] for m in a.status()["models"] for p in m["placements"]] == ["ready"]
            ),
            60,
            "the first plan with the model on a",
        )
        assert loads(a) == 1  # adopted, not reloaded

        b.start()
        b.wait_until(lambda: b.status()["cluster_id"] == a.status()["cluster_id"], 60, "b joins")
        assert "join cluster" in b.log()

        def b_runs_nothing() -> bool:
            node = next(n for n in b.status()["nodes"] if n["id"] == "b")
            return node["instances"] == []

        # Whether b heard of a before it began to preload or after, it runs no model now.
        b.wait_until(b_runs_nothing, 30, "no model on b")
        assert loads(b) == 0 or "stopping" in b.log()
        assert chat(b) == "a" and loads(a) == 1
    finally:
        for p in (a, b):
            p.stop(timeout=15)
