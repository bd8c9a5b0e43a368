"""What ends the forwarder's wait for a replica (peer/forward.py): a stall, the request's
deadline, or gossip's word on its host, all checked by one shared tick."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from peer.upstream import UpstreamResponse


class Watch:
    """What ends the wait for one replica: it stalls past its limit, the request's deadline
    passes, or gossip declares its host dead (or suspect, when `leave_suspect`: another
    replica can serve). Before the first byte it fires `cm` (the attempt's asyncio.timeout);
    once streaming it closes the upstream response, so the pending read raises. `why` says
    which. Checked by the Forwarder's one shared tick (`Watches`), not a timer each."""

    def __init__(
        self, node_id: str, limit_s: float, deadline: float, leave_suspect: bool, now: float
    ):
        self._node_id = node_id
        self._limit_s = limit_s
        self._deadline = deadline
        self.leave_suspect = leave_suspect
        self.last = now
        self.progressed = False  # a chunk arrived since the last check (no clock read per token)
        self._cm: asyncio.Timeout | None = None
        self._upstream: UpstreamResponse | None = None
        self.why = ""

    def waiting(self, cm: asyncio.Timeout) -> None:
        self._cm = cm

    def streaming(self, upstream: UpstreamResponse, stall_s: float) -> None:
        self._cm, self._upstream = None, upstream
        self._limit_s, self.leave_suspect = stall_s, False
        self.progressed = True

    def check(self, now: float, member_state: Callable[[str], str]) -> bool:
        """Fires (and says True) when the wait must end."""
        if self.progressed:
            self.last, self.progressed = now, False
        state = member_state(self._node_id)
        if state in ("dead", "left") or (state == "suspect" and self.leave_suspect):
            self.why = f"gossip declared it {state}"
        elif now >= self._deadline:
            self.why = "timed out: past the request's deadline"
        elif now >= self.last + self._limit_s:
            self.why = f"timed out: silent for {self._limit_s:g}s"
        else:
            return False
        if self._cm is not None:
            self._cm.reschedule(now)  # the awaited request or first read raises TimeoutError
        elif self._upstream is not None:
            self._upstream.close()  # the pending chunk read raises
        return True


class Watches:
    """Every in-flight wait, checked together every `check_s` while there are any: one
    timer for all the streams a peer relays, instead of one re-armed per request (which
    cost a hop more than the check). A limit fires at most `check_s` late."""

    def __init__(self, member_state: Callable[[str], str], check_s: float):
        self._member_state = member_state
        self._check_s = check_s
        self._live: set[Watch] = set()
        self._handle: asyncio.TimerHandle | None = None

    def start(self, node_id: str, limit_s: float, deadline: float, leave_suspect: bool) -> Watch:
        loop = asyncio.get_running_loop()
        watch = Watch(node_id, limit_s, deadline, leave_suspect, loop.time())
        self._live.add(watch)
        if self._handle is None:
            self._handle = loop.call_later(self._check_s, self._tick)
        return watch

    def stop(self, watch: Watch) -> None:
        self._live.discard(watch)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._live.difference_update([w for w in self._live if w.check(now, self._member_state)])
        self._handle = loop.call_later(self._check_s, self._tick) if self._live else None
