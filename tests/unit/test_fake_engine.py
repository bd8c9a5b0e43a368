"""FakeEngine keeps the Engine contract that the HTTP layer's tests rely on."""

from __future__ import annotations

import asyncio

import pytest

from aivailable.backends.base import (
    ChatRequest,
    CompletionRequest,
    ContextOverflow,
    EngineUnavailable,
    Finished,
    QueueFull,
    SamplingParams,
    TextDelta,
)
from aivailable.backends.fake_engine import DEFAULT_REPLY, FakeEngine

CHAT = ChatRequest(messages=({"role": "user", "content": "Say hi"},))


async def collect(engine, request):
    return [event async for event in engine.generate(request)]


async def ready_engine(**kwargs) -> FakeEngine:
    engine = FakeEngine("fake", **kwargs)
    await engine.start()
    return engine


async def test_streams_the_canned_reply_then_finished():
    engine = await ready_engine()
    events = await collect(engine, CHAT)
    *deltas, finished = events
    assert all(isinstance(e, TextDelta) for e in deltas)
    assert "".join(d.text for d in deltas) == DEFAULT_REPLY
    assert finished == Finished("stop", prompt_tokens=3, completion_tokens=len(deltas))
    assert engine.completed == 1 and engine.cancelled == 0 and engine.queue_depth == 0


async def test_reply_may_depend_on_the_request():
    engine = await ready_engine(reply=lambda r: f"echo: {r.prompt}")
    events = await collect(engine, CompletionRequest(prompt="one two"))
    assert "".join(e.text for e in events[:-1]) == "echo: one two"
    assert events[-1].prompt_tokens == 2


async def test_max_tokens_and_stop():
    engine = await ready_engine(reply="a b c d e")
    limited = await collect(engine, CompletionRequest("x", SamplingParams(max_tokens=2)))
    assert "".join(e.text for e in limited[:-1]) == "a b"
    assert limited[-1] == Finished("length", 1, 2)
    stopped = await collect(engine, CompletionRequest("x", SamplingParams(stop=(" d", "e"))))
    assert "".join(e.text for e in stopped[:-1]) == "a b c"
    assert stopped[-1].finish_reason == "stop"


async def test_not_ready_is_unavailable():
    engine = FakeEngine("fake")
    with pytest.raises(EngineUnavailable) as info:
        await collect(engine, CHAT)
    assert info.value.state == "pending"


async def test_context_overflow():
    engine = await ready_engine(n_ctx=4)
    with pytest.raises(ContextOverflow):
        await collect(engine, CompletionRequest("one two three four five"))


async def test_queue_full_when_limit_reached_and_free_again_after():
    engine = await ready_engine(token_delay=0.01, queue_limit=2)
    first, second = engine.generate(CHAT), engine.generate(CHAT)
    assert isinstance(await anext(first), TextDelta)  # running, holds the one slot
    waiting = asyncio.ensure_future(anext(second))  # queued behind it
    await asyncio.sleep(0.05)
    assert not waiting.done() and engine.queue_depth == 2
    with pytest.raises(QueueFull) as info:
        await collect(engine, CHAT)
    assert info.value.retry_after > 0
    await first.aclose()  # the client went away: its slot goes to the waiting one
    assert isinstance(await waiting, TextDelta)
    assert engine.queue_depth == 1 and engine.cancelled == 1
    rest = [event async for event in second]
    assert isinstance(rest[-1], Finished) and engine.queue_depth == 0
    await collect(engine, CHAT)


async def test_one_generation_at_a_time_by_default():
    engine = await ready_engine(token_delay=0.001, reply="a b c")
    results = await asyncio.gather(*(collect(engine, CHAT) for _ in range(4)))
    assert all("".join(e.text for e in r[:-1]) == "a b c" for r in results)
    assert engine.completed == 4 and engine.queue_depth == 0


async def test_crash_fails_in_flight_requests_and_reports_state():
    states = []
    engine = FakeEngine("fake", token_delay=0.01, on_state_change=states.append)
    await engine.start()
    stream = engine.generate(CHAT)
    await anext(stream)
    engine.crash()
    with pytest.raises(EngineUnavailable):
        async for _ in stream:
            pass
    assert engine.queue_depth == 0
    assert engine.last_error
    await engine.start()
    assert engine.restarts == 1
    await collect(engine, CHAT)
    await engine.stop()
    await engine.stop()  # twice is fine
    assert states == ["loading", "ready", "failed", "loading", "ready", "stopping", "pending"]
