"""No client sees a host die: two replicas of the model, streaming clients through a third
peer that only routes, and one host killed (-9) or stopped (SIGSTOP) under them.

Every request must succeed: one that was waiting on the dead or frozen host is retried on
the other replica (gossip's verdict, the first-byte timeout, the refused connection), and a
stream cut mid-answer is resumed there from the text already sent.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import urllib.request

import pytest

from tests.chaos.harness import (
    MODEL,
    REQUEST_TIMEOUT_S,
    ClientLoad,
    Cluster,
    print_log_tails,
    ready_hosts,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

GPU = ["--gpu", "fake:GTX 1080:8GiB"]
ROUTER = ["--cpu", "no"]
CLIENTS = 4


@contextlib.contextmanager
def two_replicas(tmp_path):
    cluster = Cluster(tmp_path, [ROUTER, GPU, GPU])
    try:
        cluster.start()
        router = cluster["n0"]
        body = {"name": MODEL, "source": "builtin:" + MODEL, "replicas": 2, "n_ctx": 512}
        req = urllib.request.Request(
            router.url + "/cluster/models",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 202
        router.wait_until(
            lambda: sorted(ready_hosts(router.status())) == ["n1", "n2"], 120, "two replicas"
        )
        yield cluster
    except BaseException:
        print_log_tails(cluster.peers)
        raise
    finally:
        cluster.close()


@contextlib.contextmanager
def clients(target, n: int = CLIENTS):
    loads = [ClientLoad(target, pause_s=0.05) for _ in range(n)]
    with contextlib.ExitStack() as stack:
        for load in loads:
            stack.enter_context(load)
        yield loads


def assert_all_ok(loads: list[ClientLoad], after: float, router) -> None:
    outcomes = [o for load in loads for o in load.outcomes]
    log = router.log()
    print(
        f"{len(outcomes)} requests, slowest {max(o.seconds for o in outcomes):.2f}s; router: "
        f"{log.count('mid-stream')} streams cut, {log.count('resumed a stream')} resumed"
    )
    failed = [o for o in outcomes if o.kind != "ok"]
    assert not failed, "client-visible failures:\n" + "\n".join(
        f"  +{o.start - after:.1f}s {o.seconds:.1f}s {o.kind}: {o.detail}" for o in failed
    )
    assert sum(o.start > after for o in outcomes) >= CLIENTS, "too few requests after the fault"


def test_kill_9_a_host_under_streaming_clients(tmp_path):
    with two_replicas(tmp_path) as c:
        router = c["n0"]
        with clients(router) as loads:
            for load in loads:
                load.wait_success(0, 60, "a chat before the fault")
            killed_at = time.monotonic()
            c.kill9(c["n1"])
            for load in loads:
                load.wait_success(killed_at, 60, "a chat after the kill")
            time.sleep(2)
        assert_all_ok(loads, killed_at, router)


def test_sigstop_a_host_past_the_clients_patience(tmp_path):
    # Stopped for longer than a client waits (REQUEST_TIMEOUT_S): a request left waiting on
    # the frozen host would hang and count as failed.
    with two_replicas(tmp_path) as c:
        router, frozen = c["n0"], c["n1"]
        with clients(router) as loads:
            for load in loads:
                load.wait_success(0, 60, "a chat before the fault")
            stopped_at = time.monotonic()
            frozen.signal(signal.SIGSTOP)
            try:
                time.sleep(REQUEST_TIMEOUT_S + 5)
            finally:
                frozen.signal(signal.SIGCONT)
        assert_all_ok(loads, stopped_at, router)
