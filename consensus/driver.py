"""RaftDriver: the asyncio adapter around the pure RaftNode.

It only moves time, bytes and files: a clock gives node.tick() (waking only when a tick is
due to act), POST /raft/messages (and, for heartbeats, an optional datagram route) feeds
node.step(), and one loop runs the Ready cycle (save in a thread so fsync never blocks the
event loop, then send, then apply, then advance). Outgoing messages are batched per
destination, one HTTP request in flight per peer, over the caller's aiohttp.ClientSession
(keep-alive connections), so everything queued while a request or an fsync is under way
leaves in the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from random import Random

import aiohttp
from aiohttp import web

from .core import RaftNode
from .types import (
    CMD,
    HEARTBEAT,
    HEARTBEAT_RESP,
    Entry,
    Message,
    NotLeader,
    ProposalRejected,
    Ready,
)
from .wire import WireError, decode_batch, encode_batch

log = logging.getLogger(__name__)

MESSAGES_PATH = "/raft/messages"
# What may travel as a datagram: small, frequent, and harmless to lose or reorder.
DATAGRAM_KINDS = frozenset((HEARTBEAT, HEARTBEAT_RESP))


@dataclass(frozen=True)
class RaftConfig:
    # One logical tick, in milliseconds. 100 ms like etcd's and hashicorp/raft's heartbeat:
    # fast failure detection on a LAN without flooding it.
    tick_interval_ms: int = 100
    # Election timeout in ticks; each node draws its timeout from [T, 2T) = [1 s, 2 s) at the
    # defaults, the 1 s of etcd and hashicorp/raft. Failover lands around 1.3 s (p50).
    election_ticks: int = 10
    # Heartbeat period in ticks: every third, so followers hear the leader 3-6 times per
    # election timeout (a lost one is no election). Over HTTP each heartbeat was a signed
    # request per follower: every tick made them most of an idle peer's CPU (3 idle peers:
    # 1.7% of a core each, 0.9% at 3 ticks; docs/cluster.md); a peer now sends them as
    # datagrams (`datagram`). Failover waits on the election timeout, not on this.
    heartbeat_ticks: int = 3
    # PreVote (dissertation 9.6): a node that was cut off cannot depose a healthy leader.
    pre_vote: bool = True
    # CheckQuorum (dissertation 6.2): a leader cut off from a majority steps down.
    check_quorum: bool = True
    # Entries per AppendEntries message: large enough to catch up a follower quickly,
    # small enough (with ~KB commands) to stay well under a MB per message.
    max_append_entries: int = 512
    # Unacknowledged AppendEntries per follower before the leader waits for answers.
    max_inflight: int = 64
    # Compact the log once this many entries were applied since the last snapshot. Controller
    # state is small, so a snapshot is cheap; 10k entries bound both replay time and memory.
    snapshot_entries: int = 10_000
    # Per-POST timeout in ms. A peer that does not answer within two election timeouts is
    # treated as unreachable; the messages are dropped and Raft retries what matters.
    send_timeout_ms: int = 2_000
    # Messages queued per peer before the oldest are dropped (a dead peer must not eat memory).
    max_queued_messages: int = 10_000
    # Largest accepted POST body, in bytes: snapshots travel in one message.
    max_body_bytes: int = 256 << 20


def _maybe_await(result) -> Awaitable | None:
    return result if inspect.isawaitable(result) else None


class RaftDriver:
    def __init__(
        self,
        node_id: str,
        storage,
        config: RaftConfig,
        session: aiohttp.ClientSession,
        address_of: Callable[[str], str | None],
        apply: Callable[[Entry, int], object],
        *,
        voters: tuple[str, ...] = (),
        learners: tuple[str, ...] = (),
        snapshot: Callable[[], bytes] | None = None,
        restore: Callable[[bytes], object] | None = None,
        rng: Random | None = None,
        datagram: Callable[[str, bytes], bool] | None = None,
    ):
        """`voters`/`learners` bootstrap a brand-new node only (storage wins afterwards).
        `apply(entry, term)` is called for each committed "cmd" entry in log order, with the
        term it was proposed in (fencing). `snapshot()` returns the state-machine bytes as of
        the last applied entry; `restore(bytes)` loads them (both optional: no compaction).
        `datagram(dst, batch_bytes)` sends heartbeats and their answers as one authenticated
        datagram (the peer's sealed gossip transport), False when it cannot; the other end
        hands them to `receive_datagram`. Without it, or when it fails, they go by HTTP."""
        self.config = config
        self.storage = storage
        self.session = session
        self.address_of = address_of
        self._apply_cb = apply
        self._datagram = datagram
        self._change_callbacks: list[Callable[[], None]] = []
        self._snapshot_cb = snapshot
        self._restore_cb = restore
        self.node = RaftNode(
            node_id,
            storage,
            voters=voters,
            learners=learners,
            rng=rng,
            election_ticks=config.election_ticks,
            heartbeat_ticks=config.heartbeat_ticks,
            pre_vote=config.pre_vote,
            check_quorum=config.check_quorum,
            max_append_entries=config.max_append_entries,
            max_inflight=config.max_inflight,
        )
        self._wake = asyncio.Event()
        # The logical clock (_tick_loop): ticks given to the node so far, the tick the loop
        # sleeps until, and the loop time of tick 0 (None until the driver runs).
        self._interval = config.tick_interval_ms / 1000
        self._ticks = 0
        self._due = 0
        self._clock_origin: float | None = None
        self._clock_wake = asyncio.Event()
        self._outbox: dict[str, list[Message]] = {}
        self._outbox_ready: dict[str, asyncio.Event] = {}
        self._waiters: dict[int, tuple[int, asyncio.Future]] = {}
        self._reads: dict[bytes, asyncio.Future] = {}  # read context -> its read index
        # Contexts must never repeat across restarts: a late answer to an old request would
        # otherwise satisfy a new one with a read index from before it began.
        self._read_prefix = f"{node_id}/{uuid.uuid4().hex[:12]}/".encode()
        self._read_seq = 0
        self._applied = asyncio.Event()  # set whenever the applied index moves
        self._leader_changed = asyncio.Event()
        self._last_leader: str | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"raft-{node_id}")
        self.dropped_messages = 0
        self.datagrams_sent = 0
        self.clock_wakeups = 0  # times the clock loop woke (it sleeps until a tick acts)
        self.datagrams_refused = 0  # not a batch, or a kind that must not come this way
        self.send_errors = 0
        self.restore_failures = 0  # snapshots the state machine could not load

    # ---- read-only views

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def role(self) -> str:
        return self.node.role

    @property
    def term(self) -> int:
        return self.node.term

    @property
    def leader_id(self) -> str | None:
        return self.node.leader_id

    @property
    def voters(self) -> tuple[str, ...]:
        return self.node.voters

    @property
    def learners(self) -> tuple[str, ...]:
        return self.node.learners

    @property
    def commit_index(self) -> int:
        return self.node.commit_index

    @property
    def applied_index(self) -> int:
        return self.node.applied_index

    # ---- HTTP

    def routes(self) -> list[web.RouteDef]:
        return [web.post(MESSAGES_PATH, self._handle_messages)]

    async def _handle_messages(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > self.config.max_body_bytes:
            return web.json_response({"error": "raft batch too large"}, status=413)
        # read(), not the stream: a signing middleware may have read (and cached) it already.
        body = await request.read()
        try:
            _, messages = decode_batch(body)
        except WireError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.receive(messages)
        return web.Response(status=204)

    def receive(self, messages: list[Message]) -> None:
        """Messages from a peer, by whatever transport brought them."""
        self._catch_up()
        for m in messages:
            self.node.step(m)
        self._wake.set()

    def receive_datagram(self, body: bytes) -> None:
        """A batch that came as a datagram: only heartbeats and their answers may (they are
        small and Raft tolerates their loss); anything else is refused whole."""
        try:
            _, messages = decode_batch(body)
        except WireError:
            self.datagrams_refused += 1
            return
        if not messages or any(m.type not in DATAGRAM_KINDS for m in messages):
            self.datagrams_refused += 1
            return
        self.receive(messages)

    # ---- the application's calls

    async def propose(self, data: bytes) -> int:
        """Replicate `data`; returns its log index once applied here. Raises NotLeader(leader)
        on a follower, or if the entry was overwritten by a newer leader. Wrap it in a timeout:
        a leader cut off from its quorum cannot tell whether the entry will commit."""
        return await self._wait_applied(self.node.propose(bytes(data)))

    async def add_voter(self, node_id: str) -> int:
        return await self._conf_change("add", node_id, True)

    async def add_learner(self, node_id: str) -> int:
        return await self._conf_change("add", node_id, False)

    async def promote(self, node_id: str) -> int:
        return await self._conf_change("promote", node_id, True)

    async def remove(self, node_id: str) -> int:
        return await self._conf_change("remove", node_id, True)

    async def _conf_change(self, op: str, node_id: str, voter: bool) -> int:
        """One membership change, returned once applied. Raises NotLeader, or ProposalRejected
        if the change is invalid or still not possible after two election timeouts (another
        change pending, or a new leader that has not yet committed an entry of its term)."""
        tick = self.config.tick_interval_ms / 1000
        for _ in range(2 * self.config.election_ticks):
            try:
                index = self.node.propose_conf_change(op, node_id, voter=voter)
            except ProposalRejected as exc:
                if not exc.retryable:
                    raise
                await asyncio.sleep(tick)
                continue
            return await self._wait_applied(index)
        return await self._wait_applied(self.node.propose_conf_change(op, node_id, voter=voter))

    async def transfer_leadership(self, to: str) -> bool:
        """Ask the leader (this node) to hand over to `to`; True once `to` leads, False if the
        transfer did not finish within an election timeout."""
        self._catch_up()  # the transfer's timeout counts from now
        self.node.transfer_leadership(to)
        self._wake.set()
        timeout = 2 * self.config.election_ticks * self.config.tick_interval_ms / 1000
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.node.leader_id != to:
                    self._leader_changed.clear()
                    await self._leader_changed.wait()
        return self.node.leader_id == to

    async def read_index(self) -> int:
        """A linearizable read barrier (ReadIndex, dissertation 6.4; etcd's ReadOnlySafe): once
        it returns, this node has applied every entry committed before the call, so reading
        the local state machine then sees every write acknowledged before the read began.
        Returns the read index. Raises NotLeader while no leader is known, or if leadership
        changed before the answer came. Wrap it in a timeout: a leader cut off from its
        quorum can never confirm, and a request lost with a leader is not retried."""
        self._read_seq += 1
        context = self._read_prefix + str(self._read_seq).encode()
        future = asyncio.get_running_loop().create_future()
        self._reads[context] = future
        try:
            self.node.read_index(context)
            self._wake.set()
            index = await future
        finally:
            self._reads.pop(context, None)
        while self.node.applied_index < index:
            self._applied.clear()
            await self._applied.wait()
        return index

    async def _wait_applied(self, index: int) -> int:
        future = asyncio.get_running_loop().create_future()
        stale = self._waiters.pop(index, None)
        if stale is not None and not stale[1].done():
            # Our earlier entry at this index was truncated away before it was applied.
            stale[1].set_exception(NotLeader(self.node.leader_id))
        self._waiters[index] = (self.node.term, future)
        self._wake.set()
        return await future

    # ---- running

    async def run(self) -> None:
        """Tick, send, save and apply until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._tick_loop(), name=f"raft-{self.id}-tick")
                tg.create_task(self._ready_loop(), name=f"raft-{self.id}-ready")
        finally:
            self._tg = None
            for _, future in self._waiters.values():
                if not future.done():
                    future.set_exception(NotLeader(None))
            self._waiters.clear()
            self._fail_reads(None)
            self._executor.shutdown(wait=True)

    async def _tick_loop(self) -> None:
        """The logical clock, woken only when a tick is due to act (ticks_until_due), not
        every tick: an idle follower hears the leader's heartbeats and otherwise sleeps
        through its election timeout. Ticks stay on a fixed grid of tick_interval_ms, and
        the ones that only count are made up (_catch_up) before the node sees a message or
        a call, so the node sees exactly the ticks it would have seen ticking each one."""
        loop = asyncio.get_running_loop()
        self._clock_origin = loop.time()
        while True:
            self.clock_wakeups += 1
            self._catch_up()
            self._wake.set()
            self._due = self._next_due()
            delay = self._clock_origin + self._due * self._interval - loop.time()
            self._clock_wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._clock_wake.wait()

    def _next_due(self) -> int:
        due = self.node.ticks_until_due()
        # A learner's ticks only age its lease: made up whenever it hears something.
        return self._ticks + (due if due is not None else self.config.election_ticks)

    def _catch_up(self) -> None:
        """Give the node every tick of the grid that has passed. A loop that was stalled
        past the tick it meant to wake at gets the ticks up to that one and a grid moved to
        now, not a burst: the stall is taken to begin there (as a loop ticking every tick
        would tick once after it), and the heartbeats that arrived meanwhile may still be
        in the socket."""
        if self._clock_origin is None:
            return
        now = asyncio.get_running_loop().time()
        # (the epsilon: a timer that fires a hair early still reaches its tick)
        target = int((now - self._clock_origin) / self._interval + 1e-6)
        if target > self._due + 1:  # a stall, not a sleep
            target = self._due
            self._clock_origin = now - target * self._interval
        while self._ticks < target:
            self._ticks += 1
            self.node.tick()

    def _clock_changed(self) -> None:
        """After the node changed: wake the clock if a tick is now due sooner (a new leader's
        first heartbeat, a campaign's timeout)."""
        if self._clock_origin is not None and self._next_due() < self._due:
            self._clock_wake.set()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` after entries commit or the leader changes: a new leader's own
        no-op commits no command, and the controller waits for it without polling."""
        self._change_callbacks.append(callback)

    async def _ready_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            changed = False
            while self.node.has_ready():
                rd = self.node.ready()
                if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                    await loop.run_in_executor(self._executor, self.storage.save, rd)
                self._queue_messages(rd.messages)
                await self._apply(rd)
                self.node.advance(rd)
                for state in rd.read_states:
                    future = self._reads.get(state.context)
                    if future is not None and not future.done():
                        future.set_result(state.index)
                if rd.committed or rd.restore is not None:
                    self._applied.set()
                    changed = True
                self._maybe_compact()
            if self.node.leader_id != self._last_leader:
                self._last_leader = self.node.leader_id
                self._leader_changed.set()
                self._fail_reads(self.node.leader_id)  # their requests died with the old leader
                changed = True
            self._clock_changed()
            if changed:
                for callback in self._change_callbacks:
                    callback()

    async def _apply(self, rd: Ready) -> None:
        if rd.restore is not None and self._restore_cb is not None and rd.restore.data:
            try:
                pending = _maybe_await(self._restore_cb(rd.restore.data))
                if pending is not None:
                    await pending
            except Exception:  # e.g. a snapshot of a newer format: keep serving, say so
                self.restore_failures += 1
                log.exception(
                    "raft %s: restoring the snapshot at %d failed", self.id, rd.restore.index
                )
        for entry in rd.committed:
            if entry.kind == CMD:
                try:
                    pending = _maybe_await(self._apply_cb(entry, entry.term))
                    if pending is not None:
                        await pending
                except Exception:
                    log.exception("raft %s: apply of entry %d failed", self.id, entry.index)
            waiter = self._waiters.pop(entry.index, None)
            if waiter is not None:
                term, future = waiter
                if future.done():
                    continue
                if entry.term == term:
                    future.set_result(entry.index)
                else:  # a newer leader overwrote our entry: it never happened
                    future.set_exception(NotLeader(self.node.leader_id))
        if rd.restore is not None:
            for index in [i for i in self._waiters if i <= rd.restore.index]:
                _, future = self._waiters.pop(index)
                if not future.done():  # covered by a snapshot: we cannot tell; say so
                    future.set_exception(
                        ProposalRejected("outcome unknown: log replaced by snapshot")
                    )

    def _fail_reads(self, leader: str | None) -> None:
        for future in self._reads.values():
            if not future.done():
                future.set_exception(NotLeader(leader))

    def _maybe_compact(self) -> None:
        if self._snapshot_cb is None:
            return
        node = self.node
        if node.applied_index - node.log.snap_index >= self.config.snapshot_entries:
            node.compact(node.applied_index, self._snapshot_cb())
            self._wake.set()

    # ---- sending

    def _queue_messages(self, messages: tuple[Message, ...]) -> None:
        if self._datagram is not None:
            messages = self._send_datagrams(messages)
        for m in messages:
            queue = self._outbox.get(m.dst)
            if queue is None:
                queue = self._outbox[m.dst] = []
                self._outbox_ready[m.dst] = asyncio.Event()
                if self._tg is not None:
                    self._tg.create_task(self._send_loop(m.dst), name=f"raft-{self.id}-to-{m.dst}")
            queue.append(m)
            if len(queue) > self.config.max_queued_messages:
                del queue[0]
                self.dropped_messages += 1
            self._outbox_ready[m.dst].set()

    def _send_datagrams(self, messages: tuple[Message, ...]) -> list[Message]:
        """Send the heartbeats and their answers as one datagram per peer, now: a leader's
        heartbeat round is a sendto per follower instead of a signed HTTP request each way
        (most of an idle leader's CPU at 30 peers). Returns the rest, for HTTP."""
        by_dst: dict[str, list[Message]] = {}
        rest: list[Message] = []
        for m in messages:
            (by_dst.setdefault(m.dst, []) if m.type in DATAGRAM_KINDS else rest).append(m)
        for dst, batch in by_dst.items():
            if self._datagram(dst, encode_batch(self.id, batch)):
                self.datagrams_sent += 1
            else:  # no datagram route (yet): the HTTP path, as before
                rest.extend(batch)
        return rest

    async def _send_loop(self, dst: str) -> None:
        """One request in flight per peer; whatever queues meanwhile goes in the next batch."""
        ready = self._outbox_ready[dst]
        client_timeout = aiohttp.ClientTimeout(total=self.config.send_timeout_ms / 1000)
        while True:
            await ready.wait()
            ready.clear()
            batch, self._outbox[dst] = self._outbox[dst], []
            if not batch:
                continue
            address = self.address_of(dst)
            if address is None:
                self.dropped_messages += len(batch)
                continue
            try:
                await self._post(address, batch, client_timeout)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.send_errors += 1
                self.dropped_messages += len(batch)
                log.debug("raft %s: send to %s at %s failed: %r", self.id, dst, address, exc)
                # Back off a little so a dead peer costs one failed connect per tick, not a spin.
                await asyncio.sleep(self.config.tick_interval_ms / 1000)

    async def _post(
        self, address: str, batch: list[Message], client_timeout: aiohttp.ClientTimeout
    ) -> None:
        """The one place outgoing requests are made (the peer adds request signing here)."""
        body = encode_batch(self.id, batch)
        url = f"http://{address}{MESSAGES_PATH}"
        async with self.session.post(
            url, data=body, timeout=client_timeout, headers={"Content-Type": "application/msgpack"}
        ) as resp:
            if resp.status >= 300:
                raise aiohttp.ClientResponseError(
                    resp.request_info, resp.history, status=resp.status, message=await resp.text()
                )

    def status(self) -> dict:
        return {
            "id": self.id,
            "role": self.role,
            "term": self.term,
            "leader": self.leader_id,
            "voters": list(self.voters),
            "learners": list(self.learners),
            "commit_index": self.commit_index,
            "applied_index": self.applied_index,
            "last_index": self.node.last_index,
        }
