"""The batch scheduler's decisions, apart from llama.cpp. Pure: a sans-IO core.

One worker decodes many sequences at once (continuous batching, as llama.cpp's server
does). Each step the worker asks this core for a `Step`: which KV cells to drop or copy,
and which tokens go into the one `llama_batch` it decodes: the next token of every
decoding sequence first, then chunks of pending prompts under a token budget (chunked
prefill), so a long prompt delays the others' next token by at most one chunk. After
decoding and sampling, the worker reports each sampled token back with `accept()`.

Slots are llama.cpp sequence ids over one unified KV cache. A slot keeps the tokens its
cells hold after its request ends, so the next request whose prompt shares a prefix with
them (a chat resends its whole history each turn) evaluates only the rest.

No clocks, threads or I/O here (DESIGN.md rule 1): `Admission` takes times as arguments.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aivailable.backends.prompt_cache import PromptCache


# Tokens a restore from the prompt cache must save over the slot's own prefix: below
# this, prefilling them costs less than copying a whole saved sequence in.
MIN_RESTORE_GAIN = 32


class Unschedulable(ValueError):
    """This request can never run on this scheduler, whatever else runs."""


class PromptTooLong(Unschedulable):
    """The prompt does not fit one sequence's context (a context overflow)."""


@dataclass(frozen=True)
class SeqRequest:
    """What the scheduler needs of a request: its id, prompt tokens and limits."""

    id: int
    prompt: tuple[int, ...]
    max_tokens: int  # tokens to generate per choice at most
    n: int = 1  # choices: the prompt is evaluated once and its cells copied


@dataclass(frozen=True)
class Token:
    """One entry of the batch: `token` at `pos` of sequence `seq`. When `sample_for` is
    not empty, llama.cpp keeps this row's logits and each listed slot samples from it."""

    seq: int
    token: int
    pos: int
    sample_for: tuple[int, ...] = ()


@dataclass(frozen=True)
class Started:
    """A request got its slots; `reused` prompt tokens came from the prefix cache."""

    request_id: int
    slots: tuple[int, ...]  # slot i serves choice i
    reused: int
    restored: int = 0  # of `reused`, tokens restored from the host-memory prompt cache


@dataclass
class Step:
    """What to do this step, in order: copies, saves, restores, trims, then decode
    `tokens`."""

    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, n_cells)
    # (seq, tokens): save the seq's state into the prompt cache under its tokens
    saves: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    # (seq, data): the state taken from the prompt cache, to restore into seq
    restores: list[tuple[int, object]] = field(default_factory=list)
    trims: list[tuple[int, int]] = field(default_factory=list)  # (seq, p0): drop cells >= p0
    tokens: list[Token] = field(default_factory=list)
    started: list[Started] = field(default_factory=list)


