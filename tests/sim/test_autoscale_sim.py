"""Demand scaling in the whole-cluster simulation (tests/sim/cluster_sim.py): demand traces
(step, ramp, burst, diurnal) drive the instances' measured windows, gossip carries them to
the leader, the controller's pure step commits a count and a plan, the reconciler loads.

What must hold: a steady load changes replicas at most once; a step up gets its replica
within the window plus the load time; a model that goes idle is unloaded after its idle
time and comes back on the next request; no GPU over capacity (checked on every beat by the
simulation); a higher-priority model never yields VRAM to a lower one; a seed replays
exactly.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aivailable.backends.demand import WINDOW_S
from tests.sim.cluster_sim import ClusterSim

GPUS = {"n1": [8], "n2": [8], "n3": [8]}
VOTERS = ("n1", "n2", "n3")
LOAD_S = 2.0
# Virtual seconds a decision may take beyond its window: a gossip round or two, the
# commit of the count and then of the plan, the payload's 5 s steps for idle times.
SLACK_S = 6.0
EXAMPLES = int(os.environ.get("SIM_EXAMPLES", "1000"))


def new_sim(seed: int = 1) -> ClusterSim:
    sim = ClusterSim(seed, GPUS, VOTERS, load_s=LOAD_S)
    assert sim.run_until_true(lambda: sim.leader() is not None, 10.0) is not None
    return sim


def step(t0: float, before: int, after: int):
    return lambda t: before if t < t0 else after


def ramp(t0: float, t1: float, top: int):
    return lambda t: 0 if t < t0 else top if t >= t1 else int(top * (t - t0) / (t1 - t0))


def burst(t0: float, length: float, height: int, base: int = 1):
    return lambda t: height if t0 <= t < t0 + length else base


def diurnal(period: float, top: int, phase: float = 0.0):
    return lambda t: int(top * (1 - math.cos(2 * math.pi * (t + phase) / period)) / 2)


def served(sim: ClusterSim, model: str, n: int):
    return lambda: sim.ready_count(model) >= n


def changes(sim: ClusterSim, model: str) -> list[tuple]:
    return [e for e in sim.scale_log if e[1] == model]


def test_a_step_up_gets_its_replicas_within_the_window_plus_the_load_time():
    sim = new_sim(3)
    sim.deploy("m", 2, 1, min_replicas=1, max_replicas=3)
    assert sim.run_until_true(served(sim, "m", 1), 20.0) is not None
    sim.load["m"] = step(sim.now + 5.0, 1, 16)
    sim.run_until(sim.now + 5.0)
    t0 = sim.now
    waited = sim.run_until_true(served(sim, "m", 2), WINDOW_S + LOAD_S + SLACK_S, step=0.1)
    assert waited is not None, sim.scale_log
    assert sim.now - t0 <= WINDOW_S + LOAD_S + SLACK_S
    # The third after the cooldown and another window of full replicas.
    assert sim.run_until_true(served(sim, "m", 3), 2 * (WINDOW_S + LOAD_S + SLACK_S)) is not None
    assert [e[2:4] for e in changes(sim, "m")] == [(1, 2), (2, 3)]
    assert "occupancy" in changes(sim, "m")[0][4]


def test_a_steady_load_changes_replicas_at_most_once_and_a_short_burst_not_at_all():
    sim = new_sim(5)
    sim.deploy("m", 2, 1, min_replicas=1, max_replicas=3)
    sim.deploy("b", 2, 1, min_replicas=1, max_replicas=3)
    sim.load["m"] = lambda t: 6  # 1.5 replicas' worth: 1 -> 2, then it holds
    sim.load["b"] = burst(sim.now + 100, 5.0, 16)
    sim.run_until(sim.now + 900)
    assert len(changes(sim, "m")) <= 1, changes(sim, "m")
    assert sim.wanted("m") == 2
    assert changes(sim, "b") == []


def test_low_load_brings_it_back_to_min_after_the_long_window():
    sim = new_sim(7)
    sim.deploy("m", 2, 1, min_replicas=1, max_replicas=3)
    t0 = sim.now
    sim.load["m"] = step(t0 + 120, 16, 1)
    assert sim.run_until_true(served(sim, "m", 3), 120) is not None
    assert sim.run_until_true(lambda: sim.wanted("m") == 1, 900) is not None
    downs = [e for e in changes(sim, "m") if e[3] < e[2]]
    assert downs and all(e[0] - t0 - 120 >= 170 for e in downs)  # never within the window
    assert sim.run_until_true(lambda: sim.ready_count("m") == 1, 20) is not None


def test_an_idle_model_is_unloaded_after_its_idle_time_and_comes_back_on_demand():
    sim = new_sim(11)
    sim.deploy("z", 2, 1, min_replicas=0, max_replicas=2, idle_unload_s=60)
    assert sim.run_until_true(served(sim, "z", 1), 20.0) is not None
    stop = sim.now + 20
    sim.load["z"] = step(stop, 2, 0)
    sim.run_until(stop + 55)
    assert sim.ready_count("z") == 1  # not before its idle time
    assert sim.run_until_true(lambda: sim.ready_count("z") == 0, 5 + 2 * SLACK_S) is not None
    assert sim.wanted("z") == 0 and "no request for" in changes(sim, "z")[-1][4]
    back = sim.now
    sim.load["z"] = lambda t: 1  # a request arrives: a peer holds it and says so in gossip
    assert sim.run_until_true(served(sim, "z", 1), LOAD_S + SLACK_S) is not None
    assert sim.now - back <= LOAD_S + SLACK_S
    assert "waiting" in changes(sim, "z")[-1][4]


def test_keep_alive_zero_unloads_at_once():
    sim = new_sim(13)
    sim.deploy("z", 2, 1, min_replicas=0, max_replicas=2, idle_unload_s=600)
    sim.keep_alive["z"] = 0.0
    sim.load["z"] = step(sim.now + 10, 1, 0)
    sim.run_until(sim.now + 10)
    assert sim.run_until_true(lambda: sim.ready_count("z") == 0, 2 * SLACK_S) is not None


def test_a_busy_high_priority_model_takes_vram_from_a_low_priority_one():
    sim = new_sim(17)
    sim.deploy("lo", 5, 2, priority=0, min_replicas=0, max_replicas=3)
    assert sim.run_until_true(served(sim, "lo", 2), 20.0) is not None
    sim.deploy("hi", 5, 1, priority=5, min_replicas=1, max_replicas=3)
    assert sim.run_until_true(served(sim, "hi", 1), 20.0) is not None
    sim.load["hi"] = lambda t: 16
    sim.load["lo"] = lambda t: 4  # busy too, but lower priority: it yields above min (0)
    assert sim.run_until_true(served(sim, "hi", 3), 200.0) is not None, sim.scale_log
    assert sim.ready_count("lo") == 0
    assert any("yielded VRAM to hi" in e[4] for e in changes(sim, "lo"))


def test_an_idle_equal_yields_and_a_busy_equal_does_not():
    sim = new_sim(19)
    sim.deploy("idle", 5, 1, min_replicas=0, max_replicas=2, idle_unload_s=3600)
    sim.deploy("busy", 5, 1, min_replicas=1, max_replicas=2)
    sim.deploy("other", 5, 1, min_replicas=1, max_replicas=2)
    assert sim.run_until_true(lambda: all(sim.ready_count(m) for m in sim.deployed), 30) is not None
    sim.load["busy"] = lambda t: 16
    sim.load["other"] = lambda t: 2  # served, at its min: never a donor
    assert sim.run_until_true(served(sim, "busy", 2), 200.0) is not None, sim.scale_log
    assert sim.ready_count("other") == 1 and sim.ready_count("idle") == 0
    assert changes(sim, "idle")[-1][4].startswith("idle, yielded VRAM to busy")


TRACES = st.one_of(
    st.builds(step, st.floats(0, 300), st.integers(0, 4), st.integers(0, 20)),
    st.builds(ramp, st.floats(0, 200), st.floats(201, 500), st.integers(0, 20)),
    st.builds(burst, st.floats(0, 400), st.floats(1, 60), st.integers(0, 20)),
    st.builds(diurnal, st.floats(120, 600), st.integers(0, 20), st.floats(0, 600)),
)


def check_yields(sim: ClusterSim, priority: dict[str, int]) -> None:
    for _, donor, _, _, why in sim.scale_log:
        if "yielded VRAM to " in why:
            taker = why.split("yielded VRAM to ")[1].split()[0]
            assert priority[donor] <= priority[taker], why


def run_traces(seed: int, traces: list, priorities: list[int], tens: int = 60) -> ClusterSim:
    sim = new_sim(seed)
    names = ["a", "b", "c"][: len(traces)]
    for name, trace, prio in zip(names, traces, priorities, strict=False):
        sim.deploy(name, 3, 1, priority=prio, min_replicas=0, max_replicas=3, idle_unload_s=120)
        sim.load[name] = lambda t, f=trace, t0=sim.now: f(t - t0)
    bounds_ok = True
    for _ in range(tens):
        sim.run_until(sim.now + 10)
        bounds_ok &= all(0 <= sim.wanted(n) <= 3 for n in names)
    assert bounds_ok
    check_yields(sim, {n: p for n, p in zip(names, priorities, strict=False)})
    return sim


@pytest.mark.slow  # ten virtual minutes per example, about 10 s each
@settings(
    max_examples=max(5, EXAMPLES // 100),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.integers(0, 1 << 32),
    st.lists(TRACES, min_size=1, max_size=3),
    st.lists(st.integers(0, 2), min_size=3, max_size=3),
)
def test_traces_keep_bounds_capacity_and_priority(seed, traces, priorities):
    run_traces(seed, traces, priorities)  # capacity: cluster_sim.Violation on every beat


def test_the_same_seed_replays_exactly():
    def run() -> tuple:
        sim = run_traces(23, [diurnal(200, 16), burst(40, 40, 20)], [1, 0, 0], tens=20)
        return sim.now, sim.scale_log, sim.leader().state.snapshot(), len(sim.log)

    first = run()
    assert first[1], "the traces should have scaled something"
    assert first == run()
