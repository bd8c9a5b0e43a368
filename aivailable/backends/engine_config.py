"""Node-wide settings of model workers: one frozen dataclass, every default with its reason
(DESIGN rule 4). Per-model settings are LlamaEngine arguments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Node-wide settings of model workers (per-model ones are LlamaEngine arguments)."""

    # Seconds a client is told to wait (Retry-After) when the queue is full: about one
    # short generation of a small model on a CPU.
    queue_retry_after: float = 1.0
    # Seconds a client is told to wait while the model loads or restarts: SmolLM2 loads
    # in about a second; bigger models take longer, and clients retry anyway.
    unavailable_retry_after: float = 2.0
    # Seconds a child may take from spawn to "ready" before it is killed: a large model
    # read from a slow disk takes minutes; a hung driver should not block forever.
    load_timeout: float = 300.0
    # Seconds before the first restart of a dead child; doubled after each quick death
    # up to restart_backoff_max, so a model that crashes at once does not spin a core.
    restart_backoff_initial: float = 0.5
    restart_backoff_max: float = 30.0
    # Seconds a child must have lived for its death to reset the backoff: a crash after
    # that long is a new incident, not a crash loop.
    stable_after: float = 30.0
    # Seconds stop() waits for a clean exit before SIGKILL: freeing a GPU context takes
    # well under a second; a wedged child must not hold the reconciler.
    stop_timeout: float = 5.0
    # Sequences one worker decodes together (slots), unless a deploy says otherwise. None:
    # 4 on a CPU node (2 cores gave ~2x the single-stream throughput at 4, and more slots
    # only split the same cores thinner), 8 on a GPU node (llama-server's -np 8: a GPU's
    # batched decode is nearly free up to there). Placement plans the KV cache for it.
    n_parallel: int | None = None
    # llama.cpp threads for decoding; None: the physical cores on a CPU node (hyperthreads
    # add nothing to its matmuls; llama.cpp's own default of half the cores left one of
    # two idle: 2 threads gave up to 1.3x at 4 clients), 4 on a GPU node (the GPU does the
    # work; more threads only spin).
    n_threads: int | None = None
    # Tokens per llama_decode (llama.cpp's n_batch): also the chunk of a long prompt
    # evaluated per step, so others' next token waits for at most one such chunk.
    n_batch: int = 512
    # Seconds a request may wait for a slot: beyond this, estimated from the slots and the
    # measured time a request holds one, it gets 429 with Retry-After at once instead of
    # joining a queue where it would wait (40 clients on one CPU host waited a median 22 s).
    # 15 s: a chat user would rather wait 10-20 s than see an error (issue 21: at 5 s, 12
    # clients on one 4-slot replica got 222 refusals to 142 answers), and past about 20 s
    # they give up anyway. A refusal is also the signal to add a replica (scaling.py); a
    # request for a model with no ready replica waits this long plus its load time.
    max_queue_wait: float = 15.0
    # All of llama.cpp's logging (per-request timings included) instead of warnings only.
    verbose: bool = False
    # MiB of host memory per worker for the KV of prompts evicted from their slots
    # (llama-server's --cache-ram; prompt_cache.py), restored instead of prefilled again.
    # 512: SmolLM2-135M's f16 KV is ~22.5 KiB a token, so ~15 chats of 1.5k tokens; an
    # entry over the bound is not kept. Nothing is allocated until a slot is evicted. 0: off.
    prompt_cache_mib: int = 512