@dataclass
class _Slot:
    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose cells this seq holds
    request: SeqRequest | None = None
    choice: int = 0
    pending: deque[int] = field(default_factory=deque)  # prompt tokens still to evaluate
    last: int | None = None  # the sampled token to decode next
    generated: int = 0
    # Order of last use (a counter, strictly increasing): recently used prefixes are kept
    # longer, and prompts waiting for the budget take turns, least recently served first.
    used_at: int = 0

    @property
    def free(self) -> bool:
        return self.request is None


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Slots, the waiting queue and the composition of each batch."""

    def __init__(
        self,
        n_parallel: int,
        n_ctx: int,
        batch_tokens: int,
        max_waiting: int = 64,
        prompt_cache: PromptCache | None = None,
    ):
        """`n_ctx`: positions per sequence. `batch_tokens`: tokens per decode at most
        (llama.cpp's n_batch). `max_waiting`: requests queued for a slot at most.
        `prompt_cache`: where slots' evicted sequences are saved (None: nowhere); the
        worker fills it with the data of each step's `saves`."""
        if n_parallel < 1 or n_ctx < 2 or batch_tokens < 1:
            raise ValueError("n_parallel >= 1, n_ctx >= 2 and batch_tokens >= 1 are required")
        self.n_ctx = n_ctx
        self.batch_tokens = batch_tokens
        self.max_waiting = max_waiting
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self.waiting: deque[SeqRequest] = deque()
        self._uses = 0  # the used_at counter
        self._copy_from: dict[int, int] = {}  # sibling slot -> slot holding the prompt
        self.prompt_cache = prompt_cache

    # --- requests in and out ------------------------------------------------------------

    def check(self, request: SeqRequest) -> None:
        """Raise Unschedulable if this request can never run here: refused before it
        takes a slot."""
        if not request.prompt:
            raise Unschedulable("the prompt is empty")
        if len(request.prompt) >= self.n_ctx:
            raise PromptTooLong(
                f"the prompt has {len(request.prompt)} tokens; this model's context holds "
                f"{self.n_ctx} (prompt and answer together)"
            )
        if request.n > len(self.slots):
            raise Unschedulable(f"n={request.n} is more than this model's {len(self.slots)} slots")

    def submit(self, request: SeqRequest) -> bool:
        """Queue a request; False if the waiting queue is full (Unschedulable if it can
        never run)."""
        self.check(request)
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(request)
        return True

    def cancel(self, request_id: int) -> bool:
        """Drop a request, waiting or running; its slots' evaluated cells stay cached."""
        for request in list(self.waiting):
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        found = False
        for slot in self.slots:
            if slot.request is not None and slot.request.id == request_id:
                self._release(slot)
                found = True
        return found

    def finish(self, slot_index: int) -> None:
        """This choice is done (a stop string, EOS, a limit): the slot frees at once."""
        self._release(self.slots[slot_index])

    def forget_cache(self) -> None:
        """The KV cells were cleared: no slot's prefix can be reused any more."""
        for slot in self.slots:
            slot.cached = []

    def _release(self, slot: _Slot) -> None:
        slot.request = None
        slot.pending.clear()
        slot.last = None
        self._copy_from.pop(slot.index, None)

    # --- state for admission and gossip -------------------------------------------------

    @property
    def free_slots(self) -> int:
        return sum(slot.free for slot in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(not slot.free for slot in self.slots)

    def request_of(self, slot_index: int) -> SeqRequest | None:
        return self.slots[slot_index].request

    def choice_of(self, slot_index: int) -> int:
        return self.slots[slot_index].choice

    # --- one step -----------------------------------------------------------------------

    def next_step(self) -> Step:
        """Assign waiting requests to free slots, then compose the next batch."""
        step = Step()
        # Copies first: a source that finished at once may be reassigned (and trimmed)
        # below, but its prompt's cells are intact until then.
        for sibling, source in list(self._copy_from.items()):
            if not self.slots[source].pending and self.slots[sibling].last is not None:
                n_cells = len(self.slots[sibling].request.prompt)
                step.copies.append((source, sibling, n_cells))
                self.slots[sibling].cached = list(self.slots[source].cached[:n_cells])
                del self._copy_from[sibling]
        self._assign(step)
        budget = self.batch_tokens
        for slot in self.slots:  # decoding sequences first: one token each
            if slot.request is not None and slot.last is not None and budget > 0:
                step.tokens.append(Token(slot.index, slot.last, len(slot.cached), (slot.index,)))
                slot.cached.append(slot.last)
                slot.last = None
                self._touch(slot)
                budget -= 1
        # Then prompt chunks, oldest assignment first, while the budget lasts.
        for slot in sorted(self.slots, key=lambda s: s.used_at):
            if slot.request is None or not slot.pending or budget <= 0:
                continue
            take = min(budget, len(slot.pending))
            for k in range(take):
                token = slot.pending.popleft()
                last = k == take - 1 and not slot.pending
                sample_for = self._sample_group(slot) if last else ()
                step.tokens.append(Token(slot.index, token, len(slot.cached), sample_for))
                slot.cached.append(token)
            self._touch(slot)
            budget -= take
        return step

    def _sample_group(self, source: _Slot) -> tuple[int, ...]:
        """The slots that sample from the prompt's last logits: the source and its siblings."""
        siblings = [s for s, src in self._copy_from.items() if src == source.index]
        return (source.index, *sorted(siblings, key=lambda s: self.slots[s].choice))

    def _assign(self, step: Step) -> None:
        while self.waiting and self.free_slots >= self.waiting[0].n:
            request = self.waiting.popleft()
            free = [s for s in self.slots if s.free]
            # The free slot sharing the longest prefix; ties go to the least recently used,
            # so the prefixes of recent conversations stay cached longest.
            source = max(free, key=lambda s: (common_prefix(s.cached, request.prompt), -s.used_at))
            keep = min(common_prefix(source.cached, request.prompt), len(request.prompt) - 1)
            restored = self._from_ram(step, source, request, keep)
            keep = max(keep, restored)
            self._occupy(source, request, 0)
            step.trims.append((source.index, keep))  # always: cheap, and never stale cells
            del source.cached[keep:]
            source.pending.extend(request.prompt[keep:])
            chosen = [source.index]
            others = sorted((s for s in free if s is not source), key=lambda s: s.used_at)
            for choice, sibling in enumerate(others[: request.n - 1], start=1):
                if self.prompt_cache is not None and self.prompt_cache.worth_saving(
                    sibling.cached, 0
                ):
                    step.saves.append((sibling.index, tuple(sibling.cached)))
                self._occupy(sibling, request, choice)
                step.trims.append((sibling.index, 0))
                sibling.cached = []
                self._copy_from[sibling.index] = source.index
                chosen.append(sibling.index)
            step.started.append(Started(request.id, tuple(chosen), keep, restored))

    def _from_ram(self, step: Step, slot: _Slot, request: SeqRequest, keep: int) -> int:
        """Save what `slot` is about to lose, and restore a longer prefix of the prompt
        than `keep` from the prompt cache into it: the tokens restored (0: none)."""
        cache = self.prompt_cache
        if cache is None:
            return 0
        if cache.worth_saving(slot.cached, keep):
            step.saves.append((slot.index, tuple(slot.cached)))
        found = cache.best(request.prompt)
        if found is None:
            return 0
        tokens, shared = found
        shared = min(shared, len(request.prompt) - 1)  # the last token is decoded to sample
        if shared - keep < MIN_RESTORE_GAIN:
            return 0
        step.restores.append((slot.index, cache.take(tokens)))
        slot.cached = list(tokens)
        return shared

    def _occupy(self, slot: _Slot, request: SeqRequest, choice: int) -> None:
        slot.request = request
        slot.choice = choice
        slot.generated = 0
        slot.last = None
        self._touch(slot)

    def _touch(self, slot: _Slot) -> None:
        # A count, not the step number: a slot taken in this step ranks ahead of one served
        # after it in the same step; with a tie, one long prompt took the budget twice.
        self._uses += 1
        slot.used_at = self._uses

    # --- after decoding -----------------------------------------------------------------

    def accept(self, slot_index: int, token: int, end_of_generation: bool) -> str | None:
        """The token sampled for this slot. Returns a finish reason ("stop", "length")
        when the choice ends here (the slot is then free), else None."""
        slot = self.slots[slot_index]
        request = slot.request
        if request is None:
            raise ValueError(f"slot {slot_index} has no request")
        if end_of_generation:
            self._release(slot)
            return "stop"
        slot.generated += 1
        # The token is returned to the client; it is decoded next step only if another
        # follows, and the sequence may not outgrow its share of the context.
        if slot.generated >= request.max_tokens or len(slot.cached) + 1 >= self.n_ctx:
            self._release(slot)
            return "length"
        slot.last = token
        return None


@dataclass
class Admission:
    """Admit a request only if it can start within `max_wait` seconds.

    The wait is estimated from the free slots, the requests ahead and the measured time
    a request holds a slot (an exponential moving average of finished requests).
    """

    n_parallel: int
    max_wait: float  # seconds a request may wait for a slot
    hold_estimate: float = 2.0  # seconds a slot is held, until measured
    weight: float = 0.2  # of each new measurement in the average

    def record(self, held_seconds: float) -> None:
        if held_seconds >= 0:
            self.hold_estimate += self.weight * (held_seconds - self.hold_estimate)

    def expected_wait(self, in_flight: int) -> float:
        """Seconds until a new request starts, with `in_flight` admitted requests ahead."""
        if in_flight < self.n_parallel:
            return 0.0
        rounds = math.floor((in_flight - self.n_parallel) / self.n_parallel) + 1
        return rounds * self.hold_estimate

    def retry_after(self, in_flight: int) -> float | None:
        """None to admit; else the seconds to tell the client to wait (>= 1)."""
        wait = self.expected_wait(in_flight)
        if wait <= self.max_wait:
            return None
        return max(1.0, math.ceil(wait - self.max_wait))
