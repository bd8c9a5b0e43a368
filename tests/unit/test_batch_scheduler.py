"""The batch scheduler's pure core, driven by a fake decoder (no llama.cpp).

The fake decoder keeps, per sequence, the list of (pos, token) cells it holds, as
llama.cpp's KV cache would after the trims and copies a step asks for; it "samples" a
token that depends only on the sequence's cells, like a greedy model would. So a
request's output must not depend on what ran before or beside it.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.backends.scheduler import (
    Admission,
    PromptTooLong,
    Scheduler,
    SeqRequest,
    Unschedulable,
    common_prefix,
)

EOS = 0


class FakeDecoder:
    """A KV cache of per-sequence cells and a deterministic 'model' over them."""

    def __init__(self, n_parallel: int):
        self.cells: dict[int, list[int]] = {i: [] for i in range(n_parallel)}
        self.evaluated = 0  # prompt and generated tokens decoded
        self.batches: list[int] = []

    def run(self, sched: Scheduler, step) -> dict[int, int]:
        for src, dst, n in step.copies:
            self.cells[dst] = list(self.cells[src][:n])
        for seq, p0 in step.trims:
            del self.cells[seq][p0:]
        sampled = {}
        self.batches.append(len(step.tokens))
        for t in step.tokens:
            assert t.pos == len(self.cells[t.seq]), "tokens are decoded in order, no gaps"
            self.cells[t.seq].append(t.token)
            self.evaluated += 1
            for slot in t.sample_for:
                # Depends on the prompt and the choice only: choice i shifts the result.
                history = self.cells[t.seq]
                sampled[slot] = (sum(history) * 31 + len(history) + sched.choice_of(slot)) % 50
        return sampled


def run_all(sched: Scheduler, decoder: FakeDecoder, limit: int = 10_000) -> dict:
    """Step until idle; returns request id -> list of choices' token lists."""
    out: dict[int, dict[int, list[int]]] = {}
    finish: dict[tuple[int, int], str] = {}
    for _ in range(limit):
        if not sched.busy:
            break
        step = sched.next_step()
        for started in step.started:
            out.setdefault(started.request_id, {i: [] for i in range(len(started.slots))})
        for slot, token in decoder.run(sched, step).items():
            request = sched.request_of(slot)
            choice = sched.choice_of(slot)
            reason = sched.accept(slot, token, token == EOS)
            if token != EOS:
                out[request.id][choice].append(token)
            if reason:
                finish[(request.id, choice)] = reason
    else:
        raise AssertionError("the scheduler never became idle")
    return {rid: [choices[i] for i in sorted(choices)] for rid, choices in out.items()}


def alone(request: SeqRequest, **kw) -> list[list[int]]:
    sched = Scheduler(n_parallel=max(1, request.n), n_ctx=kw.get("n_ctx", 256), batch_tokens=8)
    sched.submit(request)
    return run_all(sched, FakeDecoder(len(sched.slots)))[request.id]


def test_decoding_tokens_come_first_then_prompt_chunks_under_the_budget():
    sched = Scheduler(n_parallel=3, n_ctx=512, batch_tokens=8)
    sched.submit(SeqRequest(1, tuple(range(1, 4)), max_tokens=5))
    step = sched.next_step()
    assert [t.token for t in step.tokens] == [1, 2, 3]
    assert step.tokens[-1].sample_for == (step.tokens[-1].seq,)
    assert all(not t.sample_for for t in step.tokens[:-1])  # logits only where sampled
    sched.accept(step.tokens[-1].seq, 7, False)
    sched.submit(SeqRequest(2, tuple(range(10, 30)), max_tokens=5))  # 20 prompt tokens
    step = sched.next_step()
    # One decode token for request 1, then 7 of request 2's prompt: a long prompt is chunked
    # and request 1 is never held back by it.
    assert step.tokens[0].token == 7 and step.tokens[0].sample_for
    assert len(step.tokens) == 8
    assert [t.token for t in step.tokens[1:]] == list(range(10, 17))
    assert all(not t.sample_for for t in step.tokens[1:])


