"""What the HTTP layer asks of a model engine, and what it gets back.

An engine serves one loaded model. The real one (`llama_engine.LlamaEngine`) runs
llama.cpp in a child process; `fake_engine.FakeEngine` answers instantly for unit tests.
Errors are raised as the exceptions below and translated to HTTP once, in the API layer.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

InstanceState = Literal["pending", "loading", "ready", "failed", "stopping"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until EOS or the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]  # OpenAI-style {"role", "content"} maps, already validated
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Always the last item of a generation."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


Event = TextDelta | Finished


class EngineError(Exception):
    """Base of what an engine raises; the API layer maps each to a status."""


class QueueFull(EngineError):
    """The model's bounded queue is full: answer 429 with Retry-After."""

    def __init__(self, retry_after: float = 1.0):
        super().__init__(f"queue full, retry after {retry_after:.0f}s")
        self.retry_after = retry_after


class EngineUnavailable(EngineError):
    """The engine is loading, failed or restarting: answer 503 with Retry-After."""

    def __init__(self, state: str, detail: str = "", retry_after: float = 2.0):
        super().__init__(f"model is {state}" + (f": {detail}" if detail else ""))
        self.state = state
        self.retry_after = retry_after


class InvalidRequest(EngineError):
    """The model cannot take this request as asked (e.g. its chat template rejects the
    order of roles): answer 400."""


class ContextOverflow(InvalidRequest):
    """The prompt does not fit the context window: answer 400."""


class Engine(abc.ABC):
    """One loaded model. `generate` yields TextDelta items then exactly one Finished.

    Closing the iterator early (client gone, task cancelled) must stop the generation
    and free the slot promptly.
    """

    name: str  # the model name clients use
    state: InstanceState

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns once ready (or raises EngineError)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop and free all resources; safe to call twice."""

    async def run(self) -> None:
        """Serve until cancelled, in the caller's TaskGroup: start, wait, stop.

        Engines with a supervisor of their own (LlamaEngine) override this."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    @abc.abstractmethod
    def generate(self, request: ChatRequest | CompletionRequest) -> AsyncIterator[Event]:
        """Queue the request (QueueFull if the queue is full) and stream its events."""

    @property
    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Requests waiting or running."""
