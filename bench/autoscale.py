"""Demand scaling on real peers (issue 21), against fixed replicas in the same run.

Three `aivailable up` peers on loopback, each with one simulated 1 GiB GPU (room for one
SmolLM2-135M instance; llama.cpp runs it on the CPU), in one run:

1. scaled: a `min 1, max 3` deploy; 1 stream, then a step to 16 concurrent streams. Time
   from the step until each new replica serves (its own measured requests/min > 0), and
   429s and TTFT p90 before and after the step;
2. fixed: the same load on a `replicas 1` deploy (the anchor: today's fixed count);
3. cold: a `min 0` model scaled to zero (file cached): its first request's TTFT against a
   warm one's.

    python bench/autoscale.py [--quick] [--before S] [--after S]

Prints a table and writes bench/results/autoscale.json. Asserts nothing about time.
Targets (issue 21): a new replica serves within 35 s of the step plus the load time; the
scaled-to-zero model answers its first request within 2 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import PeerProcess  # noqa: E402
from peer.secret import load_or_create_secret  # noqa: E402

SOURCE = "builtin:smollm2-135m"
GPU = ["--gpu", "fake:Small:1GiB"]
PROMPT = [{"role": "user", "content": "Tell me a short story about a robot."}]


def call(peer: PeerProcess, method: str, path: str, body: dict | None = None) -> dict:
    host, port = peer.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, json.dumps(body) if body else None,
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return json.loads(data or b"{}")


def stream_once(peer: PeerProcess, model: str, max_tokens: int = 32) -> tuple[int, float | None]:
    """(status, seconds to the first content chunk) of one streamed chat."""
    host, port = peer.url.split("//")[1].split(":")
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return resp.status, None
        ttft = None
        for line in resp:
            if ttft is None and line.startswith(b"data:") and b'"content"' in line:
                ttft = time.monotonic() - started
        return 200, ttft
    except OSError:
        return 0, None
    finally:
        conn.close()


def ready_nodes(peer: PeerProcess, model: str) -> list[str]:
    for m in peer.status()["models"]:
        if m["name"] == model:
            return [p["node"] for p in m["placements"] if p["state"] == "ready"]
    return []


def serving_nodes(peer: PeerProcess, model: str) -> set[str]:
    """Nodes whose instance of `model` measured requests (rpm > 0), as gossiped."""
    return {
        n["id"]
        for n in peer.status()["nodes"]
        for i in n["instances"]
        if i["model"] == model and (i.get("demand") or {}).get("rpm", 0) > 0
    }


def wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(what)


def p90(xs: list[float]) -> float | None:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else (xs[0] if xs else None)


def run_load(peers, model: str, before_s: float, after_s: float, watch=None) -> dict:
    """1 stream for before_s, then 16 for after_s. `watch(t_step)` runs beside (polling)."""
    results: list[tuple[float, int, float | None]] = []  # (start, status, ttft)
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int, start_at: float) -> None:
        while time.monotonic() < start_at:
            time.sleep(0.05)
        while not stop.is_set():
            t = time.monotonic()
            code, ttft = stream_once(peers[i % len(peers)], model)
            with lock:
                results.append((t, code, ttft))
            if code != 200:
                time.sleep(1.0)  # a new user's patience: retry after a second

    t0 = time.monotonic()
    step = t0 + before_s
    threads = [threading.Thread(target=client, args=(0, t0), daemon=True)]
    threads += [threading.Thread(target=client, args=(i, step), daemon=True) for i in range(1, 16)]
    for t in threads:
        t.start()
    watched = watch(step) if watch else {}
    while time.monotonic() < step + after_s:
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(150)

    def summary(rows):
        ok = [r for r in rows if r[1] == 200]
        ttfts = [r[2] for r in ok if r[2] is not None]
        return {
            "answers": len(ok),
            "refused_429": sum(1 for r in rows if r[1] == 429),
            "other_errors": sum(1 for r in rows if r[1] not in (200, 429)),
            "ttft_p90_s": p90(ttfts),
        }

    return {
        "before": summary([r for r in results if r[0] < step]),
        "after": summary([r for r in results if r[0] >= step]),
        **watched,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases")
    ap.add_argument("--before", type=float, default=20.0, help="seconds of 1 stream")
    ap.add_argument("--after", type=float, default=120.0, help="seconds of 16 streams")
    args = ap.parse_args()
    before, after = (10.0, 75.0) if args.quick else (args.before, args.after)
    tmp = Path(tempfile.mkdtemp(prefix="aivailable-autoscale-"))
    key = tmp / "cluster.key"
    load_or_create_secret(key)
    peers = [
        PeerProcess(tmp, name, "--cluster-key-file", str(key), "--model", "none", *GPU)
        for name in ("a", "b", "c")
    ]
    out: dict = {"before_s": before, "after_s": after}
    try:
        for p in peers:
            p.start()
        a = peers[0]
        wait(lambda: len(a.status()["nodes"]) == 3 and a.status()["leader"], 90, "3 peers")

        # 1. scaled: min 1, max 3
        call(a, "POST", "/cluster/models", {"name": "auto", "source": SOURCE, "n_ctx": 512, "n_parallel": 4,
                                            "min_replicas": 1, "max_replicas": 3})  # fmt: skip
        wait(lambda: len(ready_nodes(a, "auto")) == 1, 240, "auto ready")
        first = set(ready_nodes(a, "auto"))

        def watch(step: float) -> dict:
            seen: dict = {}

            def poll() -> None:
                while time.monotonic() < step + after:
                    try:
                        for n in serving_nodes(a, "auto") - first:
                            seen.setdefault(n, round(time.monotonic() - step, 1))
                        dec = next(m for m in a.status()["models"] if m["name"] == "auto")
                        seen["last_decision"] = dec["scaling"]["last_decision"]
                    except (OSError, StopIteration, KeyError):
                        pass
                    time.sleep(1.0)

            threading.Thread(target=poll, daemon=True).start()
            return {"new_replica_serves_after_s": seen}

        out["scaled"] = run_load(peers, "auto", before, after, watch)
        call(a, "DELETE", "/cluster/models/auto")
        wait(lambda: not ready_nodes(a, "auto"), 60, "auto gone")

        # 2. fixed: replicas 1, the same load
        call(a, "POST", "/cluster/models", {"name": "fixed", "source": SOURCE, "n_ctx": 512, "n_parallel": 4,
                                            "replicas": 1})  # fmt: skip
        wait(lambda: len(ready_nodes(a, "fixed")) == 1, 240, "fixed ready")
        out["fixed"] = run_load(peers, "fixed", before, after)
        call(a, "DELETE", "/cluster/models/fixed")
        wait(lambda: not ready_nodes(a, "fixed"), 60, "fixed gone")

        # 3. cold: scaled to zero, file cached
        call(a, "POST", "/cluster/models", {"name": "cold", "source": SOURCE, "n_ctx": 512, "n_parallel": 4,
                                            "min_replicas": 0, "max_replicas": 1,
                                            "idle_unload_s": 5})  # fmt: skip
        wait(lambda: len(ready_nodes(a, "cold")) == 1, 240, "cold loaded once")
        wait(lambda: not ready_nodes(a, "cold"), 90, "cold scaled to zero")
        time.sleep(2.0)
        code, cold = stream_once(peers[1], "cold", 8)
        code2, warm = stream_once(peers[1], "cold", 8)
        out["cold"] = {"status": code, "first_ttft_s": cold, "warm_ttft_s": warm, "status2": code2}
    finally:
        for p in peers:
            if p.proc is not None and p.proc.poll() is None:
                p.signal(signal.SIGTERM)
        for p in peers:
            p.stop(timeout=20)

    rows = [("", "429s", "TTFT p90 s", "answers")]
    for phase in ("scaled", "fixed"):
        for part in ("before", "after"):
            s = out[phase][part]
            ttft = s["ttft_p90_s"]
            rows.append((f"{phase} {part}", str(s["refused_429"]),
                         f"{ttft:.2f}" if ttft is not None else "-", str(s["answers"])))  # fmt: skip
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))
    print("new replicas serve after the step (s):", out["scaled"]["new_replica_serves_after_s"])
    c = out["cold"]
    print(f"cold first TTFT {c['first_ttft_s']} s, warm {c['warm_ttft_s']} s")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "autoscale.json").write_text(json.dumps(out, indent=2))
    print("wrote", results / "autoscale.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
