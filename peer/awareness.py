"""Lifeguard local health awareness (memberlist's awareness.go), pure.

A node that misses acks and nacks is more likely to be the slow one than its targets are;
its score rises and it scales its own probe interval and timeout, so it accuses others less.
"""

from __future__ import annotations


class Awareness:
    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max(1, max_multiplier)
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        self.score = min(self.max_multiplier - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
