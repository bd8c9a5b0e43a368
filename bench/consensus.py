"""Raft benchmark: election time in simulation, and failover/commit figures of real drivers.

(a) Simulation: after the leader crashes, how long until a new leader, for 3 and 5 nodes,
    in ticks and in ms at the default tick (RaftConfig.tick_interval_ms).
(b) Real: three RaftDrivers on loopback, each with its own aiohttp server and FileStorage;
    kill the leader (its task and its port go away), time until another node leads; repeat.
    Then commit latency (one proposal at a time) and proposals/s (many concurrent proposers,
    so fsyncs batch) with FileStorage; and linearizable-read latency (ReadIndex, dissertation
    6.4) on the leader and on a follower, against a plain local read.
(c) Before/after: commit latency and throughput of another revision's consensus/ (default:
    main, taken with `git archive`) and of this tree, each in a fresh child process, in the
    same run on the same disk.

    python bench/consensus.py            # 1000 sim trials per size, 100 failovers
    python bench/consensus.py --quick    # a short run
    python bench/consensus.py --quick --baseline HEAD~3   # compare with another revision
Writes bench/results/consensus.json. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from random import Random

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A child measuring a baseline revision imports that revision's consensus package first.
if os.environ.get("AIVAILABLE_BENCH_CONSENSUS_PATH"):
    sys.path.insert(0, os.environ["AIVAILABLE_BENCH_CONSENSUS_PATH"])

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from consensus import FileStorage  # noqa: E402
from consensus.driver import RaftConfig, RaftDriver  # noqa: E402

SIM_UNITS_PER_TICK = 10  # the simulator's clock: 10 units per nominal tick


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


# ---- (a) simulation


def sim_election_after_crash(n: int, trials: int) -> list[float]:
    """Ticks from the leader's crash to the next leader (1 unit = 1/10 tick of network delay)."""
    from tests.sim.raft_sim import Cluster

    out = []
    for seed in range(trials):
        c = Cluster(n=n, seed=seed, delay=(1, 2))
        c.run_until(lambda c=c: c.leader() is not None, 100_000, check=False)
        c.run(200, check=False)  # steady state: heartbeats flowing
        old = c.leader()
        c.crash(old.id)
        start = c.now
        c.run_until(lambda c=c: c.leader() is not None, 100_000, check=False)
        out.append((c.now - start) / SIM_UNITS_PER_TICK)
    return out


# ---- (b) real drivers on loopback


class Node:
    def __init__(self, nid: str, ids: tuple[str, ...], base: Path, config: RaftConfig, net):
        self.id, self.ids, self.base, self.config, self.net = nid, ids, base, config, net
        self.task = None
        self.applied = 0

    def apply(self, entry, term):
        self.applied += 1

    async def start(self):
        self.storage = FileStorage(self.base / self.id)
        self.driver = RaftDriver(
            self.id,
            self.storage,
            self.config,
            self.net["session"],
            self.net["addresses"].get,
            self.apply,
            voters=self.ids,
            rng=Random(f"{self.id}/{time.monotonic_ns()}"),
        )
        app = web.Application()
        app.add_routes(self.driver.routes())
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.net["ports"].get(self.id, 0))
        await site.start()
        port = self.runner.addresses[0][1]
        self.net["ports"][self.id] = port
        self.net["addresses"][self.id] = f"127.0.0.1:{port}"
        self.task = asyncio.create_task(self.driver.run())  # owned: awaited in stop()

    async def stop(self):
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.runner.cleanup()
        self.storage.close()
        self.task = None


async def poll_until(pred, limit: float, step: float = 0.002) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


def leader_of(nodes, exclude=()):
    leaders = [n for n in nodes if n.task is not None and n.driver.role == "leader"]
    leaders = [n for n in leaders if n.id not in exclude]
    return max(leaders, key=lambda n: n.driver.term) if leaders else None


