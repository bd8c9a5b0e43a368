"""Chaos in the lab network (tests/chaos/netns.py): partitions and packet loss.

Each peer runs in its own network namespace on a bridge and finds the others with mDNS
bound to its namespace's address; the test process reaches them through the bridge.
A client streams chats to a peer that stays on the majority side throughout.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request

import pytest

from aivailable.http_client import auth_headers
from tests.chaos.harness import (
    MODEL,
    ClientLoad,
    Cluster,
    StatusWatcher,
    alive,
    plan_of,
    print_log_tails,
    ready_hosts,
    wait_one_plan,
)
from tests.chaos.netns import Lab, available

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

GPU = ["--gpu", "fake:GTX 1080:8GiB"]


@contextlib.contextmanager
def lab_cluster(tmp_path, size: int, config: str | None = None):
    reason = available()
    if reason:
        pytest.fail(f"chaos tests need network namespaces: {reason}")
    with Lab(size) as lab:
        cluster = Cluster(tmp_path, [GPU] * size, hosts=lab.hosts, config=config)
        try:
            yield lab, cluster.start()
        except BaseException:
            print_log_tails(cluster.peers)
            raise
        finally:
            cluster.close()


def deploy(peer, name: str, timeout: float = 20) -> tuple[int, dict]:
    """POST /cluster/models through `peer`: (status, JSON body)."""
    body = json.dumps({"name": name, "source": f"builtin:{MODEL}", "replicas": 1}).encode()
    req = urllib.request.Request(
        peer.url + "/cluster/models",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **auth_headers()},  # auth is on in netns
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_partition_one_node_then_a_minority_then_heal(tmp_path):
    with lab_cluster(tmp_path, 5) as (lab, c):
        host_of = {p.name: h for p, h in zip(c.peers, lab.hosts, strict=True)}
        first = c["n4"].status()
        client = c["n4"]  # stays on the majority side throughout
        with StatusWatcher(c.peers) as watch, ClientLoad(client) as load:
            load.wait_success(0, 30, "a chat before the faults")

            # 1. Cut off the leader (which also hosts the model, as the founder).
            lone = c[first["leader"]]
            cut_at = time.monotonic()
            lab.partition(host_of[lone.name], watchable=True)
            client.wait_until(
                lambda: client.status()["leader"] not in (None, lone.name),
                30,
                "a leader on the majority side",
            )
            c.wait_ready(client, avoid=(lone.name,), timeout=90)
            load.wait_success(cut_at, 60, "a chat with the leader cut off")
            # CheckQuorum: the old leader, cut off from every voter, steps down.
            lone.wait_until(
                lambda: lone.status()["leader"] is None, 10, "the lone node to step down"
            )
            lab.heal(host_of[lone.name])
            client.wait_until(lambda: len(alive(client.status())) == 5, 60, "5 alive members")

            # 2. Cut off a minority of two: the leader and the model's host when they are
            # not the client's peer.
            now = client.status()
            minority: list[str] = []
            for n in (now["leader"], *ready_hosts(now), *(p.name for p in c.peers)):
                if n and n != client.name and n not in minority:
                    minority.append(n)
            minority = sorted(minority[:2])
            majority = [p for p in c.peers if p.name not in minority]
            cut_at = time.monotonic()
            lab.isolate_group([host_of[n] for n in minority], watchable=True)
            for p in majority:
                p.wait_until(
                    lambda p=p: p.status()["leader"] not in (None, *minority),
                    30,
                    "a leader in the majority",
                )
            c.wait_ready(client, avoid=minority, timeout=90)
            load.wait_success(cut_at, 60, "a chat with a minority cut off")
            # The minority cannot commit: a deploy through it fails with a clear 503.
            code, body = deploy(c[minority[0]], "minority-only")
            assert code == 503 and body["error"]["message"], (code, body)

            # 3. Heal: everyone converges on one leader and one plan.
            for n in minority:
                lab.heal(host_of[n])
            healed_at = time.monotonic()
            for p in c.peers:
                p.wait_until(lambda p=p: len(alive(p.status())) == 5, 60, "5 alive members")
            load.wait_success(healed_at, 60, "a chat after healing")
        plan = wait_one_plan(c.peers)
        assert plan.keys() == plan_of(first).keys(), f"models changed: {plan}"
        assert len(plan[MODEL]) == 1
        watch.assert_one_leader_per_term()
        print(f"terms: {watch.leaders_by_term()}\n{load.report()}")
        load.assert_clean(min_ok=3)


def test_30_percent_packet_loss_on_the_host(tmp_path):
    with lab_cluster(tmp_path, 3) as (lab, c):
        first = c["n0"].status()
        (host,) = ready_hosts(first)
        client = next(p for p in c.peers if p.name != host)
        with StatusWatcher(c.peers) as watch, ClientLoad(client) as load:
            load.wait_success(0, 30, "a chat before the fault")
            lossy_at = time.monotonic()
            lab.loss(lab.hosts[int(host[1:])], 30)
            time.sleep(20)
            lab.heal(lab.hosts[int(host[1:])])
            healed_at = time.monotonic()
            for p in c.peers:
                p.wait_until(lambda p=p: len(alive(p.status())) == 3, 60, "3 alive members")
            c.wait_ready(client, timeout=60)
            load.wait_success(healed_at, 60, "a chat after the loss ended")
        during = [o for o in load.since(lossy_at) if o.start < healed_at]
        plan = wait_one_plan(c.peers)
        assert plan.keys() == plan_of(first).keys()
        watch.assert_one_leader_per_term()
        print(f"terms: {watch.leaders_by_term()} dead: {watch.ever_dead()}\n{load.report()}")
        load.assert_clean(min_ok=3)
        assert any(o.kind == "ok" for o in during), "nothing got through 30% loss"
        # SWIM with Lifeguard keeps a live node behind 30% loss from being declared dead.
        assert host not in watch.ever_dead(), "the lossy node was declared dead"
