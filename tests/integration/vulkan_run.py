"""Running SmolLM2 in a child of a given python (the Vulkan venv's or the CPU one's):
greedy text, speed, what llama.cpp put on the device and what the estimate planned.
Shared by tests/integration/test_vulkan.py and bench/vulkan.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VK_PYTHON = ROOT / ".venv-vulkan" / "bin" / "python"
# What llama.cpp's ubuntu-llvmpipe CI job exports (.github/workflows/build-vulkan.yml).
LAVAPIPE_ENV = {
    "GGML_VK_VISIBLE_DEVICES": "0",
    "GGML_VK_DISABLE_F16": "1",
    "GGML_VK_DISABLE_COOPMAT": "1",
}
PROMPT = "The capital of France is"


OFFLOAD_RUN = r"""
import ctypes, json, re, sys, os, time
import llama_cpp
from llama_cpp import Llama
from placement import estimate
path, n_ctx = sys.argv[1], int(sys.argv[2])
ggml = ctypes.CDLL("libggml.so.0")  # the copy libllama uses (the wheel ships two files)
ggml.ggml_backend_dev_by_name.restype = ctypes.c_void_p
ggml.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_size_t)] * 2
def free_bytes(name):
    dev = ggml.ggml_backend_dev_by_name(name)
    if not dev:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value
before = free_bytes(b"Vulkan0")
start = time.monotonic()
llm = Llama(path, n_gpu_layers=int(sys.argv[3]), n_ctx=n_ctx, n_threads=2, seed=1, verbose=True)
load_s = time.monotonic() - start
after = free_bytes(b"Vulkan0")
start = time.monotonic()
out = llm.create_completion(sys.argv[4], max_tokens=24, temperature=0.0, top_k=1)
gen_s = time.monotonic() - start
est = estimate(path, n_ctx, 1)
print(json.dumps({
    "text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"],
    "load_s": load_s, "gen_s": gen_s, "free_before": before, "free_after": after,
    "estimate": est.total, "estimate_weights": est.weights, "estimate_kv": est.kv_cache,
    "estimate_compute": est.compute,
}))
"""


def run_model(python: str, model: Path, n_gpu_layers: int, n_ctx: int = 2048) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [python, "-c", OFFLOAD_RUN, str(model), str(n_ctx), str(n_gpu_layers), PROMPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def buffer_mib(log: str, device: str) -> float:
    """What llama.cpp's load log says it put on `device`: model, KV and compute buffers."""
    pattern = rf"{device} (?:model|KV|compute|RS) buffer size =\s+([\d.]+) MiB"
    return sum(float(x) for x in re.findall(pattern, log))
