"""Two clusters with one key, side by side: real `aivailable up` processes on loopback.

Cluster A (a1, a2) and cluster B (b1) are founded apart (no mDNS, --join only within each);
then b1 restarts with --join a1, as when two labs share a secret and their networks meet.
b1 resumes its own cluster from its data dir, sees A's peers in gossip, and never places
on, forwards to or counts them; both sides' status names the other cluster.
No model is loaded: the deployed source does not exist, so placement is all there is.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aivailable.local_peers import PeerProcess, free_port
from peer.secret import load_or_create_secret

pytestmark = pytest.mark.slow

GPU = ["--gpu", "fake:GTX 1080:8GiB"]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def placed(peer: PeerProcess, model: str) -> list[str]:
    for m in peer.status()["models"]:
        if m["name"] == model:
            return [p["node"] for p in m["placements"]]
    return []


def test_a_cluster_that_meets_another_with_the_same_key_keeps_to_itself(
    tmp_path: Path, embedded_model: Path
):
    key = tmp_path / "shared.key"
    load_or_create_secret(key)
    common = ["--cluster-key-file", str(key), "--model", "none", "--no-mdns", *GPU]
    ports = {n: free_port() for n in ("a1", "a2", "b1")}

    def peer(name: str, *join: str) -> PeerProcess:
        joins = [arg for j in join for arg in ("--join", f"127.0.0.1:{ports[j]}")]
        return PeerProcess(tmp_path, name, *common, *joins, port=ports[name])

    a1, a2, b1 = peer("a1", "a2"), peer("a2", "a1"), peer("b1")
    procs = [a1, a2, b1]
    try:
        for p in procs:
            p.start()
        members = lambda p: sorted(p.status()["voters"] + p.status()["learners"])  # noqa: E731
        a1.wait_until(lambda: members(a1) == ["a1", "a2"], 60, "A's two members")
        b1.wait_until(lambda: b1.status()["leader"] == "b1", 60, "B's leader")
        # A leader founds its cluster with its first entry: its id shows once that applies.
        for p in (a1, b1):
            p.wait_until(lambda p=p: p.status()["cluster_id"], 60, "the cluster founded")
        cluster_a, cluster_b = a1.status()["cluster_id"], b1.status()["cluster_id"]
        assert cluster_a and cluster_b and cluster_a != cluster_b

        # The networks meet: b1 restarts pointed at a1 and resumes its own cluster.
        b1.signal(signal.SIGTERM)
        assert b1.proc.wait(30) == 0
        procs[2] = b1 = peer("b1", "a1")
        b1.start()

        def sees_a(p: PeerProcess) -> bool:
            others = {o["cluster_id"]: o["nodes"] for o in p.status()["other_clusters"]}
            return sorted(others.get(cluster_a, [])) == ["a1", "a2"]

        b1.wait_until(lambda: sees_a(b1), 60, "cluster A visible from b1")
        a1.wait_until(
            lambda: [o["nodes"] for o in a1.status()["other_clusters"]] == [["b1"]],
            60,
            "cluster B visible from a1",
        )
        status = b1.status()
        assert status["cluster_id"] == cluster_b and status["voters"] == ["b1"]
        assert [n["id"] for n in status["nodes"]] == ["b1"]  # A's peers are not counted
        assert "another cluster" in status["other_clusters"][0]["hint"]

        # Three replicas wanted, one node in B: one placement, never on A's peers.
        code, body = post(
            b1.url + "/cluster/models",
            {"name": "m", "source": str(embedded_model), "replicas": 3, "n_ctx": 512},
        )
        assert code == 202, body
        b1.wait_until(lambda: placed(b1, "m") == ["b1"], 60, "m placed on b1 only")
        assert "unplaced" in next(m for m in b1.status()["models"] if m["name"] == "m")
        assert placed(a1, "m") == []  # A never heard of it
        # Nor does a request for A's models leave B: b1 does not know them.
        code, body = post(
            b1.url + "/v1/chat/completions",
            {"model": "a-only", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert code == 404, body
        b1.wait_until(
            lambda: "belongs to another cluster" in b1.log(), 30, "a log line on cluster A"
        )
    finally:
        for p in procs:
            p.stop(timeout=15)