async def real_benchmarks(
    failovers: int, latency_samples: int, throughput_total: int, reads: bool = True
) -> dict:
    config = RaftConfig()  # the defaults: 100 ms tick, election timeout 10 ticks
    ids = ("n1", "n2", "n3")
    results: dict = {"config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results") as tmp:
        async with aiohttp.ClientSession() as session:
            net = {"session": session, "addresses": {}, "ports": {}}
            nodes = [Node(i, ids, Path(tmp), config, net) for i in ids]
            for n in nodes:
                await n.start()
            try:
                await poll_until(lambda: leader_of(nodes) is not None, 30)
                results["failover_s"] = await measure_failover(nodes, failovers)
                leader = leader_of(nodes)
                results["commit_latency_ms"] = await measure_latency(leader, latency_samples)
                results["throughput"] = await measure_throughput(leader, throughput_total)
                if reads:
                    follower = next(n for n in nodes if n is not leader and n.task is not None)
                    results["reads"] = await measure_reads(leader, follower, latency_samples)
            finally:
                for n in nodes:
                    if n.task is not None:
                        await n.stop()
    return results


async def measure_failover(nodes, trials: int) -> list[float]:
    times = []
    for trial in range(trials):
        await poll_until(lambda: leader_of(nodes) is not None, 30)
        leader = leader_of(nodes)
        await leader.driver.propose(b"before failover %d" % trial)
        await asyncio.sleep(0.3)  # steady state: a few heartbeats since the last election
        start = time.monotonic()
        await leader.stop()
        elected = await poll_until(lambda lid=leader.id: leader_of(nodes, {lid}) is not None, 30)
        if elected:
            times.append(time.monotonic() - start)
        await leader.start()  # back from its disk, as a follower
        await poll_until(lambda lid=leader.id: leader_of(nodes, {lid}) is not None, 30)
        print(f"  failover {trial + 1}/{trials}: {times[-1] * 1000:.0f} ms", file=sys.stderr)
    return times


async def measure_latency(leader: Node, samples: int) -> list[float]:
    out = []
    for i in range(samples):
        t = time.monotonic()
        await leader.driver.propose(b"latency %d" % i)
        out.append((time.monotonic() - t) * 1000)
    return out


async def measure_throughput(leader: Node, total: int, concurrency: int = 256) -> dict:
    payload = os.urandom(128)
    remaining = total

    async def proposer():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await leader.driver.propose(payload)

    start = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(proposer())
    elapsed = time.monotonic() - start
    return {
        "proposals": total,
        "concurrency": concurrency,
        "seconds": elapsed,
        "per_second": total / elapsed,
    }


async def measure_reads(leader: Node, follower: Node, samples: int) -> dict:
    """ReadIndex latency on the leader and on a follower, each read right after a commit (the
    worst case: the follower must also apply it), and a plain local read for scale."""
    out: dict = {"leader_ms": [], "follower_ms": [], "local_ms": []}
    for i in range(samples):
        await leader.driver.propose(b"read %d" % i)
        for key, node in (("leader_ms", leader), ("follower_ms", follower)):
            t = time.monotonic()
            await node.driver.read_index()
            out[key].append((time.monotonic() - t) * 1000)
        t = time.monotonic()
        _ = follower.applied  # what serving from local state costs: a read of memory
        out["local_ms"].append((time.monotonic() - t) * 1000)
    return out


