"""Demand scaling's pure parts: an instance's sliding windows (backends/demand.py), the
scaling step and VRAM contention (cluster/scaling.py), the deploy fields and SET_SCALE in
the replicated state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aivailable.backends.demand import LONG_S, WINDOW_S, DemandWindow, Signals
from aivailable.cluster import state as cs
from aivailable.cluster.scaling import Bounds, Demand, aggregate, contend, scale, yield_order

B13 = Bounds(1, 3, 300.0, 0)


# ---- the instance's windows ------------------------------------------------------------


def test_occupancy_is_the_mean_of_busy_slots_over_the_window():
    w = DemandWindow(4, now=0.0)
    w.set_depth(0.0, 4)  # all four slots busy from the start
    assert w.signals(30.0).occupancy == pytest.approx(1.0)
    w.set_depth(30.0, 2)
    assert w.signals(45.0).occupancy == pytest.approx((15 * 4 + 15 * 2) / (30 * 4))
    w.set_depth(45.0, 6)  # two waiting beyond the slots
    s = w.signals(75.0)
    assert s.occupancy == pytest.approx(1.0) and s.queue_depth == pytest.approx(2.0)
    assert s.active == 6 and s.idle_s == 0.0


def test_a_young_instance_averages_over_the_time_it_lived():
    w = DemandWindow(2, now=100.0)
    w.set_depth(100.0, 2)
    assert w.signals(105.0).occupancy == pytest.approx(1.0)
    assert w.signals(105.0).age_s == pytest.approx(5.0)


def test_the_long_window_remembers_what_the_short_one_forgot():
    w = DemandWindow(1, now=0.0)
    w.set_depth(0.0, 1)
    w.set_depth(60.0, 0)
    s = w.signals(180.0)
    assert s.occupancy == 0.0
    assert s.occupancy_long == pytest.approx(1.0)  # its busiest 10 s
    assert s.idle_s == pytest.approx(120.0)
    assert w.signals(245.0).occupancy_long == 0.0  # 180 s below the mark
    w.set_depth(245.0, 1)
    w.set_depth(250.0, 0)  # 5 s of one slot in a 10 s step
    assert w.signals(255.0).occupancy_long == pytest.approx(0.5)


def test_refusals_rate_and_ttft_p90_count_only_inside_the_short_window():
    w = DemandWindow(4, now=0.0)
    for t in range(10):
        w.admitted(float(t))
        w.first_token(float(t), 0.1 * (t + 1))
    w.refused(5.0)
    w.refused(5.5)
    w.refused(7.0)
    s = w.signals(10.0)
    assert s.refused == 3 and s.refusing_s == 2 and s.rpm == pytest.approx(60.0)
    assert s.ttft_p90 == pytest.approx(0.9)
    later = w.signals(10.0 + WINDOW_S)
    assert (
        later.refused == 0 and later.refusing_s == 0 and later.ttft_p90 is None and later.rpm == 0
    )


def test_keep_alive_of_the_last_request_is_reported():
    w = DemandWindow(4, now=0.0)
    w.admitted(1.0, keep_alive_s=0.0)
    assert w.signals(2.0).keep_alive_s == 0.0
    w.admitted(3.0)
    assert w.signals(4.0).keep_alive_s is None


@given(
    st.lists(st.tuples(st.floats(0, 1000), st.integers(0, 20)), max_size=40),
    st.integers(1, 8),
)
def test_signals_stay_in_range_and_round_trip_the_wire(changes, slots):
    w = DemandWindow(slots, now=0.0)
    t = 0.0
    for dt, depth in changes:
        t += dt
        w.set_depth(t, depth)
    s = w.signals(t + 1)
    assert 0.0 <= s.occupancy <= 1.0 + 1e-9 and 0.0 <= s.occupancy_long <= 1.0 + 1e-9
    back = Signals.from_wire(s.wire())
    assert back is not None and back.active == s.active
    assert Signals.from_wire("junk") is None


# ---- the scaling step ------------------------------------------------------------------


def busy(occ: float, n: int = 1, **kw) -> Demand:
    base = dict(instances=n, occupancy=occ, occupancy_long=occ, age_s=1000.0, active=n)
    return Demand(**{**base, **kw})


def test_high_occupancy_adds_one_replica_with_its_reason():
    d = scale(1, 1, B13, busy(0.93), None, 100.0)
    assert d.wanted == 2 and "occupancy 0.93" in d.reason


def test_no_second_add_before_the_new_replica_serves_or_within_the_cooldown():
    assert scale(2, 1, B13, busy(1.0), 0.0, 100.0).wanted == 2  # still loading
    assert scale(2, 2, B13, busy(1.0, 2), 90.0, 100.0).wanted == 2  # cooldown
    assert scale(2, 2, B13, busy(1.0, 2), 0.0, 100.0).wanted == 3
    assert scale(3, 3, B13, busy(1.0, 3), 0.0, 100.0).wanted == 3  # max


def test_refusals_add_a_replica_only_when_they_last_most_of_the_window():
    assert scale(1, 1, B13, busy(0.6, refused=90, refusing_s=25), None, 100.0).wanted == 2
    assert scale(1, 1, B13, busy(0.6, refused=90, refusing_s=5), None, 100.0).wanted == 1


def test_low_occupancy_for_the_long_window_removes_one_and_hysteresis_holds():
    assert scale(2, 2, B13, busy(0.1, 2), 0.0, 1000.0).wanted == 1
    assert scale(2, 2, B13, busy(0.1, 2), 900.0, 1000.0).wanted == 2  # changed recently
    assert scale(2, 2, B13, busy(0.5, 2), 0.0, 1000.0).wanted == 2  # between the marks
    # 3 -> 2 at 0.29 would put the others at 0.435: allowed; never below min.
    assert scale(3, 3, B13, busy(0.29, 3), 0.0, 1000.0).wanted == 2
    assert scale(1, 1, B13, busy(0.0), 0.0, 1000.0).wanted == 1


def test_idle_goes_to_min_after_idle_unload_s_and_a_waiting_request_brings_it_back():
    b = Bounds(0, 2, 300.0, 0)
    idle = Demand(instances=1, idle_s=299.0, age_s=1000.0)
    assert scale(1, 1, b, idle, None, 1000.0).wanted == 1
    d = scale(1, 1, b, Demand(instances=1, idle_s=300.0, age_s=1000.0), None, 1000.0)
    assert d.wanted == 0 and "no request for 300 s" in d.reason
    assert scale(0, 0, b, Demand(), None, 1000.0).wanted == 0
    back = scale(0, 0, b, Demand(waiting=3), 999.0, 1000.0)
    assert back.wanted == 1 and "waiting" in back.reason


def test_keep_alive_overrides_the_idle_time():
    b = Bounds(0, 2, 300.0, 0)
    now = Demand(instances=1, idle_s=0.0, age_s=100.0, keep_alive_s=0.0)
    assert scale(1, 1, b, now, None, 100.0).wanted == 0  # keep_alive 0: unload now
    never = Demand(instances=1, idle_s=10_000.0, age_s=10_000.0, keep_alive_s=-1.0)
    assert scale(1, 1, b, never, None, 10_000.0).wanted == 1
    running = Demand(instances=1, active=1, keep_alive_s=0.0, age_s=100.0)
    assert scale(1, 1, b, running, None, 100.0).wanted == 1  # never mid-request


def test_bounds_clamp_a_committed_count():
    assert scale(5, 5, B13, busy(0.5), None, 0.0).wanted == 3


@given(
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(0, 3),
    st.integers(1, 5),
    st.floats(0, 1),
    st.floats(0, 1),
    st.integers(0, 10),
    st.floats(0, 1000),
    st.integers(0, 3),
)
def test_a_step_changes_by_at_most_one_within_bounds(
    w, ready, lo, span, occ, occ_l, ref, idle, wait
):
    b = Bounds(lo, lo + span, 300.0, 0)
    w = b.clamp(w)
    d = Demand(
        instances=min(ready, w),
        occupancy=occ,
        occupancy_long=occ_l,
        refused=ref,
        idle_s=idle,
        age_s=idle,
        waiting=wait,
    )
    out = scale(w, ready, b, d, None, 1000.0).wanted
    assert b.min_replicas <= out <= b.max_replicas
    assert abs(out - w) <= 1 or out == b.min_replicas  # idle goes straight to min


# ---- VRAM contention -------------------------------------------------------------------


def fits(total: int, size: dict[str, int]):
    """A one-GPU 'placement' that keeps what runs: replicas in the order of `size` (the
    ones placed first hold their VRAM) until the GPU is full."""

    def missing(counts):
        free, out = total, {}
        for m in size:
            for _ in range(counts[m]):
                if free >= size[m]:
                    free -= size[m]
                else:
                    out[m] = out.get(m, 0) + 1
        return out

    return missing


def test_a_lower_priority_replica_above_min_yields_and_min_is_never_touched():
    bounds = {"hi": Bounds(1, 3, None, 5), "lo": Bounds(1, 3, None, 0)}
    demand = {"hi": busy(1.0), "lo": busy(0.9, 2)}
    counts, why = contend({"hi": 2, "lo": 2}, bounds, demand, fits(3, {"lo": 1, "hi": 1}))
    assert counts == {"hi": 2, "lo": 1} and "yielded VRAM to hi" in why["lo"]
    counts, _ = contend({"hi": 3, "lo": 1}, bounds, demand, fits(3, {"lo": 1, "hi": 1}))
    assert counts == {"hi": 3, "lo": 1}  # lo at its min: hi stays short


def test_a_busy_equal_is_not_a_donor_an_idle_one_is_and_the_least_recently_used_goes_first():
    bounds = {m: Bounds(0, 2, 300.0, 0) for m in ("a", "b", "c")}
    idle = lambda s: Demand(instances=1, idle_s=s, age_s=1000.0)  # noqa: E731
    demand = {"a": busy(1.0), "b": idle(100.0), "c": idle(500.0)}
    assert yield_order("a", {"a": 1, "b": 1, "c": 1}, bounds, demand) == ["c", "b"]
    counts, why = contend(
        {"a": 2, "b": 1, "c": 1}, bounds, demand, fits(3, dict.fromkeys("bca", 1))
    )
    assert counts == {"a": 2, "b": 1, "c": 0} and why["c"].startswith("idle")
    demand["c"] = busy(0.5)
    assert yield_order("a", {"a": 1, "b": 1, "c": 1}, bounds, demand) == ["b"]


def test_a_higher_priority_model_never_yields_to_a_lower_one_even_when_idle():
    bounds = {"hi": Bounds(0, 2, 300.0, 5), "lo": Bounds(0, 2, 300.0, 0)}
    demand = {"hi": Demand(instances=1, idle_s=1000.0, age_s=1000.0), "lo": busy(1.0)}
    assert yield_order("lo", {"hi": 1, "lo": 1}, bounds, demand) == []


def test_a_yield_that_does_not_help_is_not_made():
    bounds = {"a": Bounds(1, 2, None, 5), "b": Bounds(0, 1, None, 0)}
    counts, why = contend(
        {"a": 2, "b": 1},
        bounds,
        {"a": busy(1.0)},
        lambda c: {"a": 1},  # never fits
    )
    assert counts == {"a": 2, "b": 1} and why == {}


def test_aggregate_sums_the_instances():
    sig = [
        Signals(occupancy=1.0, active=4, idle_s=0.0, rpm=30, ttft_p90=0.5, age_s=50),
        Signals(occupancy=0.5, active=2, idle_s=0.0, rpm=10, ttft_p90=1.5, age_s=10),
    ]
    d = aggregate(sig, waiting=2)
    assert d.instances == 2 and d.occupancy == pytest.approx(0.75)
    assert d.rpm == 40 and d.ttft_p90 == 1.5 and d.age_s == 10 and d.waiting == 2
    assert aggregate([], 1) == Demand(waiting=1)


# ---- the replicated state ---------------------------------------------------------------


def deployed(**kw) -> cs.ClusterState:
    state = cs.ClusterState()
    assert state.apply(cs.encode_deploy("m", "builtin:smollm2-135m", **kw)).ok
    return state


def test_replicas_alone_keeps_a_fixed_count():
    state = deployed(replicas=2)
    record = state.models["m"]
    assert not record.scaled and state.wanted_replicas("m") == 2
    assert not state.apply(cs.encode_scale("m", 1, 0.0, "x", 2)).ok


def test_min_max_bounds_defaults_and_set_scale():
    state = deployed(min_replicas=0, max_replicas=3)
    record = state.models["m"]
    assert (record.min_replicas, record.max_replicas, record.idle_unload_s) == (0, 3, 300.0)
    assert state.wanted_replicas("m") == 1  # starts at one, may go to zero when idle
    assert state.apply(cs.encode_scale("m", 0, 12.5, "idle", 1)).ok
    assert state.wanted_replicas("m") == 0 and state.scale["m"].reason == "idle"
    assert not state.apply(cs.encode_scale("m", 4, 13.0, "too many", 0)).ok
    copy = cs.ClusterState()
    copy.restore(state.snapshot())
    assert copy.snapshot() == state.snapshot() and copy.scale["m"].at == 12.5
    assert state.apply(cs.encode_undeploy("m")).ok and "m" not in state.scale


@pytest.mark.parametrize(
    "kw",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": -1},
        {"max_replicas": 0},
        {"min_replicas": 0, "idle_unload_s": "soon"},
        {"replicas": 0},
    ],
)
def test_bad_bounds_are_refused(kw):
    state = cs.ClusterState()
    assert not state.apply(cs.encode_deploy("m", "builtin:x", **kw)).ok


def test_one_bound_implies_the_other_and_a_negative_idle_time_means_never():
    assert deployed(min_replicas=2).models["m"].max_replicas == 2
    only_max = deployed(max_replicas=3).models["m"]
    assert (only_max.min_replicas, only_max.max_replicas) == (1, 3)
    assert deployed(min_replicas=0, idle_unload_s=-5).models["m"].idle_unload_s == -1.0
    assert deployed(min_replicas=0, max_replicas=2, replicas=0).wanted_replicas("m") == 0


def test_new_bounds_start_again_from_replicas():
    state = deployed(min_replicas=1, max_replicas=3)
    assert state.apply(cs.encode_scale("m", 3, 1.0, "busy", 1)).ok
    assert state.apply(
        cs.encode_deploy("m", "builtin:smollm2-135m", min_replicas=1, max_replicas=2)
    )
    assert "m" not in state.scale and state.wanted_replicas("m") == 1
    assert LONG_S > WINDOW_S
