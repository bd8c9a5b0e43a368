"""Ask llama.cpp itself what it allocates: load a GGUF, create contexts, read its load log.

Run as a script in a child process (llama.cpp logs to the process's stderr, which only a
parent can capture): `python placement_llama_probe.py MODEL.gguf '[{"n_ctx": 2048}, ...]'`.
`measure()` does that and parses each context's buffer sizes (bytes) from the log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

MIB = 1 << 20
_SIZE = r"=\s+([0-9.]+) MiB"
_MODEL = re.compile(r"(\S+) model buffer size\s+" + _SIZE)
_KV = re.compile(r"llama_kv_cache: size\s+" + _SIZE)
_COMPUTE = re.compile(r"(\S+) compute buffer size\s+" + _SIZE)


def measure(model: Path, configs: list[dict], timeout: float = 300) -> tuple[int, list[dict]]:
    """(model buffer bytes, [{"kv_cache": bytes, "compute": bytes}] per config)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, str(model), json.dumps(configs)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    weights, results, current = 0, [], None
    for line in proc.stderr.splitlines():
        if line.startswith("=== CFG"):
            current = {}
            results.append(current)
        elif (m := _MODEL.search(line)) and current is None:
            weights += round(float(m.group(2)) * MIB)
        elif (m := _KV.search(line)) and current is not None:
            current["kv_cache"] = round(float(m.group(1)) * MIB)
        elif (m := _COMPUTE.search(line)) and current is not None and "~" not in line:
            current["compute"] = current.get("compute", 0) + round(float(m.group(2)) * MIB)
    if len(results) != len(configs) or not all(
        {"kv_cache", "compute"} <= r.keys() for r in results
    ):
        raise RuntimeError(
            f"could not read buffer sizes from llama.cpp's log:\n{proc.stderr[-3000:]}"
        )
    return weights, results


def _probe(model: str, configs: list[dict]) -> None:
    import llama_cpp as lc

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0
    handle = lc.llama_model_load_from_file(model.encode(), params)
    if not handle:
        raise SystemExit(f"llama.cpp could not load {model}")
    types = {"f16": lc.GGML_TYPE_F16, "q8_0": lc.GGML_TYPE_Q8_0, "q4_0": lc.GGML_TYPE_Q4_0}
    for cfg in configs:
        cp = lc.llama_context_default_params()
        cp.n_ctx = cfg["n_ctx"] * cfg.get("n_parallel", 1)
        cp.n_seq_max = cfg.get("n_parallel", 1)
        cp.n_batch = max(cfg.get("n_ubatch", 512), 512)
        cp.n_ubatch = cfg.get("n_ubatch", 512)
        cp.kv_unified = cfg.get("kv_unified", False)
        cp.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if cfg.get("flash_attn")
            else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cp.type_k = cp.type_v = types[cfg.get("cache_type", "f16")]
        cp.n_threads = cp.n_threads_batch = 1
        sys.stderr.write(f"=== CFG {json.dumps(cfg)}\n")
        sys.stderr.flush()
        ctx = lc.llama_init_from_model(handle, cp)
        if not ctx:
            raise SystemExit(f"llama.cpp could not create a context for {cfg}")
        lc.llama_free(ctx)
    lc.llama_model_free(handle)


if __name__ == "__main__":
    _probe(sys.argv[1], json.loads(sys.argv[2]))
