"""Serving throughput of the batching engine against llama.cpp's own llama-server.

Same model (SmolLM2-135M), same prompt, greedy, 128 tokens, in one run with the paths'
trials alternating, so the shared machine's changing load weighs on all alike:

- ceiling: raw batched llama_decode of k sequences in this process, argmax only;
- llama-server: llama.cpp's C++ server built by `make bench-anchor` from the sources
  vendored in our llama-cpp-python (skipped, and said so, when absent), same slots and
  threads;
- api: our OpenAI API over LlamaEngine (the serving stack of `aivailable up`);
- routed: the same through a routing-only peer (a Forwarder, signed peer requests).

At 1, 4, 8 and 16 concurrent streams: aggregate and per-stream tok/s, TTFT p50/p99. And a
multi-turn case: a ~1,500-token history, then the same history with one more turn: the
second turn's TTFT against the first (the prefix cache at work).

    python bench/serve.py [--quick] [--max-tokens N] [--trials N] [--levels 1,4,8,16]
                          [--paths ceiling,llama-server,api,routed]

Prints a table and writes bench/results/serve.json. Asserts nothing about time. Beside
the pooled table, each path's trials are compared with llama-server's trial of the same
round (the spread): every trial's tok/s ratio, their median and minimum, and the TTFT p50
ratio per level; the JSON carries them under "vs_anchor".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import free_port  # noqa: E402
from aivailable.models import store  # noqa: E402
from bench.forward import Child, start_role, wait_port  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
ANCHOR = Path(os.environ.get("AIVAILABLE_CACHE_DIR", Path.home() / ".cache/aivailable"))
ANCHOR = ANCHOR / "anchor" / "bin" / "llama-server"
N_CTX = 2048  # per slot: the multi-turn history and its answer fit


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def serve_model(port: int, slots: int, threads: int, secret: bytes) -> None:
    """`aivailable up`'s serving stack for one model, in its own process."""
    from types import SimpleNamespace

    from aiohttp import web

    from aivailable.api.app import build_app
    from aivailable.api.openai_api import OpenAIApi
    from aivailable.backends.llama_engine import EngineConfig, LlamaEngine
    from aivailable.metrics import Metrics
    from peer.auth import PeerAuth

    path = store.resolve(f"builtin:{MODEL}").path
    config = EngineConfig(n_threads=threads, max_queue_wait=600)
    engine = LlamaEngine(MODEL, path, N_CTX, 0, 256, n_parallel=slots, config=config)
    await engine.start()
    instances = {MODEL: SimpleNamespace(engine=engine, error="", state="ready")}
    metrics = Metrics()
    app = build_app(
        metrics, lambda: True, [OpenAIApi(lambda: instances, metrics, 4096, 600).routes()]
    )
    app.middlewares.append(PeerAuth(secret).middleware)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def one_stream(session, url: str, messages: list[dict], max_tokens: int, start: float):
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, chunks, usage = None, 0, None
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return first or elapsed, usage if usage is not None else chunks, elapsed


async def api_trial(url: str, k: int, max_tokens: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(session, url, PROMPT, max_tokens, start) for _ in range(k))
        )
        seconds = time.perf_counter() - start
    return {
        "ttfts": [r[0] for r in results],
        "tokens": sum(r[1] for r in results),
        "seconds": seconds,
        "per_stream": [r[1] / (r[2] - r[0]) for r in results if r[2] > r[0] and r[1] > 1],
    }


