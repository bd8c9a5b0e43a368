"""Saved KV state of sequences in host memory, beyond the slots. Pure: no clocks or I/O.

A slot keeps its conversation's cells until another request takes it. With more
conversations than slots (8 chats on a replica of 4 slots), each reuse of a slot threw a
history away, and its next turn paid the whole prefill again. llama-server keeps such
prompts in RAM (`--cache-ram`); so does this: before a slot is given to another prompt,
the worker saves the sequence's state (`llama_state_seq_get_data`) here, keyed by its
tokens; a later prompt that shares a longer prefix with an entry than with any free slot
gets it restored into its slot (`llama_state_seq_set_data`) and evaluates only the rest.

Bounded by bytes, least recently used out first. The data is opaque here (a ctypes
buffer in the worker); only its length counts. An entry is moved out on restore: the slot
holds it then, and saves it again when it is taken from it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sized
from typing import Generic, TypeVar

from aivailable.backends.scheduler import common_prefix

D = TypeVar("D", bound=Sized)

# A sequence shorter than this is not worth a save: restoring it saves less prefill than
# the copy costs, and a chat's system prompt alone is about this long.
MIN_SAVED_TOKENS = 64


class PromptCache(Generic[D]):
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], D] = OrderedDict()  # oldest first
        self.bytes_used = 0
        self.saves = 0
        self.restores = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: tuple[int, ...]) -> bool:
        return tokens in self._entries

    def worth_saving(self, tokens: tuple[int, ...] | list[int], kept: int) -> bool:
        """Whether a slot's cells are worth saving before all but `kept` are dropped."""
        return self.max_bytes > 0 and len(tokens) - kept >= MIN_SAVED_TOKENS

    def put(self, tokens: tuple[int, ...], data: D) -> bool:
        """Keep `data` as the state of `tokens`; False when it can never fit. Entries that
        are a prefix of `tokens` go (this one serves every prompt they served); when
        `tokens` is itself a prefix of an entry, that entry serves it already."""
        size = len(data)
        if size > self.max_bytes or not tokens:
            return False
        for key in list(self._entries):
            if len(key) >= len(tokens) and key[: len(tokens)] == tokens:
                self._entries.move_to_end(key)
                return True
            if len(key) < len(tokens) and tokens[: len(key)] == key:
                self._drop(key)
        while self.bytes_used + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[tokens] = data
        self.bytes_used += size
        self.saves += 1
        return True

    def best(self, prompt: tuple[int, ...] | list[int]) -> tuple[tuple[int, ...], int] | None:
        """The entry sharing the longest prefix with `prompt` and that length, or None."""
        found, length = None, 0
        for key in self._entries:
            n = common_prefix(key, prompt)
            if n > length:
                found, length = key, n
        return (found, length) if found is not None else None

    def take(self, tokens: tuple[int, ...]) -> D:
        """Move an entry out (to be restored into a slot)."""
        data = self._entries[tokens]
        self._drop(tokens)
        self.restores += 1
        return data

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes_used -= len(self._entries.pop(key))
