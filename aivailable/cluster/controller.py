"""The SDAI controller as a step: `step(view, state, now, ctx) -> actions`. Pure.

The Raft leader's runner (aivailable/cluster/runner.py) calls it whenever gossip or the log
changes, carries out the first action (a proposal, or a voter change) and calls it again, so
every decision is made from the view and state as they are at that moment. The plan is
fenced by the leader's term (`state.encode_plan(plan, term)`), so a deposed leader's late
plan is ignored.

Only members of this cluster count (view.member_of); a node of another cluster that shares
the key is never placed on. Make-before-break: a ready replica that a new plan moves keeps
its place until its successor is ready, unless capacity forbids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from aivailable.cluster import scaling
from aivailable.cluster import state as cs
from aivailable.cluster.identity import node_of
from aivailable.cluster.membership_policy import ConfChange, MembershipConfig, next_conf_change
from aivailable.cluster.state import ClusterState, ModelRecord
from aivailable.cluster.view import NodeView, member_of, rpc_pairing
from aivailable.models import store
from placement import Assignment, ModelSpec, Node, Plan, solve
from placement.split import LayerProfile

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
    # Seconds to wait for one proposal to be applied. A leader cut off from its quorum cannot
    # tell whether an entry will commit; CheckQuorum deposes it within an election timeout
    # (1-2 s), so 5 s means the proposal is lost, and the next pass tries again.
    propose_timeout_s: float = 5.0
    # Log entries a learner may lag behind the leader and still be promoted: promoting a
    # learner far behind would stall commits until it caught up.
    promote_max_lag: int = 100


DEFAULT_CONFIG = ControllerConfig()
DEFAULT_MEMBERSHIP = MembershipConfig()


# ---- what the step decides ------------------------------------------------------------------


@dataclass(frozen=True)
class Propose:
    data: bytes  # a cluster.state command
    why: str = ""


@dataclass(frozen=True)
class ChangeConf:
    change: ConfChange


Action = Propose | ChangeConf


@dataclass(frozen=True)
class LocalFile:
    """What the leader read of a model file it holds (the runner reads it, the step decides)."""

    size: int
    vram: int | None = None  # placement.estimate(...).total; None: the header was unreadable
    split_overhead: int | None = None
    profile: tuple[int, ...] | None = None  # state.ModelRecord.profile, from the header


@dataclass(frozen=True)
class Context:
    """What the step needs of Raft and of this node's disk."""

    me: str  # this leader's Raft id (identity.py)
    term: int
    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()
    caught_up: tuple[str, ...] | None = None  # learners close enough to promote (None: all)
    found_cluster_id: str | None = None  # the founder commits it first
    local_files: Mapping[str, LocalFile] = field(default_factory=dict)  # by model name
    # The leader's wall clock, for demand scaling's cooldowns: committed with each change,
    # so a new leader reads them in the same clock. None: `now` (the simulation's clock).
    wall: float | None = None
    scaling_config: scaling.ScalingConfig = scaling.DEFAULT_SCALING


# ---- the pure core --------------------------------------------------------------------------


def usable_nodes(nodes: Iterable[NodeView], now: float, suspect_grace_s: float) -> list[Node]:
    """Nodes placement may use: alive, or suspect for less than the grace."""
    out = []
    for n in nodes:
        if n.state == "alive" or (n.state == "suspect" and now - n.since < suspect_grace_s):
            out.append(Node(n.id, tuple(n.gpus)))
    return sorted(out, key=lambda n: n.id)


def model_vram(
    record: ModelRecord,
    local: LocalFile | None = None,
    config: ControllerConfig = DEFAULT_CONFIG,
) -> tuple[int, int]:
    """(bytes one instance needs, extra bytes per extra GPU when split): the one place a
    model's VRAM is decided. Exact when a leader already committed it or has the file (its
    GGUF header via placement.estimate); otherwise a safe over-estimate from the size."""
    if record.vram is not None:
        return record.vram, record.split_overhead or 0
    if local is not None and local.vram is not None:
        return local.vram, local.split_overhead or 0
    size = record.size if record.size is not None else _known_size(record.source)
    if size is None:
        size = 1 << 30  # nothing known yet: a 1 GiB file until someone resolves the source
    kv = record.n_ctx * planned_parallel(record) * config.kv_bytes_per_token
    kv = kv * KV_BYTES_PER_F16[record.kv_type]
    return int(size * config.size_factor + kv) + config.fallback_overhead, config.fallback_overhead


# Slots placement plans each instance's KV cache for when its deploy names none: a GPU
# node's default (LlamaEngine: 8 on a GPU, 4 on a CPU), so a GPU never loads more than
# was planned for it.
PLANNED_PARALLEL = 8