def ceiling_trial(k: int, max_tokens: int, threads: int) -> dict:
    """Raw batched decode of k greedy sequences: no HTTP, no frames, no Python per token
    beyond the scheduler (the fastest this process could serve k streams)."""
    from aivailable.backends.llama_runtime import LlamaRuntime, RuntimeConfig
    from aivailable.backends.scheduler import Scheduler, SeqRequest

    path = store.resolve(f"builtin:{MODEL}").path
    rt = LlamaRuntime(RuntimeConfig(str(path), N_CTX, k, 512, threads, threads))
    try:
        prompt = rt.tokenize(rt.chat_prompt(PROMPT), special=True)
        sched = Scheduler(k, N_CTX, 512)
        for i in range(k):
            sched.submit(SeqRequest(i, tuple(prompt), max_tokens))
        samplers = {s: rt.sampler({"temperature": 0}, 0) for s in range(k)}
        tokens, start = 0, time.perf_counter()
        while sched.busy:
            step = sched.next_step()
            for seq, p0 in step.trims:
                rt.trim(seq, p0)
            for slot, row in rt.decode(step.tokens).items():
                tokens += 1
                sched.accept(slot, rt.sample(samplers[slot], row), False)
        seconds = time.perf_counter() - start
        for s in samplers.values():
            rt.free_sampler(s)
    finally:
        rt.close()
    return {"ttfts": [], "tokens": tokens, "seconds": seconds, "per_stream": []}


def drained(child: Child) -> Child:
    """Read a child's output away, so a chatty one never blocks on a full pipe."""
    threading.Thread(target=lambda: child.proc.stdout.read(), daemon=True).start()
    return child


def cpu_seconds(pid: int) -> float:
    """CPU time of all of a process's threads so far (schedstat: nanoseconds, where
    /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total / 1e9


def child_pids(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_roles(processes: dict[str, int]) -> dict[str, float]:
    out = {}
    for role, pid in processes.items():
        try:
            out[role] = cpu_seconds(pid)
        except OSError:
            continue
    return out


def measured(trial, args: tuple, processes: dict[str, int]) -> dict:
    """Run a trial and add each role's CPU seconds during it (`cpu`)."""
    before = cpu_roles(processes)
    result = asyncio.run(trial(*args))
    after = cpu_roles(processes)
    result["cpu"] = {r: after[r] - before[r] for r in before if r in after}
    return result


