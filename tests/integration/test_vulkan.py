"""The Vulkan route on a software GPU: llama-cpp-python built with GGML_VULKAN=on
(`make vulkan`, in .venv-vulkan) on Mesa's lavapipe.

lavapipe is a CPU-type Vulkan device, which ggml-vulkan passes over unless
GGML_VK_VISIBLE_DEVICES names it (llama.cpp's own llvmpipe CI sets it, with F16 and
cooperative matrices off): every run here sets that environment. Without the Vulkan venv
these tests fail with how to build it, unless AIVAILABLE_SKIP_VULKAN says why not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from aivailable.gpu import registry
from aivailable.local_peers import PeerProcess
from tests.integration.vulkan_run import LAVAPIPE_ENV, ROOT, VK_PYTHON, buffer_mib, run_model

pytestmark = [pytest.mark.slow, pytest.mark.vulkan]


@pytest.fixture(scope="module")
def vk_python() -> str:
    skip = os.environ.get("AIVAILABLE_SKIP_VULKAN")
    if skip:
        pytest.skip(f"AIVAILABLE_SKIP_VULKAN: {skip}")
    if not VK_PYTHON.exists():
        pytest.fail(
            "no .venv-vulkan: run `make vulkan` (needs libvulkan-dev, glslc, spirv-headers)"
        )
    return str(VK_PYTHON)


@pytest.fixture
def lavapipe_env(monkeypatch):
    for name, value in LAVAPIPE_ENV.items():
        monkeypatch.setenv(name, value)


def test_the_registry_lists_lavapipe_with_its_memory(vk_python, lavapipe_env):
    reg = registry.probe(python=vk_python)
    assert reg.error == "" and "Vulkan" in reg.backends, reg
    (gpu,) = reg.gpus
    assert gpu.backend == "Vulkan" and gpu.name == "Vulkan0" and gpu.kind == "gpu"
    assert "llvmpipe" in gpu.description
    assert 0 < gpu.free <= gpu.total


def test_without_the_env_lavapipe_is_passed_over(vk_python, monkeypatch):
    """ggml-vulkan's default takes only discrete and integrated GPUs: a CPU-type device
    is no GPU to it, so the node sees none (and runs on the CPU)."""
    monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
    reg = registry.probe(python=vk_python)
    assert reg.error == "" and "Vulkan" in reg.backends and reg.gpus == ()


def test_smollm2_runs_fully_offloaded_on_lavapipe(vk_python, lavapipe_env, embedded_model):
    vk, log = run_model(vk_python, embedded_model, -1)
    assert "offloaded 31/31 layers to GPU" in log, log[-3000:]
    assert vk["tokens"] > 0 and vk["text"].strip()
    cpu, _ = run_model(sys.executable, embedded_model, 0)
    on_device = buffer_mib(log, "Vulkan0") * (1 << 20)
    report = {
        "vulkan_text": vk["text"],
        "cpu_text": cpu["text"],
        "same_greedy_output": vk["text"] == cpu["text"],
        "vulkan_tok_s": vk["tokens"] / vk["gen_s"],
        "cpu_tok_s": cpu["tokens"] / cpu["gen_s"],
        "llama_buffers_on_vulkan0": on_device,
        "device_free_drop": (vk["free_before"] or 0) - (vk["free_after"] or 0),
        "estimate_total": vk["estimate"],
        "estimate_without_overhead": vk["estimate_weights"]
        + vk["estimate_kv"]
        + vk["estimate_compute"],
    }
    print("VULKAN-REPORT " + json.dumps(report))
    # Greedy texts agree on the answer, then drift apart: lavapipe sums in another order
    # (and without F16) than ggml-cpu, and a 135M model's near-ties flip (measured:
    # " Paris.\n\nThe answer is..." against " Paris.\n\nThe United States...").
    assert vk["text"].split()[0] == cpu["text"].split()[0] == "Paris.", report
    # lavapipe reports a fixed 2 GiB heap whose free figure does not move with use, so the
    # device's own reading cannot check the estimate; llama.cpp's load log can.
    # The estimate's buffers (weights, KV, compute) against llama.cpp's own log of what it
    # allocated on the device; the 256 MiB runtime overhead is not logged (estimate.py).
    assert on_device > 0
    assert abs(report["estimate_without_overhead"] - on_device) <= 0.10 * on_device, report


class VulkanPeer(PeerProcess):
    """`aivailable up` run by the Vulkan venv's python, not this one."""

    def start(self) -> VulkanPeer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(VK_PYTHON), "-m", "aivailable", "up", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self


def worker_of(pid: int) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the model worker under the peer `pid`."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (child / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == pid and any(b"llama_worker" in c for c in cmd):
            env = dict(
                e.decode().split("=", 1)
                for e in (child / "environ").read_bytes().split(b"\0")
                if b"=" in e
            )
            return [c.decode() for c in cmd if c], env
    raise AssertionError(f"no model worker under {pid}")


def test_a_peer_on_the_vulkan_build_places_smollm2_on_lavapipe_and_answers(vk_python, tmp_path):
    env = {**LAVAPIPE_ENV, "PYTHONPATH": str(ROOT)}
    peer = VulkanPeer(tmp_path, "vk", "--no-mdns", env=env).start()
    try:
        peer.wait_healthy()
        peer.wait_model_ready(timeout=300)
        status = peer.status()
        (node,) = status["nodes"]
        (gpu,) = node["gpus"]
        assert gpu["backend"] == "Vulkan" and "llvmpipe" in gpu["name"] and gpu["vram_total"] > 0
        (model,) = [m for m in status["models"] if m["name"] == "smollm2-135m"]
        assert [p["gpus"] for p in model["placements"]] == [[gpu["id"]]]
        cmd, worker_env = worker_of(peer.pid)
        assert cmd[cmd.index("--n-gpu-layers") + 1] == "-1"
        assert worker_env["GGML_VK_VISIBLE_DEVICES"] == "0"
        client = openai.OpenAI(
            base_url=peer.url + "/v1", api_key="none", max_retries=0, timeout=300
        )
        answer = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=16,
            temperature=0,
        )
        assert answer.choices[0].message.content.strip()
    finally:
        peer.stop()