# Bytes of a KV element of each deploy kv_type per byte of f16 (ggml's q8_0 block: 34
# bytes for 32 elements, q4_0: 18), for the size-based guess before the header is read.
KV_BYTES_PER_F16 = {"f16": 1.0, "q8_0": 34 / 64, "q4_0": 18 / 64}


def kv_estimate_args(record: ModelRecord) -> dict:
    """placement.estimate's cache arguments for a deploy: a quantized cache runs with flash
    attention (llama_runtime.apply_kv_type), whose compute buffer is smaller too."""
    if record.kv_type == "f16":
        return {}
    return {"cache_type": record.kv_type, "flash_attn": True}


def planned_parallel(record: ModelRecord) -> int:
    return record.n_parallel or PLANNED_PARALLEL


def _known_size(source: str) -> int | None:
    """The size of a built-in model, known without fetching it."""
    known = store.builtin(source)
    return known.size if known is not None else None


def layer_profile(record: ModelRecord, local: LocalFile | None, vram: int, split: int):
    """The per-slot bytes of a model for split plans: from its header when known (the
    record, or the leader's file), else equal slots from the totals."""
    wire = record.profile or (local.profile if local is not None else None)
    if wire is None:
        return LayerProfile.uniform(vram, split)
    *layers, output, compute, compute_output, overhead = wire
    return LayerProfile(tuple(layers), output, compute, compute_output, overhead)


def model_specs(
    models: Iterable[ModelRecord], local: Mapping[str, LocalFile], config: ControllerConfig
) -> list[ModelSpec]:
    return [
        ModelSpec(
            m.name,
            vram,
            m.replicas,
            m.priority,
            split_overhead=split,
            split=m.split,
            layers=layer_profile(m, local.get(m.name), vram, split) if m.split != "never" else None,
        )
        for m in models
        for vram, split in [model_vram(m, local.get(m.name), config)]
    ]


def keep_until_ready(
    plan: Plan,
    current: Plan | None,
    nodes: Sequence[NodeView],
    models: Mapping[str, ModelRecord],
) -> Plan:
    """Make-before-break: add back the ready replicas `plan` moves away from nodes gossip
    still reaches (alive, or suspect: a slow node past the grace still serves), while the
    model has fewer ready replicas in `plan` than it has now, if their GPUs still have room.
    The next step drops them once the successors are ready (or the host is declared dead)."""
    if current is None:
        return plan
    reachable = [n for n in nodes if n.state in ("alive", "suspect")]
    ready = {(n.id, i.model) for n in reachable for i in n.payload.instances if i.state == "ready"}
    capacity = {g.id: g.capacity for n in reachable for g in n.gpus}
    used: dict[str, int] = {}
    for a in plan.assignments:
        for gpu, vram in zip(a.gpus, a.vram, strict=True):
            used[gpu] = used.get(gpu, 0) + vram
    kept: list[Assignment] = []
    for model in sorted({a.model for a in current.assignments} & set(models)):
        new = plan.for_model(model)
        on = {a.node for a in new}
        ready_new = sum((a.node, model) in ready for a in new)
        ready_now = sum((a.node, model) in ready for a in current.for_model(model))
        want = min(models[model].replicas, ready_now)
        for old in current.for_model(model):
            if ready_new + sum(k.model == model for k in kept) >= want:
                break
            if old.node in on or (old.node, model) not in ready:
                continue
            pairs = list(zip(old.gpus, old.vram, strict=True))
            if all(g in capacity and used.get(g, 0) + v <= capacity[g] for g, v in pairs):
                kept.append(old)
                on.add(old.node)
                for g, v in pairs:
                    used[g] = used.get(g, 0) + v
    if not kept:
        return plan
    return Plan(
        assignments=plan.assignments + tuple(kept), unplaced=plan.unplaced, splits=plan.splits
    )


def decide(
    models: Iterable[ModelRecord],
    nodes: Sequence[NodeView],
    current: Plan | None,
    now: float,
    config: ControllerConfig = DEFAULT_CONFIG,
    local: Mapping[str, LocalFile] | None = None,
) -> Plan | None:
    """The plan to commit, or None when the current one stands.

    Nodes dead, left, or suspect past the grace drop out, so solve() re-places their
    instances; everything that still fits where it is stays (solve keeps `current`).
    """
    models = list(models)
    usable = usable_nodes(nodes, now, config.suspect_grace_s)
    base = _without_extras(current, models)
    plan = solve(
        usable,
        model_specs(models, local or {}, config),
        current=base,
        policy=config.policy,
        split_nodes=split_nodes(nodes, usable),
    )
    plan = keep_until_ready(plan, current, nodes, {m.name: m for m in models})
    return None if plan == current else plan


