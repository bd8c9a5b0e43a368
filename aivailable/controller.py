"""The SDAI controller: run by the Raft leader only, it turns the desired models and the gossip
view into a placement plan and commits it when it changes.

`decide` is the pure core (DESIGN.md rule 1: inputs and `now` in, a decision out);
`Controller` is the thin asyncio loop around it. The plan is fenced by the leader's term
(`cluster_state.encode_plan(plan, term)`), so a deposed leader's late plan is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivailable import cluster_state as cs
from aivailable import store
from aivailable.cluster_state import ClusterState, ModelRecord
from aivailable.membership_policy import ConfChange, MemberInfo, MembershipConfig, next_conf_change
from placement import Gpu, ModelSpec, Node, Plan, solve

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MODEL_SOURCE = "builtin:smollm2-135m"
DEFAULT_MODEL_NAME = store.model_name(DEFAULT_MODEL_SOURCE)


@dataclass(frozen=True)
class ControllerConfig:
    # Seconds a suspect node keeps its placements before they are moved elsewhere. SWIM marks
    # a slow node suspect for a few seconds before it is declared dead; moving a model costs a
    # reload (seconds to minutes), so a short suspicion should not. Dead/left: moved at once.
    suspect_grace_s: float = 5.0
    # Seconds between re-checks when nothing triggers one: catches anything a lost trigger
    # missed. Cheap: solve() on a LAN-sized cluster takes milliseconds.
    tick_s: float = 2.0
    # Safe VRAM estimate when the leader does not have the model file to read its header:
    # file size x this factor (weights plus padding) + n_ctx x KV bytes per token + overhead.
    size_factor: float = 1.1
    # Bytes of KV cache per context token assumed without the header, at f16: a 7-8B model
    # with grouped-query attention needs 128 KiB (SmolLM2-135M 22 KiB). Over-estimating only
    # leaves VRAM unused until a leader that has the file commits the exact figure.
    kv_bytes_per_token: int = 128 << 10
    # Bytes per process for the GPU runtime and compute buffer when estimating without the
    # header (placement.estimate's DEFAULT_OVERHEAD plus a compute buffer).
    fallback_overhead: int = 384 * MIB
    # Model deployed once on a new cluster (None: none). The embedded model, so a fresh
    # cluster serves out of the box; undeploying it sticks (ClusterState.default_applied).
    default_source: str | None = DEFAULT_MODEL_SOURCE
    default_replicas: int = 1
    default_n_ctx: int = 2048
    # placement.solve policy: "pack" keeps large holes for large models.
    policy: str = "pack"
    # Seconds before a plan identical to one already proposed is proposed again (a proposal
    # can be lost when leadership changes hands).
    repropose_s: float = 5.0
    # Seconds to wait for one proposal to be applied. A leader cut off from its quorum cannot
    # tell whether an entry will commit; CheckQuorum deposes it within an election timeout
    # (1-2 s), so 5 s means the proposal is lost, and the next pass tries again.
    propose_timeout_s: float = 5.0
    # Log entries a learner may lag behind the leader and still be promoted: promoting a
    # learner far behind would stall commits until it caught up.
    promote_max_lag: int = 100


@dataclass(frozen=True)
class NodeStatus:
    """One node as gossip shows it (see reconciler.read_payload for the payload)."""

    id: str
    state: str  # alive | suspect | dead | left
    since: float  # when it entered this state, in the caller's clock (seconds)
    gpus: tuple[Gpu, ...] = ()
    cluster_id: str | None = None
    files: tuple[tuple[str, int, str], ...] = ()  # (sha256, size, source) it holds locally
    addr: str = ""  # HOST:PORT of its HTTP API


# ---- the pure core --------------------------------------------------------------------------


def usable_nodes(nodes: Iterable[NodeStatus], now: float, suspect_grace_s: float) -> list[Node]:
    """Nodes placement may use: alive, or suspect for less than the grace."""
    out = []
    for n in nodes:
        if n.state == "alive" or (n.state == "suspect" and now - n.since < suspect_grace_s):
            out.append(Node(n.id, tuple(n.gpus)))
    return sorted(out, key=lambda n: n.id)


def model_vram(
    record: ModelRecord,
    local_path: Path | None = None,
    config: ControllerConfig = ControllerConfig(),
    estimator: Callable[..., Any] | None = None,
) -> tuple[int, int]:
    """(bytes one instance needs, extra bytes per extra GPU when split): the one place a
    model's VRAM is decided. Exact when a leader already committed it or has the file (its
    GGUF header via placement.estimate); otherwise a safe over-estimate from the size."""
    if record.vram is not None:
        return record.vram, record.split_overhead or 0
    if local_path is not None:
        if estimator is None:
            from placement import estimate as estimator
        try:
            est = estimator(local_path, record.n_ctx)
            return est.total, est.split_overhead
        except Exception as exc:  # a header it cannot read: fall back to the size
            log.warning("cannot estimate %s from %s: %s", record.name, local_path, exc)
    size = record.size if record.size is not None else _known_size(record.source)
    if size is None:
        size = 1 << 30  # nothing known yet: a 1 GiB file until someone resolves the source
    kv = record.n_ctx * config.kv_bytes_per_token
    return int(size * config.size_factor) + kv + config.fallback_overhead, config.fallback_overhead


def _known_size(source: str) -> int | None:
    """The size of a built-in model, known without fetching it."""
    known = store.builtin(source)
    return known.size if known is not None else None


def model_specs(
    models: Iterable[ModelRecord],
    vram_of: Callable[[ModelRecord], tuple[int, int]],
) -> list[ModelSpec]:
    return [
        ModelSpec(m.name, vram, m.replicas, m.priority, split_overhead=split)
        for m in models
        for vram, split in [vram_of(m)]
    ]


def decide(
    models: Iterable[ModelRecord],
    nodes: Iterable[NodeStatus],
    current: Plan | None,
    now: float,
    config: ControllerConfig = ControllerConfig(),
    vram_of: Callable[[ModelRecord], tuple[int, int]] | None = None,
) -> Plan | None:
    """The plan to commit, or None when the current one stands.

    Nodes dead, left, or suspect past the grace drop out, so solve() re-places their
    instances; everything that still fits where it is stays (solve keeps `current`).
    """
    vram_of = vram_of or (lambda m: model_vram(m, None, config))
    plan = solve(
        usable_nodes(nodes, now, config.suspect_grace_s),
        model_specs(models, vram_of),
        current=current,
        policy=config.policy,
    )
    return None if plan == current else plan


def model_file_updates(
    models: Iterable[ModelRecord],
    nodes: Iterable[NodeStatus],
    local_path: Callable[[ModelRecord], Path | None],
    config: ControllerConfig = ControllerConfig(),
    estimator: Callable[..., Any] | None = None,
) -> list[bytes]:
    """SET_MODEL_FILE commands for what the cluster learned about model files: the checksum
    and size from any node that holds the file, the exact VRAM when the leader holds it."""
    reported: dict[str, tuple[str, int]] = {}
    for n in sorted(nodes, key=lambda n: n.id):
        if n.state in ("alive", "suspect"):
            for sha, size, source in n.files:
                reported.setdefault(source, (sha, size))
    out = []
    for m in models:
        if m.vram is not None:
            continue
        path = local_path(m)
        if path is not None:
            found = reported.get(m.source)
            sha = m.sha256 or (found[0] if found else None)
            if sha is not None:
                vram = split = None
                try:
                    if estimator is None:
                        from placement import estimate as estimator
                    est = estimator(path, m.n_ctx)
                    vram, split = est.total, est.split_overhead
                except Exception as exc:  # commit what is certain; the size-based guess stays
                    log.debug("cannot estimate %s from %s: %s", m.name, path, exc)
                size = m.size if m.size is not None else path.stat().st_size
                if vram is not None or m.sha256 is None:
                    out.append(cs.encode_model_file(m.name, m.source, sha, size, vram, split))
                continue
        if m.sha256 is None and m.source in reported:
            sha, size = reported[m.source]
            out.append(cs.encode_model_file(m.name, m.source, sha, size))
    return out


def registry_updates(
    nodes: Iterable[NodeStatus], registry: Mapping[str, str], members: Iterable[str] | None = None
) -> list[bytes]:
    """NODE_ADDR commands for alive nodes (of `members`, when given) whose gossiped address
    differs from the one in the Raft state, so a restarted cluster finds them without mDNS."""
    keep = set(members) if members is not None else None
    return [
        cs.encode_node_addr(n.id, n.addr)
        for n in sorted(nodes, key=lambda n: n.id)
        if n.state == "alive"
        and n.addr
        and registry.get(n.id) != n.addr
        and (keep is None or n.id in keep)
    ]


# ---- gossip -> NodeStatus ------------------------------------------------------------------


class MemberClock:
    """Remembers since when each member has been in its current state (gossip's member
    views carry the state but not when it changed)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}

    def since(self, node: str, state: str, now: float) -> float:
        last = self._seen.get(node)
        if last is None or last[0] != state:
            self._seen[node] = (state, now)
            return now
        return last[1]

    def forget_except(self, nodes: Iterable[str]) -> None:
        keep = set(nodes)
        for node in list(self._seen):
            if node not in keep:
                del self._seen[node]


