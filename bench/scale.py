"""Scale: a 30-peer cluster on loopback, a 1,000-peer gossip simulation, placement at 1,000.

a. Real peers (`python -m aivailable up`, --no-mdns, joined through 3 seeds): half with a
   simulated GPU (`--gpu fake:G:8GiB`), half routing-only (`--cpu no`). Measured:
   - all alive: from starting them all until every peer's /cluster/status lists all alive
     and one leader;
   - idle: CPU per peer (from /proc over a quiet window), gossip bytes sent per peer per
     second (UDP, the transport's counter; push-pull over HTTP is not in it), the Raft
     heartbeat datagrams' bytes apart (per peer and of the leader), RSS per peer;
   - deploy to serving: the embedded model with 1 replica, from the POST until a chat
     through a routing-only peer answers;
   - kill -9 of a follower: until every other peer shows it not alive, and dead;
   - leader failover: kill -9 of the leader until a survivor names another leader.
   Polls run every ~0.2 s per peer, so each figure includes up to one poll.
b. Simulation (tests/sim/gossip_sim.py, seeded, 1,000 Membership cores, LAN latency):
   seconds and gossip rounds (a round = one gossip interval) until every node sees a
   joiner alive, a crashed node dead, and both halves of a healed partition alive again;
   bytes sent per peer per second over each (datagram bytes as the transport seals them).
   And at 30 nodes, 40 seeds each, with probes every 0.5 s and every 1 s: a crash until
   every other node suspects it (why the probe interval stays 0.5 s).
c. placement.solve of 200 models on 1,000 nodes (bench/placement.py's random clusters).

    python bench/scale.py [--peers 30] [--sim-nodes 1000] [--only real|sim|placement]
    python bench/scale.py --only real --peers 5 --idle-only   # idle figures only, quick

Prints a table and writes bench/results/scale.json. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from random import Random

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import PeerProcess, free_port, get_json  # noqa: E402
from bench.placement import GIB, MODEL_SIZES_GIB  # noqa: E402
from bench.placement import cluster as random_cluster  # noqa: E402
from peer.config import GossipConfig  # noqa: E402
from peer.crypto import OVERHEAD  # noqa: E402
from peer.messages import Packet  # noqa: E402
from peer.secret import load_or_create_secret  # noqa: E402
from peer.transport import split_into_datagrams  # noqa: E402
from placement import ModelSpec, solve  # noqa: E402
from tests.sim.gossip_sim import GossipSim  # noqa: E402

MODEL = "smollm2-135m"
POOL = ThreadPoolExecutor(32)


# ---------------------------------------------------------------- a. real peers


def status(peer: PeerProcess) -> dict | None:
    try:
        return get_json(peer.url + "/cluster/status", 10.0)
    except (OSError, ValueError):
        return None


def statuses(peers: list[PeerProcess]) -> list[dict | None]:
    return list(POOL.map(status, peers))


def until(predicate, timeout: float, poll: float = 0.2) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(poll)
    return None


def states(st: dict | None) -> dict[str, str]:
    return {n["id"]: n["state"] for n in (st or {}).get("nodes", [])}


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def gossip_bytes(peer: PeerProcess, counter: str = "transport_bytes_sent") -> float:
    """A transport counter: gossip's own bytes sent, or with counter="transport_app_bytes_sent"
    the other parts' datagrams (Raft's heartbeats and their answers)."""
    with urllib.request.urlopen(peer.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f'aivailable_gossip{{counter="{counter}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def udp_bytes(peer: PeerProcess) -> tuple[float, float]:
    return gossip_bytes(peer), gossip_bytes(peer, "transport_app_bytes_sent")


def real_cluster(n: int, idle_window: float, idle_only: bool = False) -> dict:
    base = Path(tempfile.mkdtemp(prefix="aiv-scale-"))
    key = base / "cluster.key"
    load_or_create_secret(key)
    ports = [free_port() for _ in range(n)]
    seeds = [a for p in ports[:3] for a in ("--join", f"127.0.0.1:{p}")]
    peers = [
        PeerProcess(
            base,
            f"p{i:02d}",
            "--cluster-key-file",
            str(key),
            "--no-mdns",
            "--model",
            "none",
            *seeds,
            *(("--gpu", "fake:G:8GiB") if i % 2 else ("--cpu", "no")),
            port=ports[i],
        )
        for i in range(n)
    ]
    out: dict = {"peers": n}
    try:
        t0 = time.monotonic()
        for p in peers:
            p.start()

        last: dict = {}

        def all_alive() -> bool:
            sts = statuses(peers)
            alive = [sum(s == "alive" for s in states(st).values()) if st else -1 for st in sts]
            last["alive"] = alive
            return all(a == n for a in alive)

        def one_leader() -> bool:
            leaders = [st.get("leader") if st else "?" for st in statuses(peers)]
            last["leaders"] = sorted({str(x) for x in leaders})
            return len(set(leaders)) == 1 and leaders[0] not in (None, "?")

        seen = until(all_alive, 300, poll=0.5)
        out["all_alive_s"] = None if seen is None else time.monotonic() - t0
        agreed = until(one_leader, 120, poll=0.5)
        out["one_leader_s"] = None if agreed is None else time.monotonic() - t0
        out["last_seen"] = last  # what the polls saw last, for a figure that timed out
        time.sleep(5)  # let start-up settle before the idle window
        before = {p.name: (proc_stat(p.proc.pid), udp_bytes(p)) for p in peers}
        w0 = time.monotonic()
        time.sleep(idle_window)
        window = time.monotonic() - w0
        cpu, rss, gossip, raft_udp = [], [], [], []
        for p in peers:
            (c0, _), (b0, a0) = before[p.name]
            c1, r1 = proc_stat(p.proc.pid)
            cpu.append(100 * (c1 - c0) / window)
            rss.append(r1)
            b1, a1 = udp_bytes(p)
            gossip.append((b1 - b0) / window)
            raft_udp.append((a1 - a0) / window)
        leader = (status(peers[-1]) or {}).get("leader")
        out["idle_cpu_pct"] = summary(cpu)
        out["idle_cpu_pct_leader"] = next(
            (c for p, c in zip(peers, cpu, strict=True) if p.name == leader), None
        )
        out["gossip_bytes_per_s"] = summary(gossip)
        out["raft_datagram_bytes_per_s"] = summary(raft_udp)
        out["raft_datagram_bytes_per_s_leader"] = next(
            (b for p, b in zip(peers, raft_udp, strict=True) if p.name == leader), None
        )
        out["rss_mib"] = summary([r / 2**20 for r in rss])
        if idle_only:  # the edit loop's measurement: no deploy, no kills
            return out

        # Deploy to serving, through a routing-only peer.
        router = peers[2]
        t0 = time.monotonic()
        body = {"name": MODEL, "source": f"builtin:{MODEL}", "replicas": 1, "n_parallel": 2}
        post(router.url + "/cluster/models", body)
        chat = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        served = until(lambda: ok(router.url + "/v1/completions", chat), 240, poll=0.3)
        out["deploy_to_serving_s"] = served

        # kill -9 of followers (fake-GPU peers that host nothing), one at a time.
        kills = []
        alive = list(peers)
        for victim in [p for p in peers[5::6] if p.name != leader][:3]:
            victim.proc.kill()
            victim.proc.wait()
            alive.remove(victim)
            gone = until(
                lambda v=victim: all(
                    st and states(st).get(v.name, "gone") != "alive" for st in statuses(alive)
                ),
                60,
            )
            dead = until(
                # dead, or already dropped from the view (a removed Raft member, reaped)
                lambda v=victim: all(
                    st and states(st).get(v.name, "dead") in ("dead", "left")
                    for st in statuses(alive)
                ),
                60,
            )
            kills.append({"not_alive_s": gone, "dead_s": None if dead is None else gone + dead})
        out["kill9"] = kills

        failovers = []
        for _ in range(2):
            leader = (status(alive[0]) or {}).get("leader")
            victim = next((p for p in alive if p.name == leader), None)
            if victim is None:
                break
            victim.proc.kill()
            victim.proc.wait()
            alive.remove(victim)
            took = until(
                lambda old=leader: (status(alive[0]) or {}).get("leader") not in (None, old), 30
            )
            failovers.append(took)
            time.sleep(3)
        out["leader_failover_s"] = failovers
    finally:
        for p in peers:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    return out


def post(url: str, body: dict) -> None:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()


def ok(url: str, body: dict) -> bool:
    try:
        post(url, body)
        return True
    except OSError:
        return False


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "p50": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "mean": statistics.fmean(values),
    }


# ---------------------------------------------------------------- b. simulation

# Bytes the transport adds to each sealed datagram (key id, nonce, tag) and UDP/IPv4 headers.
SEAL_BYTES = OVERHEAD
IP_UDP_BYTES = 28


class MeteredSim(GossipSim):
    """GossipSim that also counts the bytes each node sends, as sealed datagrams."""

    sent_bytes = 0

    def _flush(self, node) -> None:  # noqa: ANN001 - the sim's own node type
        outputs = node.core.take_outputs()
        for out in outputs:
            if isinstance(out, Packet):
                limit = node.core.config.packet_size
                for datagram in split_into_datagrams(out.messages, limit):
                    self.sent_bytes += len(datagram) + SEAL_BYTES + IP_UDP_BYTES
        node.core._outputs.extend(outputs)  # put back for the sim's own handling
        super()._flush(node)


def simulate(n: int, seed: int, partition: bool = True) -> dict:
    sim = MeteredSim(n, seed=seed)
    interval = sim.config.gossip_interval
    sim.run_until(5.0)
    rows = {}

    def measure(what: str, start, predicate, timeout: float = 120.0) -> None:
        start()
        b0, t0 = sim.sent_bytes, sim.now
        took = sim.run_until_true(predicate, timeout)
        span = max(sim.now - t0, 1e-9)
        rows[what] = {
            "seconds": took,
            "rounds": None if took is None else took / interval,
            "bytes_per_peer_per_s": (sim.sent_bytes - b0) / span / len(sim.live()),
        }

    names = sorted(sim.nodes)
    measure(
        "join",
        lambda: sim.add_node("joiner", join=names[0]),
        lambda: sim.all_see("joiner", ("alive",)),
    )
    victim = names[n // 2]
    measure("crash", lambda: sim.crash(victim), lambda: sim.all_dead(victim))
    if not partition:
        return {"nodes": n, "seed": seed, **rows}
    half = [x for x in names if x != victim]
    left, right = half[: len(half) // 2], half[len(half) // 2 :] + ["joiner"]
    sim.partition(left, right)
    sim.run_until(sim.now + 30.0)  # long enough for each side to declare the other dead
    measure(
        "partition_heal",
        sim.heal,
        lambda: all(sim.all_see(x, ("alive",)) for x in (left[0], right[0])),
        300.0,
    )
    b0 = sim.sent_bytes
    sim.run_until(sim.now + 20.0)
    rows["steady"] = {"bytes_per_peer_per_s": (sim.sent_bytes - b0) / 20.0 / len(sim.live())}
    return {"nodes": n, "seed": seed, **rows}


def suspect_by_all(n: int, probe_interval: float, seeds: int) -> dict:
    """Seconds from a crash until every other node sees it not alive (suspect or dead), over
    `seeds` seeded runs of n nodes: what the probe interval buys (the kill -9 target)."""
    config = dataclasses.replace(GossipConfig(), probe_interval=probe_interval)
    took = []
    for seed in range(seeds):
        sim = GossipSim(n, seed=seed, config=config)
        sim.run_until(3.0 + (seed % 10) * 0.1)  # crashes at different points of a probe round
        victim = f"n{seed % n:03d}"
        sim.crash(victim)
        others = [x for x in sim.nodes if x != victim]
        took.append(
            sim.run_until_true(
                lambda s=sim, v=victim, o=others: all(s.state_of(x, v) != "alive" for x in o),
                30.0,
            )
        )
    seen = sorted(t for t in took if t is not None)
    return {
        "nodes": n,
        "probe_interval": probe_interval,
        "runs": seeds,
        "missed": len(took) - len(seen),
        "p50": statistics.median(seen),
        "p90": statistics.quantiles(seen, n=10)[-1],
        "max": seen[-1],
    }


# ---------------------------------------------------------------- c. placement


def placement_at_scale(n_nodes: int, n_models: int, seed: int, repeats: int = 3) -> dict:
    """Two clusters of random old GPUs: "roomy", models of the sizes labs run (0.5-40 GiB,
    1-3 replicas) as they are; "tight", bench/placement.py's, the asks scaled to 110% of
    the cluster's VRAM, so that some stay unplaced."""
    rng = Random(seed)
    nodes, tight = random_cluster(rng, n_nodes, n_models)
    roomy = [
        ModelSpec(f"r{k:03}", int(rng.choice(MODEL_SIZES_GIB) * GIB), rng.choice([1, 2, 3]))
        for k in range(n_models)
    ]
    out = {"nodes": n_nodes, "models": n_models}
    for name, models in (("roomy", roomy), ("tight", tight)):
        walls, cpus = [], []
        plan = None
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            plan = solve(nodes, models)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)  # what a busy machine does not inflate
        t0 = time.perf_counter()
        solve(nodes, models, plan)
        again = time.perf_counter() - t0
        out[name] = {
            "solve_s": summary(walls),
            "solve_cpu_s": summary(cpus),
            "resolve_with_current_s": again,
            "asked": sum(m.replicas for m in models),
            "assignments": len(plan.assignments),
            "unplaced": len(plan.unplaced),
        }
    return out


