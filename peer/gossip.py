"""The asyncio adapter around the pure membership core: UDP, timers, push-pull over HTTP.

    gossip = Gossip(GossipConfig(), "n1", "127.0.0.1", 7946, Keyring.from_secret(secret),
                    session, seeds=["127.0.0.1:7947"], payload={"gpus": [...]})
    app.add_routes(gossip.routes())            # POST /gossip/pushpull
    async with asyncio.TaskGroup() as tg:
        tg.create_task(gossip.run())
        async for event in gossip.subscribe(): ...   # MemberEvent(kind, member)

It only moves bytes and timers; every decision is the core's (peer/membership.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from random import Random
from typing import Any

import aiohttp
from aiohttp import web

from peer import wire
from peer.config import GossipConfig
from peer.crypto import CryptoError, Envelope, Keyring
from peer.membership import Membership
from peer.messages import (
    ALIVE,
    SUSPECT,
    AppData,
    MemberEvent,
    MemberView,
    Message,
    Packet,
    PushPullRequest,
)
from peer.transport import UdpTransport

log = logging.getLogger(__name__)

PUSH_PULL_PATH = "/gossip/pushpull"
SEED_RETRY_SECONDS = 2.0  # while alone, how often to try the seeds again
MAX_CONCURRENT_PUSH_PULLS = 4
MAX_PENDING_PUSH_PULLS = 64


@dataclass(slots=True)
class GossipMetrics:
    push_pull_ok: int = 0
    push_pull_failed: int = 0  # peer unreachable, timed out or answered an error
    push_pull_rejected: int = 0  # a push-pull reply we could not open (bad key, replay...)
    push_pull_served: int = 0
    push_pull_refused: int = 0  # incoming push-pull we could not open: never admitted
    events_dropped: int = 0  # a subscriber too slow to keep up
    clock_wakeups: int = 0  # times the clock loop ran (it sleeps until the next deadline)


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class Subscription:
    """An async iterator of MemberEvents, registered from the moment it is created."""

    def __init__(self, owner: Gossip, maxsize: int) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[MemberEvent] = asyncio.Queue(maxsize)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> MemberEvent:
        return await self._queue.get()

    def close(self) -> None:
        self._owner._subscribers.discard(self)

    def _offer(self, event: MemberEvent) -> bool:
        try:
            self._queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            return False


class Gossip:
    def __init__(
        self,
        config: GossipConfig,
        node_id: str,
        bind_host: str,
        port: int,
        keyring: Keyring,
        session: aiohttp.ClientSession,
        seeds: Iterable[str | tuple[str, int]] = (),
        payload: dict[str, Any] | None = None,
        *,
        advertise_host: str | None = None,
        rng: Random | None = None,
    ) -> None:
        advertise = advertise_host or bind_host
        if advertise in ("0.0.0.0", "::", ""):
            raise ValueError("binding all interfaces needs advertise_host: the address peers use")
        self.config = config
        self.node_id = node_id
        self.bind_host = bind_host
        self.port = port
        self.session = session
        self.envelope = Envelope(keyring, config.replay_window)
        self.core = Membership(
            config, node_id, advertise, port, rng or Random(), time.monotonic(), payload
        )
        self.transport = UdpTransport(self.envelope, config.packet_size, self._on_messages)
        self.metrics = GossipMetrics()
        self._seeds = [parse_host_port(s) if isinstance(s, str) else s for s in seeds]
        self._subscribers: set[Subscription] = set()
        self._datagram_handlers: dict[int, Callable[[bytes], None]] = {}
        self._wake = asyncio.Event()
        self._sleep_until = float("-inf")  # the deadline the clock sleeps until
        self._push_pulls: asyncio.Queue[tuple[str, int, bool]] = asyncio.Queue(
            MAX_PENDING_PUSH_PULLS
        )

    # ----- what the rest of the peer uses ------------------------------------------------

    def members(self) -> list[MemberView]:
        return self.core.members()

    def subscribe(self, maxsize: int = 1024) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subscribers.add(sub)
        return sub

    def set_payload(self, payload: dict[str, Any]) -> None:
        self.core.set_payload(payload, time.monotonic())
        self._flush()

    def send_datagram(self, node_id: str, channel: int, body: bytes) -> bool:
        """Send `body` to member `node_id`'s handler of `channel` in one sealed datagram
        (AES-GCM, replay-guarded, like gossip's own), at the address gossip knows it by.
        False when it cannot go: an unknown, dead or left member, or a body too big. For
        small messages that may be lost (Raft's heartbeats): no retry, no order."""
        member = self.core.member(node_id)
        if member is None or member.state not in (ALIVE, SUSPECT):
            return False
        if len(body) > wire.MAX_APP_BODY:
            return False
        return self.transport.send_app(member.addr, member.port, AppData(channel, body))

    def on_datagram(self, channel: int, handler: Callable[[bytes], None]) -> None:
        """Call `handler(body)` for every datagram of `channel` that opens and decodes."""
        self._datagram_handlers[channel] = handler

    def report_unreachable(self, node_id: str) -> None:
        """A connection to node_id was refused or reset: suspect it at once (see the core)."""
        if self.core.report_unreachable(node_id, time.monotonic()):
            self._flush()

    def add_peer(self, host: str, port: int, node_id: str | None = None) -> None:
        """A peer found by discovery (or a seed): push-pull with it unless already known alive."""
        if node_id is not None:
            known = self.core.member(node_id)
            if known is not None and known.state == "alive" and known.port == port:
                return
        if node_id == self.node_id:
            return
        self._request_push_pull(host, port, join=True)

    def peer_found(self, node_id: str, host: str, port: int) -> None:
        """Discovery's on_found callback."""
        self.add_peer(host, port, node_id)

    async def leave(self) -> None:
        """Graceful leave (SIGTERM): others see "left" at once instead of "dead" later."""
        self.core.leave(time.monotonic())
        self._flush()
        await asyncio.sleep(self.config.leave_propagate_time)

    def metrics_snapshot(self) -> dict[str, int]:
        """Every counter, flat, for Prometheus (gossip_*, transport_*, membership_*)."""
        out = {f"gossip_{k}": v for k, v in asdict(self.metrics).items()}
        out.update({f"transport_{k}": v for k, v in asdict(self.transport.metrics).items()})
        out.update({f"membership_{k}": v for k, v in asdict(self.core.counters).items()})
        out["membership_awareness"] = self.core.awareness.score
        return out

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PUSH_PULL_PATH, self._serve_push_pull)]

    # ----- the running adapter -----------------------------------------------------------

    async def run(self) -> None:
        await self.transport.open(self.bind_host, self.port)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._clock())
                tg.create_task(self._push_pull_worker())
                tg.create_task(self._join_seeds())
        finally:
            self.transport.close()

    async def _clock(self) -> None:
        while True:
            self.metrics.clock_wakeups += 1
            self.core.tick(time.monotonic())
            self._flush()
            self._wake.clear()  # set again only by what happens while we wait
            self._sleep_until = self.core.next_deadline()
            delay = self._sleep_until - time.monotonic()
            if delay > 0:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally
                # when the wake-up and a cancel land together, losing the cancel, and this
                # loop would then keep the peer from ever shutting down.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def _join_seeds(self) -> None:
        for host, port in self._seeds:
            self._request_push_pull(host, port, join=True)
        while self._seeds:
            await asyncio.sleep(SEED_RETRY_SECONDS)
            if self.core.live_count() <= 1:  # alone: the seeds may have come up since
                for host, port in self._seeds:
                    self._request_push_pull(host, port, join=True)

    async def _push_pull_worker(self) -> None:
        slots = asyncio.Semaphore(MAX_CONCURRENT_PUSH_PULLS)
        async with asyncio.TaskGroup() as tg:
            while True:
                host, port, join = await self._push_pulls.get()
                await slots.acquire()
                tg.create_task(self._push_pull_guarded(host, port, join, slots))

    async def _push_pull_guarded(self, host: str, port: int, join: bool, slots) -> None:
        try:
            await self.push_pull(host, port, join)
        except Exception:  # never let one exchange take the adapter down
            log.exception("gossip: push-pull with %s:%s failed", host, port)
        finally:
            slots.release()

    # ----- push-pull (the one place outgoing HTTP requests are made) -------------------

    async def push_pull(self, host: str, port: int, join: bool = False) -> bool:
        """Exchange full state with host:port over HTTP; True when merged."""
        state = wire.encode_state(self.node_id, self.core.local_state(), join)
        body = self.envelope.seal(state, time.time())
        url = f"http://{_url_host(host)}:{port}{PUSH_PULL_PATH}"
        timeout = aiohttp.ClientTimeout(total=self.config.push_pull_timeout)
        try:
            async with self.session.post(url, data=body, timeout=timeout) as resp:
                if resp.status != 200:
                    self.metrics.push_pull_failed += 1
                    return False
                reply = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.metrics.push_pull_failed += 1
            return False
        try:
            _, records, _ = wire.decode_state(self.envelope.open(reply, time.time()))
        except (CryptoError, wire.DecodeError):
            self.metrics.push_pull_rejected += 1
            return False
        self.metrics.push_pull_ok += 1
        self.core.merge_remote_state(records, time.monotonic())
        self._flush()
        return True

    async def _serve_push_pull(self, request: web.Request) -> web.Response:
        data = await request.read()
        try:
            _, records, _ = wire.decode_state(self.envelope.open(data, time.time()))
        except (CryptoError, wire.DecodeError) as exc:
            self.metrics.push_pull_refused += 1
            reason = exc.reason if isinstance(exc, CryptoError) else "malformed"
            if isinstance(exc, CryptoError) and reason == "bad_key":
                self.transport.metrics.rejected_bad_key += 1
            return web.json_response(
                {"error": {"message": f"push-pull refused: {reason}", "type": "forbidden"}},
                status=403,
            )
        reply = wire.encode_state(self.node_id, self.core.local_state(), False)
        self.core.merge_remote_state(records, time.monotonic())
        self._flush()
        self.metrics.push_pull_served += 1
        return web.Response(
            body=self.envelope.seal(reply, time.time()), content_type="application/octet-stream"
        )

    # ----- plumbing ----------------------------------------------------------------------

    def _on_messages(self, host: str, port: int, messages: list[Message]) -> None:
        if any(isinstance(m, AppData) for m in messages):
            for m in messages:
                if isinstance(m, AppData) and m.channel in self._datagram_handlers:
                    self._datagram_handlers[m.channel](m.body)
            messages = [m for m in messages if not isinstance(m, AppData)]
            if not messages:
                return
        self.core.receive(host, port, messages, time.monotonic())
        self._flush()

    def _request_push_pull(self, host: str, port: int, join: bool) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._push_pulls.put_nowait((host, port, join))

    def _flush(self) -> None:
        for out in self.core.take_outputs():
            if isinstance(out, Packet):
                self.transport.send(out.addr, out.port, out.messages)
            elif isinstance(out, PushPullRequest):
                self._request_push_pull(out.addr, out.port, False)
        for event in self.core.take_events():
            for sub in list(self._subscribers):
                if not sub._offer(event):
                    self.metrics.events_dropped += 1
        # Wake the clock only if something is now due sooner than it sleeps for (a queued
        # broadcast, a probe's ack): a ping answered or an unchanged payload set changes
        # no deadline, and waking for each was most of the clock's wake-ups.
        if self.core.next_deadline() < self._sleep_until:
            self._wake.set()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
