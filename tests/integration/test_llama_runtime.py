"""LlamaRuntime on the real SmolLM2 model: the fast paths pick what llama.cpp would."""

from __future__ import annotations

import llama_cpp
import pytest

from aivailable.backends.base import SamplingParams
from aivailable.backends.llama_runtime import ARGMAX, LlamaRuntime, RuntimeConfig
from aivailable.backends.scheduler import Token


@pytest.fixture(scope="module")
def runtime(embedded_model):
    rt = LlamaRuntime(RuntimeConfig(str(embedded_model), 512, 2, 128, 2, 2))
    yield rt
    rt.close()


def greedy_chain() -> int:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


def generate(rt: LlamaRuntime, chain: int, seq: int, n: int) -> list[int]:
    messages = [{"role": "user", "content": "List three colours of the rainbow."}]
    prompt = rt.tokenize(rt.chat_prompt(messages), special=True)
    rt.trim(seq, 0)
    last = len(prompt) - 1
    rows = rt.decode([Token(seq, t, i, (seq,) if i == last else ()) for i, t in enumerate(prompt)])
    out = [rt.sample(chain, rows[seq])]
    for _ in range(n - 1):
        rows = rt.decode([Token(seq, out[-1], len(prompt) + len(out) - 1, (seq,))])
        out.append(rt.sample(chain, rows[seq]))
    return out


def test_plain_greedy_needs_no_chain_and_picks_llama_cpps_greedy_tokens(runtime):
    assert runtime.sampler(SamplingParams(temperature=0.0), 7) == ARGMAX
    assert runtime.sampler({"temperature": 0}, 7) == ARGMAX  # overrides of the defaults
    # Anything beyond the argmax keeps llama.cpp's chain.
    for extra in ({"repeat_penalty": 1.3}, {"logit_bias": ((42, 5.0),)}, {"temperature": 0.7}):
        chain = runtime.sampler(SamplingParams(**{"temperature": 0.0, **extra}), 7)
        assert chain != ARGMAX
        runtime.free_sampler(chain)
    runtime.free_sampler(ARGMAX)  # nothing to free, and no crash
    chain = greedy_chain()
    try:
        by_chain = generate(runtime, chain, 0, 40)
    finally:
        llama_cpp.llama_sampler_free(chain)
    by_argmax = generate(runtime, ARGMAX, 1, 40)
    assert by_argmax == by_chain
    assert len(set(by_argmax)) > 5  # a real answer, not one token repeated


def test_pieces_are_the_tokens_bytes_cached_or_not(runtime):
    tokens = runtime.tokenize("Caché naïve — 東京", special=False)
    first = b"".join(runtime.piece(t) for t in tokens)
    again = b"".join(runtime.piece(t) for t in tokens)  # from the cache now
    assert first == again == "Caché naïve — 東京".encode()
