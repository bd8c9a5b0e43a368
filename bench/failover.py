"""Failover of a real cluster: peer processes (`python -m aivailable up`) on loopback.

Three measures, one cluster of three peers ("route": no device, it only routes; "gpu1" and
"gpu2": one simulated GPU each), the embedded model (SmolLM2-135M, llama.cpp on the CPU)
deployed by the new cluster with one replica:

  a. model failover: kill -9 the model's only host; time to the first successful request
     (a one-token completion) through "route" (a client retries every ~50 ms), with the
     phases seen in route's /cluster/status: host suspect, host dead, the plan moving the
     replica, the new instance loading, ready. The killed peer is started again (same data dir) before the
     next trial, and the next trial kills the new host.
  b. leader failover: kill -9 the Raft leader; time until a surviving peer's /cluster/status
     names another leader (polled every ~20 ms). Restarted before the next trial.
  c. join to placement: the model redeployed with one replica more than the GPU nodes, so
     one is unplaced; a brand-new peer with a simulated GPU starts (--join route); time from
     its start to serving HTTP, to being alive in route's view, to the plan placing the
     replica on it, and to its instance being ready. It then stops (SIGTERM) and the next
     trial starts another one.

Times run from the signal (or Popen) to the first poll that shows the event, so each
figure includes up to one poll interval. The machine is shared: read the figures as
upper bounds of the system's own latency.

  d-f. what clients see (kill -9 / SIGSTOP of one of two hosts under streaming clients) and
     a lone peer's cold start: bench/failover_streams.py.

    python bench/failover.py [--quick] [--trials N] [--only model|leader|join|streams|cold]

Prints a table and writes bench/results/failover.json. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import PeerProcess, free_port, get_json  # noqa: E402
from bench.failover_streams import cold_start_trial, streams_trial  # noqa: E402

MODEL = "smollm2-135m"
SOURCE = f"builtin:{MODEL}"
TARGETS_S = {
    "model_failover": 3.0,
    "leader_failover": 1.5,
    "join_to_placement": 3.0,
    "cold_start": 2.0,
}
# The probe: the smallest request the model can serve (a one-token prompt, one token out),
# so that the figure is the failover and not this shared CPU's prompt processing. Its own
# latency is reported apart ("that request's own latency").
PROBE = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}


def pct(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100)."""
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "min": min(values, default=float("nan")),
        "max": max(values, default=float("nan")),
    }


def status(peer: PeerProcess, timeout: float = 2.0) -> dict | None:
    try:
        return get_json(peer.url + "/cluster/status", timeout)
    except (OSError, ValueError):
        return None


