"""The host-memory prompt cache's pure parts: LRU under a byte bound, the best prefix, and
the scheduler's saves and restores around a slot's reuse."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aivailable.backends.prompt_cache import MIN_SAVED_TOKENS, PromptCache
from aivailable.backends.scheduler import MIN_RESTORE_GAIN, Scheduler, SeqRequest


def toks(base: int, n: int) -> tuple[int, ...]:
    return tuple(base * 10_000 + i for i in range(n))


def test_lru_evicts_oldest_within_the_byte_bound():
    cache = PromptCache(max_bytes=300)
    a, b, c = toks(1, 100), toks(2, 100), toks(3, 100)
    assert cache.put(a, b"x" * 100) and cache.put(b, b"x" * 100) and cache.put(c, b"x" * 100)
    assert cache.bytes_used == 300
    cache.put(a, b"x" * 100)  # already there: touched, now the newest
    cache.put(toks(4, 100), b"x" * 100)
    assert b not in cache and a in cache and c in cache
    assert cache.bytes_used == 300 and cache.evictions == 1


def test_too_big_or_disabled_is_not_kept():
    cache = PromptCache(max_bytes=50)
    assert not cache.put(toks(1, 100), b"x" * 51)
    assert len(cache) == 0 and cache.bytes_used == 0
    assert not PromptCache(0).worth_saving(toks(1, 500), 0)


def test_longer_history_supersedes_its_prefix():
    cache = PromptCache(max_bytes=1000)
    turn1 = toks(1, 100)
    turn2 = turn1 + toks(2, 100)
    cache.put(turn1, b"x" * 100)
    cache.put(turn2, b"y" * 200)
    assert turn1 not in cache and turn2 in cache and cache.bytes_used == 200
    cache.put(turn1, b"x" * 100)  # a prefix of an entry: that entry serves it
    assert turn1 not in cache and len(cache) == 1


def test_best_is_the_longest_shared_prefix_and_take_moves_it_out():
    cache = PromptCache(max_bytes=10_000)
    system = toks(9, 20)
    a, b = system + toks(1, 200), system + toks(2, 300)
    cache.put(a, b"a" * 10)
    cache.put(b, b"b" * 10)
    assert cache.best(a + toks(5, 50)) == (a, len(a))
    assert cache.best(system + toks(3, 5)) in ((a, 20), (b, 20))
    assert cache.best(toks(7, 10)) is None
    assert cache.take(a) == b"a" * 10
    assert a not in cache and cache.bytes_used == 10 and cache.restores == 1


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 200)), max_size=60))
def test_the_bound_always_holds(puts):
    cache = PromptCache(max_bytes=500)
    for base, size in puts:
        cache.put(toks(base, 5 + base), b"z" * size)
        assert cache.bytes_used <= 500
        assert cache.bytes_used == sum(len(cache._entries[k]) for k in cache._entries)


# --- the scheduler with a cache: one slot, two conversations taking turns ---------------


def run_to_end(sched: Scheduler, request: SeqRequest, token: int = 7) -> list:
    """Submit, run every step (sampling `token`) until the request ends; the steps."""
    sched.submit(request)
    steps = []
    while sched.busy:
        step = sched.next_step()
        steps.append(step)
        for _seq, tokens in step.saves:  # what the worker does: the cells' state
            sched.prompt_cache.put(tokens, bytes(len(tokens)))
        for t in step.tokens:
            for slot in t.sample_for:
                sched.accept(slot, token, False)
    return steps


def test_an_evicted_conversation_is_saved_and_restored():
    sched = Scheduler(1, 4096, 512, prompt_cache=PromptCache(1 << 20))
    a1 = toks(1, 300)
    run_to_end(sched, SeqRequest(1, a1, 3))
    b1 = toks(2, 300)
    steps = run_to_end(sched, SeqRequest(2, b1, 3))
    saved = steps[0].saves
    assert len(saved) == 1 and saved[0][1][:300] == a1  # a's cells, before b trims them
    # a's next turn: its history (prompt + the 3 answer tokens decoded) and a new message
    a2 = saved[0][1] + toks(3, 100)
    steps = run_to_end(sched, SeqRequest(3, a2, 3))
    first = steps[0]
    assert [seq for seq, _ in first.restores] == [0]
    assert first.started[0].restored == len(saved[0][1]) == first.started[0].reused
    assert [seq for seq, _ in first.saves] == [0]  # b's cells went to the cache meanwhile
    assert first.trims == [(0, len(saved[0][1]))]
    assert len(first.tokens) == 100  # only the new message is evaluated
    assert saved[0][1] not in sched.prompt_cache  # moved into the slot


def test_no_restore_when_the_slot_has_as_much_or_no_cache_at_all():
    sched = Scheduler(1, 4096, 512, prompt_cache=PromptCache(1 << 20))
    a1 = toks(1, 300)
    run_to_end(sched, SeqRequest(1, a1, 3))
    steps = run_to_end(sched, SeqRequest(2, a1 + toks(3, 50), 3))  # the slot holds a
    assert not steps[0].saves and not steps[0].restores
    short = toks(4, MIN_SAVED_TOKENS - 10)
    steps = run_to_end(sched, SeqRequest(3, short, 3))  # a's cells: saved, nothing to restore
    assert len(steps[0].saves) == 1 and not steps[0].restores
    plain = Scheduler(1, 4096, 512)  # without a cache nothing changes
    plain.prompt_cache = None
    for rid, prompt in enumerate((a1, toks(5, 300), a1 + toks(3, 50))):
        steps = []
        plain.submit(SeqRequest(rid, prompt, 3))
        while plain.busy:
            steps.append(plain.next_step())
            for t in steps[-1].tokens:
                for slot in t.sample_for:
                    plain.accept(slot, 7, False)
        assert not any(s.saves or s.restores for s in steps)
    assert MIN_RESTORE_GAIN < MIN_SAVED_TOKENS


async def test_restores_are_counted_in_the_metrics():
    from types import SimpleNamespace

    from aivailable.api.openai_api import OpenAIApi
    from aivailable.backends.base import Finished
    from aivailable.metrics import Metrics

    metrics = Metrics()
    api = OpenAIApi(lambda: {}, metrics, 64, 5)
    meter = SimpleNamespace(parsed=SimpleNamespace(model="m"), used=lambda *a: None)
    api.count(meter, Finished("stop", 500, 5, cached_tokens=400, restored_tokens=380))
    api.count(meter, Finished("stop", 500, 5, cached_tokens=400))  # from the slot itself
    text = metrics.render().decode()
    assert 'aivailable_prompt_cache_restores_total{model="m"} 1.0' in text
    assert 'aivailable_prompt_cache_restored_tokens_total{model="m"} 380.0' in text
    assert 'aivailable_prefix_cache_tokens_total{model="m"} 800.0' in text


def test_the_engine_passes_the_bound_to_chat_workers_only():
    from aivailable.backends.llama_engine import EngineConfig, LlamaEngine

    argv = LlamaEngine("m", "/m.gguf")._command()
    assert argv[argv.index("--prompt-cache-mib") + 1] == "512"
    off = LlamaEngine("m", "/m.gguf", config=EngineConfig(prompt_cache_mib=0))
    assert "--prompt-cache-mib" not in off._command()
    assert "--prompt-cache-mib" not in LlamaEngine("m", "/m.gguf", kind="embedding")._command()
