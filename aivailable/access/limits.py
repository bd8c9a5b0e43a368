"""Requests and tokens per minute per key, counted cluster-wide. Pure: time comes in as `now`.

Each peer counts what its own clients used in one-second buckets over the last minute and
gossips the sums; a peer admits a request while its own count plus the others' last gossiped
counts stay under the key's limit. The others' counts are as old as gossip is slow (about a
second), which is the "within 20%" the limits promise at a per-minute scale.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping

from aivailable.cluster.keys import KeyRecord

WINDOW_S = 60  # the limits are per minute
# Keys in one gossip payload (about 25 bytes each): bounds the payload under any load; the
# keys in use at once on one peer beyond this are counted locally only.
MAX_PUBLISHED = 64


class _Window:
    """One key's use on this peer: (second, requests, tokens) buckets, at most WINDOW_S."""

    def __init__(self) -> None:
        self.buckets: collections.deque[list[int]] = collections.deque()

    def add(self, second: int, requests: int, tokens: int) -> None:
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += requests
            self.buckets[-1][2] += tokens
        else:
            self.buckets.append([second, requests, tokens])

    def sums(self, second: int) -> tuple[int, int, float]:
        """(requests, tokens, seconds until the oldest bucket leaves the window)."""
        while self.buckets and self.buckets[0][0] <= second - WINDOW_S:
            self.buckets.popleft()
        if not self.buckets:
            return 0, 0, 0.0
        req = sum(b[1] for b in self.buckets)
        tok = sum(b[2] for b in self.buckets)
        return req, tok, float(self.buckets[0][0] + WINDOW_S - second)


class RateLimiter:
    def __init__(self) -> None:
        self._local: dict[str, _Window] = {}
        self._remote: dict[str, dict[str, tuple[int, int, float]]] = {}  # peer -> key -> use
        # Since start, per key id: what /metrics and `keys list` show.
        self.requests: collections.Counter[str] = collections.Counter()
        self.tokens: collections.Counter[str] = collections.Counter()
        # Per key id: the token bounds of its requests running on this peer (`reserve`).
        self._held: collections.Counter[str] = collections.Counter()

    def _used(self, key_id: str, now: float) -> tuple[int, int, float]:
        window = self._local.get(key_id)
        req, tok, wait = window.sums(int(now)) if window else (0, 0, 0.0)
        for use in self._remote.values():
            r, t, w = use.get(key_id, (0, 0, 0.0))
            req, tok = req + r, tok + t
            if r or t:
                wait = min(wait, w) if wait else w
        return req, tok, wait

    def admit(self, key: KeyRecord, now: float) -> float | None:
        """None and the request counted, or the seconds to wait (Retry-After)."""
        if key.rpm or key.tpm:
            req, tok, wait = self._used(key.id, now)
            if (key.rpm and req >= key.rpm) or (key.tpm and tok >= key.tpm):
                return max(1.0, math.ceil(wait or 1.0))
        self._local.setdefault(key.id, _Window()).add(int(now), 1, 0)
        self.requests[key.id] += 1
        return None

    def reserve(self, key: KeyRecord, bound: int, now: float) -> float | None:
        """A request about to run that may cost up to `bound` tokens: None and the bound
        held against the key's tpm until `settle`, or the seconds to wait. Holding the bound
        keeps a burst of concurrent requests from all passing before any of them is charged;
        a request is refused only once the key's tokens (used and held) reach its tpm."""
        if key.tpm:
            _, tok, wait = self._used(key.id, now)
            if tok + self._held[key.id] >= key.tpm:
                return max(1.0, math.ceil(wait or 1.0))
        self._held[key.id] += bound
        return None

    def settle(self, key: KeyRecord, reserved: int, tokens: int, now: float) -> None:
        """A request that reserved `reserved` tokens is over and cost `tokens`."""
        self._held[key.id] = max(0, self._held[key.id] - reserved)
        if not self._held[key.id]:
            del self._held[key.id]
        self.spent(key, tokens, now)

    def spent(self, key: KeyRecord, tokens: int, now: float) -> None:
        """Tokens a finished request used, counted against the key's tpm."""
        if tokens <= 0:
            return
        self._local.setdefault(key.id, _Window()).add(int(now), 0, tokens)
        self.tokens[key.id] += tokens

    def usage(self, key_id: str, now: float) -> tuple[int, int]:
        """(requests, tokens) of the last minute, all peers together."""
        req, tok, _ = self._used(key_id, now)
        return req, tok

    def local_use(self, now: float) -> dict[str, list]:
        """This peer's use in the window, for its gossip payload: {key id: [req, tok, wait]}."""
        out = {}
        for key_id, window in list(self._local.items()):
            req, tok, wait = window.sums(int(now))
            if not req and not tok:
                del self._local[key_id]
            elif len(out) < MAX_PUBLISHED:
                out[key_id] = [req, tok, int(wait)]  # whole seconds: fewer payload changes
        return out

    def set_remote(self, peers: Iterable[tuple[str, Mapping]]) -> None:
        """The other peers' gossiped use; malformed entries are ignored."""
        remote = {}
        for peer, use in peers:
            if not isinstance(use, Mapping):
                continue
            clean = {}
            for key_id, value in list(use.items())[:MAX_PUBLISHED]:
                if (
                    isinstance(value, list | tuple)
                    and len(value) == 3
                    and all(isinstance(v, int | float) and v >= 0 for v in value)
                ):
                    clean[str(key_id)] = (int(value[0]), int(value[1]), float(value[2]))
            remote[peer] = clean
        self._remote = remote

    def forget(self, live_ids: Iterable[str]) -> None:
        """Drop the counters of revoked keys."""
        live = set(live_ids)
        for key_id in [k for k in self._local if k not in live]:
            del self._local[key_id]
        for counter in (self.requests, self.tokens):
            for key_id in [k for k in counter if k not in live]:
                del counter[key_id]