# ---------------------------------------------------------------- report


def fmt(v, unit: str = "s") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        return f"{v['p50']:.2f}{unit} ({v['min']:.2f}-{v['max']:.2f})"
    return f"{v:.2f}{unit}"


def print_table(results: dict) -> None:
    if "real" in results:
        r = results["real"]
        print(f"a. {r['peers']} real peers on loopback (p50 (min-max) over peers)")
        print(f"   all see all alive               {fmt(r.get('all_alive_s'))}")
        print(f"   all name one leader             {fmt(r.get('one_leader_s'))}")
        print(f"   idle CPU per peer               {fmt(r.get('idle_cpu_pct'), '%')}")
        print(f"   idle CPU of the leader          {fmt(r.get('idle_cpu_pct_leader'), '%')}")
        print(f"   gossip sent per peer            {fmt(r.get('gossip_bytes_per_s'), ' B/s')}")
        print(
            f"   Raft datagrams sent per peer    {fmt(r.get('raft_datagram_bytes_per_s'), ' B/s')}"
            f", leader {fmt(r.get('raft_datagram_bytes_per_s_leader'), ' B/s')}"
        )
        print(f"   RSS per peer                    {fmt(r.get('rss_mib'), ' MiB')}")
        print(f"   deploy to serving               {fmt(r.get('deploy_to_serving_s'))}")
        for k in r.get("kill9", []):
            print(
                f"   kill -9: not alive / dead        {fmt(k['not_alive_s'])} / {fmt(k['dead_s'])}"
            )
        for f in r.get("leader_failover_s", []):
            print(f"   leader failover                 {fmt(f)}")
    for key in ("sim", "sim_partition"):
        if key not in results:
            continue
        s = results[key]
        print(f"b. gossip simulation, {s['nodes']} nodes, seed {s['seed']}")
        for what in ("join", "crash", "partition_heal"):
            row = s.get(what)
            if row is None:
                continue
            print(
                f"   {what:<15} {fmt(row['seconds'])}  {row['rounds'] or 0:.0f} rounds  "
                f"{row['bytes_per_peer_per_s']:.0f} B/s per peer"
            )
        if "steady" in s:
            print(f"   steady          {s['steady']['bytes_per_peer_per_s']:.0f} B/s per peer")
    for row in results.get("suspect", []):
        print(
            f"b. crash until all {row['nodes']} suspect it, probe every {row['probe_interval']}s"
            f" ({row['runs']} seeds): p50 {row['p50']:.2f}s p90 {row['p90']:.2f}s"
            f" max {row['max']:.2f}s, missed {row['missed']}"
        )
    if "placement" in results:
        p = results["placement"]
        print(f"c. placement of {p['models']} models on {p['nodes']} nodes")
        for name in ("roomy", "tight"):
            r = p[name]
            print(
                f"   {name:<6} {fmt(r['solve_s'])} per solve (CPU {fmt(r['solve_cpu_s'])}), "
                f"{r['resolve_with_current_s']:.2f}s"
                f" with the current plan; {r['assignments']} of {r['asked']} instances placed"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=30)
    ap.add_argument("--idle-window", type=float, default=30.0)
    ap.add_argument("--sim-nodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument(
        "--partition-nodes", type=int, default=200, help="the partition-heal run's size"
    )
    ap.add_argument("--only", choices=("real", "sim", "placement"))
    ap.add_argument(
        "--idle-only", action="store_true", help="real peers: stop after the idle figures"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    results: dict = {}
    if args.only in (None, "placement"):
        results["placement"] = placement_at_scale(1000, 200, args.seed)
    if args.only in (None, "sim"):
        # A healed 1,000-node partition is hours of CPU in the simulator; a smaller one
        # shows how healing goes.
        results["sim"] = simulate(args.sim_nodes, args.seed, partition=False)
        results["sim_partition"] = simulate(args.partition_nodes, args.seed)
        results["suspect"] = [suspect_by_all(30, t, 40) for t in (0.5, 1.0)]
    if args.only in (None, "real"):
        results["real"] = real_cluster(args.peers, args.idle_window, args.idle_only)
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "args": vars(args)}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