def commit_figures_of(consensus_path: str | None, samples: int, total: int) -> dict:
    """Commit latency and throughput measured by a child process (a fresh interpreter, so two
    revisions of consensus/ never share one); consensus_path: that revision's tree."""
    env = {**os.environ, "AIVAILABLE_BENCH_CONSENSUS_PATH": consensus_path or ""}
    cmd = [sys.executable, __file__, "--commit-only", str(samples), str(total)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def before_after(ref: str, samples: int, total: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "consensus"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        rounds = []
        for _ in range(2):  # interleaved, so a slow minute on a shared machine hits both
            rounds.append(
                {
                    "before": commit_figures_of(tmp, samples, total),
                    "after": commit_figures_of(None, samples, total),
                }
            )
    out: dict = {"baseline": ref}
    for side in ("before", "after"):
        lat = [x for r in rounds for x in r[side]["commit_latency_ms"]]
        out[side] = {
            "commit_latency_ms": summary(lat),
            "per_second": statistics.fmean(r[side]["throughput"]["per_second"] for r in rounds),
        }
    out["throughput_change"] = out["after"]["per_second"] / out["before"]["per_second"] - 1
    return out


def commit_only(samples: int, total: int) -> None:
    real = asyncio.run(real_benchmarks(0, samples, total, reads=False))
    print(json.dumps({k: real[k] for k in ("commit_latency_ms", "throughput")}))


def fsync_ms(samples: int = 200) -> dict:
    """What one small write + fsync costs on this disk: the floor under commit latency."""
    out = []
    with tempfile.NamedTemporaryFile(dir=ROOT / "bench" / "results") as f:
        for _ in range(samples):
            t = time.monotonic()
            f.write(b"x" * 128)
            f.flush()
            os.fsync(f.fileno())
            out.append((time.monotonic() - t) * 1000)
    return summary(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run")
    ap.add_argument("--baseline", default="main", help="revision to compare commits with")
    ap.add_argument("--commit-only", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.commit_only:
        return commit_only(*args.commit_only)
    sim_trials = 200 if args.quick else 1000
    failovers = 10 if args.quick else 100
    tick_ms = RaftConfig().tick_interval_ms

    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    report: dict = {"quick": args.quick, "tick_interval_ms": tick_ms, "simulation": {}}
    report["fsync_ms"] = fsync_ms()
    for n in (3, 5):
        ticks = sim_election_after_crash(n, sim_trials)
        report["simulation"][f"{n}_nodes"] = {
            "ticks": summary(ticks),
            "ms": summary([t * tick_ms for t in ticks]),
        }
    real = asyncio.run(
        real_benchmarks(failovers, 100 if args.quick else 500, 2000 if args.quick else 10000)
    )
    report["real"] = {
        "failover_s": summary(real["failover_s"]),
        "commit_latency_ms": summary(real["commit_latency_ms"]),
        "throughput": real["throughput"],
        "reads": {k: summary(v) for k, v in real["reads"].items()},
        "config": real["config"],
    }
    samples, total = (100, 2000) if args.quick else (300, 6000)
    report["before_after"] = before_after(args.baseline, samples, total)

    rows = []
    for n in (3, 5):
        s = report["simulation"][f"{n}_nodes"]
        rows.append((f"sim election after leader crash, {n} nodes (ticks)", s["ticks"], "{:.1f}"))
        rows.append((f"sim election after leader crash, {n} nodes (ms)", s["ms"], "{:.0f}"))
    rows.append(
        (
            "real failover, 3 drivers on loopback (ms)",
            scaled(report["real"]["failover_s"]),
            "{:.0f}",
        )
    )
    rows.append(
        ("real commit latency, FileStorage (ms)", report["real"]["commit_latency_ms"], "{:.1f}")
    )
    reads = report["real"]["reads"]
    rows.append(("ReadIndex read on the leader (ms)", reads["leader_ms"], "{:.2f}"))
    rows.append(
        ("ReadIndex read on a follower, after a commit (ms)", reads["follower_ms"], "{:.2f}")
    )
    rows.append(("local read, no consensus (ms)", reads["local_ms"], "{:.4f}"))
    ba = report["before_after"]
    for side in ("before", "after"):
        name = (
            f"commit latency, {side} ({ba['baseline'] if side == 'before' else 'this tree'}) (ms)"
        )
        rows.append((name, ba[side]["commit_latency_ms"], "{:.1f}"))
    rows.append(("one 128-byte write + fsync on this disk (ms)", report["fsync_ms"], "{:.2f}"))
    print(f"\n{'measure':<52} {'n':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for name, s, fmt in rows:
        cells = " ".join(f"{fmt.format(s[k]):>8}" for k in ("p50", "p90", "p99", "max"))
        print(f"{name:<52} {s['n']:>6} {cells}")
    tp = report["real"]["throughput"]
    print(
        f"\nthroughput: {tp['proposals']} proposals, {tp['concurrency']} concurrent proposers, "
        f"FileStorage with fsync: {tp['per_second']:.0f} committed proposals/s"
    )
    print(
        f"before/after: {ba['before']['per_second']:.0f} -> {ba['after']['per_second']:.0f} "
        f"proposals/s ({ba['throughput_change']:+.1%}) against {ba['baseline']}"
    )
    out = ROOT / "bench" / "results" / "consensus.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def scaled(s: dict) -> dict:
    return {k: (v * 1000 if k != "n" else v) for k, v in s.items()}


if __name__ == "__main__":
    main()
