"""The replicated state machine the Raft log drives: desired models, the committed plan, nodes.

Every peer applies the same committed commands in the same order and so holds the same
state. `apply` is deterministic (no clock, no randomness, no I/O) and never raises on bad
bytes: a command that does not decode or validate is rejected with a reason and changes
nothing, so a bad entry cannot wedge the log.

Commands are msgpack maps `{"v": PROTOCOL, "t": TYPE, ...}`; type numbers are append-only
(DESIGN.md rule 5). Fencing: a plan carries the term of the leader that computed it; a plan
from an older term than the last applied plan is ignored, and so is one that claims a term
newer than the log entry that carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import msgpack

from aivailable.cluster import keys as access_keys
from aivailable.cluster import usage as usage_ledger
from aivailable.cluster.records import (  # noqa: F401  (re-exported: state.ModelRecord etc.)
    DEFAULT_IDLE_UNLOAD_S,
    MAX_REPLICAS,
    MAX_TEXT,
    MODEL_NAME,
    SHA256_HEX,
    CommandError,
    ModelRecord,
    ScaleRecord,
    SnapshotError,
    _int,
    _list,
    _model_record,
    _name,
    _opt_int,
    _profile,
    _sha,
    _text,
)
from placement import Assignment, Plan, Unplaced
from placement.split import Part, Split

PROTOCOL = 1
# Command type numbers: append-only, never reuse or renumber.
INIT = 1  # found the cluster: its id
DEPLOY = 2  # add or change a desired model
UNDEPLOY = 3  # remove a desired model
SET_PLAN = 4  # the leader's placement plan, fenced by its term
SET_MODEL_FILE = 5  # what a model's file turned out to be: checksum, size, VRAM estimate
NODE_ADDR = 6  # a node's HTTP address, so a restarted cluster finds its members without mDNS
NODE_FORGET = 7  # drop a node from the registry (it left for good)
SET_SCALE = 8  # the replicas demand scaling wants for a model, and why

TYPE_NAMES = {
    INIT: "init",
    DEPLOY: "deploy",
    UNDEPLOY: "undeploy",
    SET_PLAN: "set_plan",
    SET_MODEL_FILE: "set_model_file",
    NODE_ADDR: "node_addr",
    NODE_FORGET: "node_forget",
    SET_SCALE: "set_scale",
    **access_keys.TYPE_NAMES,  # 32-47: API keys (cluster/keys.py)
    **usage_ledger.TYPE_NAMES,  # 48-55: the usage ledger (cluster/usage.py)
}


@dataclass(frozen=True)
class ApplyResult:
    ok: bool  # False: rejected, nothing changed
    kind: str  # the command's type name ("unknown" if it did not decode)
    changed: bool = False  # the state differs after it (an undeploy of nothing: False)
    error: str = ""  # why it was rejected
    proposal: str | None = None  # the command's proposal id, when it applied for the first time


# ---- encoding -------------------------------------------------------------------------


def _pack(t: int, **fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL, "t": t, **fields}, use_bin_type=True)


def encode_init(cluster_id: str) -> bytes:
    return _pack(INIT, cluster_id=cluster_id)


def encode_deploy(
    name: str,
    source: str,
    replicas: int = 1,
    n_ctx: int = 2048,
    priority: int = 0,
    sha256: str | None = None,
    size: int | None = None,
    default: bool = False,
    kind: str = "chat",
    n_parallel: int | None = None,
    split: str = "auto",
    kv_type: str = "f16",
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    idle_unload_s: float | None = None,
) -> bytes:
    """`default`: this is the controller deploying the embedded model on a new cluster;
    applying it records that, so the default is never deployed again after an undeploy.
    `min_replicas`/`max_replicas`: scale with demand (None for both: `replicas` fixed)."""
    scaling = {
        k: v
        for k, v in (
            ("min_replicas", min_replicas),
            ("max_replicas", max_replicas),
            ("idle_unload_s", idle_unload_s),
        )
        if v is not None
    }
    return _pack(
        DEPLOY,
        name=name,
        source=source,
        replicas=replicas,
        n_ctx=n_ctx,
        priority=priority,
        sha256=sha256,
        size=size,
        default=default,
        kind=kind,
        n_parallel=n_parallel,
        split=split,
        kv_type=kv_type,
        **scaling,
    )


def encode_scale(name: str, wanted: int, at: float, reason: str, previous: int | None) -> bytes:
    """Demand scaling's count for a scaled model; applies while the model is deployed."""
    return _pack(SET_SCALE, name=name, wanted=wanted, at=at, reason=reason, previous=previous)


