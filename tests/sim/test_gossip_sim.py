"""Seeded whole-cluster simulations of the SWIM + Lifeguard core (tests/sim/gossip_sim.py).

Every run is deterministic in its seed: hypothesis prints the failing example and the same
arguments replay it exactly.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sim.gossip_sim import GossipSim

SIM_SETTINGS = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def node(i: int) -> str:
    return f"n{i:03d}"


@SIM_SETTINGS
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(5, 30),
    loss=st.sampled_from([0.0, 0.1, 0.2]),
    who=st.integers(0, 29),
)
def test_a_payload_change_reaches_every_live_node(seed, n, loss, who):
    sim = GossipSim(n, seed=seed, loss=loss)
    sim.run_until(2.0)
    subject = node(who % n)
    sim.set_payload(subject, {"gpus": [{"name": "GTX 1080", "vram_free": seed % 1000}]})
    expected = sim.nodes[subject].core.member(subject).payload
    took = sim.run_until_true(lambda: sim.all_have_payload(subject, expected), timeout=5.0)
    assert took is not None, f"payload not everywhere after 5 s (seed={seed})"
    assert sim.false_positives == []


@SIM_SETTINGS
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(5, 20),
    loss=st.sampled_from([0.0, 0.1, 0.2]),
    who=st.integers(0, 19),
)
def test_a_crashed_node_is_marked_dead_everywhere(seed, n, loss, who):
    sim = GossipSim(n, seed=seed, loss=loss)
    sim.run_until(2.0 + (seed % 100) / 100)
    victim = node(who % n)
    sim.crash(victim)
    _, high = sim.config.suspicion_bounds(n)
    took = sim.run_until_true(lambda: sim.all_dead(victim), timeout=high + 10)
    assert took is not None, f"{victim} not dead everywhere (seed={seed})"
    assert sim.false_positives == []
    sim.loss = 0.0  # let transient suspicions settle, then all must agree
    sim.run_until(sim.now + 5)
    assert sim.agreement() == []


@pytest.mark.parametrize(
    "n,seed,seconds",
    [(5, 1, 120), (10, 2, 120), (20, 3, 60), pytest.param(50, 4, 120, marks=pytest.mark.slow)],
)
def test_no_live_node_is_declared_dead_behind_30_percent_loss(n, seed, seconds):
    sim = GossipSim(n, seed=seed, loss=0.3)
    sim.run_until(seconds)
    suspicions = sum(x.core.counters.suspicions for x in sim.nodes.values())
    assert suspicions > 0, "30% loss should cause (refuted) suspicions; the test must bite"
    assert sim.false_positives == []


@SIM_SETTINGS
@given(seed=st.integers(0, 2**32), n=st.integers(5, 20), fraction=st.floats(0.1, 0.95))
def test_a_node_paused_shorter_than_the_suspicion_minimum_is_never_declared_dead(seed, n, fraction):
    sim = GossipSim(n, seed=seed, loss=0.0)
    sim.run_until(2.0)
    low, _ = sim.config.suspicion_bounds(n)
    sim.pause(node(1), low * fraction)
    sim.run_until(sim.now + low + 10)
    assert sim.false_positives == []
    assert sim.agreement() == []


def test_a_restarted_node_rejoins_with_a_higher_incarnation():
    sim = GossipSim(8, seed=7)
    sim.run_until(2.0)
    before = sim.nodes[node(3)].core.incarnation
    sim.crash(node(3))
    assert sim.run_until_true(lambda: sim.all_dead(node(3)), timeout=30) is not None
    sim.restart(node(3), join=node(0))
    assert sim.run_until_true(lambda: sim.agreement() == [], timeout=10) is not None
    after = sim.nodes[node(3)].core.incarnation
    assert after > before
    assert all(n.core.member(node(3)).incarnation == after for n in sim.live())
    kinds = [kind for _, _, kind, subject, _ in sim.log if subject == node(3)]
    assert "alive" in kinds  # others saw it come back, not a stranger join


def test_a_leaving_node_is_seen_as_left_at_once_never_dead():
    sim = GossipSim(10, seed=11, loss=0.1)
    sim.run_until(2.0)
    sim.leave(node(4))
    took = sim.run_until_true(lambda: sim.all_see(node(4), ("left",)), timeout=1.0)
    assert took is not None and took < 1.0
    sim.crash(node(4))  # the process exits after leaving
    sim.run_until(sim.now + 20)
    assert sim.all_see(node(4), ("left",))
    assert not [e for e in sim.log if e[3] == node(4) and e[2] in ("suspect", "dead")]


def test_a_healed_partition_converges_back():
    sim = GossipSim(10, seed=5)
    sim.run_until(2.0)
    left, right = [node(i) for i in range(5)], [node(i) for i in range(5, 10)]
    sim.partition(left, right)
    sim.run_until(sim.now + 25)
    assert sim.state_of(node(0), node(9)) == "dead"
    sim.heal()
    took = sim.run_until_true(lambda: sim.agreement() == [], timeout=60, step=0.1)
    assert took is not None, sim.agreement()[:5]


def test_new_node_joining_through_one_seed_is_learned_by_all():
    sim = GossipSim(12, seed=9)
    sim.run_until(2.0)
    sim.add_node("newcomer", join=node(5))
    took = sim.run_until_true(lambda: sim.agreement() == [], timeout=5)
    assert took is not None and took < 2.0


def test_a_run_replays_exactly_from_its_seed():
    def run():
        sim = GossipSim(10, seed=1234, loss=0.2)
        sim.run_until(3.0)
        sim.crash(node(2))
        sim.set_payload(node(6), {"load": 3})
        sim.run_until(20.0)
        return sim.log, sim.packets

    assert run() == run()


@pytest.mark.slow
@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_two_hundred_nodes_converge_and_detect_a_crash(loss):
    sim = GossipSim(200, seed=200, loss=loss)
    sim.run_until(2.0)
    sim.set_payload(node(17), {"v": 2})
    sim.crash(node(123))
    expected = sim.nodes[node(17)].core.member(node(17)).payload
    assert sim.run_until_true(lambda: sim.all_have_payload(node(17), expected), 5, 0.05)
    _, high = sim.config.suspicion_bounds(200)
    assert sim.run_until_true(lambda: sim.all_dead(node(123)), high + 10, 0.1) is not None
    assert sim.false_positives == []
