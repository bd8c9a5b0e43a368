"""Chaos on loopback: kill -9 the leader, kill -9 the only host of a model, SIGSTOP a node.

Three real peers with simulated GPUs serve the embedded model; a client streams short
chats to a surviving peer throughout, and a watcher records every peer's Raft view.
These run at the default gossip and Raft timings.
"""

from __future__ import annotations

import contextlib
import signal
import time

import pytest

from tests.chaos.harness import (
    MODEL,
    ClientLoad,
    Cluster,
    StatusWatcher,
    alive,
    plan_of,
    print_log_tails,
    ready_hosts,
    wait_gone,
    wait_one_plan,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

GPU = ["--gpu", "fake:GTX 1080:8GiB"]
ROUTER = ["--cpu", "no"]  # no device at all: this peer only routes (and may lead)


@contextlib.contextmanager
def running(tmp_path, nodes: list[list[str]], **kw):
    cluster = Cluster(tmp_path, nodes, **kw)
    try:
        yield cluster.start()
    except BaseException:
        print_log_tails(cluster.peers)
        raise
    finally:
        cluster.close()


def test_kill_9_the_leader(tmp_path):
    with running(tmp_path, [GPU, GPU, GPU]) as c:
        before = c.peers[0].status()
        old_leader, old_term = before["leader"], before["term"]
        victim = c[old_leader]
        survivors = [p for p in c.peers if p is not victim]
        with StatusWatcher(c.peers) as watch, ClientLoad(survivors[0]) as load:
            load.wait_success(0, 30, "a chat before the fault")
            killed_at = time.monotonic()
            workers = c.kill9(victim)
            assert workers or old_leader not in ready_hosts(before)

            def new_leader() -> bool:
                s = survivors[0].status()
                return s["leader"] not in (None, old_leader) and s["term"] > old_term

            survivors[0].wait_until(new_leader, 30, "a new leader")
            host = c.wait_ready(survivors[0], avoid=(old_leader,), timeout=90)
            load.wait_success(killed_at, 60, "a chat after the kill")
            time.sleep(2)  # a few more requests through the recovered cluster
        plan = wait_one_plan(survivors)
        assert plan_of(before).keys() == plan.keys(), "a deployed model was lost"
        assert all(node != old_leader for node, _ in plan[MODEL]), plan
        assert host in {node for node, _ in plan[MODEL]}
        for p in survivors:
            assert old_leader not in alive(p.status())
        assert not wait_gone(workers, 15), "the killed peer's model worker outlived it"
        watch.assert_one_leader_per_term()
        print(f"terms: {watch.leaders_by_term()}\n{load.report()}")
        load.assert_clean(min_ok=2)


def test_kill_9_the_only_host_of_the_model(tmp_path):
    # n0 founds the cluster and leads but has no device, so the model lands on n1 or n2.
    with running(tmp_path, [ROUTER, GPU, GPU]) as c:
        before = c.peers[0].status()
        (host,) = ready_hosts(before)
        assert host != before["leader"]
        victim = c[host]
        survivors = [p for p in c.peers if p is not victim]
        spare = next(p.name for p in survivors if p.name != "n0")
        with StatusWatcher(c.peers) as watch, ClientLoad(c["n0"]) as load:
            load.wait_success(0, 30, "a chat before the fault")
            killed_at = time.monotonic()
            workers = c.kill9(victim)
            assert workers, f"{host} hosts the model yet ran no worker process"
            assert c.wait_ready(c["n0"], avoid=(host,), timeout=90) == spare
            load.wait_success(killed_at, 60, "a chat after the kill")
            time.sleep(2)
        plan = wait_one_plan(survivors)
        assert plan_of(before).keys() == plan.keys(), "a deployed model was lost"
        assert [node for node, _ in plan[MODEL]] == [spare]
        assert not wait_gone(workers, 15), "the killed peer's model worker outlived it"
        watch.assert_one_leader_per_term()
        print(f"terms: {watch.leaders_by_term()}\n{load.report()}")
        load.assert_clean(min_ok=2)
        assert any(o.kind == "ok" and o.replica == spare for o in load.outcomes)


def test_sigstop_the_leader_for_10s_then_sigcont(tmp_path):
    with running(tmp_path, [GPU, GPU, GPU]) as c:
        before = c.peers[0].status()
        victim = c[before["leader"]]
        others = [p for p in c.peers if p is not victim]
        with StatusWatcher(c.peers) as watch, ClientLoad(others[0]) as load:
            load.wait_success(0, 30, "a chat before the fault")
            stopped_at = time.monotonic()
            victim.signal(signal.SIGSTOP)
            try:
                others[0].wait_until(
                    lambda: others[0].status()["leader"] not in (None, victim.name),
                    30,
                    "a leader among the running peers",
                )
                time.sleep(max(0.0, stopped_at + 10 - time.monotonic()))
            finally:
                victim.signal(signal.SIGCONT)
            resumed_at = time.monotonic()
            for p in c.peers:  # the stopped node comes back as a member
                p.wait_until(lambda p=p: len(alive(p.status())) == 3, 60, "3 alive members")
            c.wait_ready(others[0], timeout=90)
            load.wait_success(resumed_at, 60, "a chat after SIGCONT")
            time.sleep(2)
        plan = wait_one_plan(c.peers)
        assert plan_of(before).keys() == plan.keys(), "a deployed model was lost"
        assert len(plan[MODEL]) == 1, plan
        watch.assert_one_leader_per_term()
        print(f"terms: {watch.leaders_by_term()}\n{load.report()}")
        load.assert_clean(min_ok=2)
