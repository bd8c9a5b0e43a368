"""Serving throughput: tokens/s and time to first token through our API vs llama.cpp direct.

Same model, same prompt, greedy decoding, same run, the two paths' trials alternating.
For k concurrent streams the direct side serves the k requests one after another (one llama.cpp context decodes one request
at a time, as our worker does), so the two sides face the same queueing.

    python bench/serve.py [--quick] [--max-tokens N] [--trials N]

Prints a table and writes bench/results/serve.json. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable import store  # noqa: E402
from aivailable.local_peers import PeerProcess  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


class Tally:
    """Time-to-first-token samples and token/time totals of one path at one level."""

    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.tokens = 0
        self.seconds = 0.0

    def summary(self) -> dict:
        return summarize(self.ttfts, self.tokens, self.seconds)


def direct_trial(llm, concurrency: int, max_tokens: int, tally: Tally) -> None:
    """k requests served one after another by one llama.cpp context, as our worker does."""
    start = time.perf_counter()
    for _ in range(concurrency):
        first = None
        for chunk in llm.create_chat_completion(
            PROMPT, max_tokens=max_tokens, temperature=0, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                tally.tokens += 1
                if first is None:
                    first = time.perf_counter() - start
        tally.ttfts.append(first or 0.0)
    tally.seconds += time.perf_counter() - start


async def api_stream(session, url: str, max_tokens: int, start: float) -> tuple[float, int]:
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    first, tokens = None, 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                if first is None:
                    first = time.perf_counter() - start
    return first or 0.0, tokens


async def api_trial(url: str, concurrency: int, max_tokens: int, tally: Tally) -> None:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(api_stream(session, url, max_tokens, start) for _ in range(concurrency))
        )
        tally.seconds += time.perf_counter() - start
    tally.ttfts += [r[0] for r in results]
    tally.tokens += sum(r[1] for r in results)


def summarize(ttfts: list[float], tokens: int, seconds: float) -> dict:
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
        "ttft_p99_ms": round(pct(ttfts, 99) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials, shorter answers")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    trials = 1 if args.quick else args.trials
    max_tokens = 32 if args.quick else args.max_tokens
    levels = (1, 4, 8)
    path = store.resolve(f"builtin:{MODEL}").path

    results: dict = {"model": MODEL, "max_tokens": max_tokens, "trials": trials, "rows": []}
    from llama_cpp import Llama

    # Both paths are loaded side by side and their trials alternate, so a machine whose
    # load changes during the run (2 shared cores) weighs on both alike.
    llm = Llama(str(path), n_ctx=2048, n_gpu_layers=0, verbose=False)
    llm.create_chat_completion(PROMPT, max_tokens=8, temperature=0)  # warm-up
    direct = {k: Tally() for k in levels}
    api = {k: Tally() for k in levels}
    with tempfile.TemporaryDirectory() as tmp:
        peer = PeerProcess(Path(tmp), "bench", "--no-mdns").start()
        try:
            peer.wait_healthy()
            peer.wait_model_ready()
            asyncio.run(api_trial(peer.url, 1, 8, Tally()))  # warm-up
            for k in levels:
                for _ in range(trials):
                    direct_trial(llm, k, max_tokens, direct[k])
                    asyncio.run(api_trial(peer.url, k, max_tokens, api[k]))
        finally:
            peer.stop()
    direct = {k: t.summary() for k, t in direct.items()}
    api = {k: t.summary() for k, t in api.items()}

    header = (
        f"{'streams':>7} | {'path':>6} | {'tok/s':>8} | {'TTFT p50 ms':>11} | "
        f"{'TTFT p99 ms':>11} | {'API/direct':>10}"
    )
    print(header)
    print("-" * len(header))
    for k in levels:
        ratio = api[k]["tokens_per_s"] / direct[k]["tokens_per_s"]
        for label, row in (("direct", direct[k]), ("api", api[k])):
            print(
                f"{k:>7} | {label:>6} | {row['tokens_per_s']:>8.1f} | "
                f"{row['ttft_p50_ms']:>11.1f} | {row['ttft_p99_ms']:>11.1f} | "
                f"{(f'{ratio:.3f}' if label == 'api' else ''):>10}"
            )
        results["rows"].append(
            {"streams": k, "direct": direct[k], "api": api[k], "api_over_direct": round(ratio, 3)}
        )
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