def split_nodes(nodes: Sequence[NodeView], usable: Sequence[Node]) -> set[str]:
    """The usable nodes a split may use: those whose llama.cpp RPC versions pair."""
    ids = {n.id for n in usable}
    _, skipped = rpc_pairing([n for n in nodes if n.id in ids])
    return ids - set(skipped)


def _without_extras(current: Plan | None, models: Sequence[ModelRecord]) -> Plan | None:
    """The current plan less replicas kept beyond a model's count by keep_until_ready, so
    solve() sees a plan it could have made (the newest assignments are the extras)."""
    if current is None:
        return None
    wanted = {m.name: m.replicas for m in models}
    count: dict[str, int] = {}
    keep = []
    for a in current.assignments:
        count[a.model] = count.get(a.model, 0) + 1
        if count[a.model] <= wanted.get(a.model, 0):
            keep.append(a)
    return Plan(assignments=tuple(keep), unplaced=current.unplaced, splits=current.splits)


def with_wanted(state: ClusterState) -> list[ModelRecord]:
    """The desired models with `replicas` set to what placement should give each now (a
    fixed count, or demand scaling's committed one)."""
    return [replace(m, replicas=state.wanted_replicas(m.name)) for m in state.desired()]


def bounds_of(record: ModelRecord) -> scaling.Bounds:
    if not record.scaled:
        return scaling.Bounds(record.replicas, record.replicas, None, record.priority)
    idle = record.idle_unload_s if record.idle_unload_s >= 0 else None
    return scaling.Bounds(record.min_replicas, record.max_replicas, idle, record.priority)


def model_demand(nodes: Iterable[NodeView], model: str) -> scaling.Demand:
    """A model's demand from gossip: its ready instances' signals and the requests peers
    hold waiting for it."""
    signals, waiting = [], 0
    for n in nodes:
        if n.state not in ("alive", "suspect"):
            continue
        signals += [
            i.demand
            for i in n.payload.instances
            if i.model == model and i.state == "ready" and i.demand is not None
        ]
        waiting += sum(count for m, count in n.payload.waiting if m == model)
    return scaling.aggregate(signals, waiting)


def scaling_updates(
    state: ClusterState,
    nodes: Sequence[NodeView],
    now: float,
    wall: float,
    config: ControllerConfig = DEFAULT_CONFIG,
    local: Mapping[str, LocalFile] | None = None,
    scaling_config: scaling.ScalingConfig = scaling.DEFAULT_SCALING,
) -> list[bytes]:
    """SET_SCALE commands: each scaled model's step (scaling.scale), then the yields that
    give VRAM to a model whose wanted replicas find none (scaling.contend)."""
    records = state.desired()
    if not any(m.scaled for m in records):
        return []
    bounds = {m.name: bounds_of(m) for m in records}
    demand = {m.name: model_demand(nodes, m.name) for m in records}
    ready: dict[str, int] = {}
    for n in nodes:
        if n.state in ("alive", "suspect"):
            for i in n.payload.instances:
                if i.state == "ready":
                    ready[i.model] = ready.get(i.model, 0) + 1
    before = {m.name: state.wanted_replicas(m.name) for m in records}
    counts, reasons = dict(before), {}
    for m in records:
        if m.scaled:
            last = state.scale.get(m.name)
            d = scaling.scale(
                before[m.name],
                ready.get(m.name, 0),
                bounds[m.name],
                demand[m.name],
                last.at if last is not None else None,
                wall,
                scaling_config,
            )
            if d.wanted != before[m.name]:
                counts[m.name], reasons[m.name] = d.wanted, d.reason
    usable = usable_nodes(nodes, now, config.suspect_grace_s)
    # The same split rule as the plan's (decide): a replica that could only be split over
    # peers that cannot pair is missing, and another model may yield for it.
    pairable = split_nodes(nodes, usable)

    def missing(c: Mapping[str, int]) -> dict[str, int]:
        wanted = [replace(m, replicas=c[m.name]) for m in records]
        base = _without_extras(state.plan, wanted)
        specs = model_specs(wanted, local or {}, config)
        plan = solve(usable, specs, current=base, policy=config.policy, split_nodes=pairable)
        return {u.model: u.missing_replicas for u in plan.unplaced}

    yielded, why = scaling.contend(counts, bounds, demand, missing, scaling_config)
    for name, n in yielded.items():
        if n != counts[name]:
            counts[name], reasons[name] = n, why[name]
    return [
        cs.encode_scale(name, counts[name], wall, reasons[name], before[name])
        for name in sorted(reasons)
        if counts[name] != before[name] and state.models[name].scaled
    ]


