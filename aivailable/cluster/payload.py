"""What one node gossips about itself, and its parser: the one place the payload format lives.

`node_payload` builds the msgpack-friendly map a node sets on its gossip member;
`read_payload` reads any peer's map back, checked, into a `PeerPayload`. A peer running
another version never crashes this one: a payload it cannot read offers nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aivailable.backends.demand import Signals
from aivailable.gpu.readings import ECC_MAX, TEMP_RANGE, as_int
from placement import Gpu

MIB = 1 << 20
PAYLOAD_VERSION = 1


def gpu_capacity(total: int, free: int, own_used: int, headroom: int, step: int = 64 * MIB) -> int:
    """Bytes placement may use on a GPU: total, minus what other programs hold (used but
    not by our instances), minus headroom; rounded down to `step`."""
    others = max(0, total - free - own_used)
    usable = max(0, total - others - headroom)
    return usable - usable % step if step > 0 else usable


@dataclass(frozen=True)
class InstanceView:
    model: str
    state: str
    queue_depth: int = 0
    gpus: tuple[str, ...] = ()
    free_slots: int = 0  # requests it would start at once
    demand: Signals | None = None  # its measured demand (backends/demand.py); None: unknown


@dataclass(frozen=True)
class PeerPayload:
    """What one node gossips about itself (read_payload of node_payload)."""

    addr: str = ""  # HOST:PORT of its HTTP API
    cluster_id: str | None = None
    gpus: tuple[Gpu, ...] = ()  # ids prefixed with the node id, capacity as above
    vram_total: tuple[int, ...] = ()  # per gpu, same order, for the dashboard
    vram_free: tuple[int, ...] = ()
    instances: tuple[InstanceView, ...] = ()
    files: tuple[tuple[str, int, str], ...] = ()  # (sha256, size, source) it can share
    member: str | None = None  # its Raft id (aivailable/cluster/identity.py); None: not known
    # The llama.cpp RPC protocol version its library speaks ("7.0.0"; None: no RPC), and
    # whether its RPC server runs now: split models pair only equal versions.
    rpc_version: str | None = None
    rpc_ready: bool = False
    # model -> requests this peer holds waiting for a replica that is not ready (a model
    # scaled to zero, or one still loading): the leader places it when it reads this.
    waiting: tuple[tuple[str, int], ...] = ()
    # Cards it has but its llama.cpp build cannot drive: (gpu id, vendor, name, reason).
    # Never in `gpus`, so placement never sees them.
    unusable: tuple[tuple[str, str, str, str], ...] = ()
    # Per gpu, same order: (°C, % busy, uncorrected ECC errors, °C limit), None = unknown.
    readings: tuple[tuple[int | None, int | None, int | None, int | None], ...] = ()
    # It reads Raft heartbeats on the gossip channel ("rd"): a leader sends them there only
    # to peers that say so, so a peer of an older version still hears them by HTTP.
    raft_datagrams: bool = False


def node_payload(
    addr: str,
    cluster_id: str | None,
    gpus: Sequence[Any],
    own_used: Mapping[str, int],
    instances: Iterable[Mapping[str, Any]],
    files: Iterable[tuple[str, int, str]] = (),
    headroom: int = 256 * MIB,
    capacity_step: int = 64 * MIB,
    member: str | None = None,
    rpc_version: str | None = None,
    rpc_ready: bool = False,
    waiting: Mapping[str, int] | None = None,
) -> dict:
    """The gossip payload (a msgpack-friendly map). gpus: aivailable.gpu.GpuInfo items (id,
    vendor, name, vram_total, vram_free); own_used: bytes our instances hold per local gpu
    id (Reconciler.own_vram); instances: Instances views (+ pending fetches); member: this
    node's Raft id (identity.py), so the leader maps gossip members to Raft members;
    waiting: requests held per model for a replica that is not ready yet. An instance view
    may carry "demand": backends.demand.Signals, gossiped rounded.
    Only usable GPUs go in "gpus" (older peers place on exactly those); "gb" holds their
    llama.cpp backends, "nogpu" the cards this build cannot drive, with the reason, and
    "gh" their NVML/amdsmi readings, small ints (absent when no card has any)."""
    unusable = [g for g in gpus if not getattr(g, "usable", True)]
    gpus = [g for g in gpus if getattr(g, "usable", True)]
    payload = {
        "v": PAYLOAD_VERSION,
        "addr": addr,
        "cluster": cluster_id,
        "gpus": [
            [
                g.id,
                g.vendor,
                g.name,
                gpu_capacity(
                    g.vram_total,
                    g.vram_free,
                    own_used.get(g.id, 0),
                    headroom,
                    capacity_step,
                ),
                g.vram_total,
                g.vram_free,
            ]
            for g in gpus
        ],
        "inst": [
            [
                v["model"],
                v["state"],
                int(v.get("queue_depth", 0)),
                list(v.get("gpus", ())),
                int(v.get("free_slots", 0)),
                *([v["demand"].wire()] if v.get("demand") is not None else []),
            ]
            for v in instances
        ],
        "files": [[sha, size, source] for sha, size, source in files],
        "gb": [getattr(g, "backend", "") for g in gpus],
        "rd": 1,
    }
    readings = [_wire_readings(g) for g in gpus]
    if any(any(x is not None for x in r) for r in readings):
        payload["gh"] = readings
    if unusable:
        payload["nogpu"] = [[g.id, g.vendor, g.name, getattr(g, "reason", "")] for g in unusable]
    if member is not None:
        payload["member"] = member
    if rpc_version is not None:
        payload["rpc"] = [rpc_version, bool(rpc_ready)]
    if waiting:
        payload["wait"] = [[m, int(n)] for m, n in sorted(waiting.items()) if n > 0]
    return payload


def _wire_readings(g: Any) -> list[int | None]:
    """[°C, % busy, uncorrected ECC errors, °C limit]: at most 3 bytes each in msgpack
    (clamped), so a GPU adds at most 9 bytes to the payload."""
    return [
        as_int(getattr(g, "temperature", None), *TEMP_RANGE),
        as_int(getattr(g, "utilization", None), 0, 100),
        as_int(getattr(g, "ecc_errors", None), 0, ECC_MAX),
        as_int(getattr(g, "temp_limit", None), *TEMP_RANGE),
    ]


def _readings(raw: Any, n: int) -> tuple[tuple[int | None, ...], ...]:
    """The "gh" list, one entry per gpu; absent (older peers, no readings) or malformed
    entries read as unknown."""
    entries = list(raw) if isinstance(raw, list | tuple) else []
    out = []
    for i in range(n):
        e = entries[i] if i < len(entries) and isinstance(entries[i], list | tuple) else ()
        e = list(e[:4]) + [None] * (4 - len(e[:4]))
        lo, hi = TEMP_RANGE
        out.append(
            (
                as_int(e[0], lo, hi),
                as_int(e[1], 0, 100),
                as_int(e[2], 0, ECC_MAX),
                as_int(e[3], lo, hi),
            )
        )
    return tuple(out)


def _instance(entry: Sequence[Any]) -> InstanceView:
    """[model, state, queue depth, gpus] and, from peers that batch, free slots, and from
    peers that measure demand, its signals."""
    model, state, depth, gpus = entry[:4]
    free = int(entry[4]) if len(entry) > 4 else 0
    demand = Signals.from_wire(entry[5]) if len(entry) > 5 else None
    return InstanceView(
        str(model), str(state), int(depth), tuple(str(g) for g in gpus), free, demand
    )


def _backends(raw: Any) -> list[str]:
    """The "gb" list; absent (an older peer) or malformed means no backend known."""
    if not isinstance(raw, list | tuple):
        return []
    return [b if isinstance(b, str) else "" for b in raw]


def _unusable(raw: Any) -> tuple[tuple[str, str, str, str], ...]:
    """The "nogpu" list, for status and the dashboard; a malformed one reads as empty."""
    if not isinstance(raw, list | tuple):
        return ()
    out = []
    for entry in raw:
        if isinstance(entry, list | tuple) and len(entry) >= 4:
            out.append(tuple(str(x) for x in entry[:4]))
    return tuple(out)


def read_payload(node_id: str, payload: Mapping[str, Any] | None) -> PeerPayload:
    """A peer's payload, checked; anything malformed reads as empty (a peer running another
    version never crashes this one, it just offers nothing to place on)."""
    if not isinstance(payload, Mapping) or payload.get("v") != PAYLOAD_VERSION:
        return PeerPayload()
    try:
        gpus, totals, frees = [], [], []
        backends = _backends(payload.get("gb"))
        for i, (gid, vendor, name, capacity, total, free) in enumerate(payload.get("gpus", ())):
            backend = backends[i] if i < len(backends) else ""
            gpus.append(Gpu(f"{node_id}/{gid}", vendor, str(name), int(capacity), backend))
            totals.append(int(total))
            frees.append(int(free))
        instances = tuple(_instance(entry) for entry in payload.get("inst", ()))
        files = tuple(
            (str(sha), int(size), str(src)) for sha, size, src in payload.get("files", ())
        )
        cluster = payload.get("cluster")
        member = payload.get("member")
        rpc = payload.get("rpc")
        rpc_version, rpc_ready = (str(rpc[0]), bool(rpc[1])) if rpc else (None, False)
        waiting = tuple((str(m), int(n)) for m, n in payload.get("wait", ()))
        return PeerPayload(
            str(payload.get("addr", "")),
            cluster if isinstance(cluster, str) else None,
            tuple(gpus),
            tuple(totals),
            tuple(frees),
            instances,
            files,
            member if isinstance(member, str) and member else None,
            rpc_version,
            rpc_ready,
            waiting,
            _unusable(payload.get("nogpu")),
            readings=_readings(payload.get("gh"), len(gpus)),
            raft_datagrams=payload.get("rd") == 1,
        )
    except (TypeError, ValueError):
        return PeerPayload()
