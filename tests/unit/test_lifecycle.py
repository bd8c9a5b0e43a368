"""The instance lifecycle: one table of allowed moves, and engines that keep to it."""

import pytest

from aivailable.backends.base import InstanceState
from aivailable.backends.fake_engine import FakeEngine
from aivailable.backends.lifecycle import TRANSITIONS, IllegalTransition, advance


def test_every_state_can_be_stopped_and_only_ready_was_loaded_first():
    for state in InstanceState:
        if state != InstanceState.STOPPING:
            assert InstanceState.STOPPING in TRANSITIONS[state]
    assert [s for s in InstanceState if InstanceState.READY in TRANSITIONS[s]] == [
        InstanceState.LOADING
    ]


@pytest.mark.parametrize(
    "old, new",
    [("pending", "ready"), ("stopping", "ready"), ("failed", "ready"), ("ready", "sleeping")],
)
def test_a_skipped_or_unknown_state_is_refused(old, new):
    with pytest.raises(IllegalTransition):
        advance(old, new)


async def test_the_fake_engine_keeps_to_the_table():
    seen = ["pending"]

    def note(state):
        advance(seen[-1], state)  # raises on a move the table does not allow
        seen.append(state)

    engine = FakeEngine(on_state_change=note)
    await engine.start()
    engine.crash()
    await engine.start()
    await engine.stop()
    assert seen == [
        "pending",
        "loading",
        "ready",
        "failed",
        "loading",
        "ready",
        "stopping",
        "pending",
    ]
