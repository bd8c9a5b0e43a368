"""Lifeguard suspicion timer (memberlist's suspicion.go), pure.

The timer starts at the maximum and shrinks logarithmically towards the minimum as
independent members confirm the suspicion: one suspector alone waits long (it may be the
one with the bad link), several agreeing members declare death quickly.
"""

from __future__ import annotations

import math


def suspicion_timeout(confirmations: int, needed: int, low: float, high: float) -> float:
    """Timeout in seconds after `confirmations` of the `needed` independent confirmations."""
    if needed <= 0:
        return low
    frac = math.log(confirmations + 1.0) / math.log(needed + 1.0)
    raw = high - frac * (high - low)
    return max(low, math.floor(raw * 1000.0) / 1000.0)


class Suspicion:
    """One suspected member: who suspects it and when it is to be declared dead."""

    __slots__ = ("start", "needed", "low", "high", "suspectors", "confirmations", "deadline")

    def __init__(self, suspector: str, needed: int, low: float, high: float, now: float):
        self.start = now
        self.needed = needed
        self.low = low
        self.high = high
        self.suspectors = {suspector}
        self.confirmations = 0
        self.deadline = now + suspicion_timeout(0, needed, low, high)

    def confirm(self, suspector: str) -> bool:
        """Count an independent confirmation; True if it was new (and should be re-gossiped)."""
        if self.confirmations >= self.needed or suspector in self.suspectors:
            return False
        self.suspectors.add(suspector)
        self.confirmations += 1
        timeout = suspicion_timeout(self.confirmations, self.needed, self.low, self.high)
        self.deadline = self.start + timeout
        return True