def encode_undeploy(name: str) -> bytes:
    return _pack(UNDEPLOY, name=name)


def plan_to_wire(plan: Plan) -> dict:
    return {
        "a": [[a.model, a.node, list(a.gpus), list(a.vram)] for a in plan.assignments],
        "u": [[u.model, u.missing_replicas, u.reason] for u in plan.unplaced],
        **(
            {
                "s": [
                    [s.model, s.primary, [[p.node, p.gpu, p.layers, p.vram] for p in s.parts]]
                    for s in plan.splits
                ]
            }
            if plan.splits
            else {}
        ),
    }


def plan_from_wire(data: Any) -> Plan:
    if not isinstance(data, dict):
        raise CommandError("plan must be a map")
    assignments, unplaced = [], []
    for item in _list(data.get("a", []), "plan assignments"):
        model, node, gpus, vram = _list(item, "assignment")
        gpus = tuple(_text(g, "gpu id") for g in _list(gpus, "gpus"))
        vram = tuple(_int(v, "vram", 0) for v in _list(vram, "vram"))
        try:
            assignments.append(Assignment(_text(model, "model"), _text(node, "node"), gpus, vram))
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
    for item in _list(data.get("u", []), "plan unplaced"):
        model, missing, reason = _list(item, "unplaced")
        unplaced.append(
            Unplaced(_text(model, "model"), _int(missing, "missing", 0), _text(reason, "reason"))
        )
    splits = []
    for item in _list(data.get("s", []), "plan splits"):
        model, primary, parts = _list(item, "split")
        split_parts = []
        for part in _list(parts, "split parts"):
            node, gpu, layers, vram = _list(part, "split part")
            split_parts.append(
                Part(
                    _text(node, "node"),
                    _text(gpu, "gpu id"),
                    _int(layers, "layers", 1),
                    _int(vram, "vram", 0),
                )
            )
        if not split_parts:
            raise CommandError("a split needs parts")
        splits.append(Split(_text(model, "model"), _text(primary, "primary"), split_parts))
    return Plan(assignments=tuple(assignments), unplaced=tuple(unplaced), splits=tuple(splits))


def encode_plan(plan: Plan, term: int) -> bytes:
    """`term`: the proposing leader's term, for fencing."""
    return _pack(SET_PLAN, term=term, plan=plan_to_wire(plan))


def encode_model_file(
    name: str,
    source: str,
    sha256: str,
    size: int,
    vram: int | None = None,
    split_overhead: int | None = None,
    profile: tuple[int, ...] | None = None,
) -> bytes:
    """Applies only while `name` is still deployed from `source` (a later redeploy wins)."""
    return _pack(
        SET_MODEL_FILE,
        name=name,
        source=source,
        sha256=sha256,
        size=size,
        vram=vram,
        split_overhead=split_overhead,
        **({"profile": list(profile)} if profile is not None else {}),
    )


def encode_node_addr(node: str, addr: str) -> bytes:
    return _pack(NODE_ADDR, node=node, addr=addr)


def encode_node_forget(node: str) -> bytes:
    return _pack(NODE_FORGET, node=node)


