"""Transmit-limited broadcast queue (memberlist's TransmitLimitedQueue), pure.

One queued message per member: a newer alive/suspect/dead about a member replaces the
older one. Each packet takes the least-sent messages first (newest first among equals) as
long as they fit; a message is dropped after the retransmit limit (lambda * log N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Queued:
    message: Any
    size: int
    transmits: int
    order: int


class BroadcastQueue:
    def __init__(self) -> None:
        self._items: dict[str, _Queued] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def enqueue(self, key: str, message: Any, size: int) -> None:
        """Queue `message` (encoded size in bytes) about `key`, replacing any older one."""
        self._order += 1
        self._items[key] = _Queued(message, size, 0, self._order)

    def remove(self, key: str) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def pending(self, key: str) -> Any | None:
        item = self._items.get(key)
        return None if item is None else item.message

    def take(self, budget: int, limit: int) -> list[Any]:
        """Messages that fit in `budget` bytes; each taken one counts a transmit."""
        if not self._items or budget <= 0:
            return []
        chosen: list[Any] = []
        ranked = sorted(self._items.items(), key=lambda kv: (kv[1].transmits, -kv[1].order))
        for key, item in ranked:
            if item.size > budget:
                continue
            budget -= item.size
            chosen.append(item.message)
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[key]
        return chosen
