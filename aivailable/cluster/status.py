"""The `/cluster/status` document (DESIGN.md): nodes from the read model, models from the
committed state and plan. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

from aivailable.cluster.controller import model_demand
from aivailable.cluster.payload import PeerPayload
from aivailable.cluster.state import ClusterState
from aivailable.cluster.view import ReadModel, rpc_pairing
from aivailable.gpu.info import health

# What to tell someone who sees another cluster with the same key: its nodes are ignored
# until they are made to join this one on purpose.
JOIN_HINT = (
    "another cluster shares this cluster key; its nodes are ignored. To merge, stop those "
    "peers, clear their data dirs' raft state and cluster_id, and start them again: a peer "
    "without state joins the cluster it sees"
)


def gpu_views(p: PeerPayload) -> list[dict]:
    """A node's usable GPUs as /cluster/status shows them: memory, backend, and what
    NVML/amdsmi read (None where unknown), with `health` "" or why the card is unwell."""
    readings = p.readings or ((None,) * 4,) * len(p.gpus)
    return [
        {
            "id": g.id,
            "vendor": g.vendor,
            "name": g.name,
            "vram_total": total,
            "vram_free": free,
            "capacity": g.capacity,
            "backend": g.backend,
            "temperature": temp,
            "utilization": util,
            "ecc_errors": ecc,
            "temp_limit": limit,
            "health": health(temp, limit, ecc),
        }
        for g, total, free, (temp, util, ecc, limit) in zip(
            p.gpus, p.vram_total, p.vram_free, readings, strict=False
        )
    ]


def scaling_status(record, state: ClusterState, view: ReadModel) -> dict:
    """A scaled model's bounds, wanted and current replicas, demand and last decision."""
    members = view.members(state.cluster_id)
    ready = sum(
        1
        for n in members
        if n.state in ("alive", "suspect")
        for i in n.payload.instances
        if i.model == record.name and i.state == "ready"
    )
    last = state.scale.get(record.name)
    return {
        "min_replicas": record.min_replicas,
        "max_replicas": record.max_replicas,
        "idle_unload_s": record.idle_unload_s,
        "wanted": state.wanted_replicas(record.name),
        "current": ready,
        "demand": model_demand(members, record.name).to_dict(),
        "last_decision": None
        if last is None
        else {"from": last.previous, "to": last.wanted, "at": last.at, "reason": last.reason},
    }


def cluster_status(
    node_id: str,
    leader: str | None,
    term: int,
    state: ClusterState,
    view: ReadModel,
    voters: Iterable[str] = (),
    learners: Iterable[str] = (),
) -> dict:
    """The /cluster/status body: nodes from gossip (this one included), models from the
    committed state and plan, each placement with its instance's state as gossiped."""
    cid = state.cluster_id
    instance_state = view.instance_states(cid)
    members = [e for e in view.nodes() if e.cluster_id in (None, cid) or cid is None]
    rpc_version, rpc_skipped = rpc_pairing([e for e in members if e.state == "alive"])
    nodes = []
    # Nodes of this cluster, and those of none yet (a peer still listening, a payload this
    # version cannot read): shown, though never placed on. Other clusters are listed apart.
    for e in (n for n in view.nodes() if n.cluster_id in (None, cid) or cid is None):
        p = e.payload
        nodes.append(
            {
                "id": e.id,
                "addr": p.addr,
                "state": e.state,
                "incarnation": e.incarnation,
                "member": e.member,  # its Raft id (None: not advertised)
                "gpus": gpu_views(p),
                "unusable_gpus": [
                    {"id": gid, "vendor": vendor, "name": name, "reason": reason}
                    for gid, vendor, name, reason in p.unusable
                ],
                "instances": [
                    {
                        "model": i.model,
                        "state": i.state,
                        "queue_depth": i.queue_depth,
                        "free_slots": i.free_slots,
                        "gpus": list(i.gpus),
                        **({"demand": asdict(i.demand)} if i.demand is not None else {}),
                    }
                    for i in p.instances
                ],
                # llama.cpp RPC: the version this node speaks, whether its RPC server runs,
                # and why split models leave it out (another version, no RPC backend)
                "rpc": {
                    "version": p.rpc_version,
                    "server": p.rpc_ready,
                    "paired": rpc_version is not None and p.rpc_version == rpc_version,
                    **({"skipped": rpc_skipped[e.id]} if e.id in rpc_skipped else {}),
                },
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
        # A split instance is one placement on its primary, with its parts listed.
        for split in state.plan.splits if state.plan else ():
            if split.model != record.name:
                continue
            placements.append(
                {
                    "node": split.primary,
                    "gpus": [p.gpu for p in split.parts if p.node == split.primary],
                    "vram": sum(p.vram for p in split.parts),
                    "state": instance_state.get((split.primary, split.model), "pending"),
                    "split": True,
                    "parts": [p.to_dict() for p in split.parts],
                }
            )
        model = {
            "name": record.name,
            "source": record.source,
            "replicas": record.replicas,
            "n_ctx": record.n_ctx,
            "priority": record.priority,
            "split": record.split,
            "placements": placements,
        }
        if record.kv_type != "f16":  # shown when it differs from llama.cpp's default
            model["kv_type"] = record.kv_type
        if record.scaled:
            model["scaling"] = scaling_status(record, state, view)
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
        "rpc": {"version": rpc_version, "skipped": rpc_skipped},
        "other_clusters": [
            {"cluster_id": other, "nodes": ids, "hint": JOIN_HINT}
            for other, ids in sorted(view.other_clusters(cid).items())
        ],
    }
