"""What the HTTP layer asks of a model engine, and what it gets back.

An engine serves one loaded model. The real one (`llama_engine.LlamaEngine`) runs
llama.cpp in a child process; `fake_engine.FakeEngine` answers instantly for unit tests.
Errors are raised as the exceptions below and translated to HTTP once, in the API layer.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

from aivailable.backends.demand import DemandWindow, Signals


class InstanceState(StrEnum):
    """An instance's state (DESIGN.md); the moves between them: backends/lifecycle.py."""

    PENDING = "pending"  # planned here; the model file is being fetched, or stopped
    LOADING = "loading"  # the worker is loading the model
    READY = "ready"  # takes requests
    FAILED = "failed"  # the load or the worker failed; retried with backoff
    STOPPING = "stopping"  # being stopped; takes no new requests


@dataclass(frozen=True)
class SamplingParams:
    """Per request, applied by llama.cpp's sampler chain in the worker."""

    max_tokens: int | None = None  # None: until EOS or the context is full
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh one per request
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    logprobs: bool = False  # each token's log-probability in the output
    top_logprobs: int = 0  # and this many most likely alternatives
    n: int = 1  # choices; the prompt is evaluated once
    grammar: str | None = None  # GBNF the output must match (JSON, a schema, tool calls)


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]  # OpenAI-style {"role", "content"} maps, already validated
    params: SamplingParams = field(default_factory=SamplingParams)
    tools: tuple[dict, ...] = ()  # OpenAI function tools, for templates that render them
    # The last message is an assistant's answer cut short: go on from its end (vLLM's
    # name; a peer resuming a stream whose host died sends it).
    continue_final_message: bool = False


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text of choice `index`; `logprobs`: one OpenAI-shaped entry
    per token in it, when asked for."""

    text: str
    index: int = 0
    logprobs: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Timing:
    """When a generation's phases ended, in `time.time_ns()` (the clock spans use): a slot
    took it at `slot_ns` (the queue wait ends, the prefill begins), its first token was
    sampled at `first_ns` (the prefill ends) and it finished at `end_ns`."""

    slot_ns: int
    first_ns: int
    end_ns: int


@dataclass(frozen=True)
class Finished:
    """Always the last item of a generation."""

    finish_reason: Literal["stop", "length"]  # of choice 0
    prompt_tokens: int
    completion_tokens: int  # of all choices together
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache, not evaluated
    finish_reasons: tuple[str, ...] = ()  # per choice, when n > 1
    restored_tokens: int = 0  # of cached_tokens, restored from the host-memory prompt cache
    # None: the engine did not say (traces then guess). A measurement, not an outcome: two
    # generations with the same result are equal whenever they ran.
    timing: Timing | None = field(default=None, compare=False)


Event = TextDelta | Finished


@dataclass(frozen=True)
class Embeddings:
    """The answer of an embedding instance: one unit vector per input."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


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
        self.detail = detail
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
    n_parallel: int = 1  # sequences generated at once
    # Demand measured since the instance last became ready (backends/demand.py); engines
    # call the hooks below, gossip carries `signals()` to the leader's scaling step.
    demand: DemandWindow | None = None

    def _measure_from_ready(self) -> None:
        self.demand = DemandWindow(self.n_parallel, time.monotonic())

    def _demand_depth(self, depth: int) -> None:
        if self.demand is not None:
            self.demand.set_depth(time.monotonic(), depth)

    def _demand_admitted(self, depth: int) -> None:
        if self.demand is not None:
            now = time.monotonic()
            self.demand.admitted(now, self.demand.keep_alive_s)
            self.demand.set_depth(now, depth)

    def _demand_refused(self) -> None:
        if self.demand is not None:
            self.demand.refused(time.monotonic())

    def _demand_first_token(self, since: float) -> None:
        """`since`: time.monotonic() when the request was admitted."""
        if self.demand is not None:
            now = time.monotonic()
            self.demand.first_token(now, now - since)

    def keep_alive(self, seconds: float | None) -> None:
        """A request's keep_alive (Ollama): how long the model stays loaded after the last
        request, from now on (None: the deploy's idle_unload_s; negative: forever)."""
        if self.demand is not None:
            self.demand.keep_alive_s = seconds

    def signals(self) -> Signals | None:
        if self.demand is None or self.state != "ready":
            return None
        return self.demand.signals(time.monotonic())

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

    kind: str = "chat"  # "chat" | "embedding": what the instance was started for

    async def embed(self, inputs: list[str]) -> Embeddings:
        """Embeddings of the inputs; only instances started as "embedding" have them."""
        raise InvalidRequest(f"the model '{self.name}' is not deployed for embeddings")

    @property
    def free_slots(self) -> int:
        """Requests that would start at once (gossip and forwarding prefer more)."""
        return max(0, self.n_parallel - self.queue_depth)

    def admits(self) -> bool:
        """Whether a request now would be queued rather than refused with QueueFull: a peer
        serves its own instance before a free one elsewhere only while this holds."""
        return True


@dataclass(frozen=True)
class EngineSpec:
    """One instance to start on this node, as the cluster asks an engine factory for it."""

    model: str  # the model name clients use
    path: Path  # the model file, already fetched
    gpus: tuple[str, ...] = ()  # node-local device ids ("gpu0"), in the plan's order
    n_ctx: int | None = None  # None: the node's default
    tensor_split: tuple[float, ...] = ()  # proportions per gpu when it spans several
    n_parallel: int | None = None  # slots; None: the engine's default for the device
    kind: str = "chat"  # "chat" | "embedding"
    # A split instance's primary (placement/split.py): llama.cpp RPC servers (loopback
    # tunnels to the helper peers, in layer order), `tensor_split` then holds the layer
    # slots of [rpc devices..., local gpus...], and `host_layers` the first slots, kept on
    # this host's CPU (a primary without a real GPU).
    rpc_servers: tuple[str, ...] = ()
    host_layers: int = 0
    kv_type: str = "f16"  # KV cache type: "f16" | "q8_0" | "q4_0"


# What the wiring (server.py) hands the cluster floor: a spec in, an engine (not started) out.
EngineFactory = Callable[[EngineSpec], Engine]
