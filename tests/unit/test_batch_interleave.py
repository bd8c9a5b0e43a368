"""How the scheduler interleaves new prompts with running sequences: llama-server's rule.

llama-server's `update_slots` builds each `llama_decode` batch the same way: first the
sampled token of every generating slot, then prompt tokens of the slots still prefilling
while the batch holds fewer than `n_batch` tokens (continuous batching with chunked
prefill), and a new task takes a free slot at the next iteration. Ours, checked here over
seeded random arrivals:

- a waiting request that a free slot can take starts in the very next step;
- every decoding sequence has its next token in every batch (none is skipped) while
  their number is within the batch;
- no budget is left unused while prompt tokens wait (so a new prompt's first chunk joins
  the running sequences' next batch, never a later one);
- prompts waiting for the budget take turns: each gets a chunk within `n_parallel` steps
  (llama-server goes by slot order; least recently served first bounds the wait).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.backends.scheduler import Scheduler, SeqRequest

EOS = 0


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_each_batch_follows_llama_servers_interleave_rule(seed):
    rng = random.Random(seed)
    n_parallel = rng.randint(1, 6)
    batch_tokens = rng.randint(n_parallel + 1, 24)  # room for a prompt chunk each step
    sched = Scheduler(n_parallel, n_ctx=96, batch_tokens=batch_tokens, max_waiting=200)
    unserved: dict[int, int] = {}  # slot with prompt tokens waiting -> steps without a chunk
    next_id = 1
    for _ in range(300):
        for _ in range(rng.choice((0, 0, 0, 1, 2))):  # bursts of arrivals
            prompt = tuple(rng.randint(1, 49) for _ in range(rng.randint(1, 40)))
            n = rng.randint(1, min(2, n_parallel))
            assert sched.submit(SeqRequest(next_id, prompt, rng.randint(1, 12), n=n))
            next_id += 1
        decoding = {s.index for s in sched.slots if s.request is not None and s.last is not None}
        step = sched.next_step()
        tokens = step.tokens
        assert len(tokens) <= batch_tokens
        # Head of the queue: started as soon as slots are free for it.
        assert not (sched.waiting and sched.free_slots >= sched.waiting[0].n)
        # Every decoding sequence's next token, first in the batch, one each.
        firsts = [t.seq for t in tokens[: len(decoding)]]
        assert sorted(firsts) == sorted(decoding)
        assert all(tokens[i].sample_for == (tokens[i].seq,) for i in range(len(decoding)))
        # Work-conserving: prompt tokens left over only when the batch is full.
        pending = {s.index for s in sched.slots if s.request is not None and s.pending}
        if pending:
            assert len(tokens) == batch_tokens
        # Turns: a prefilling slot gets a chunk within n_parallel steps.
        served = {t.seq for t in tokens[len(decoding) :]}
        unserved = {s: (0 if s in served else unserved.get(s, 0) + 1) for s in pending}
        assert all(waited < n_parallel for waited in unserved.values()), unserved
        sampled = [(slot, t) for t in tokens for slot in t.sample_for]
        for slot, _ in sampled:
            if sched.request_of(slot) is None:
                continue
            token = rng.randint(0, 49)
            sched.accept(slot, token, token == EOS)


def test_a_new_prompt_joins_the_running_sequences_next_batch():
    """Three streams decode; a new request's prompt is in the very next batch beside
    their tokens, chunked to the budget, and its first token is sampled as soon as the
    last chunk is decoded: ceil(prompt / (n_batch - running)) steps."""
    sched = Scheduler(n_parallel=4, n_ctx=256, batch_tokens=8)
    for i in range(3):
        sched.submit(SeqRequest(i, (1, 2, 3 + i), max_tokens=100))
    step = sched.next_step()
    for t in step.tokens:
        for slot in t.sample_for:
            sched.accept(slot, 9, False)
    sched.submit(SeqRequest(99, tuple(range(10, 30)), max_tokens=4))  # 20 prompt tokens
    steps = 0
    while True:
        step = sched.next_step()
        steps += 1
        running = [t for t in step.tokens if t.sample_for and sched.request_of(t.seq).id != 99]
        assert len(running) == 3  # never held back by the prefill
        new = [t for t in step.tokens if sched.request_of(t.seq).id == 99]
        assert new, "the new prompt has a chunk in every batch until it is evaluated"
        sampled_new = any(t.sample_for for t in new)
        for t in step.tokens:
            for slot in t.sample_for:
                sched.accept(slot, 9, False)
        if sampled_new:
            break
    assert steps == -(-20 // (8 - 3))  # 4 steps of 5 prompt tokens
