"""FakeEngine: a stand-in for LlamaEngine that answers instantly with canned tokens.

For fast unit tests of the HTTP layer, the forwarder and the reconciler: same interface,
same errors, same queue rules, no model and no child process. Its output is a fixed
reply (or one computed from the request), split at whitespace into tokens; max_tokens
and stop strings behave as in the real engine. `crash()` simulates the worker dying.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import AsyncIterator, Callable

from aivailable.backends import lifecycle
from aivailable.backends.base import (
    ChatRequest,
    CompletionRequest,
    ContextOverflow,
    Embeddings,
    Engine,
    EngineUnavailable,
    Event,
    Finished,
    InstanceState,
    InvalidRequest,
    QueueFull,
    TextDelta,
    Timing,
)

DEFAULT_REPLY = "Hello! This is a canned reply from the fake engine."
_TOKEN = re.compile(r"\s*\S+")


def count_prompt_tokens(request: ChatRequest | CompletionRequest) -> int:
    """Whitespace words, plus one per chat message for the template's role markers."""
    if isinstance(request, CompletionRequest):
        return len(request.prompt.split())
    return sum(len(str(m.get("content") or "").split()) + 1 for m in request.messages)


class FakeEngine(Engine):
    def __init__(
        self,
        name: str = "fake-model",
        *,
        reply: str | Callable[[ChatRequest | CompletionRequest], str] = DEFAULT_REPLY,
        token_delay: float = 0.0,  # seconds between tokens; >0 lets tests catch it mid-stream
        load_delay: float = 0.0,  # seconds start() spends "loading"
        queue_limit: int = 8,  # requests waiting or running before QueueFull
        parallel: int = 1,  # generations at once (the real engine's n_parallel slots)
        n_ctx: int = 2048,  # prompt tokens above this raise ContextOverflow
        retry_after: float = 1.0,  # seconds suggested with QueueFull
        on_state_change: Callable[[InstanceState], None] | None = None,
        kind: str = "chat",  # "embedding": embed() gives fake vectors, generate() refuses
    ):
        self.name = name
        self.kind = kind
        self.state: InstanceState = "pending"
        self.reply = reply
        self.token_delay = token_delay
        self.load_delay = load_delay
        self.queue_limit = queue_limit
        self.n_ctx = n_ctx
        self.retry_after = retry_after
        self.on_state_change = on_state_change
        self.n_parallel = parallel
        self._slots = asyncio.Semaphore(parallel)
        self._depth = 0
        self._epoch = 0  # bumped by crash(); generations of an older epoch fail
        # What LlamaEngine reports too, for status pages.
        self.pid: int | None = None  # no child process
        self.restarts = 0  # start() calls after a crash()
        self.last_error = ""
        # Counters tests assert on.
        self.completed = 0
        self.cancelled = 0
        self.requests: list[ChatRequest | CompletionRequest] = []

    def _set_state(self, state: InstanceState) -> None:
        if state != self.state:
            lifecycle.advance(self.state, state)  # the fake is strict: a skip fails the test
            self.state = state
            if state == "ready":
                self._measure_from_ready()
            if self.on_state_change is not None:
                self.on_state_change(state)

    async def start(self) -> None:
        if self.state == "failed":
            self.restarts += 1
        self._set_state("loading")
        await asyncio.sleep(self.load_delay)
        self._set_state("ready")

    async def stop(self) -> None:
        if self.state == "pending":
            return
        self._set_state("stopping")
        self._epoch += 1
        self._set_state("pending")

    def crash(self) -> None:
        """Simulate the worker dying: in-flight generations raise EngineUnavailable."""
        self._epoch += 1
        self.last_error = "the fake worker crashed"
        self._set_state("failed")

    @property
    def queue_depth(self) -> int:
        return self._depth

    def admits(self) -> bool:
        return self._depth < self.queue_limit

    def _text_for(self, request: ChatRequest | CompletionRequest) -> tuple[list[str], str]:
        text = self.reply(request) if callable(self.reply) else self.reply
        finish = "stop"
        cut = [text.find(s) for s in request.params.stop if s and s in text]
        if cut:
            text = text[: min(cut)]
        tokens = _TOKEN.findall(text)
        limit = request.params.max_tokens
        if limit is not None and limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        return tokens, finish

    async def embed(self, inputs: list[str]) -> Embeddings:
        """Fake vectors: 8 numbers from each input's hash, unit length; equal inputs give
        equal vectors, as a real model's do."""
        if self.kind != "embedding":
            return await super().embed(inputs)
        if self.state != "ready":
            raise EngineUnavailable(self.state)
        vectors = []
        for text in inputs:
            digest = hashlib.sha256(text.encode()).digest()[:8]
            raw = [b - 127.5 for b in digest]
            norm = math.sqrt(sum(x * x for x in raw)) or 1.0
            vectors.append(tuple(x / norm for x in raw))
        return Embeddings(tuple(vectors), sum(len(t.split()) for t in inputs))

    async def generate(self, request: ChatRequest | CompletionRequest) -> AsyncIterator[Event]:
        if self.kind == "embedding":
            raise InvalidRequest(f"the model '{self.name}' is deployed for embeddings only")
        if self.state != "ready":
            raise EngineUnavailable(self.state)
        if self._depth >= self.queue_limit:
            self._demand_refused()
            raise QueueFull(self.retry_after)
        prompt_tokens = count_prompt_tokens(request)
        if prompt_tokens > self.n_ctx:
            raise ContextOverflow(
                f"prompt has {prompt_tokens} tokens, the context window is {self.n_ctx}"
            )
        tokens, finish = self._text_for(request)
        epoch = self._epoch
        self._depth += 1
        self._demand_admitted(self._depth)
        admitted = time.monotonic()
        done = False
        try:
            async with self._slots:
                slot_ns = first_ns = time.time_ns()  # as the real engine's Timing says
                self.requests.append(request)
                for i, token in enumerate(tokens):
                    await asyncio.sleep(self.token_delay)
                    if self._epoch != epoch:
                        raise EngineUnavailable(self.state, "the worker exited")
                    if i == 0:
                        first_ns = time.time_ns()
                        self._demand_first_token(admitted)
                    yield TextDelta(token)
                if self._epoch != epoch:
                    raise EngineUnavailable(self.state, "the worker exited")
                done = True
                self.completed += 1
                timing = Timing(slot_ns, first_ns, time.time_ns())
                yield Finished(finish, prompt_tokens, len(tokens), timing=timing)
        except (GeneratorExit, asyncio.CancelledError):
            if not done:  # closed early: the client went away
                self.cancelled += 1
            raise
        finally:
            self._depth -= 1
            self._demand_depth(self._depth)
