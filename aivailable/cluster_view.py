"""The cluster as the HTTP API sees it: a `ClusterView` backed by Raft and gossip, and the
`Proposer` that gets a command to the leader from any peer.

- `peer_entries(members, clock, now)`: gossip members -> `PeerEntry` (state, since, payload),
  from which `node_statuses` (for the controller) and `member_infos` (for the membership
  policy) are derived.
- `cluster_status(...)`: the `/cluster/status` JSON (DESIGN.md), pure.
- `Proposer`: `propose(bytes)` on the leader, or forwarded to it over
  `POST /internal/propose`; raises a 503 ApiError when no leader answers in time.
- `RaftClusterView`: `status()`, `deploy()`, `undeploy()` for `ClusterApi`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from aivailable import cluster_state as cs
from aivailable import hub, sources, store
from aivailable.access.keys import stamp
from aivailable.api.errors import ApiError, bad_request
from aivailable.cluster_state import ClusterState
from aivailable.controller import MemberClock, NodeStatus
from aivailable.membership_policy import MemberInfo
from aivailable.reconciler import PeerPayload, read_payload

log = logging.getLogger(__name__)

PROPOSE_PATH = "/internal/propose"
MAX_COMMAND_BYTES = 1 << 20


@dataclass(frozen=True)
class PeerEntry:
    id: str
    state: str  # alive | suspect | dead | left
    since: float
    payload: PeerPayload
    incarnation: int = 0  # gossip's: a restarted node comes back with a higher one


def peer_entries(members: Iterable[Any], clock: MemberClock, now: float) -> list[PeerEntry]:
    """Gossip MemberViews (id, state, payload) -> PeerEntry, with since-when per state."""
    out = []
    for m in members:
        since = clock.since(m.id, m.state, now)
        payload = read_payload(m.id, m.payload)
        out.append(PeerEntry(m.id, m.state, since, payload, getattr(m, "incarnation", 0)))
    clock.forget_except(e.id for e in out)
    return sorted(out, key=lambda e: e.id)


def node_statuses(entries: Iterable[PeerEntry]) -> list[NodeStatus]:
    return [
        NodeStatus(
            e.id,
            e.state,
            e.since,
            e.payload.gpus,
            e.payload.cluster_id,
            e.payload.files,
            e.payload.addr,
        )
        for e in entries
    ]


def member_infos(entries: Iterable[PeerEntry]) -> dict[str, MemberInfo]:
    return {e.id: MemberInfo(e.state, e.since, e.payload.cluster_id) for e in entries}


def cluster_status(
    node_id: str,
    leader: str | None,
    term: int,
    state: ClusterState,
    entries: Iterable[PeerEntry],
    voters: Iterable[str] = (),
    learners: Iterable[str] = (),
) -> dict:
    """The /cluster/status body: nodes from gossip (this one included), models from the
    committed state and plan, each placement with its instance's state as gossiped."""
    entries = list(entries)
    instance_state: dict[tuple[str, str], str] = {}
    nodes = []
    for e in entries:
        p = e.payload
        for inst in p.instances:
            instance_state[(e.id, inst.model)] = inst.state
        nodes.append(
            {
                "id": e.id,
                "addr": p.addr,
                "state": e.state,
                "incarnation": e.incarnation,
                "gpus": [
                    {
                        "id": g.id,
                        "vendor": g.vendor,
                        "name": g.name,
                        "vram_total": total,
                        "vram_free": free,
                        "capacity": g.capacity,
                    }
                    for g, total, free in zip(p.gpus, p.vram_total, p.vram_free, strict=False)
                ],
                "instances": [
                    {
                        "model": i.model,
                        "state": i.state,
                        "queue_depth": i.queue_depth,
                        "gpus": list(i.gpus),
                    }
                    for i in p.instances
                ],
            }
        )
    unplaced = {u.model: u for u in state.plan.unplaced} if state.plan else {}
    models = []
    for record in state.desired():
        placements = [
            {
                "node": a.node,
                "gpus": list(a.gpus),
                "vram": sum(a.vram),
                "state": instance_state.get((a.node, a.model), "pending"),
            }
            for a in (state.plan.for_model(record.name) if state.plan else ())
        ]
        model = {
            "name": record.name,
            "source": record.source,
            "replicas": record.replicas,
            "n_ctx": record.n_ctx,
            "priority": record.priority,
            "placements": placements,
        }
        if record.name in unplaced:
            u = unplaced[record.name]
            model["unplaced"] = f"{u.missing_replicas} replica(s) unplaced: {u.reason}"
        elif not placements:
            model["unplaced"] = "waiting for the controller"
        models.append(model)
    return {
        "node_id": node_id,
        "leader": leader,
        "term": term,
        "cluster_id": state.cluster_id,
        "voters": sorted(voters),
        "learners": sorted(learners),
        "nodes": nodes,
        "models": models,
    }