def decode(data: bytes) -> dict:
    """Bytes -> a command map with "v" and "t" checked; CommandError on anything else."""
    try:
        cmd = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types on garbage
        raise CommandError(f"not msgpack: {exc}") from exc
    if not isinstance(cmd, dict):
        raise CommandError("a command must be a map")
    if cmd.get("v") != PROTOCOL:
        raise CommandError(f"unsupported protocol version {cmd.get('v')!r}")
    t = cmd.get("t")
    if not isinstance(t, int) or isinstance(t, bool) or t not in TYPE_NAMES:
        raise CommandError(f"unknown command type {t!r}")
    return cmd


# ---- the state machine -----------------------------------------------------------------


class ClusterState:
    """What the committed log says. Read it from anywhere; change it only through `apply`."""

    def __init__(self) -> None:
        self.cluster_id: str | None = None
        self.models: dict[str, ModelRecord] = {}
        self.plan: Plan | None = None
        self.plan_term = 0  # term of the leader that ordered the current plan
        self.plan_version = 0  # bumps on every accepted plan
        self.models_version = 0  # bumps on every change to the desired models
        self.default_applied = False  # the embedded model was deployed once (undeploy sticks)
        self.nodes: dict[str, str] = {}  # node id -> HTTP address "host:port"
        self.scale: dict[str, ScaleRecord] = {}  # model -> demand scaling's last decision
        self.access = access_keys.AccessState()  # API keys and applied proposal ids
        self.usage = usage_ledger.UsageState()  # requests and tokens per key, model, day

    # -- reading

    def desired(self) -> list[ModelRecord]:
        return [self.models[k] for k in sorted(self.models)]

    def wanted_replicas(self, name: str) -> int:
        """The replicas placement should give `name`: a fixed deploy's count, or what
        demand scaling committed last (within the deploy's bounds; its start before)."""
        record = self.models[name]
        if not record.scaled:
            return record.replicas
        scale = self.scale.get(name)
        wanted = scale.wanted if scale is not None else record.replicas
        return max(record.min_replicas, min(record.max_replicas, wanted))

    def assignments_for(self, node: str) -> tuple[Assignment, ...]:
        return self.plan.for_node(node) if self.plan is not None else ()

    # -- applying

    def apply(self, data: bytes, term: int = 0) -> ApplyResult:
        """Apply one committed command. `term`: the Raft entry's term (0: unknown)."""
        try:
            cmd = decode(bytes(data))
        except (CommandError, TypeError) as exc:
            return ApplyResult(False, "unknown", error=str(exc))
        kind = TYPE_NAMES[cmd["t"]]
        pid = None  # the proposal id, once it is known to apply for the first time
        try:
            if not self.access.first_time(cmd):  # each proposal id applies once
                return ApplyResult(False, kind, error="replayed proposal (id applied before)")
            pid = cmd.get(access_keys.PROPOSAL_FIELD)
            if cmd["t"] in access_keys.TYPE_NAMES:
                changed = self.access.apply(cmd)
            elif cmd["t"] in usage_ledger.TYPE_NAMES:
                changed = self.usage.apply(cmd)
            else:
                changed = getattr(self, f"_apply_{kind}")(cmd, term)
        except (
            CommandError,
            access_keys.AccessCommandError,
            usage_ledger.UsageCommandError,
        ) as exc:
            return ApplyResult(False, kind, error=str(exc), proposal=pid)
        except Exception as exc:  # a malformed field deep inside: reject, never wedge the log
            return ApplyResult(False, kind, error=f"malformed {kind}: {exc!r}", proposal=pid)
        return ApplyResult(True, kind, changed=changed, proposal=pid)

    def _apply_init(self, cmd: dict, term: int) -> bool:
        cluster_id = _text(cmd.get("cluster_id"), "cluster_id")
        if self.cluster_id is not None:
            if self.cluster_id != cluster_id:
                raise CommandError(f"cluster already founded as {self.cluster_id}")
            return False
        self.cluster_id = cluster_id
        return True

    def _apply_deploy(self, cmd: dict, term: int) -> bool:
        record = _model_record(cmd)
        name, source = record.name, record.source
        default = cmd.get("default", False) is True
        old = self.models.get(name)
        if old is not None and old.source == source:
            # Same file: keep what is known of it unless the command says more.
            record = replace(
                record,
                sha256=record.sha256 or old.sha256,
                size=record.size if record.size is not None else old.size,
            )
            if (old.n_ctx, old.n_parallel, old.kv_type) == (
                record.n_ctx,
                record.n_parallel,
                record.kv_type,
            ) and (record.sha256 == old.sha256):
                record = replace(
                    record,
                    vram=old.vram,
                    split_overhead=old.split_overhead,
                    profile=old.profile,
                )
        changed = default and not self.default_applied
        if default:
            self.default_applied = True
            if old is not None:  # someone deployed it by hand first: leave theirs alone
                return changed
        if old != record:
            self.models[name] = record
            self.models_version += 1
            changed = True
            if old is None or (old.source, old.min_replicas, old.max_replicas) != (
                record.source,
                record.min_replicas,
                record.max_replicas,
            ):
                self.scale.pop(name, None)  # new bounds: start again from `replicas`
        return changed

    def _apply_undeploy(self, cmd: dict, term: int) -> bool:
        name = _name(cmd.get("name"))
        if self.models.pop(name, None) is None:
            return False
        self.scale.pop(name, None)
        self.models_version += 1
        return True

    def _apply_set_scale(self, cmd: dict, term: int) -> bool:
        name = _name(cmd.get("name"))
        record = self.models.get(name)
        if record is None or not record.scaled:
            raise CommandError(f"{name} is not deployed with min_replicas/max_replicas")
        wanted = _int(cmd.get("wanted"), "wanted", record.min_replicas, record.max_replicas)
        at = cmd.get("at", 0.0)
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise CommandError("at must be a number")
        reason = cmd.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_TEXT:
            raise CommandError("reason must be a string")
        previous = cmd.get("previous")
        new = ScaleRecord(
            wanted, float(at), reason, None if previous is None else _int(previous, "previous", 0)
        )
        if self.scale.get(name) == new:
            return False
        self.scale[name] = new
        self.models_version += 1
        return True

    def _apply_set_plan(self, cmd: dict, term: int) -> bool:
        plan_term = _int(cmd.get("term"), "term", 0)
        if term and plan_term > term:
            raise CommandError(f"plan claims term {plan_term} inside an entry of term {term}")
        if plan_term < self.plan_term:
            raise CommandError(
                f"stale plan: ordered in term {plan_term}, the current plan is from term "
                f"{self.plan_term}"
            )
        plan = plan_from_wire(cmd.get("plan"))
        self.plan_term = plan_term
        if plan == self.plan:
            return False
        self.plan = plan
        self.plan_version += 1
        return True

    def _apply_set_model_file(self, cmd: dict, term: int) -> bool:
        name = _name(cmd.get("name"))
        source = _text(cmd.get("source"), "source")
        sha256 = _sha(cmd.get("sha256"))
        size = _int(cmd.get("size"), "size", 0)
        vram = _opt_int(cmd.get("vram"), "vram")
        split = _opt_int(cmd.get("split_overhead"), "split_overhead")
        profile = _profile(cmd.get("profile"))
        old = self.models.get(name)
        if old is None or old.source != source:
            raise CommandError(f"{name} is no longer deployed from {source}")
        if old.sha256 not in (None, sha256):
            raise CommandError(f"{name}: checksum differs from the one recorded")
        new = replace(
            old,
            sha256=sha256,
            size=size,
            vram=vram if vram is not None else old.vram,
            split_overhead=split if split is not None else old.split_overhead,
            profile=profile if profile is not None else old.profile,
        )
        if new == old:
            return False
        self.models[name] = new
        self.models_version += 1
        return True

    def _apply_node_addr(self, cmd: dict, term: int) -> bool:
        node = _text(cmd.get("node"), "node")
        addr = _text(cmd.get("addr"), "addr")
        if self.nodes.get(node) == addr:
            return False
        self.nodes[node] = addr
        return True

    def _apply_node_forget(self, cmd: dict, term: int) -> bool:
        return self.nodes.pop(_text(cmd.get("node"), "node"), None) is not None

    # -- snapshots

    def to_wire(self) -> dict:
        return {
            "v": PROTOCOL,
            "cluster_id": self.cluster_id,
            "models": [self.models[k].to_wire() for k in sorted(self.models)],
            "plan": plan_to_wire(self.plan) if self.plan is not None else None,
            "plan_term": self.plan_term,
            "plan_version": self.plan_version,
            "models_version": self.models_version,
            "default_applied": self.default_applied,
            "nodes": [[k, self.nodes[k]] for k in sorted(self.nodes)],
            "access": self.access.to_wire(),
            "scale": [[k, self.scale[k].to_wire()] for k in sorted(self.scale)],
            "usage": self.usage.to_wire(),
        }

    def snapshot(self) -> bytes:
        """Canonical bytes: equal states give equal snapshots."""
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's; SnapshotError leaves it unchanged."""
        try:
            wire = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
            if not isinstance(wire, dict) or wire.get("v") != PROTOCOL:
                raise CommandError("not a cluster state snapshot of this protocol")
            fresh = ClusterState()
            cid = wire.get("cluster_id")
            fresh.cluster_id = None if cid is None else _text(cid, "cluster_id")
            for m in _list(wire.get("models", []), "models"):
                record = _model_record(m, measured=True)
                fresh.models[record.name] = record
            plan = wire.get("plan")
            fresh.plan = None if plan is None else plan_from_wire(plan)
            fresh.plan_term = _int(wire.get("plan_term", 0), "plan_term", 0)
            fresh.plan_version = _int(wire.get("plan_version", 0), "plan_version", 0)
            fresh.models_version = _int(wire.get("models_version", 0), "models_version", 0)
            fresh.default_applied = wire.get("default_applied") is True
            for node, addr in _list(wire.get("nodes", []), "nodes"):
                fresh.nodes[_text(node, "node")] = _text(addr, "addr")
            fresh.access = access_keys.AccessState.from_wire(wire.get("access"))
            for name, rec in _list(wire.get("scale", []), "scale"):
                if not isinstance(rec, dict):
                    raise CommandError("a scale record must be a map")
                prev = rec.get("previous")
                fresh.scale[_name(name)] = ScaleRecord(
                    _int(rec.get("wanted"), "wanted", 0, MAX_REPLICAS),
                    float(rec.get("at", 0.0)),
                    str(rec.get("reason", "")),
                    None if prev is None else _int(prev, "previous", 0),
                )
            fresh.usage = usage_ledger.UsageState.from_wire(wire.get("usage"))
        except Exception as exc:
            raise SnapshotError(f"cannot restore cluster state: {exc}") from exc
        self.__dict__.update(fresh.__dict__)


__all__ = [
    "DEPLOY",
    "INIT",
    "NODE_ADDR",
    "NODE_FORGET",
    "PROTOCOL",
    "SET_MODEL_FILE",
    "SET_PLAN",
    "SET_SCALE",
    "UNDEPLOY",
    "ApplyResult",
    "ClusterState",
    "CommandError",
    "ModelRecord",
    "ScaleRecord",
    "SnapshotError",
    "decode",
    "encode_deploy",
    "encode_init",
    "encode_model_file",
    "encode_node_addr",
    "encode_node_forget",
    "encode_plan",
    "encode_scale",
    "encode_undeploy",
    "plan_from_wire",
    "plan_to_wire",
]
