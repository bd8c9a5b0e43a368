"""The cluster's side of Raft: the `Proposer` that gets a command to the leader from any
peer, the API's `RaftClusterView`, the apply callback, and the predicates that say when this
peer's committed state may be acted on.

- `leader_ready(driver)`: the controller acts only once the leader has applied an entry of its
  own term (its no-op), so it never decides from a state older than its predecessor's.
- `caught_up(driver)`: a peer acts on a plan only once it has applied an entry of the current
  leader's term: a restarted peer does not act on the old plan in its snapshot or log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from aivailable.cluster import state as cs
from aivailable.cluster.errors import ClusterError, no_leader
from aivailable.cluster.identity import node_of
from aivailable.cluster.keys import stamped
from aivailable.cluster.state import ClusterState
from aivailable.cluster.status import cluster_status
from aivailable.cluster.view import ReadModel
from aivailable.models import hub, sources, store
from peer.messages import RAFT_CHANNEL

log = logging.getLogger(__name__)

PROPOSE_PATH = "/internal/propose"
MAX_COMMAND_BYTES = 1 << 20


def applied_own_term(driver: Any) -> bool:
    """True once the entry at the applied index is of the current term."""
    node = driver.node
    return node.log.term(node.applied_index) == node.term


def leader_ready(driver: Any) -> bool:
    return driver.role == "leader" and applied_own_term(driver)


def caught_up(driver: Any) -> bool:
    return driver.leader_id is not None and applied_own_term(driver)


ConfHooks = tuple[
    Callable[[], tuple[tuple[str, ...], tuple[str, ...]]],  # () -> (voters, learners)
    Callable[[str, str, bool], Awaitable[Any]],  # propose_conf_change(op, node, voter)
]


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
        # Proposal id -> the state machine's result, for this peer's proposals in flight
        # (None until applied here): an undeploy answers from what its own entry did.
        self._results: dict[str, cs.ApplyResult | None] = {}

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
        until `timeout_s`; then a 503 ClusterError (no_leader)."""
        index, _ = await self.commit(data)
        return index

    async def commit(self, data: bytes) -> tuple[int, cs.ApplyResult | None]:
        """As `propose`, with what applying the command did: the result of the entry that
        applied it (a retry that arrived twice applies once), or None if this peer got the
        state from a snapshot and so cannot tell."""
        last = "no leader elected"
        # A unique id: the state applies it once, however often it arrives.
        data, pid = stamped(data)
        if pid is not None:
            self._results[pid] = None
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    index, last = await self._try_once(data, last)
                    if index is not None:
                        await self._applied_here(index)  # read-your-writes on this peer
                        return index, self._results.get(pid) if pid is not None else None
                    await asyncio.sleep(self.retry_s)
        except TimeoutError:
            raise no_leader(last) from None
        finally:
            if pid is not None:
                self._results.pop(pid, None)

    def applied(self, index: int, result: cs.ApplyResult | None = None) -> None:
        """Called by the apply callback (apply_entry) for every applied command."""
        self._applied_index = max(self._applied_index, index)
        pid = result.proposal if result is not None else None
        if pid is not None and pid in self._results and self._results[pid] is None:
            self._results[pid] = result
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
        view: ReadModel,
        local_models: Any = None,  # model_transfer.LocalModels: fills sha256/size on deploy
    ):
        self.node_id = node_id
        self.state = state
        self._driver = driver
        self._proposer = proposer
        self._view = view
        self._local = local_models

    def status(self) -> dict:
        """Leader, voters and learners by node name (what a user knows a machine by), and
        `raft_id` / `raft_members` with the Raft ids alongside: during a rejoin a node's old
        id (a voter about to be retired) and its new one (a learner) are both listed, so its
        name can appear under both `voters` and `learners` for a moment."""
        d = self._driver
        name = self._view.node_of_member
        status = cluster_status(
            self.node_id,
            name(d.leader_id) if d.leader_id else None,
            d.term,
            self.state,
            self._view,
            {name(v) for v in d.voters},
            {name(v) for v in d.learners},
        )
        status["raft_id"] = d.id
        status["raft_members"] = [
            {"id": r, "node": name(r), "role": role}
            for role, ids in (("voter", d.voters), ("learner", d.learners))
            for r in sorted(ids)
        ]
        return status

    async def deploy(
        self,
        name: str,
        source: str,
        replicas: int,
        n_ctx: int,
        kind: str = "chat",
        n_parallel: int | None = None,
        split: str = "auto",
        kv_type: str = "f16",
        priority: int = 0,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        idle_unload_s: float | None = None,
    ) -> dict:
        sha256 = size = None
        if source.startswith(store.BUILTIN_PREFIX):
            builtin = store.builtin(source)
            if builtin is None:
                known = ", ".join(store.BUILTIN_PREFIX + k for k in store.BUILTINS)
                raise ClusterError.bad_request(
                    f"unknown built-in model {source!r} (known: {known})", "source"
                )
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
                raise ClusterError.bad_request(str(exc), "source") from exc
        elif self._local is not None and self._local.held_locally(source):
            # The file is here: check it and record its checksum, so peers can copy it from us.
            try:
                held = await asyncio.to_thread(self._local.resolve_with_store, source)
            except store.ModelSourceError as exc:
                raise ClusterError.bad_request(str(exc), "source") from exc
            sha256, size = held.sha256, held.size
        await self._proposer.propose(
            cs.encode_deploy(
                name,
                source,
                replicas,
                n_ctx,
                priority,
                sha256=sha256,
                size=size,
                kind=kind,
                n_parallel=n_parallel,
                split=split,
                kv_type=kv_type,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                idle_unload_s=idle_unload_s,
            )
        )
        out = {
            "name": name,
            "source": source,
            "replicas": replicas,
            "n_ctx": n_ctx,
            "kind": kind,
            "n_parallel": n_parallel,
            "split": split,
            "kv_type": kv_type,
            "priority": priority,
            "state": "pending",
        }
        if min_replicas is not None or max_replicas is not None:
            out.update(min_replicas=min_replicas, max_replicas=max_replicas)
            out["idle_unload_s"] = idle_unload_s if idle_unload_s is not None else 300.0
        return out

    async def undeploy(self, name: str) -> bool:
        """True if this undeploy removed the model, False if it was not deployed. Both come
        from applying the command, never from this peer's copy of the state beforehand: that
        copy may be stale (a follower behind, or cut off), and two undeploys racing would
        both have seen the model there."""
        _, result = await self._proposer.commit(cs.encode_undeploy(name))
        if result is None:
            raise ClusterError(
                503,
                f"the undeploy of '{name}' was committed, but this peer cannot tell whether the "
                "model was deployed (it caught up from a snapshot); it is not deployed now",
                type="server_error",
                code="outcome_unknown",
            )
        return result.ok and result.changed


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
            proposer.applied(entry.index, result)
        return result

    return apply