def no_leader(detail: str) -> ApiError:
    return ApiError(
        503,
        f"the cluster has no reachable leader right now ({detail}); try again shortly",
        type="server_error",
        code="no_leader",
        retry_after=2.0,
    )


class Proposer:
    """Gets a command committed from any peer. `driver` is the consensus.RaftDriver; `session`
    the peer's signed ClientSession; `address_of(node_id)` its HTTP "host:port"."""

    def __init__(
        self,
        driver: Any,
        session: aiohttp.ClientSession,
        address_of: Callable[[str], str | None],
        timeout_s: float = 5.0,  # a leader election takes 1-2 s; two of them fit
        retry_s: float = 0.1,
    ):
        self._driver = driver
        self._session = session
        self._address_of = address_of
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._applied_index = 0
        self._applied_event = asyncio.Event()

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PROPOSE_PATH, self._handle)]

    async def _handle(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_COMMAND_BYTES:
            return web.json_response({"error": "command too large"}, status=413)
        # read(), not the stream: the signing middleware has read (and cached) it already.
        data = await request.read()
        try:
            cs.decode(data)
        except cs.CommandError as exc:
            return web.json_response({"error": f"not a cluster command: {exc}"}, status=400)
        if self._driver.role != "leader":
            return web.json_response({"leader": self._driver.leader_id}, status=421)
        try:
            async with asyncio.timeout(self.timeout_s):
                index = await self._driver.propose(data)
        except TimeoutError:
            return web.json_response({"error": "not committed in time"}, status=503)
        except Exception as exc:  # NotLeader, ProposalRejected: the caller retries
            return web.json_response({"leader": self._driver.leader_id, "error": repr(exc)}, 421)
        return web.json_response({"index": index})

    async def propose(self, data: bytes) -> int:
        """The log index once committed (and applied here). Retries through leader changes
        until `timeout_s`; then a 503 ApiError."""
        last = "no leader elected"
        data = stamp(data)  # a unique id: the state applies it once, however often it arrives
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    index, last = await self._try_once(data, last)
                    if index is not None:
                        await self._applied_here(index)  # read-your-writes on this peer
                        return index
                    await asyncio.sleep(self.retry_s)
        except TimeoutError:
            raise no_leader(last) from None

    def applied(self, index: int) -> None:
        """Called by the apply callback (apply_entry) for every applied command."""
        self._applied_index = max(self._applied_index, index)
        self._applied_event.set()

    async def _applied_here(self, index: int) -> None:
        while max(self._applied_index, self._driver.applied_index) < index:
            self._applied_event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):  # also re-reads the driver (snapshots)
                    await self._applied_event.wait()

    async def _try_once(self, data: bytes, last: str) -> tuple[int | None, str]:
        driver = self._driver
        if driver.role == "leader":
            try:
                return await driver.propose(data), last
            except Exception as exc:  # deposed meanwhile
                return None, f"proposal lost: {exc!r}"
        leader = driver.leader_id
        addr = self._address_of(leader) if leader else None
        if addr is None:
            return None, "no leader elected" if leader is None else f"no address for {leader}"
        try:
            async with self._session.post(f"http://{addr}{PROPOSE_PATH}", data=data) as resp:
                if resp.status == 200:
                    return int((await resp.json())["index"]), last
                return None, f"leader {leader} answered {resp.status}"
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            return None, f"leader {leader} unreachable: {exc!r}"


