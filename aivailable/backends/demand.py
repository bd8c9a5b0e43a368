"""How busy one instance is, measured over sliding windows: the demand signals that the
leader's scaling step reads (aivailable/cluster/scaling.py) once gossip carried them there.

Pure (DESIGN.md rule 1): every method takes `now` in seconds, from whatever clock the
caller keeps (the engine: its event loop's; the simulation: virtual time), so the same
code runs in the engines and in tests/sim/cluster_sim.py.

Two windows: a short one (`window_s`, the scale-up window) for occupancy, queue, refusals,
TTFT and the request rate, and a long one (`long_s`, the scale-down window) for occupancy
only, so that adding a replica reacts within about 30 s while removing one waits for
minutes of low load.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# Seconds of the short window: a load step shows in the mean occupancy within this time.
WINDOW_S = 30.0
# Seconds of the long window: a replica is removed only after this long under a low mark.
LONG_S = 180.0
# Seconds per step of the long window: its occupancy is the highest of these steps'.
STEP_S = 10.0


@dataclass(frozen=True)
class Signals:
    """One instance's demand at one moment. Rounded (see `wire`) before it is gossiped,
    so a steady instance does not change its payload every refresh."""

    occupancy: float = 0.0  # busy slots / slots, mean over the short window (0..1)
    # The highest occupancy of any 10 s of the long window: below a low mark only when
    # the instance stayed below it for the whole window, not just on average.
    occupancy_long: float = 0.0
    queue_depth: float = 0.0  # requests waiting for a slot, mean over the short window
    refused: int = 0  # admission refusals (429) in the short window
    refusing_s: int = 0  # whole seconds of the short window that had a refusal
    ttft_p90: float | None = None  # seconds to the first token, p90 over the short window
    rpm: float = 0.0  # requests admitted per minute, over the short window
    idle_s: float = 0.0  # seconds without a request in flight (0 while one runs)
    age_s: float = 0.0  # seconds since the instance started measuring (became ready)
    active: int = 0  # requests waiting or running now
    keep_alive_s: float | None = None  # the last request's keep_alive (None: the deploy's)

    def wire(self) -> list:
        """A short msgpack-friendly list; times in whole seconds, idle and age in steps of
        5 s (an idle instance changes its payload every 5 s, not every 0.1 s refresh)."""
        return [
            round(self.occupancy, 2),
            round(self.occupancy_long, 2),
            round(self.queue_depth, 1),
            self.refused,
            None if self.ttft_p90 is None else round(self.ttft_p90, 1),
            round(self.rpm),
            5 * math.floor(self.idle_s / 5),
            5 * math.floor(self.age_s / 5),
            self.active,
            self.keep_alive_s,
            self.refusing_s,
        ]

    @classmethod
    def from_wire(cls, data: object) -> Signals | None:
        """Read a `wire` list back; None when it is not one (a peer of another version)."""
        if not isinstance(data, list | tuple) or len(data) < 10:
            return None
        occ, occ_long, queue, refused, ttft, rpm, idle, age, active, keep = data[:10]
        refusing = int(data[10]) if len(data) > 10 else 0
        return cls(
            occupancy=float(occ),
            occupancy_long=float(occ_long),
            queue_depth=float(queue),
            refused=int(refused),
            refusing_s=refusing,
            ttft_p90=None if ttft is None else float(ttft),
            rpm=float(rpm),
            idle_s=float(idle),
            age_s=float(age),
            active=int(active),
            keep_alive_s=None if keep is None else float(keep),
        )


class DemandWindow:
    """The measurements of one instance. The engine calls `set_depth` whenever its count
    of requests waiting or running changes, `admitted`/`refused` at admission,
    `first_token` when a request's first token arrives; `signals(now)` sums them up."""

    def __init__(
        self, n_parallel: int, now: float, window_s: float = WINDOW_S, long_s: float = LONG_S
    ) -> None:
        self.n_parallel = max(1, n_parallel)
        self.window_s = window_s
        self.long_s = max(long_s, window_s)
        self.started = now
        self._depth = 0
        self._idle_since: float | None = now
        # (time, depth from then on): the integral of busy slots and queue is read from it.
        self._changes: deque[tuple[float, int]] = deque([(now, 0)])
        self._admitted: deque[float] = deque()
        self._refused: deque[float] = deque()
        self._ttft: deque[tuple[float, float]] = deque()
        self.keep_alive_s: float | None = None

    # --- events --------------------------------------------------------------------------

    def set_depth(self, now: float, depth: int) -> None:
        depth = max(0, depth)
        if depth == self._depth:
            return
        if depth and not self._depth:
            self._idle_since = None
        elif not depth:
            self._idle_since = now
        self._depth = depth
        self._changes.append((now, depth))
        self._prune(now)

    def admitted(self, now: float, keep_alive_s: float | None = None) -> None:
        """A request was taken; `keep_alive_s`: what it asked the model to stay loaded for
        after it (Ollama's keep_alive), None: the deploy's idle_unload_s."""
        self._admitted.append(now)
        self.keep_alive_s = keep_alive_s
        if self._depth == 0:
            self._idle_since = now  # counted from here even if set_depth never follows
        self._prune(now)

    def refused(self, now: float) -> None:
        self._refused.append(now)
        self._prune(now)

    def first_token(self, now: float, ttft_s: float) -> None:
        self._ttft.append((now, max(0.0, ttft_s)))
        self._prune(now)

    # --- reading -------------------------------------------------------------------------

    def signals(self, now: float) -> Signals:
        self._prune(now)
        short = self._span(now, self.window_s)
        busy, queued = self._integral(now - self.window_s, now)
        peak = self._peak(now)
        ttfts = sorted(t for at, t in self._ttft if at > now - self.window_s)
        p90 = ttfts[min(len(ttfts) - 1, math.ceil(0.9 * len(ttfts)) - 1)] if ttfts else None
        admitted = sum(1 for at in self._admitted if at > now - self.window_s)
        recent_refusals = [at for at in self._refused if at > now - self.window_s]
        idle = 0.0 if self._idle_since is None else now - self._idle_since
        return Signals(
            occupancy=busy / (short * self.n_parallel) if short > 0 else 0.0,
            occupancy_long=peak,
            queue_depth=queued / short if short > 0 else 0.0,
            refused=sum(1 for at in recent_refusals),
            refusing_s=len({math.floor(at) for at in recent_refusals}),
            ttft_p90=p90,
            rpm=admitted * 60.0 / max(short, 1.0),
            idle_s=max(0.0, idle) if self._depth == 0 else 0.0,
            age_s=max(0.0, now - self.started),
            active=self._depth,
            keep_alive_s=self.keep_alive_s,
        )

    def _span(self, now: float, window: float) -> float:
        """The part of the window this instance has lived (a new one averages over less)."""
        return max(0.0, min(window, now - self.started))

    def _integral(self, start: float, end: float) -> tuple[float, float]:
        """Slot-seconds busy and request-seconds queued over [start, end]."""
        start = max(start, self.started)
        busy = queued = 0.0
        points = list(self._changes)
        for i, (t, depth) in enumerate(points):
            until = points[i + 1][0] if i + 1 < len(points) else end
            lo, hi = max(t, start), min(until, end)
            if hi > lo:
                busy += (hi - lo) * min(depth, self.n_parallel)
                queued += (hi - lo) * max(0, depth - self.n_parallel)
        return busy, queued

    def _peak(self, now: float) -> float:
        """The highest occupancy of the long window's STEP_S steps (counted back from now),
        in one pass over the changes."""
        steps = math.ceil(self.long_s / STEP_S)
        busy = [0.0] * steps
        start = max(now - steps * STEP_S, self.started)
        points = list(self._changes)
        for i, (t, depth) in enumerate(points):
            lo = max(t, start)
            hi = min(points[i + 1][0] if i + 1 < len(points) else now, now)
            used = min(depth, self.n_parallel)
            while hi > lo and used:  # from hi back to lo, one step at a time
                k = min(steps - 1, int((now - hi) // STEP_S))
                bottom = max(lo, now - (k + 1) * STEP_S)
                if bottom >= hi:  # float rounding at a step's edge
                    bottom = lo
                busy[k] += (hi - bottom) * used
                hi = bottom
        peak = 0.0
        for k in range(steps):
            span = min(now - k * STEP_S, now) - max(now - (k + 1) * STEP_S, self.started)
            if span <= 0:
                break
            peak = max(peak, busy[k] / (span * self.n_parallel))
        return peak

    def _prune(self, now: float) -> None:
        horizon = now - self.long_s
        # Keep the last change before the horizon: it says the depth at the horizon.
        while len(self._changes) > 1 and self._changes[1][0] <= horizon:
            self._changes.popleft()
        for times in (self._admitted, self._refused):
            while times and times[0] <= now - self.window_s:
                times.popleft()
        while self._ttft and self._ttft[0][0] <= now - self.window_s:
            self._ttft.popleft()
