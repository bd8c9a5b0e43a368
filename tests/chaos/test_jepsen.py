"""Jepsen-style: is the deployment map linearizable on real peers under a nemesis?

Five real peers (`python -m aivailable up`), each in its own network namespace, routing-only
(no device, no default model: a deploy is a Raft write and nothing more). Four clients
deploy (an upsert: name -> a value of its own, carried as n_ctx), undeploy and read (a
ReadIndex read: `GET /cluster/status?consistent=1`) a few names through a random peer each
time, while a nemesis kills -9 and restarts, pauses (SIGSTOP) and partitions peers. The
recorded history (invoke, ok / fail / unknown, tests/chaos/jepsen.py) must be linearizable
for a map (tests/linearizability.py's Wing-Gong search).

Seeded: the seed is printed; JEPSEN_SEED=N replays its choices (not its timing).
JEPSEN_SECONDS sets how long the nemesis runs.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.chaos.harness import Cluster, alive, print_log_tails
from tests.chaos.jepsen import Client, History, Nemesis, Recorded, deployed, request
from tests.chaos.netns import Lab, available
from tests.linearizability import (
    Operation,
    deployment_map_model,
    first_violation,
    is_linearizable,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

PEERS = 5
CLIENTS = 4
KEYS = ("jep-a", "jep-b")
ROUTER = ["--cpu", "no", "--model", "none", "--offline"]
REQUEST_TIMEOUT_S = 4.0  # a client's patience; a proposal gives up after 5 s on its own


def start(cluster: Cluster, timeout: float = 60) -> None:
    """The founder first, then the rest; until every peer is a live voter."""
    first, *rest = cluster.peers
    first.start()
    first.wait_healthy()
    for p in rest:
        p.start()
    for p in cluster.peers:
        p.wait_healthy()
    first.wait_until(
        lambda: (
            len(first.status()["voters"]) == len(cluster.peers)
            and all(len(alive(p.status())) == len(cluster.peers) for p in cluster.peers)
        ),
        timeout,
        "every peer a live voter",
    )


def final_reads(cluster: Cluster, history: History, timeout: float = 30) -> None:
    """After healing: a consistent read through every peer, each retried until it answers.
    They go into the history (a peer that forgot a write shows here)."""
    for p in cluster.peers:
        deadline = time.monotonic() + timeout
        while True:
            call = time.monotonic()
            status, body = request(p, "GET", "/cluster/status?consistent=1", None, 5)
            if status == 200:
                op = Operation(call, time.monotonic(), "read", None, deployed(body, KEYS))
                history.add(Recorded(-1, p.name, op, "[final]"), "read")
                break
            assert time.monotonic() < deadline, f"{p.name} never answered a read: {status} {body}"
            time.sleep(0.5)


def test_the_deployment_map_is_linearizable_under_kills_pauses_and_partitions(tmp_path):
    reason = available()
    if reason:
        pytest.fail(f"chaos tests need network namespaces: {reason}")
    seed = int(os.environ.get("JEPSEN_SEED") or random.SystemRandom().randrange(1 << 32))
    seconds = float(os.environ.get("JEPSEN_SECONDS", "40"))
    print(f"JEPSEN_SEED={seed} JEPSEN_SECONDS={seconds:g}")
    rng = random.Random(seed)
    history = History(KEYS)
    began = time.monotonic()
    with Lab(PEERS) as lab:
        cluster = Cluster(tmp_path, [ROUTER] * PEERS, hosts=lab.hosts)
        nemesis = Nemesis(cluster, lab, random.Random(rng.random()))
        clients = [
            Client(i, cluster.peers, history, random.Random(rng.random()), REQUEST_TIMEOUT_S)
            for i in range(CLIENTS)
        ]
        try:
            start(cluster)
            started = time.monotonic()
            for c in clients:
                c.start()
            time.sleep(1.0)  # some operations on a healthy cluster first
            nemesis.start()
            time.sleep(seconds)
            nemesis.stop.set()
            nemesis.join(30)
            assert not nemesis.is_alive(), "the nemesis is stuck"
            time.sleep(3.0)  # the clients go on against the healed cluster a while
            for c in clients:
                c.stop.set()
            for c in clients:
                c.join(REQUEST_TIMEOUT_S + 5)
            assert not any(c.is_alive() for c in clients), "a client is stuck past its timeout"
            final_reads(cluster, history)
            gone = [p.name for p in cluster.peers if p.proc.poll() is not None]
            assert not gone, f"peers that did not survive: {gone}"
            ran = time.monotonic()
        except BaseException:
            print_log_tails(cluster.peers, 3000)
            raise
        finally:
            for c in clients:
                c.stop.set()
            nemesis.stop.set()
            nemesis.heal_all()
            cluster.close()

    ops = history.operations()
    t0 = min((o.call for o in ops), default=0.0)
    dump = tmp_path / "jepsen-history.txt"  # the whole run, by call time, for a closer look
    dump.write_text(history.report(last=len(ops)) + "\n" + nemesis.report(t0) + "\n")
    print(f"history: {dump}")
    checked_at = time.monotonic()
    ok = is_linearizable(ops, deployment_map_model())
    check_s = time.monotonic() - checked_at
    print(
        f"start {started - began:.1f}s, run {ran - started:.1f}s, check {check_s:.2f}s; "
        f"{len(ops)} operations in the history ({history.summary()}); "
        f"faults: {nemesis.counts}; not in the history: {history.why_failed}\n" + nemesis.report(t0)
    )
    assert nemesis.error is None, f"the nemesis failed: {nemesis.error!r}"
    if not ok:
        window = first_violation(ops, deployment_map_model()) or ops
        raise AssertionError(
            f"JEPSEN_SEED={seed}: the history is not linearizable. The shortest prefix that "
            f"is not ({len(window)} operations), its last ones, with the nemesis:\n"
            + history.report(window)
            + "\n"
            + nemesis.report(t0)
        )
    assert not history.unexpected, (
        "answers the API should not give:\n"
        + "\n".join(f"  {t - t0:7.3f} {what[:300]}" for t, what in history.unexpected[:20])
        + "\n"
        + nemesis.report(t0)
    )
    # Not vacuous: the nemesis acted, and every kind of operation succeeded often enough.
    assert set(Nemesis.FAULTS) <= set(nemesis.counts), nemesis.counts
    assert history.count("deploy", "ok") >= 20, history.summary()
    assert history.count("read", "ok") >= 20, history.summary()
    undeploys = [o for o in ops if o.kind == "undeploy" and o.ret is not None]
    assert sum(o.result is True for o in undeploys) >= 5, history.summary()
    assert sum(o.result is False for o in undeploys) >= 1, history.summary()
