"""Prefix-affinity routing against today's routing, on a real cluster on loopback.

One cluster per routing and trial, three peers (`python -m aivailable up`): "route" (no
device), "gpu1" and "gpu2" (a simulated GPU each; llama.cpp on the CPU), the embedded
model deployed with 2 replicas of 4 slots (`--slots`). Then 8 concurrent 5-turn chats: each turn
resends the whole history (long user turns, answers of up to 48 tokens, so histories grow
to about 1.5k tokens) and enters through a peer picked at random (seeded, the same picks
for every routing). Streams with `include_usage`, so each answer says how many prompt
tokens its replica's prefix cache served (`cached_tokens`).

Routings (ForwardConfig.routing, set through a config file):
  local_first   today's rule before issue 22: a hosting peer serves its own replica
                whatever its load, others go to the most free slots;
  affinity      the prefix's replica while its load is under 1.25x the mean, but any
                replica with a free slot before one that would queue;
  affinity_bounded  the default now: the bound alone moves a chat off its home (a free
                slot counts as under it), so a full home under it queues the turn beside
                its cached prefix.

Measured per routing: later turns (2-5) that hit the prefix cache (cached_tokens >= half
the previous turn's prompt), the mean fraction of their prompt served from cache, TTFT
p50 of first and later turns, aggregate completion tok/s over the run's wall time,
requests refused (429), prefixes restored from the host-memory prompt cache (the replicas'
/metrics), and the TTFTs of one more chat run alone afterwards ("solo": its own prefill
and overhead; what a turn under load takes beyond that is waiting). Trials alternate the
routings; the machine is shared, so read the spread.

    python bench/affinity.py [--trials N] [--quick] [--slots 4] [--prompt-cache-mib N]

Prints a table and writes bench/results/affinity.json. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
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

MODEL = "smollm2-135m"
ROUTINGS = ("local_first", "affinity", "affinity_bounded")
WORDS = [
    "river",
    "stone",
    "cloud",
    "lamp",
    "garden",
    "window",
    "paper",
    "engine",
    "harbor",
    "violet",
    "copper",
    "silent",
    "meadow",
    "lantern",
    "orbit",
    "maple",
    "signal",
    "canyon",
    "velvet",
    "thunder",
    "pocket",
    "marble",
    "ember",
    "compass",
    "glacier",
    "whisper",
    "saddle",
    "crystal",
    "beacon",
    "nectar",
    "quarry",
    "tundra",
    "falcon",
]


def turn_text(rng: random.Random, words: int) -> str:
    return "Summarize this note in one sentence: " + " ".join(
        rng.choice(WORDS) for _ in range(words)
    )


class Cluster:
    def __init__(self, base: Path, routing: str, cache_mib: int | None = None):
        self.base = base
        conf = base / "peer.toml"
        # One llama.cpp thread per worker: two workers share this machine's cores.
        engine = "n_threads = 1\n"
        if cache_mib is not None:  # the host-memory prompt cache (backends/prompt_cache.py)
            engine += f"prompt_cache_mib = {cache_mib}\n"
        conf.write_text(f'[forward]\nrouting = "{routing}"\n\n[engine]\n{engine}')
        self.key = base / "cluster.key"
        names = ("route", "gpu1", "gpu2")
        ports = {n: free_port() for n in names}
        devices = {"route": ("--cpu", "no"), "gpu1": GPU, "gpu2": GPU}
        self.peers = [
            PeerProcess(
                base,
                n,
                "--cluster-key-file",
                str(self.key),
                "--no-mdns",
                "--model",
                "none",
                *[a for m, p in ports.items() if m != n for a in ("--join", f"127.0.0.1:{p}")],
                *devices[n],
                port=ports[n],
                env={"AIVAILABLE_CONFIG": str(conf)},
            )
            for n in names
        ]

    def start(self) -> None:
        for p in self.peers:
            p.start()
        wait("all peers serving", lambda: all(status(p) for p in self.peers), 90)

    def deploy(self, slots: int) -> None:
        body = {"name": MODEL, "source": f"builtin:{MODEL}", "replicas": 2}
        body.update(n_parallel=slots, n_ctx=2048)
        post(self.peers[0].url + "/cluster/models", body)

        def ready() -> bool:
            st = status(self.peers[0]) or {}
            for m in st.get("models", []):
                if m["name"] == MODEL:
                    return sum(p["state"] == "ready" for p in m["placements"]) == 2
            return False

        wait("2 ready replicas", ready, 240)
        # Every peer's gossip view shows both before the clients start.
        time.sleep(2.0)

    def stop(self) -> None:
        for p in self.peers:
            p.stop(timeout=15)


GPU = ("--gpu", "fake:GTX 1080:8GiB")


def status(peer: PeerProcess) -> dict | None:
    try:
        return get_json(peer.url + "/cluster/status", 2.0)
    except (OSError, ValueError):
        return None


def post(url: str, body: dict, timeout: float = 30) -> bytes:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def wait(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def stream_chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed turn: its TTFT, text, usage, status and serving replica."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        method="POST",
    )
    started = time.monotonic()
    out = {"status": 200, "ttft": None, "text": "", "usage": None, "replica": None}
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            out["replica"] = resp.headers.get("X-Aivailable-Replica")
            for line in resp:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        if out["ttft"] is None:
                            out["ttft"] = time.monotonic() - started
                        out["text"] += piece
                if event.get("usage"):
                    out["usage"] = event["usage"]
    except urllib.error.HTTPError as exc:
        out["status"] = exc.code
        exc.read()
    out["elapsed"] = time.monotonic() - started
    return out


def conversation(
    cid: int, entries: list[tuple[str, str]], seed: int, words: int, results: list
) -> None:
    rng = random.Random(seed * 1000 + cid)
    messages = [{"role": "system", "content": f"You are assistant number {cid}."}]
    prev_prompt = 0
    for turn, (name, url) in enumerate(entries):
        messages.append({"role": "user", "content": turn_text(rng, words)})
        r = stream_chat(url, messages, 48)
        r["replica"] = r["replica"] or name  # no header: the entry peer served it itself
        usage = r["usage"] or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        prompt = usage.get("prompt_tokens", 0)
        results.append(
            {
                "conversation": cid,
                "turn": turn + 1,
                "status": r["status"],
                "ttft": r["ttft"],
                "elapsed": r["elapsed"],
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "completion_tokens": usage.get("completion_tokens", 0),
                "hit": turn > 0 and prev_prompt > 0 and cached >= prev_prompt // 2,
                "replica": r["replica"],
            }
        )
        if r["status"] != 200:
            messages.pop()  # a refused turn: the client gives up on it
            continue
        prev_prompt = prompt
        messages.append({"role": "assistant", "content": r["text"]})


def run(
    routing: str, seed: int, chats: int, turns: int, words: int, slots: int, cache_mib=None
) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"aiv-affinity-{routing}-"))
    cluster = Cluster(base, routing, cache_mib)
    try:
        cluster.start()
        cluster.deploy(slots)
        urls = [(p.name, p.url) for p in cluster.peers]
        rng = random.Random(seed)
        plans = [[rng.randrange(len(urls)) for _ in range(turns)] for _ in range(chats)]
        results: list[dict] = []
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=conversation, args=(c, [urls[i] for i in plans[c]], seed, words, results)
            )
            for c in range(chats)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        restores = sum(scrape(p.url, RESTORES) for p in cluster.peers)
        restored_tokens = sum(scrape(p.url, RESTORED_TOKENS) for p in cluster.peers)
        # Where a later turn's TTFT goes: the same chat alone on the idle cluster is its
        # own prefill and overhead; what a turn under load takes beyond it is waiting (for
        # a slot, or in the batch beside the others' decode and prefill).
        solo: list[dict] = []
        conversation(chats, [urls[0]] * turns, seed, words, solo)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    out = summarize(routing, results, wall)
    out.update(prompt_cache_restores=restores, prompt_cache_restored_tokens=restored_tokens)
    out["solo_ttft_first_s"] = p50([r["ttft"] for r in solo if r["turn"] == 1 and r["ttft"]])
    out["solo_ttft_later_p50_s"] = p50([r["ttft"] for r in solo if r["turn"] > 1 and r["ttft"]])
    out["solo_turns"] = solo
    return out


RESTORES = "aivailable_prompt_cache_restores_total"
RESTORED_TOKENS = "aivailable_prompt_cache_restored_tokens_total"


def scrape(url: str, name: str) -> float:
    """The sum of a counter over its labels in a peer's /metrics (0 when absent)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(routing: str, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    later = [r for r in ok if r["turn"] > 1]
    first = [r for r in ok if r["turn"] == 1]
    ttft_first = p50([r["ttft"] for r in first if r["ttft"] is not None])
    ttft_later = p50([r["ttft"] for r in later if r["ttft"] is not None])
    return {
        "routing": routing,
        "requests": len(results),
        "refused": sum(r["status"] == 429 for r in results),
        "failed": sum(r["status"] not in (200, 429) for r in results),
        "later_hit_rate": sum(r["hit"] for r in later) / len(later) if later else 0.0,
        "later_cached_fraction": (
            sum(r["cached_tokens"] for r in later) / max(1, sum(r["prompt_tokens"] for r in later))
        ),
        "ttft_first_p50_s": ttft_first,
        "ttft_later_p50_s": ttft_later,
        "ttft_later_over_first": ttft_later / ttft_first if ttft_first else float("nan"),
        "tok_per_s": sum(r["completion_tokens"] for r in ok) / wall,
        "wall_s": wall,
        "max_prompt_tokens": max((r["prompt_tokens"] for r in ok), default=0),
        "turns": results,
    }


