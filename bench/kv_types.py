"""KV cache types on the embedded model: answers, speed, and what fits on an 8 GiB card.

For each of f16 / q8_0 / q4_0 (a deploy's `kv_type`), in one process, alternating:
- greedy answers (48 tokens) to a fixed set of prompts through LlamaRuntime, the worker's
  own ctypes layer, compared token for token with f16's: the share of answers identical,
  and the mean share of tokens before the first difference;
- single-stream decode tok/s over those answers (median of the rounds);
- KV bytes per slot: placement.estimate's, and llama.cpp's own ("llama_kv_cache: size" in
  its load log, through tests/unit/placement_llama_probe.py);
- slots of n_ctx 4096 that fit in a simulated 8 GiB card with the runtime overhead, by
  placement.estimate (what the controller plans).

    python bench/kv_types.py [--rounds N] [--threads T]

Prints a table and writes bench/results/kv_types.json. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.backends.llama_runtime import ARGMAX, LlamaRuntime, RuntimeConfig  # noqa: E402
from aivailable.backends.scheduler import Token  # noqa: E402
from aivailable.cluster.controller import kv_estimate_args  # noqa: E402
from aivailable.cluster.state import ModelRecord  # noqa: E402
from aivailable.models import store  # noqa: E402
from placement import estimate  # noqa: E402
from tests.unit.placement_llama_probe import measure  # noqa: E402

TYPES = ("f16", "q8_0", "q4_0")
PROMPTS = (
    "List three colours of the rainbow.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a GPU is in one sentence.",
    "Give me two tips for learning to cook.",
    "What is 12 times 7?",
    "Name a famous scientist and one discovery.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What does a compiler do?",
    "Describe a cat in five words.",
)
CARD = 8 << 30
SLOT_CTX = 4096


def answer(rt: LlamaRuntime, prompt: str, n: int) -> tuple[list[int], float]:
    """Greedy tokens for a chat prompt, and the seconds the n-1 decode steps took."""
    tokens = rt.tokenize(rt.chat_prompt([{"role": "user", "content": prompt}]), special=True)
    rt.trim(0, 0)
    last = len(tokens) - 1
    rows = rt.decode([Token(0, t, i, (0,) if i == last else ()) for i, t in enumerate(tokens)])
    out = [rt.sample(ARGMAX, rows[0])]
    started = time.perf_counter()
    while len(out) < n and not rt.is_eog(out[-1]):
        rows = rt.decode([Token(0, out[-1], len(tokens) + len(out) - 1, (0,))])
        out.append(rt.sample(ARGMAX, rows[0]))
    return out, time.perf_counter() - started


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def slots_that_fit(model: Path, kv_type: str) -> int:
    record = ModelRecord("m", str(model), kv_type=kv_type)
    n = 0
    while n < 1024 and estimate(model, SLOT_CTX, n + 1, **kv_estimate_args(record)).total <= CARD:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv_types.json"))
    args = ap.parse_args()
    model = store.resolve("builtin:smollm2-135m").path
    runtimes = {
        t: LlamaRuntime(
            RuntimeConfig(str(model), 512, 1, 512, args.threads, args.threads, kv_type=t)
        )
        for t in TYPES
    }
    answers: dict[str, list[list[int]]] = {}
    speed: dict[str, list[float]] = {t: [] for t in TYPES}
    for _ in range(args.rounds):
        for t in TYPES:  # alternating, so the machine's load falls on every type alike
            toks, secs = 0, 0.0
            outs = []
            for p in PROMPTS:
                out, s = answer(runtimes[t], p, args.tokens)
                outs.append(out)
                toks, secs = toks + len(out) - 1, secs + s
            answers[t] = outs
            speed[t].append(toks / secs)
    for rt in runtimes.values():
        rt.close()
    ref = answers["f16"]
    measured = measure(model, [{"n_ctx": SLOT_CTX, **kv_args(t)} for t in TYPES])[1]
    rows = []
    for t, got in zip(TYPES, measured, strict=True):
        same = sum(a == b for a, b in zip(answers[t], ref, strict=True))
        prefix = statistics.mean(
            common_prefix(a, b) / max(len(b), 1) for a, b in zip(answers[t], ref, strict=True)
        )
        est = estimate(model, SLOT_CTX, 1, **kv_args(t))
        rows.append(
            {
                "kv_type": t,
                "answers_identical": same / len(PROMPTS),
                "mean_prefix_match": prefix,
                "tok_per_s": statistics.median(speed[t]),
                "tok_per_s_trials": speed[t],
                "kv_per_slot_estimate": est.kv_cache,
                "kv_per_slot_llama_cpp": got["kv_cache"],
                "slots_in_8GiB": slots_that_fit(model, t),
            }
        )
    print(
        f"{'kv_type':<8}{'identical':>10}{'prefix':>8}{'tok/s':>8}{'spread':>14}"
        f"{'KV/slot est':>13}{'KV/slot llama':>15}{'slots 8GiB':>11}"
    )
    for r in rows:
        spread = f"{min(r['tok_per_s_trials']):.0f}-{max(r['tok_per_s_trials']):.0f}"
        print(
            f"{r['kv_type']:<8}{r['answers_identical']:>10.0%}{r['mean_prefix_match']:>8.0%}"
            f"{r['tok_per_s']:>8.1f}{spread:>14}{r['kv_per_slot_estimate'] / 2**20:>11.1f}Mi"
            f"{r['kv_per_slot_llama_cpp'] / 2**20:>13.1f}Mi{r['slots_in_8GiB']:>11}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "args": vars(args), "n_ctx": SLOT_CTX}, indent=1))
    print(f"wrote {out} (n_ctx {SLOT_CTX} per slot, {len(PROMPTS)} prompts)")


def kv_args(kv_type: str) -> dict:
    return kv_estimate_args(ModelRecord("m", "x", kv_type=kv_type))


if __name__ == "__main__":
    main()