def start_anchor(port: int, slots: int, threads: int) -> Child | None:
    if not ANCHOR.exists():
        return None
    path = store.resolve(f"builtin:{MODEL}").path
    argv = [str(ANCHOR), "-m", str(path), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["-np", str(slots), "-c", str(N_CTX * slots), "-t", str(threads), "-tb", str(threads)]
    argv += ["--no-webui", "-lv", "1"]
    env_path = f"{ANCHOR.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    os.environ["LD_LIBRARY_PATH"] = env_path
    child = drained(Child(argv, ready_line=None))
    wait_port(port, within=120)
    import urllib.request

    for _ in range(600):  # the port opens before the model has loaded
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return child
        except OSError:
            time.sleep(0.2)
    child.stop()
    return None


def history(topic: str, turns: int = 24) -> list[dict]:
    """A conversation of about 1,500 tokens, as a chat UI resends it each turn; its own
    topic per path, so that no path finds another's history cached."""
    out = [{"role": "system", "content": f"You are an expert on {topic}."}]
    for i in range(turns):
        out.append({"role": "user", "content": f"Tell me fact number {i} about the ocean."})
        out.append(
            {"role": "assistant", "content": f"Fact {i}: " + "the ocean is deep and wide, " * 5}
        )
    return out


async def multi_turn(url: str, topic: str) -> dict:
    import aiohttp

    past = history(topic)
    # A fresh connection per request: llama-server may close an idle keep-alive one.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        first = [*past, {"role": "user", "content": "Summarise."}]
        t1, _, _ = await one_stream(session, url, first, 16, time.perf_counter())
        second = [*first, {"role": "assistant", "content": "The ocean is deep."}]
        second.append({"role": "user", "content": "And the sky?"})
        t2, _, _ = await one_stream(session, url, second, 16, time.perf_counter())
    return {"first_ttft_ms": round(t1 * 1000, 1), "second_ttft_ms": round(t2 * 1000, 1),
            "second_over_first": round(t2 / t1, 3)}  # fmt: skip


def summarize(trials: list[dict], k: int) -> dict:
    ttfts = [t for trial in trials for t in trial["ttfts"]]
    tokens = sum(t["tokens"] for t in trials)
    seconds = sum(t["seconds"] for t in trials)
    per_stream = [x for t in trials for x in t["per_stream"]]
    cpu: dict[str, float] = {}
    for t in trials:
        for role, used in t.get("cpu", {}).items():
            cpu[role] = cpu.get(role, 0.0) + used
    return {
        "cpu_ms_per_token": {r: round(c * 1000 / tokens, 3) for r, c in cpu.items()}
        if tokens
        else {},
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        # Each trial's own figures, to see a stalled trial (the shared host's) for what it is.
        "trial_tokens_per_s": [
            round(t["tokens"] / t["seconds"], 1) for t in trials if t["seconds"]
        ],
        "trial_seconds": [round(t["seconds"], 3) for t in trials],
        "per_stream_tokens_per_s": round(statistics.median(per_stream), 1) if per_stream else None,
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
        "ttft_p99_ms": round(pct(ttfts, 99) * 1000, 1) if ttfts else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one trial, 32 tokens, levels 1,4")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--paths", default="ceiling,llama-server,api,routed", help="which paths to measure"
    )
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--secret-hex", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "model":
        import uvloop  # the loop `aivailable up` runs on

        uvloop.run(serve_model(args.port, args.slots, args.threads, bytes.fromhex(args.secret_hex)))
        return 0
    levels = [1, 4] if args.quick else [int(x) for x in args.levels.split(",")]
    trials, max_tokens = (1, 32) if args.quick else (args.trials, args.max_tokens)
    slots = max(levels)
    secret = secrets.token_bytes(32)
    model_port, front_port, anchor_port = free_port(), free_port(), free_port()
    argv = [sys.executable, __file__, "--role", "model", "--port", str(model_port)]
    argv += ["--slots", str(slots), "--threads", str(args.threads), "--secret-hex", secret.hex()]
    children = [drained(Child(argv))]
    notes = []
    try:
        children.append(drained(start_role("front", front_port, secret, f"127.0.0.1:{model_port}")))
        wanted = args.paths.split(",")
        anchor = (
            start_anchor(anchor_port, slots, args.threads) if "llama-server" in wanted else None
        )
        paths = {
            "api": f"http://127.0.0.1:{model_port}",
            "routed": f"http://127.0.0.1:{front_port}",
        }
        paths = {name: url for name, url in paths.items() if name in wanted}
        if anchor is None and "llama-server" in wanted:
            notes.append(f"llama-server not measured: {ANCHOR} is absent (run make bench-anchor)")
        elif anchor is not None:
            children.append(anchor)
            paths = {"llama-server": f"http://127.0.0.1:{anchor_port}", **paths}
        for url in paths.values():  # warm-up: load, first allocations, prompt cache
            asyncio.run(api_trial(url, 1, 8))
        # Whose CPU time each path spends: the serving peer (frames in, SSE out) and its
        # worker (decode and the work between decodes), the routing peer, llama-server.
        model_pid = children[0].proc.pid
        worker = child_pids(model_pid)
        ours = {"peer": model_pid, **({"worker": worker[0]} if worker else {})}
        processes = {
            "api": ours,
            "routed": {"front": children[1].proc.pid, **ours},
            "llama-server": {"server": anchor.proc.pid} if anchor is not None else {},
        }
        with_ceiling = "ceiling" in wanted
        names = ["ceiling", *paths] if with_ceiling else list(paths)
        runs: dict = {name: {k: [] for k in levels} for name in names}
        for k in levels:
            for trial in range(trials):
                order = list(paths.items())
                order = order[trial % len(order) :] + order[: trial % len(order)]  # rotate
                if with_ceiling:
                    runs["ceiling"][k].append(ceiling_trial(k, max_tokens, args.threads))
                for name, url in order:
                    result = measured(api_trial, (url, k, max_tokens), processes[name])
                    runs[name][k].append(result)
        turns = {}
        for name, url in paths.items():
            try:
                turns[name] = asyncio.run(multi_turn(url, name))
            except Exception as exc:  # one path's failure must not lose the whole run
                notes.append(f"multi-turn on {name} failed: {exc!r}")
    finally:
        for child in reversed(children):
            child.stop()
    table = {name: {k: summarize(runs[name][k], k) for k in levels} for name in runs}
    spread = against_anchor(runs, levels)
    print_table(table, levels, turns, notes)
    print_spread(spread, levels)
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL, "max_tokens": max_tokens, "trials": trials, "slots": slots,
            "threads": args.threads, "paths": list(runs), "notes": notes}  # fmt: skip
    meta["load_average"] = [round(x, 2) for x in os.getloadavg()]
    body = {**meta, "levels": table, "vs_anchor": spread, "multi_turn": turns}
    out.write_text(json.dumps(body, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def against_anchor(runs: dict, levels: list[int]) -> dict:
    """Each path's trial against llama-server's trial of the same round (they ran back to
    back, so a change of the shared machine's load weighs on both): the tok/s ratio of every
    trial, their median and minimum, and the TTFT p50 ratio (each trial's and pooled)."""
    anchor = runs.get("llama-server")
    if not anchor:
        return {}
    out: dict = {}
    for name, by_level in runs.items():
        if name == "llama-server":
            continue
        out[name] = {}
        for k in levels:
            pairs = list(zip(by_level[k], anchor[k], strict=True))
            ratios = [(t["tokens"] / t["seconds"]) / (a["tokens"] / a["seconds"]) for t, a in pairs]
            ttft = [
                statistics.median(t["ttfts"]) / statistics.median(a["ttfts"])
                for t, a in pairs
                if t["ttfts"] and a["ttfts"]
            ]
            ours = [x for t in by_level[k] for x in t["ttfts"]]
            theirs = [x for a in anchor[k] for x in a["ttfts"]]
            out[name][k] = {
                "trial_ratios": [round(r, 3) for r in ratios],
                "median_ratio": round(statistics.median(ratios), 3),
                "min_ratio": round(min(ratios), 3),
                "max_ratio": round(max(ratios), 3),
                "trial_ttft_p50_ratios": [round(r, 3) for r in ttft],
                "ttft_p50_ratio": round(statistics.median(ours) / statistics.median(theirs), 3)
                if ours and theirs
                else None,
                "ttft_p99_ratio": round(pct(ours, 99) / pct(theirs, 99), 3)
                if ours and theirs
                else None,
            }
    return out


def print_spread(spread: dict, levels: list[int]) -> None:
    if not spread:
        return
    print("\nper trial against llama-server's trial of the same round (tok/s ratio)")
    head = f"{'streams':>7} | {'path':>8} | {'median':>6} | {'min':>5} | {'TTFT p50':>8} | trials"
    print(head)
    print("-" * len(head))
    for k in levels:
        for name, rows in spread.items():
            r = rows[k]
            trials = " ".join(f"{x:.2f}" for x in r["trial_ratios"])
            ttft = f"{r['ttft_p50_ratio']:.2f}x" if r["ttft_p50_ratio"] is not None else ""
            print(
                f"{k:>7} | {name:>8} | {r['median_ratio']:>5.2f}x | {r['min_ratio']:>4.2f}x | "
                f"{ttft:>8} | {trials}"
            )


def print_table(table: dict, levels: list[int], turns: dict, notes: list[str]) -> None:
    anchor = table.get("llama-server")
    head = f"{'streams':>7} | {'path':>12} | {'tok/s':>7} | {'per stream':>10} | {'TTFT p50':>8} | {'TTFT p99':>8} | {'vs anchor':>9} | CPU ms per token"
    print(head)
    print("-" * len(head))
    for k in levels:
        for name, rows in table.items():
            r = rows[k]
            ratio = f"{r['tokens_per_s'] / anchor[k]['tokens_per_s']:.2f}x" if anchor else ""
            print(
                f"{k:>7} | {name:>12} | {r['tokens_per_s']:>7.1f} | "
                f"{r['per_stream_tokens_per_s'] or '':>10} | {r['ttft_p50_ms'] or '':>8} | "
                f"{r['ttft_p99_ms'] or '':>8} | {ratio:>9} | "
                + " ".join(f"{role} {ms:.3f}" for role, ms in r["cpu_ms_per_token"].items())
            )
    print("\nmulti-turn (~1,500-token history resent): TTFT ms")
    for name, t in turns.items():
        print(
            f"  {name:>12}: first {t['first_ttft_ms']}, second {t['second_ttft_ms']} ({t['second_over_first']}x)"
        )
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    sys.exit(main())
