"""The host-memory prompt cache on real llama.cpp and SmolLM2: a conversation that lost its
only slot to another one comes back from RAM, with the same greedy answer as without the
cache, and the byte bound keeps out what does not fit."""

from __future__ import annotations

import pytest

from aivailable.backends.base import ChatRequest, Finished, SamplingParams, TextDelta
from aivailable.backends.llama_engine import EngineConfig, LlamaEngine

slow = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, seed=1)
NOTE_A = "Summarize: " + " ".join(["the river runs past the old stone mill"] * 12)
NOTE_B = "Summarize: " + " ".join(["a copper lantern hangs in the quiet harbor"] * 12)


def chat(*messages: tuple[str, str]) -> ChatRequest:
    return ChatRequest(tuple({"role": r, "content": c} for r, c in messages), GREEDY)


async def answer(engine: LlamaEngine, request: ChatRequest) -> tuple[str, Finished]:
    events = [e async for e in engine.generate(request)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


async def started(model, mib: int) -> LlamaEngine:
    config = EngineConfig(prompt_cache_mib=mib, stop_timeout=10.0)
    # One slot: each conversation's turn evicts the other's cells from it.
    engine = LlamaEngine("smollm2-135m", model, n_ctx=1024, n_parallel=1, config=config)
    await engine.start()
    return engine


async def three_turns(engine: LlamaEngine) -> tuple[str, Finished]:
    """A's first turn, B's (which takes A's slot), then A's second turn."""
    first, _ = await answer(engine, chat(("user", NOTE_A)))
    await answer(engine, chat(("user", NOTE_B)))
    return await answer(
        engine, chat(("user", NOTE_A), ("assistant", first), ("user", "Now in three words."))
    )


@slow
async def test_an_evicted_conversation_comes_back_from_ram_with_the_same_answer(
    embedded_model,
):
    cached = await started(embedded_model, 64)
    try:
        text, done = await three_turns(cached)
    finally:
        await cached.stop()
    plain = await started(embedded_model, 0)
    try:
        text_plain, done_plain = await three_turns(plain)
    finally:
        await plain.stop()
    # Without the cache, B's turn left only the template's default system prompt (~28 tokens) in the slot.
    assert done_plain.cached_tokens < 40 and done_plain.restored_tokens == 0
    # With it, A's first turn (prompt and answer) came back from RAM.
    assert done.restored_tokens > 100
    assert done.cached_tokens == done.restored_tokens
    assert done.cached_tokens > done.prompt_tokens // 2
    assert text == text_plain and text.strip()  # the restored cells are the same cells


@slow
async def test_an_entry_over_the_bound_is_not_kept(embedded_model):
    # ~22.5 KiB a token: A's ~150 tokens are ~3.4 MiB, over a 1 MiB bound.
    engine = await started(embedded_model, 1)
    try:
        _, done = await three_turns(engine)
    finally:
        await engine.stop()
    assert done.restored_tokens == 0 and done.cached_tokens < 40
