"""Quantized KV caches on the real model: llama.cpp loads them (flash attention on) and
answers; a type it has no name for is refused before llama.cpp sees it."""

from __future__ import annotations

import pytest

from aivailable.backends.llama_runtime import ARGMAX, LlamaCallError, LlamaRuntime, RuntimeConfig
from aivailable.backends.scheduler import Token


def greedy(rt: LlamaRuntime, n: int = 16) -> list[int]:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = rt.tokenize(rt.chat_prompt(messages), special=True)
    last = len(prompt) - 1
    rows = rt.decode([Token(0, t, i, (0,) if i == last else ()) for i, t in enumerate(prompt)])
    out = [rt.sample(ARGMAX, rows[0])]
    for _ in range(n - 1):
        rows = rt.decode([Token(0, out[-1], len(prompt) + len(out) - 1, (0,))])
        out.append(rt.sample(ARGMAX, rows[0]))
    return out


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_a_quantized_cache_loads_and_answers(embedded_model, kv_type):
    rt = LlamaRuntime(RuntimeConfig(str(embedded_model), 256, 1, 128, 1, 1, kv_type=kv_type))
    try:
        tokens = greedy(rt)
        text = b"".join(rt.piece(t) for t in tokens).decode(errors="replace")
    finally:
        rt.close()
    assert len(set(tokens)) > 3 and text.strip()  # a real answer (135M: not always right)


def test_an_unknown_type_is_a_clear_error(embedded_model):
    with pytest.raises(LlamaCallError, match="kv_type must be one of f16, q8_0, q4_0"):
        LlamaRuntime(RuntimeConfig(str(embedded_model), 256, 1, 128, 1, 1, kv_type="q2_k"))