def chat_ok(peer: PeerProcess, timeout: float = 10.0) -> bool:
    req = urllib.request.Request(
        peer.url + "/v1/completions",
        data=json.dumps(PROBE).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200 and bool(json.loads(resp.read()).get("choices"))
    except (OSError, ValueError):
        return False


def node_state(st: dict | None, node: str) -> str | None:
    for n in (st or {}).get("nodes", []):
        if n["id"] == node:
            return n["state"]
    return None


def placements(st: dict | None, model: str = MODEL) -> dict[str, str]:
    for m in (st or {}).get("models", []):
        if m["name"] == model:
            return {p["node"]: p["state"] for p in m["placements"]}
    return {}


def wait(what: str, predicate, timeout: float, peers: list[PeerProcess], poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in peers:
            if p.proc is not None and p.proc.poll() is not None:
                raise SystemExit(
                    f"peer {p.name} exited while waiting for {what}:\n{p.log()[-2000:]}"
                )
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.key = base / "cluster.key"
        self.ports = {name: free_port() for name in ("route", "gpu1", "gpu2")}
        self.route = self._peer("route", "--cpu", "no")
        self.gpus = [self._peer(n, "--gpu", "fake:GTX 1080:8GiB") for n in ("gpu1", "gpu2")]
        self.peers = [self.route, *self.gpus]
        self.extra: list[PeerProcess] = []

    def _peer(self, name: str, *args: str) -> PeerProcess:
        """Seeds: every other founding peer, so any one of them can restart and rejoin."""
        seeds = [
            a
            for n, port in self.ports.items()
            if n != name
            for a in ("--join", f"127.0.0.1:{port}")
        ]
        return PeerProcess(
            self.base,
            name,
            "--cluster-key-file",
            str(self.key),
            "--no-mdns",
            *seeds,
            *args,
            port=self.ports.get(name),
        )

    def by_name(self, name: str) -> PeerProcess:
        return next(p for p in self.peers + self.extra if p.name == name)

    def start(self) -> None:
        self.route.start()
        wait("route serving", lambda: status(self.route), 60, self.peers)
        for p in self.gpus:
            p.start()
        self.wait_settled()

    def all_alive(self) -> bool:
        st = [status(p) for p in self.peers]
        names = {p.name for p in self.peers}
        return (
            all(
                s
                and {n["id"] for n in s["nodes"] if n["state"] == "alive"} >= names
                and s["leader"]
                for s in st
            )
            and len({s["leader"] for s in st}) == 1
        )

    def host(self) -> str | None:
        ready = [n for n, state in placements(status(self.route)).items() if state == "ready"]
        return ready[0] if len(ready) == 1 else None

    def wait_settled(self) -> None:
        """Every peer alive in every view, one leader, the model ready on one host and a
        chat through route answered."""
        wait("all peers alive, one leader", self.all_alive, 120, self.peers, 0.2)
        try:
            wait(f"{MODEL} ready on one host", self.host, 120, self.peers, 0.2)
        except SystemExit:
            st = status(self.route) or {}
            print(json.dumps({k: st.get(k) for k in ("leader", "nodes", "models")}, indent=1))
            raise
        wait("a chat through route", lambda: chat_ok(self.route), 60, self.peers, 0.2)

    def leader(self) -> str:
        return status(self.route)["leader"]

    def wait_alive_and_two(self, wait_for) -> None:
        """Every peer alive, one leader, and two ready replicas (sections d and e)."""
        wait_for("all peers alive, one leader", self.all_alive, 120, self.peers, 0.2)
        wait_for(
            "two ready replicas",
            lambda: sorted(placements(status(self.route)).values()) == ["ready", "ready"],
            180,
            self.peers,
            0.2,
        )

    def stop(self) -> None:
        everyone = self.peers + self.extra
        for p in everyone:
            if p.proc is not None and p.proc.poll() is None:
                p.signal(signal.SIGTERM)
        for p in everyone:
            p.stop(timeout=15)


# ---------------------------------------------------------------- a. model failover


def model_failover_trial(cluster: Cluster) -> dict:
    host_name = cluster.host()
    host = cluster.by_name(host_name)
    leader = cluster.leader()
    phases: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:  # route's view of the failover, phase by phase
        while not done.is_set():
            st = status(cluster.route, 1.0)
            now = time.monotonic() - t0
            state = node_state(st, host_name)
            if state in ("suspect", "dead") and "suspect" not in phases:
                phases["suspect"] = now
            if state == "dead" and "dead" not in phases:
                phases["dead"] = now
            moved = {n: s for n, s in placements(st).items() if n != host_name}
            if moved and "replanned" not in phases:
                phases["replanned"] = now
            if "loading" in moved.values() and "loading" not in phases:
                phases["loading"] = now
            if "ready" in moved.values() and "ready" not in phases:
                phases["ready"] = now
            time.sleep(0.02)

    t0 = time.monotonic()
    host.signal(signal.SIGKILL)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    host.proc.wait(10)
    first_ok = None
    failed = 0
    deadline = t0 + 120
    while time.monotonic() < deadline:
        sent = time.monotonic() - t0
        if chat_ok(cluster.route):
            first_ok = time.monotonic() - t0
            break
        failed += 1
        time.sleep(0.05)
    warm_start = time.monotonic()  # the same request once more: a warm model's latency
    warm = time.monotonic() - warm_start if first_ok and chat_ok(cluster.route) else None
    time.sleep(0.1)
    done.set()
    watcher.join()
    host.start()  # same name, port and data dir
    cluster.wait_settled()
    return {
        "killed": host_name,
        "killed_was_leader": host_name == leader,
        "first_success_s": first_ok,
        "first_success_sent_s": sent if first_ok else None,
        "failed_requests_before": failed,
        "first_request_s": first_ok - sent if first_ok else None,
        "warm_request_s": warm,
        **{f"{k}_s": v for k, v in phases.items()},
    }


# ---------------------------------------------------------------- b. leader failover


def leader_failover_trial(cluster: Cluster) -> dict:
    old = cluster.leader()
    victim = cluster.by_name(old)
    survivors = [p for p in cluster.peers if p is not victim]
    t0 = time.monotonic()
    victim.signal(signal.SIGKILL)
    new = None
    while time.monotonic() - t0 < 60:
        for p in survivors:
            leader = (status(p, 1.0) or {}).get("leader")
            if leader not in (None, old):
                new = leader
                break
        if new:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - t0 if new else None
    victim.proc.wait(10)
    victim.start()
    cluster.wait_settled()
    return {"old_leader": old, "new_leader": new, "new_leader_s": elapsed}


# ---------------------------------------------------------------- c. join to placement


def join_trial(cluster: Cluster, index: int) -> dict:
    name = f"join{index}"
    peer = cluster._peer(name, "--gpu", "fake:RX 580:8GiB")
    cluster.extra.append(peer)
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    peer.start()
    while time.monotonic() - t0 < 120 and "ready" not in phases:
        now = time.monotonic() - t0
        if "serving" not in phases and status(peer, 0.5) is not None:
            phases["serving"] = now
        st = status(cluster.route, 1.0)
        if "alive" not in phases and node_state(st, name) == "alive":
            phases["alive"] = now
        mine = placements(st).get(name)
        if mine and "placed" not in phases:
            phases["placed"] = now
        if mine == "ready":
            phases["ready"] = now
        time.sleep(0.02)
    peer.stop()
    try:
        wait(
            f"{name} left and its replica unplaced again",
            lambda: (
                name not in placements(status(cluster.route))
                and node_state(status(cluster.route), name) in ("left", None)
            ),
            60,
            cluster.peers,
        )
    except SystemExit:
        st = status(cluster.route) or {}
        keys = ("leader", "voters", "learners", "nodes", "models")
        print(json.dumps({k: st.get(k) for k in keys}))
        raise
    shutil.rmtree(peer.data_dir, ignore_errors=True)
    return {"node": name, **{f"{k}_s": v for k, v in phases.items()}}


def deploy(cluster: Cluster, replicas: int) -> None:
    body = json.dumps({"name": MODEL, "source": SOURCE, "replicas": replicas}).encode()
    req = urllib.request.Request(
        cluster.route.url + "/cluster/models",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


# ---------------------------------------------------------------- report


def print_table(results: dict) -> None:
    rows = [
        ("a. kill -9 model host -> first OK request", "model_failover", "first_success_s"),
        ("     host suspect (route's view)", "model_failover", "suspect_s"),
        ("     host dead (route's view)", "model_failover", "dead_s"),
        ("     plan moves the replica", "model_failover", "replanned_s"),
        ("     new instance loading", "model_failover", "loading_s"),
        ("     new instance ready (gossip)", "model_failover", "ready_s"),
        ("     the first OK request sent", "model_failover", "first_success_sent_s"),
        ("     that request's own latency", "model_failover", "first_request_s"),
        ("     the next request's latency (warm)", "model_failover", "warm_request_s"),
        ("b. kill -9 leader -> new leader seen", "leader_failover", "new_leader_s"),
        ("d. kill -9 1 of 2 hosts: failed requests", "streams_kill", "failed"),
        ("     longest gap between tokens", "streams_kill", "longest_gap_s"),
        ("e. SIGSTOP 1 of 2 hosts: failed requests", "streams_stop", "failed"),
        ("     slowest request", "streams_stop", "slowest_s"),
        ("f. cold start: model listed", "cold_start", "listed_s"),
        ("     first answer", "cold_start", "first_answer_s"),
        ("c. new peer start -> serving HTTP", "join_to_placement", "serving_s"),
        ("     alive in route's view", "join_to_placement", "alive_s"),
        ("     replica placed on it (plan)", "join_to_placement", "placed_s"),
        ("     its instance ready", "join_to_placement", "ready_s"),
    ]
    print(f"\n{'measure (seconds)':<44} {'n':>3} {'p50':>7} {'p99':>7} {'min':>7} {'max':>7}")
    for label, section, key in rows:
        trials = results[section]["trials"]
        if not trials:
            continue
        s = summary([t.get(key) for t in trials])
        results[section].setdefault("summary", {})[key] = s
        cells = " ".join(f"{s[k]:>7.2f}" for k in ("p50", "p99", "min", "max"))
        print(f"{label:<44} {s['n']:>3} {cells}")
    print("\ntargets (p50):", ", ".join(f"{k} {v:g} s" for k, v in TARGETS_S.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 trials of each")
    parser.add_argument("--trials", type=int, help="trials of each measure (default 12)")
    parser.add_argument(
        "--only", choices=("model", "leader", "join", "streams", "cold"), action="append"
    )
    args = parser.parse_args()
    trials = args.trials or (3 if args.quick else 12)
    only = set(args.only or ("model", "leader", "join", "streams", "cold"))
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "trials": trials,
        "targets_s": TARGETS_S,
        "model_failover": {"trials": []},
        "leader_failover": {"trials": []},
        "join_to_placement": {"trials": []},
        "streams_kill": {"trials": []},
        "streams_stop": {"trials": []},
        "cold_start": {"trials": []},
    }
    base = Path(tempfile.mkdtemp(prefix="aivailable-failover-"))
    cluster = Cluster(base)
    try:
        cluster.start()
        for section, name, run in (
            ("model_failover", "model", model_failover_trial),
            ("leader_failover", "leader", leader_failover_trial),
        ):
            if name not in only:
                continue
            for i in range(trials):
                r = run(cluster)
                results[section]["trials"].append(r)
                print(f"{section} {i + 1}/{trials}: {json.dumps(r)}", flush=True)
        if "streams" in only:
            deploy(cluster, replicas=2)
            for i in range(trials):
                for fault in ("kill", "stop"):
                    r = streams_trial(cluster, fault, wait)
                    results[f"streams_{fault}"]["trials"].append(r)
                    print(f"streams_{fault} {i + 1}/{trials}: {json.dumps(r)}", flush=True)
        if "cold" in only:
            for i in range(trials):
                r = cold_start_trial(base)
                results["cold_start"]["trials"].append(r)
                print(f"cold_start {i + 1}/{trials}: {json.dumps(r)}", flush=True)
        if "join" in only:
            deploy(cluster, replicas=len(cluster.gpus) + 1)
            wait(
                "a replica on every GPU node",
                lambda: (
                    len([s for s in placements(status(cluster.route)).values() if s == "ready"])
                    == len(cluster.gpus)
                ),
                300,
                cluster.peers,
            )
            for i in range(trials):
                r = join_trial(cluster, i)
                results["join_to_placement"]["trials"].append(r)
                print(f"join_to_placement {i + 1}/{trials}: {json.dumps(r)}", flush=True)
    finally:
        cluster.stop()
        results["machine"]["loadavg_end"] = os.getloadavg()
    print_table(results)
    out = ROOT / "bench" / "results" / "failover.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