def model_file_updates(
    models: Iterable[ModelRecord],
    nodes: Iterable[NodeView],
    local: Mapping[str, LocalFile],
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
        held = local.get(m.name)
        if held is not None:
            found = reported.get(m.source)
            sha = m.sha256 or (found[0] if found else None)
            if sha is not None:
                size = m.size if m.size is not None else held.size
                if held.vram is not None or m.sha256 is None:
                    out.append(
                        cs.encode_model_file(
                            m.name,
                            m.source,
                            sha,
                            size,
                            held.vram,
                            held.split_overhead,
                            held.profile,
                        )
                    )
                continue
        if m.sha256 is None and m.source in reported:
            sha, size = reported[m.source]
            out.append(cs.encode_model_file(m.name, m.source, sha, size))
    return out


def registry_updates(
    nodes: Iterable[NodeView], registry: Mapping[str, str], members: Iterable[str] | None = None
) -> list[bytes]:
    """NODE_ADDR commands for alive nodes (of `members`, when given) whose gossiped address
    differs from the one in the Raft state, so a restarted cluster finds them without mDNS;
    and, given `members` (the Raft configuration), NODE_FORGET for registered nodes no
    longer in it (the membership policy removed them, dead past the timeout, or they left)."""
    keep = set(members) if members is not None else None
    out = [
        cs.encode_node_addr(n.id, n.addr)
        for n in sorted(nodes, key=lambda n: n.id)
        if n.state == "alive"
        and n.addr
        and registry.get(n.id) != n.addr
        and (keep is None or n.id in keep)
    ]
    if keep is not None:
        out += [cs.encode_node_forget(node) for node in sorted(registry) if node not in keep]
    return out


def step(
    view: Sequence[NodeView],
    state: ClusterState,
    now: float,
    ctx: Context,
    config: ControllerConfig = DEFAULT_CONFIG,
    membership: MembershipConfig = DEFAULT_MEMBERSHIP,
) -> list[Action]:
    """Everything the leader should do now, in order; the runner does the first and asks
    again. In order: found the cluster, deploy the default model, record model file facts
    and node addresses, commit a new plan, change the voters by one."""
    if state.cluster_id is None and ctx.found_cluster_id is not None:
        return [Propose(cs.encode_init(ctx.found_cluster_id), "found the cluster")]
    if not state.default_applied and config.default_source:
        return [
            Propose(
                cs.encode_deploy(
                    store.model_name(config.default_source),
                    config.default_source,
                    config.default_replicas,
                    config.default_n_ctx,
                    default=True,
                ),
                "deploy the default model",
            )
        ]
    members = [n for n in view if member_of(n, state.cluster_id)]
    out: list[Action] = [
        Propose(c, "model file")
        for c in model_file_updates(state.desired(), members, ctx.local_files)
    ]
    # The registry is by node name; the configuration holds Raft ids (identity.py).
    configured = {*ctx.voters, *ctx.learners}
    in_config = (
        {node_of(r) for r in configured} | {n.id for n in view if n.member in configured}
        if ctx.voters
        else None
    )
    out += [Propose(c, "node address") for c in registry_updates(members, state.nodes, in_config)]
    wall = ctx.wall if ctx.wall is not None else now
    out += [
        Propose(c, "scale")
        for c in scaling_updates(
            state, members, now, wall, config, ctx.local_files, ctx.scaling_config
        )
    ]
    plan = decide(with_wanted(state), members, state.plan, now, config, ctx.local_files)
    if plan is not None:
        why = f"plan: {len(plan.assignments)} instances, {len(plan.unplaced)} unplaced"
        if plan.splits:
            why += ", split: " + "; ".join(
                f"{x.model} over {', '.join(x.nodes)}" for x in plan.splits
            )
        out.append(Propose(cs.encode_plan(plan, ctx.term), why))
    if ctx.voters:
        change = next_conf_change(
            ctx.me,
            ctx.voters,
            ctx.learners,
            # Every node not of another cluster: a voter whose payload this peer has not
            # read yet (just restarted) must not look absent, or it would be removed.
            {n.id: n for n in view if n.cluster_id is None or member_of(n, state.cluster_id)},
            now,
            cluster_id=state.cluster_id,
            caught_up=ctx.caught_up,
            config=membership,
        )
        if change is not None:
            out.append(ChangeConf(change))
    return out