def print_table(trials: list[dict], per_trial: int) -> None:
    cols = (
        ("later_hit_rate", "hit rate", "{:.0%}"),
        ("later_cached_fraction", "cached", "{:.0%}"),
        ("ttft_first_p50_s", "TTFT 1st", "{:.2f}s"),
        ("ttft_later_p50_s", "TTFT later", "{:.2f}s"),
        ("ttft_later_over_first", "later/1st", "{:.2f}x"),
        ("tok_per_s", "tok/s", "{:.1f}"),
        ("refused", "429s", "{}"),
        ("prompt_cache_restores", "restores", "{:.0f}"),
        ("solo_ttft_first_s", "solo 1st", "{:.2f}s"),
        ("solo_ttft_later_p50_s", "solo later", "{:.2f}s"),
        ("max_prompt_tokens", "max prompt", "{}"),
    )
    print(f"{'trial':<6}{'routing':<17}" + "".join(f"{h:>12}" for _, h, _ in cols))
    for i, t in enumerate(trials):
        cells = "".join(f"{fmt.format(t[k]):>12}" for k, _, fmt in cols)
        print(f"{i // per_trial + 1:<6}{t['routing']:<17}{cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1, help="trials per routing, alternating")
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--words", type=int, default=220, help="words per user turn")
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--slots", type=int, default=4, help="per replica (a CPU node's default)")
    ap.add_argument("--quick", action="store_true", help="4 chats of 3 short turns")
    ap.add_argument("--routings", default=",".join(ROUTINGS), help="comma-separated, in order")
    ap.add_argument(
        "--prompt-cache-mib", type=int, default=None, help="host-memory prompt cache (0: off)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "affinity.json"))
    args = ap.parse_args()
    if args.quick:
        args.chats, args.turns, args.words = 4, 3, 60
    trials = []
    routings = args.routings.split(",")
    for trial in range(args.trials):
        for routing in routings:
            print(f"trial {trial + 1}: {routing} ...", flush=True)
            trials.append(
                run(
                    routing,
                    args.seed + trial,
                    args.chats,
                    args.turns,
                    args.words,
                    args.slots,
                    args.prompt_cache_mib,
                )
            )
    print_table(trials, len(routings))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trials": trials, "args": vars(args)}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
