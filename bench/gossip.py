"""Gossip benchmark: the SWIM + Lifeguard core in simulation, and real agents on loopback.

    python bench/gossip.py [--quick] [--no-loopback]

Simulation (tests/sim/gossip_sim.py, seeded, LAN latency 0.2-2 ms): for N = 10, 50, 200 at
0% and 20% loss, one node changes its payload and another crashes at the same moment:
  rounds until the payload reaches every live node (a round = one gossip interval),
  seconds until the crashed node is marked dead by every live node,
  false positives (a live node declared dead), also over long runs at 30% loss.
Each row runs with our defaults and, as a baseline, with hashicorp/memberlist's LAN timing
(probe 1 s / timeout 0.5 s, gossip 3 nodes every 200 ms, retransmit mult 4) on the same core.
Loopback: 3 and 5 `python -m peer` processes finding each other by mDNS: seconds from a new
agent's start until every other agent lists it alive, and from kill -9 until all mark it dead.
Prints a table and writes bench/results/gossip.json. Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import free_port  # noqa: E402
from peer.config import GossipConfig  # noqa: E402
from tests.sim.gossip_sim import GossipSim  # noqa: E402

OURS = GossipConfig()
MEMBERLIST_LAN = replace(
    OURS, probe_interval=1.0, probe_timeout=0.5, gossip_interval=0.2, gossip_nodes=3,
    retransmit_mult=4, push_pull_interval=30.0,
)  # fmt: skip


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def sim_row(n: int, loss: float, runs: int, config: GossipConfig) -> dict:
    rounds, dead_times, fps, unconverged = [], [], 0, 0
    for seed in range(runs):
        sim = GossipSim(n, seed=seed, loss=loss, config=config)
        sim.run_until(2.0 + (seed % 10) * 0.037)
        changer, victim = f"n{seed % n:03d}", f"n{(seed + n // 2) % n:03d}"
        sim.set_payload(changer, {"v": seed + 1})
        expected = sim.nodes[changer].core.member(changer).payload
        sim.crash(victim)
        start = sim.now
        converged_at = dead_at = None
        _, high = config.suspicion_bounds(n)
        while sim.now - start < high + 20 and (converged_at is None or dead_at is None):
            sim.run_until(sim.now + 0.005)
            if converged_at is None and sim.all_have_payload(changer, expected):
                converged_at = sim.now - start
            if dead_at is None and sim.all_dead(victim):
                dead_at = sim.now - start
        if converged_at is None:
            unconverged += 1
        else:
            rounds.append(converged_at / config.gossip_interval)
        if dead_at is not None:
            dead_times.append(dead_at)
        fps += len({(o, s) for _, o, s in sim.false_positives})
    return {
        "n": n,
        "loss": loss,
        "runs": runs,
        "rounds_p50": pct(rounds, 50),
        "rounds_p99": pct(rounds, 99),
        "convergence_s_p50": pct([r * config.gossip_interval for r in rounds], 50),
        "unconverged_runs": unconverged,
        "dead_s_p50": pct(dead_times, 50),
        "dead_s_p99": pct(dead_times, 99),
        "false_positives": fps,
    }


def false_positive_row(n: int, loss: float, seconds: float, seeds: int) -> dict:
    declared, suspicions, refutations = 0, 0, 0
    for seed in range(seeds):
        sim = GossipSim(n, seed=1000 + seed, loss=loss)
        sim.run_until(seconds)
        declared += len(sim.false_positives)
        suspicions += sum(x.core.counters.suspicions for x in sim.nodes.values())
        refutations += sum(x.core.counters.refutations for x in sim.nodes.values())
    return {"n": n, "loss": loss, "node_seconds": n * seconds * seeds,
            "suspicions": suspicions, "refutations": refutations,
            "false_positives": declared}  # fmt: skip


# ----- loopback agents -------------------------------------------------------------------


def view(port: int) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}/cluster/status"
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return {n["id"]: n["state"] for n in json.load(resp)["nodes"]}
    except OSError:
        return {}


def start_agent(tmp: Path, name: str, port: int, key: Path | None) -> subprocess.Popen:
    args = [sys.executable, "-m", "peer", "--name", name, "--port", str(port), "--bind",
            "127.0.0.1", "--data-dir", str(tmp / name), "--gpu", f"fake:{name} card:8GiB"]  # fmt: skip
    if key is not None:
        args += ["--cluster-key-file", str(key)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    proc.stdout.readline()  # the "ready" line
    return proc


def wait_until(predicate, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def loopback_row(size: int) -> dict:
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    with TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        key = None
        try:
            for i in range(size - 1):
                name = f"b{i}"
                ports[name] = free_port()
                procs[name] = start_agent(tmp, name, ports[name], key)
                key = key or tmp / name / "cluster.key"
            names = list(procs)
            wait_until(lambda: all(len(view(ports[n])) == size - 1 for n in names), 30)
            # Discovery: a new agent, from process start until every other lists it alive.
            ports["new"] = free_port()
            t0 = time.monotonic()
            procs["new"] = start_agent(tmp, "new", ports["new"], key)
            seen = wait_until(lambda: all(view(ports[n]).get("new") == "alive" for n in names), 30)
            discovery = None if seen is None else time.monotonic() - t0
            # Failure detection: kill -9 one agent (ours, by pid).
            victim = names[0]
            procs.pop(victim).kill()
            others = [n for n in procs]
            dead = wait_until(lambda: all(view(ports[n]).get(victim) == "dead" for n in others), 60)
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait(5)
    return {"agents": size, "discovery_s": discovery, "dead_s": dead}


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few runs per row")
    ap.add_argument("--no-loopback", action="store_true", help="simulation only")
    args = ap.parse_args()
    runs = {10: 8, 50: 6, 200: 2} if args.quick else {10: 40, 50: 20, 200: 4}
    result: dict = {"config": asdict(OURS), "sim": [], "false_positives": [], "loopback": []}

    print("simulation: payload convergence and crash detection (ours vs memberlist LAN timing)")
    print(f"{'N':>4} {'loss':>5} {'cfg':>10} {'rounds p50':>10} {'p99':>6} {'dead s p50':>10}"
          f" {'p99':>6} {'FP':>3}")  # fmt: skip
    for n in (10, 50, 200):
        for loss in (0.0, 0.2):
            for label, cfg in (("ours", OURS), ("memberlist", MEMBERLIST_LAN)):
                row = sim_row(n, loss, runs[n], cfg) | {"config": label}
                result["sim"].append(row)
                print(f"{n:>4} {loss:>5.0%} {label:>10} {fmt(row['rounds_p50'], 1):>10}"
                      f" {fmt(row['rounds_p99'], 1):>6} {fmt(row['dead_s_p50']):>10}"
                      f" {fmt(row['dead_s_p99']):>6} {row['false_positives']:>3}", flush=True)  # fmt: skip

    print("\nfalse positives under loss (our defaults; long runs)")
    seconds = 60 if args.quick else 300
    for n, seeds in ((10, 2 if args.quick else 4), (50, 1 if args.quick else 2)):
        for loss in (0.2, 0.3):
            row = false_positive_row(n, loss, seconds, seeds)
            result["false_positives"].append(row)
            print(f"N={n:<3} loss {loss:.0%}: {row['node_seconds']:>7.0f} node-seconds, "
                  f"{row['suspicions']} suspicions, {row['refutations']} refutations, "
                  f"{row['false_positives']} false positives", flush=True)  # fmt: skip

    if not args.no_loopback:
        print("\nloopback: real `python -m peer` agents, mDNS on 127.0.0.1")
        for size in (3,) if args.quick else (3, 5):
            row = loopback_row(size)
            result["loopback"].append(row)
            print(f"{size} agents: new peer seen by all in {fmt(row['discovery_s'])} s "
                  f"(from process start); kill -9 marked dead by all in {fmt(row['dead_s'])} s",
                  flush=True)  # fmt: skip

    out = ROOT / "bench" / "results" / "gossip.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