class RaftClusterView:
    """ClusterView (aivailable.api.cluster_api) for a peer in a cluster."""

    def __init__(
        self,
        node_id: str,
        state: ClusterState,
        driver: Any,
        proposer: Proposer,
        entries: Callable[[], list[PeerEntry]],
        local_models: Any = None,  # model_transfer.LocalModels: fills sha256/size on deploy
    ):
        self.node_id = node_id
        self.state = state
        self._driver = driver
        self._proposer = proposer
        self._entries = entries
        self._local = local_models

    def status(self) -> dict:
        d = self._driver
        return cluster_status(
            self.node_id, d.leader_id, d.term, self.state, self._entries(), d.voters, d.learners
        )

    async def deploy(self, name: str, source: str, replicas: int, n_ctx: int) -> dict:
        sha256 = size = None
        if source.startswith(store.BUILTIN_PREFIX):
            builtin = store.builtin(source)
            if builtin is None:
                known = ", ".join(store.BUILTIN_PREFIX + k for k in store.BUILTINS)
                raise bad_request(f"unknown built-in model {source!r} (known: {known})", "source")
            sha256, size = builtin.sha256, builtin.size
        elif sources.is_remote(source):
            # Hugging Face's published checksum: every replica runs these bytes, and peers
            # copy the file from each other instead of each downloading it.
            cache = self._local.cache_dir if self._local is not None else None
            try:
                described = await asyncio.to_thread(store.describe, source, cache)
                sha256, size = described or (None, None)
            except hub.Unreachable as exc:  # the nodes may reach it later: deploy anyway
                log.warning("deploying %s without its checksum: %s", source, exc)
            except store.ModelSourceError as exc:  # gated, missing, no such quant, ...
                raise bad_request(str(exc), "source") from exc
        elif self._local is not None and self._local.held_locally(source):
            # The file is here: check it and record its checksum, so peers can copy it from us.
            try:
                held = await asyncio.to_thread(self._local.resolve_with_store, source)
            except store.ModelSourceError as exc:
                raise bad_request(str(exc), "source") from exc
            sha256, size = held.sha256, held.size
        await self._proposer.propose(
            cs.encode_deploy(name, source, replicas, n_ctx, sha256=sha256, size=size)
        )
        return {
            "name": name,
            "source": source,
            "replicas": replicas,
            "n_ctx": n_ctx,
            "state": "pending",
        }

    async def undeploy(self, name: str) -> bool:
        if name not in self.state.models:
            return False
        await self._proposer.propose(cs.encode_undeploy(name))
        return True


def apply_entry(
    state: ClusterState, triggers: Iterable[Any], proposer: Proposer | None = None
) -> Callable[[Any, int], Any]:
    """The RaftDriver `apply(entry, term)` callback: apply to the state, wake the loops
    (controller and reconciler Triggers) and the proposer's waiters."""
    triggers = list(triggers)

    def apply(entry: Any, term: int) -> cs.ApplyResult:
        result = state.apply(entry.data, term)
        if not result.ok:
            log.warning("rejected %s at index %s: %s", result.kind, entry.index, result.error)
        elif result.changed:
            for trigger in triggers:
                trigger.fire()
        if proposer is not None:
            proposer.applied(entry.index)
        return result

    return apply


def address_book(
    state: ClusterState, entries: Callable[[], Mapping[str, str]]
) -> Callable[[str], str | None]:
    """node id -> "host:port": gossip's view first, else the registry in the Raft state
    (which lets a whole cluster restarted without mDNS find its members)."""

    def address_of(node: str) -> str | None:
        return entries().get(node) or state.nodes.get(node)

    return address_of