class Trigger:
    """A wake-up call for a loop: gossip changes and Raft applies fire it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()

    async def wait(self, within: float) -> bool:
        """True if fired within `within` seconds (and clears it), False otherwise."""
        try:
            async with asyncio.timeout(within):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


# ---- the loop -----------------------------------------------------------------------------


ConfHooks = tuple[
    Callable[[], tuple[tuple[str, ...], tuple[str, ...]]],  # () -> (voters, learners)
    Callable[[str, str, bool], Awaitable[Any]],  # propose_conf_change(op, node, voter)
]


class Controller:
    """Runs on every peer; acts only while `is_leader()`. Proposes through `propose(bytes)`,
    which should return once the entry is applied (or raise, e.g. NotLeader)."""

    def __init__(
        self,
        node_id: str,
        state: ClusterState,
        propose: Callable[[bytes], Awaitable[Any]],
        is_leader: Callable[[], bool],
        term: Callable[[], int],
        nodes: Callable[[], list[NodeStatus]],
        trigger: Trigger,
        config: ControllerConfig = ControllerConfig(),
        local_path: Callable[[ModelRecord], Path | None] = lambda m: None,
        conf: ConfHooks | None = None,
        members: Callable[[], Mapping[str, MemberInfo]] | None = None,
        membership: MembershipConfig | None = None,
        caught_up: Callable[[], Iterable[str]] | None = None,
        found_cluster_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.node_id = node_id
        self.state = state
        self._propose = propose
        self._is_leader = is_leader
        self._term = term
        self._nodes = nodes
        self._trigger = trigger
        self.config = config
        self._local_path = local_path
        self._conf = conf
        self._members = members
        self._membership = membership or MembershipConfig()
        self._caught_up = caught_up
        self._found_cluster_id = found_cluster_id  # the founder commits it (bootstrap)
        self._clock = clock
        self._last: tuple[bytes, float] | None = None  # last proposed plan bytes, when

    async def run(self) -> None:
        while True:
            await self._trigger.wait(self.config.tick_s)
            if not self._is_leader():
                continue
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NotLeader, a lost proposal: try again on the next wake
                log.info("controller step did not complete: %r", exc)

    async def _submit(self, data: bytes) -> Any:
        async with asyncio.timeout(self.config.propose_timeout_s):
            return await self._propose(data)

    async def step(self) -> None:
        """One pass: cluster id (founder), default model, model file facts, node addresses,
        the plan, one membership change."""
        st, cfg, now = self.state, self.config, self._clock()
        if st.cluster_id is None and self._found_cluster_id is not None:
            await self._submit(cs.encode_init(self._found_cluster_id))
        if not st.default_applied and cfg.default_source:
            await self._submit(
                cs.encode_deploy(
                    store.model_name(cfg.default_source),
                    cfg.default_source,
                    cfg.default_replicas,
                    cfg.default_n_ctx,
                    default=True,
                )
            )
        nodes = self._nodes()
        for cmd in model_file_updates(st.desired(), nodes, self._local_path, cfg):
            await self._submit(cmd)
        in_config = None
        if self._conf is not None:
            voters, learners = self._conf[0]()
            in_config = (*voters, *learners)
        for cmd in registry_updates(nodes, st.nodes, in_config):
            await self._submit(cmd)
        local = {m.name: self._local_path(m) for m in st.desired()}
        plan = decide(
            st.desired(), nodes, st.plan, now, cfg, lambda m: model_vram(m, local[m.name], cfg)
        )
        if plan is not None:
            data = cs.encode_plan(plan, self._term())
            if (
                self._last is None
                or self._last[0] != data
                or now - self._last[1] >= cfg.repropose_s
            ):
                self._last = (data, now)
                log.info(
                    "committing plan: %d instances, %d unplaced",
                    len(plan.assignments),
                    len(plan.unplaced),
                )
                await self._submit(data)
        if self._conf is not None and self._members is not None:
            change = self.conf_change(now)
            if change is not None:
                log.info("membership: %s %s (%s)", change.op, change.node, change.reason)
                async with asyncio.timeout(self.config.propose_timeout_s):
                    await self._conf[1](change.op, change.node, change.voter)

    def conf_change(self, now: float) -> ConfChange | None:
        assert self._conf is not None and self._members is not None
        voters, learners = self._conf[0]()
        return next_conf_change(
            self.node_id,
            voters,
            learners,
            self._members(),
            now,
            cluster_id=self.state.cluster_id,
            caught_up=self._caught_up() if self._caught_up is not None else None,
            config=self._membership,
        )


# ---- wiring to consensus.RaftDriver ---------------------------------------------------------


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