def test_new_requests_join_at_the_next_step_and_finished_ones_free_their_slot():
    sched = Scheduler(n_parallel=1, n_ctx=512, batch_tokens=64)
    sched.submit(SeqRequest(1, (5, 6), max_tokens=2))
    sched.submit(SeqRequest(2, (8, 9), max_tokens=2))
    step = sched.next_step()
    assert [s.request_id for s in step.started] == [1] and len(sched.waiting) == 1
    assert sched.accept(step.tokens[-1].seq, 11, False) is None
    step = sched.next_step()
    assert sched.accept(step.tokens[-1].seq, 12, False) == "length"
    assert sched.free_slots == 1
    step = sched.next_step()
    assert [s.request_id for s in step.started] == [2]


def test_the_slot_sharing_the_longest_prefix_is_chosen_and_only_the_rest_evaluated():
    sched = Scheduler(n_parallel=3, n_ctx=512, batch_tokens=512)
    decoder = FakeDecoder(3)
    history_a = tuple(range(100, 160))
    history_b = tuple(range(200, 240))
    for rid, prompt in ((1, history_a), (2, history_b)):
        sched.submit(SeqRequest(rid, prompt, max_tokens=3))
    run_all(sched, decoder)
    before = decoder.evaluated
    # The second turn of conversation A: its whole history plus a new message.
    turn2 = history_a + (1, 2, 3, 4)
    sched.submit(SeqRequest(3, turn2, max_tokens=3))
    step = sched.next_step()
    (started,) = step.started
    assert started.reused == len(history_a)
    assert decoder.cells[started.slots[0]][: len(history_a)] == list(history_a)
    assert [t.token for t in step.tokens] == [1, 2, 3, 4]
    decoder.run(sched, step)
    assert decoder.evaluated - before == 4


def test_a_prompt_fully_cached_still_evaluates_its_last_token_for_logits():
    sched = Scheduler(n_parallel=1, n_ctx=512, batch_tokens=512)
    decoder = FakeDecoder(1)
    sched.submit(SeqRequest(1, (1, 2, 3), max_tokens=1))
    first = run_all(sched, decoder)[1]
    sched.submit(SeqRequest(2, (1, 2, 3), max_tokens=1))
    step = sched.next_step()
    assert step.trims == [(0, 2)] and [t.token for t in step.tokens] == [3]
    assert step.started[0].reused == 2
    decoder.run(sched, step)
    assert decoder.cells[0] == [1, 2, 3]
    sched.cancel(2)
    assert first == [[(6 * 31 + 3) % 50]]


def test_cancel_frees_the_slot_and_drops_waiting_requests():
    sched = Scheduler(n_parallel=1, n_ctx=512, batch_tokens=4)
    sched.submit(SeqRequest(1, tuple(range(1, 20)), max_tokens=5))
    sched.submit(SeqRequest(2, (1,), max_tokens=5))
    step = sched.next_step()
    assert len(step.tokens) == 4
    assert sched.cancel(2) and len(sched.waiting) == 0
    assert sched.cancel(1) and sched.free_slots == 1 and not sched.busy
    # The 4 cells evaluated before the cancel stay cached for a later prompt.
    sched.submit(SeqRequest(3, tuple(range(1, 10)), max_tokens=1))
    assert sched.next_step().started[0].reused == 4
    assert not sched.cancel(99)


def test_prompts_that_cannot_fit_are_refused_before_taking_a_slot():
    sched = Scheduler(n_parallel=2, n_ctx=16, batch_tokens=4, max_waiting=1)
    with pytest.raises(PromptTooLong, match="context holds 16"):
        sched.check(SeqRequest(1, tuple(range(1, 17)), max_tokens=1))
    with pytest.raises(Unschedulable, match="empty") as empty:
        sched.check(SeqRequest(1, (), max_tokens=1))
    assert not isinstance(empty.value, PromptTooLong)  # a bad request, not an overflow
    with pytest.raises(Unschedulable, match="slots"):
        sched.check(SeqRequest(1, (1,), max_tokens=1, n=3))
    with pytest.raises(PromptTooLong):
        sched.submit(SeqRequest(1, tuple(range(1, 17)), max_tokens=1))
    assert sched.free_slots == 2
    assert sched.submit(SeqRequest(2, (1,), max_tokens=1))
    assert not sched.submit(SeqRequest(3, (1,), max_tokens=1))  # queue bound


def test_a_sequence_stops_at_its_share_of_the_context():
    sched = Scheduler(n_parallel=2, n_ctx=8, batch_tokens=8)
    sched.submit(SeqRequest(1, (1, 2, 3), max_tokens=100))
    (tokens,) = run_all(sched, FakeDecoder(2))[1]
    assert len(tokens) >= 1 and 3 + len(tokens) <= 8


