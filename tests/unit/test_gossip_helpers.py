"""Suspicion timer, local health awareness and the transmit-limited broadcast queue."""

import pytest

from peer.awareness import Awareness
from peer.broadcast import BroadcastQueue
from peer.config import GossipConfig
from peer.suspicion import Suspicion, suspicion_timeout


def test_suspicion_timeout_shrinks_from_max_to_min_with_confirmations():
    timeouts = [suspicion_timeout(c, 3, 2.0, 12.0) for c in range(4)]
    assert timeouts[0] == 12.0 and timeouts[-1] == 2.0
    assert timeouts == sorted(timeouts, reverse=True)
    assert suspicion_timeout(0, 0, 2.0, 12.0) == 2.0


def test_suspicion_counts_each_independent_confirmation_once():
    s = Suspicion("a", needed=2, low=2.0, high=12.0, now=10.0)
    assert s.deadline == 22.0
    assert not s.confirm("a")  # the original suspector
    assert s.confirm("b") and not s.confirm("b")
    middle = s.deadline
    assert 12.0 < middle < 22.0
    assert s.confirm("c")
    assert s.deadline == 12.0
    assert not s.confirm("d")  # enough already


def test_awareness_scales_timeouts_and_stays_within_bounds():
    a = Awareness(max_multiplier=4)
    a.apply_delta(-5)
    assert a.scale(0.5) == 0.5
    a.apply_delta(10)
    assert a.score == 3 and a.scale(0.5) == 2.0


def test_broadcast_queue_replaces_older_news_about_the_same_member():
    q = BroadcastQueue()
    q.enqueue("b", "old", 10)
    q.enqueue("b", "new", 10)
    assert len(q) == 1 and q.take(100, limit=5) == ["new"]


def test_broadcast_queue_prefers_least_sent_and_drops_at_the_limit():
    q = BroadcastQueue()
    q.enqueue("x", "x", 10)
    assert q.take(100, limit=2) == ["x"]
    q.enqueue("y", "y", 10)
    assert q.take(15, limit=2) == ["y"]  # y was sent fewer times; only one fits
    assert q.take(100, limit=2) == ["y", "x"]
    assert len(q) == 0


def test_broadcast_queue_skips_what_does_not_fit():
    q = BroadcastQueue()
    q.enqueue("big", "big", 900)
    q.enqueue("small", "small", 50)
    assert q.take(100, limit=3) == ["small"]


@pytest.mark.parametrize("n", [1, 5, 10, 50, 200])
def test_config_scales_with_cluster_size(n):
    cfg = GossipConfig()
    low, high = cfg.suspicion_bounds(n)
    assert low >= cfg.suspicion_mult * cfg.probe_interval and high == low * 6
    assert cfg.retransmit_limit(n) >= cfg.retransmit_mult
    assert cfg.push_pull_scaled(n) >= cfg.push_pull_interval
