"""The model worker's loops over pipes, with a stand-in for llama.cpp: typed frames in,
each refusal with the ErrorCode set where it arose, generations and embeddings out."""

from __future__ import annotations

import os
import threading
import time

import pytest

from aivailable.backends import worker_protocol as wire
from aivailable.backends.base import SamplingParams
from aivailable.backends.llama_worker import Worker
from aivailable.backends.worker_protocol import ErrorCode


class FakeRuntime:
    """Tokens are a text's bytes; every step samples "A"; no end-of-generation token.
    With a `gate`, each decode says it has begun (`entered`), then waits for one release
    of the gate."""

    def __init__(self):
        self.gate: threading.Semaphore | None = None
        self.entered = threading.Semaphore(0)

    def chat_prompt(self, messages, tools=None, go_on=False) -> str:
        return " ".join(m["content"] for m in messages)

    def tokenize(self, text: str, special: bool) -> list[int]:
        return list(text.encode())

    def sampler(self, params: SamplingParams, seed: int) -> int:
        if params.grammar == "bad":
            raise ValueError("the output grammar is not valid GBNF")
        return 1

    def free_sampler(self, chain: int) -> None:
        pass

    def decode(self, tokens) -> dict[int, int]:
        if self.gate is not None:
            self.entered.release()
            assert self.gate.acquire(timeout=10)
        return {slot: i for i, t in enumerate(tokens) for slot in t.sample_for}

    def sample(self, chain: int, row: int) -> int:
        return ord("A")

    def is_eog(self, token: int) -> bool:
        return False

    def piece(self, token: int) -> bytes:
        return bytes([token])

    def embed(self, tokens: list[int]) -> list[float]:
        return [1.0, 0.0]

    def trim(self, seq, p0) -> None:
        pass

    def copy_cells(self, src, dst) -> None:
        pass

    def clear(self) -> None:
        pass


@pytest.fixture
def worker():
    """(send, receive, worker): frames into a running worker (n_ctx 16, 2 slots), frames
    out."""
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    inbox, outbox = os.fdopen(to_worker_w, "wb"), os.fdopen(from_worker_r, "rb")
    worker = Worker(FakeRuntime(), os.fdopen(from_worker_w, "wb"), 16, 2, 8)
    threads = [
        threading.Thread(target=worker.read_forever, args=(os.fdopen(to_worker_r, "rb"),)),
        threading.Thread(target=worker.serve),
    ]
    for t in threads:
        t.start()

    def send(*messages):
        for m in messages:
            inbox.write(wire.encode(m))
        inbox.flush()

    try:
        yield send, lambda: wire.read_frame(outbox), worker
    finally:
        inbox.close()  # end of input: the worker ends what runs and returns
        for t in threads:
            t.join(10)
        worker._out.close()
        outbox.close()
        assert not any(t.is_alive() for t in threads)


def completion(request_id: int, prompt: str, **params) -> wire.Generate:
    return wire.Generate(request_id, "completion", SamplingParams(**params), prompt=prompt)


def test_refusals_carry_the_code_set_where_they_arose(worker):
    send, receive, _ = worker
    send(completion(1, "x" * 16))  # the scheduler's PromptTooLong
    assert receive() == wire.Error(
        1,
        ErrorCode.CONTEXT_OVERFLOW,
        "the prompt has 16 tokens; this model's context holds 16 (prompt and answer together)",
    )
    send(completion(2, "hi", n=3))  # Unschedulable, not an overflow
    assert receive() == wire.Error(
        2, ErrorCode.BAD_REQUEST, "n=3 is more than this model's 2 slots"
    )
    send(completion(3, ""))
    assert receive() == wire.Error(3, ErrorCode.BAD_REQUEST, "the prompt is empty")
    send(completion(4, "hi", grammar="bad"))  # the runtime refused the grammar
    assert receive() == wire.Error(4, ErrorCode.BAD_REQUEST, "the output grammar is not valid GBNF")


def test_a_generation_streams_deltas_then_done(worker):
    send, receive, _ = worker
    chat = ({"role": "user", "content": "hey"},)
    send(wire.Generate(7, "chat", SamplingParams(max_tokens=3, n=2), messages=chat))
    text = {0: "", 1: ""}
    while isinstance(frame := receive(), wire.Deltas):
        for delta in frame.items:
            assert delta.id == 7 and delta.logprobs is None
            text[delta.choice] += delta.text
    assert text == {0: "AAA", 1: "AAA"}
    assert frame == wire.Done(7, ("length", "length"), 3, 6, 0)


def test_embeddings_and_a_cancel_of_nothing(worker):
    send, receive, _ = worker
    send(wire.Cancel(99), wire.Embed(5, ("ab", "c")))  # nothing to cancel: no answer
    assert receive() == wire.Embeddings(5, ((1.0, 0.0), (1.0, 0.0)), prompt_tokens=3)


def test_a_cancel_stops_a_generation_at_the_next_step(worker):
    send, receive, w = worker
    w.rt.gate = threading.Semaphore(1)  # one decode now, the next when we say
    send(completion(8, "hi", max_tokens=None))  # else up to the context's end
    assert receive() == wire.Deltas((wire.Delta(8, 0, "A"),))
    for _ in range(2):  # the first step's decode, then the second's: now it waits
        assert w.rt.entered.acquire(timeout=10)
    send(wire.Cancel(8))
    for _ in range(1000):  # until the reader thread has handed it to the decode loop
        if w.inbox.qsize():
            break
        time.sleep(0.01)
    w.rt.gate.release()  # the step under way ends; the cancel applies before the next
    assert receive() == wire.Deltas((wire.Delta(8, 0, "A"),))
    assert receive() == wire.Cancelled(8)
    w.rt.gate = None
    send(completion(9, "hi", max_tokens=1))  # and the slot serves the next one
    assert receive() == wire.Deltas((wire.Delta(9, 0, "A"),))
    assert receive() == wire.Done(9, ("length",), 2, 1, cached_tokens=1)  # "h" reused


def test_done_says_how_long_the_prefill_and_the_decode_took(worker):
    """Per sequence, for traces: slot to first token, and first token to the end. Each step
    is held a known time at the gate, so each phase lasts at least that."""
    send, receive, w = worker
    hold = 0.05
    w.rt.gate = threading.Semaphore(0)
    send(completion(10, "hi", max_tokens=2))
    for _ in range(2):  # the prompt's decode (the prefill), then the first token's (decode)
        assert w.rt.entered.acquire(timeout=10)
        time.sleep(hold)
        w.rt.gate.release()
    while isinstance(frame := receive(), wire.Deltas):
        pass
    assert frame == wire.Done(10, ("length",), 2, 2)
    assert frame.prefill_ns >= hold * 1e9 and frame.decode_ns >= hold * 1e9
    # Measurements travel, and never decide equality.
    assert wire.decode(wire.encode(frame)[4:]).prefill_ns == frame.prefill_ns
    assert wire.Done(1, ("stop",), 1, 1, prefill_ns=5) == wire.Done(1, ("stop",), 1, 1)