def address_book(
    state: ClusterState,
    entries: Callable[[], Mapping[str, str]],
    node_of_member: Callable[[str], str] = node_of,
) -> Callable[[str], str | None]:
    """Raft id -> "host:port" of its node (`node_of_member`: ReadModel.node_of_member, the
    node that advertises the id, else the name in it): gossip's view first, else the
    registry in the Raft state (which lets a whole cluster restarted without mDNS find its
    members)."""

    def address_of(raft_id: str) -> str | None:
        node = node_of_member(raft_id)
        return entries().get(node) or state.nodes.get(node)

    return address_of


def raft_datagrams(
    gossip: Any, node_of_member: Callable[[str], str], accepts: Callable[[str], bool]
) -> Any:
    """The RaftDriver's `datagram` route over the gossip transport (sealed, replay-guarded
    UDP), or None where the gossip has none (a test's fake): heartbeats and their answers
    then cost a sendto each instead of a signed HTTP request each way. Only to a node that
    `accepts` them (its payload says "rd"): an older peer drops an unknown gossip message,
    so it would hear no heartbeat and keep starting elections; False sends by HTTP."""
    send = getattr(gossip, "send_datagram", None)
    if send is None:
        return None

    def route(raft_id: str, body: bytes) -> bool:
        node = node_of_member(raft_id)
        return accepts(node) and send(node, RAFT_CHANNEL, body)

    return route


def listen_raft_datagrams(gossip: Any, driver: Any) -> None:
    """Hand the Raft datagrams gossip receives to the driver."""
    if hasattr(gossip, "on_datagram"):
        gossip.on_datagram(RAFT_CHANNEL, driver.receive_datagram)


def raft_conf_hooks(driver: Any) -> ConfHooks:
    """ConfHooks for a consensus.RaftDriver: its configuration and its change calls."""

    async def change(op: str, node: str, voter: bool) -> Any:
        if op == "promote":
            return await driver.promote(node)
        if op == "remove":
            return await driver.remove(node)
        return await (driver.add_voter(node) if voter else driver.add_learner(node))

    return (lambda: (tuple(driver.voters), tuple(driver.learners)), change)


def caught_up_learners(driver: Any, max_lag: int) -> Callable[[], list[str]]:
    """Learners whose replicated log is within `max_lag` entries of the leader's."""

    def caught_up() -> list[str]:
        node = driver.node
        progress = getattr(node, "progress", {}) or {}
        return [
            learner
            for learner in driver.learners
            if learner in progress and progress[learner].match >= node.last_index - max_lag
        ]

    return caught_up