def test_n_choices_evaluate_the_prompt_once_and_copy_its_cells():
    sched = Scheduler(n_parallel=4, n_ctx=256, batch_tokens=64)
    decoder = FakeDecoder(4)
    sched.submit(SeqRequest(1, tuple(range(1, 30)), max_tokens=4, n=3))
    out = run_all(sched, decoder)[1]
    assert len(out) == 3 and all(len(c) == 4 for c in out)
    assert len(set(map(tuple, out))) == 3  # each choice is its own sequence
    assert decoder.evaluated == 29 + 3 * 3  # the prompt once, then 3 decoded each
    assert out == alone(SeqRequest(1, tuple(range(1, 30)), max_tokens=4, n=3))


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_output_does_not_depend_on_what_runs_before_or_beside(seed):
    """Random arrivals, prompts sharing prefixes, cancels and n>1: every finished
    request's output equals what the same request gives alone; cells never overflow."""
    rng = random.Random(seed)
    n_parallel = rng.randint(1, 4)
    sched = Scheduler(n_parallel, n_ctx=64, batch_tokens=rng.randint(1, 16), max_waiting=100)
    decoder = FakeDecoder(n_parallel)
    base = [rng.randint(1, 49) for _ in range(30)]
    requests, cancelled = {}, set()
    out: dict[int, dict[int, list[int]]] = {}
    done: dict[int, set[int]] = {}
    next_id = 1
    for _ in range(400):
        if rng.random() < 0.3 and next_id < 25:
            prompt = tuple(base[: rng.randint(1, 30)] + [rng.randint(1, 49)] * rng.randint(0, 3))
            req = SeqRequest(next_id, prompt, rng.randint(1, 6), n=rng.randint(1, n_parallel))
            requests[next_id] = req
            assert sched.submit(req)
            next_id += 1
        if rng.random() < 0.05 and requests:
            victim = rng.choice(list(requests))
            if sched.cancel(victim):
                cancelled.add(victim)
        step = sched.next_step()
        assert len(step.tokens) <= sched.batch_tokens
        for started in step.started:
            out[started.request_id] = {i: [] for i in range(len(started.slots))}
        for slot, token in decoder.run(sched, step).items():
            req, choice = sched.request_of(slot), sched.choice_of(slot)
            reason = sched.accept(slot, token, token == EOS)
            if token != EOS:
                out[req.id][choice].append(token)
            if reason:
                done.setdefault(req.id, set()).add(choice)
        assert all(len(cells) <= 64 for cells in decoder.cells.values())
    for rid, choices in done.items():
        if rid in cancelled or len(choices) < requests[rid].n:
            continue
        got = [out[rid][i] for i in range(requests[rid].n)]
        assert got == alone(requests[rid], n_ctx=64), f"request {rid}"


def test_common_prefix():
    assert common_prefix([1, 2, 3], (1, 2, 4)) == 2
    assert common_prefix([], (1,)) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


def test_admission_by_expected_wait_and_retry_after():
    adm = Admission(n_parallel=4, max_wait=3.0, hold_estimate=2.0)
    assert adm.retry_after(0) is None and adm.expected_wait(3) == 0.0
    assert adm.expected_wait(4) == 2.0  # every slot busy: one hold ahead
    assert adm.retry_after(7) is None  # starts within 2 s
    assert adm.expected_wait(8) == 4.0
    assert adm.retry_after(8) == 1.0  # 4 s > 3 s: come back in about a second
    assert adm.retry_after(20) == 7.0  # (20-4)//4+1 = 5 rounds of 2 s, less the 3 s allowed
    for _ in range(50):
        adm.record(0.5)  # requests got faster: more are admitted
    assert adm.expected_wait(8) < 1.1 and adm.retry_after(12) is None


def test_after_the_cells_are_cleared_nothing_is_reused():
    sched = Scheduler(n_parallel=1, n_ctx=64, batch_tokens=64)
    sched.submit(SeqRequest(1, (1, 2, 3), max_tokens=1))
    run_all(sched, FakeDecoder(1))
    sched.forget_cache()
    sched.submit(SeqRequest(2, (1, 2, 3), max_tokens=1))
    step = sched.next_step()
    assert step.started[0].reused == 0 and [t.token for t in step.tokens] == [1, 2, 3]
