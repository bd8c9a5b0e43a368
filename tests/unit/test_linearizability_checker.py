"""The Wing-Gong checker on hand-made histories whose verdict is known."""

from __future__ import annotations

from random import Random

from tests.linearizability import (
    Operation,
    deployment_map_model,
    deployment_model,
    drop_unobserved,
    first_violation,
    is_linearizable,
    register_model,
)


def op(call, ret, kind, arg=None, result=None) -> Operation:
    return Operation(call, ret, kind, arg, result)


REG = register_model(0)


def test_a_sequential_history_is_linearizable_and_a_wrong_read_is_not():
    good = [op(0, 1, "write", 1), op(2, 3, "read", result=1), op(4, 5, "write", 2)]
    assert is_linearizable(good, REG)
    assert not is_linearizable([op(0, 1, "write", 1), op(2, 3, "read", result=0)], REG)


def test_a_read_concurrent_with_a_write_may_see_either_value():
    for seen in (0, 1):
        assert is_linearizable([op(0, 10, "write", 1), op(2, 3, "read", result=seen)], REG)
    assert not is_linearizable([op(0, 10, "write", 1), op(2, 3, "read", result=7)], REG)


def test_a_stale_read_after_a_newer_read_is_not_linearizable():
    # The write overlaps both reads, but once one read saw 1 a later read cannot see 0.
    history = [
        op(0, 10, "write", 1),
        op(1, 2, "read", result=1),
        op(3, 4, "read", result=0),
    ]
    assert not is_linearizable(history, REG)


def test_an_unknown_write_may_have_happened_or_not_but_not_both():
    unknown = op(0, None, "write", 5)
    assert is_linearizable([unknown, op(1, 2, "read", result=5)], REG)
    assert is_linearizable([unknown, op(1, 2, "read", result=0)], REG)
    flicker = [unknown, op(1, 2, "read", result=5), op(3, 4, "read", result=0)]
    assert not is_linearizable(flicker, REG)
    # It cannot take effect before it was invoked.
    assert not is_linearizable([op(0, 1, "read", result=5), op(2, None, "write", 5)], REG)


def test_the_deployment_map():
    m = deployment_model()
    ok = [
        op(0, 1, "deploy", "a"),
        op(2, 5, "undeploy", "a", result=True),
        op(3, 4, "read", result=["a"]),  # concurrent with the undeploy: before it
        op(6, 7, "read", result=[]),
        op(8, 9, "undeploy", "a", result=False),  # a 404: it was gone
    ]
    assert is_linearizable(ok, m)
    lost_write = [op(0, 1, "deploy", "a"), op(2, 3, "read", result=[])]
    assert not is_linearizable(lost_write, m)
    double_delete = [
        op(0, 1, "deploy", "a"),
        op(2, 4, "undeploy", "a", result=True),
        op(3, 5, "undeploy", "a", result=True),
    ]
    assert not is_linearizable(double_delete, m)


def test_a_long_concurrent_history_is_checked_quickly_thanks_to_memoization():
    rng = Random(3)
    history, t = [], 0
    for i in range(1, 200):
        # Overlapping writes of increasing values; each read, right after its write returns,
        # sees that value (later writes, still running, are placed after it).
        history.append(op(t, t + 3, "write", i))
        history.append(op(t + 3, t + 3.5, "read", result=i))
        t += rng.choice((1, 2))  # the next write starts before this one returns
    assert is_linearizable(history, REG)
    stale = op(t + 10, t + 11, "read", result=150)  # after every write returned
    assert not is_linearizable([*history, stale], REG)


def test_dropping_unobserved_unknown_writes_keeps_the_verdict():
    lost = [op(i, None, "write", 100 + i) for i in range(40)]  # timeouts, never seen
    seen = op(50, None, "write", 7)
    good = [*lost, seen, op(60, 61, "read", result=7), op(62, 63, "read", result=7)]
    bad = [*lost, seen, op(60, 61, "read", result=7), op(62, 63, "read", result=0)]
    assert len(drop_unobserved(good)) == 3
    assert is_linearizable(drop_unobserved(good), REG)
    assert not is_linearizable(drop_unobserved(bad), REG)


def test_the_deployment_map_with_values():
    m = deployment_map_model()

    def seen(**kv):
        return frozenset(kv.items())

    ok = [
        op(0, 1, "deploy", ("a", 1)),
        op(2, 6, "deploy", ("a", 2)),  # an upsert, concurrent with the next two reads
        op(3, 4, "read", result=seen(a=1)),
        op(5, 6, "read", result=seen(a=2)),
        op(7, None, "deploy", ("b", 3)),  # unknown: it happened, as a read shows
        op(8, 9, "read", result=seen(a=2, b=3)),
        op(10, 11, "undeploy", "b", result=True),
        op(12, 13, "undeploy", "b", result=False),
        op(14, 15, "read", result=seen(a=2)),
    ]
    assert is_linearizable(ok, m)
    # An old value back after a newer one was read.
    assert not is_linearizable([*ok[:4], op(6.5, 6.8, "read", result=seen(a=1))], m)
    # A 404 for a deployed name; the same name deleted twice.
    assert not is_linearizable([ok[0], op(2, 3, "undeploy", "a", result=False)], m)
    twice = [ok[0], op(2, 4, "undeploy", "a", result=True), op(3, 5, "undeploy", "a", result=True)]
    assert not is_linearizable(twice, m)
    # An unknown deploy explains a later undeploy's 200.
    assert is_linearizable([op(0, None, "deploy", ("a", 1)), op(2, 3, "undeploy", "a", True)], m)


def test_first_violation_is_a_short_prefix_that_fails():
    m = deployment_map_model()
    good = [op(i * 2, i * 2 + 1, "deploy", ("a", i)) for i in range(50)]
    stale = op(101, 102, "read", result=frozenset({("a", 3)}))
    later = [op(103 + i, 103.5 + i, "deploy", ("b", i)) for i in range(20)]
    assert first_violation(good, m) is None
    window = first_violation([*later, stale, *good], m)
    assert window is not None and window[-1] == stale and len(window) == 51
    assert not is_linearizable(window, m)
