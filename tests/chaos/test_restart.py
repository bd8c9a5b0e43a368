"""Chaos on loopback: stop (SIGTERM) and restart every node, one at a time under load, then
all at once. The data dir must carry the cluster through: same members, same models.
Default gossip and Raft timings."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.chaos.harness import (
    MODEL,
    ClientLoad,
    Cluster,
    StatusWatcher,
    alive,
    chat_once,
    print_log_tails,
    wait_one_plan,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

GPU = ["--gpu", "fake:GTX 1080:8GiB"]
SECOND = "smol-b"  # a second deployment of the embedded model: two models to keep


def deploy(peer, name: str) -> None:
    body = json.dumps({"name": name, "source": f"builtin:{MODEL}", "replicas": 1}).encode()
    req = urllib.request.Request(
        peer.url + "/cluster/models", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status in (200, 202)


def settled(c: Cluster, models: set[str], timeout: float = 120) -> dict:
    """Every peer alive and a voter, every model ready, one plan everywhere."""
    for p in c.peers:
        p.wait_until(
            lambda p=p: (
                len(alive(p.status())) == len(c.peers) and len(p.status()["voters"]) == len(c.peers)
            ),
            timeout,
            "every peer alive and a voter",
        )
    for model in models:
        c.wait_ready(c.peers[0], model, timeout)
    plan = wait_one_plan(c.peers, timeout)
    assert set(plan) == models, f"models changed: {set(plan)} != {models}"
    return plan


def test_stop_and_restart_every_node(tmp_path):
    c = Cluster(tmp_path, [GPU, GPU, GPU])
    try:
        c.start()
        deploy(c["n2"], SECOND)
        models = {MODEL, SECOND}
        settled(c, models)
        cluster_id = c.peers[0].status()["cluster_id"]
        with StatusWatcher(c.peers) as watch:
            # 1. One at a time, with a client on a peer that stays up.
            with ClientLoad(c["n1"]) as load:
                load.wait_success(0, 30, "a chat before the restarts")
                for p in c.peers:
                    load.target = next(q for q in c.peers if q is not p)
                    assert p.stop() == 0, f"{p.name} did not exit cleanly:\n{p.log()[-3000:]}"
                    back_at = time.monotonic()
                    p.start()
                    p.wait_healthy()
                    settled(c, models)
                    load.wait_success(back_at, 60, f"a chat after restarting {p.name}")
            # 2. All at once: nothing serves until they are back.
            codes = c.stop_all()
            assert set(codes.values()) == {0}, f"unclean exits: {codes}"
            for p in c.peers:
                p.start()
            plan = settled(c, models)
            outcome = chat_once(c["n0"].url, "n0")
            assert outcome.kind == "ok", outcome
        watch.assert_one_leader_per_term()
        print(f"terms: {watch.leaders_by_term()}\nplan: {plan}\n{load.report()}")
        load.assert_clean(min_ok=3)
        cluster_ids = {p.status()["cluster_id"] for p in c.peers}
        assert cluster_ids == {cluster_id}, f"not the same cluster after restarts: {cluster_ids}"
    except BaseException:
        print_log_tails(c.peers)
        raise
    finally:
        c.close()
