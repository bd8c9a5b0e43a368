"""Backends and the usable flag beyond the probe: gossip carries them, placement splits
an instance only within one backend, and never sees a card the build cannot drive."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aivailable.backends import llama_factory
from aivailable.backends.base import EngineSpec
from aivailable.backends.llama_engine import EngineConfig
from aivailable.cluster.payload import node_payload, read_payload
from aivailable.gpu import GpuInfo, cpu_device
from placement import Gpu, ModelSpec, Node, solve
from placement.split import devices_of, solve_with_splits

GiB = 1 << 30


def test_gossip_carries_backends_and_keeps_unusable_cards_out_of_placement():
    gpus = [
        GpuInfo("gpu0", "amd", "RX 580", 8 * GiB, 8 * GiB, "", "", 0, "Vulkan"),
        GpuInfo(
            "gpu1", "nvidia", "GTX 1080", 8 * GiB, 8 * GiB, "", "", 0, "CUDA", False, "no CUDA"
        ),
    ]
    read = read_payload("n1", node_payload("h:1", None, gpus, {}, []))
    assert [(g.id, g.backend) for g in read.gpus] == [("n1/gpu0", "Vulkan")]
    assert read.unusable == (("gpu1", "nvidia", "GTX 1080", "no CUDA"),)
    # A peer of an older version gossips no backends: its GPUs group by vendor as before.
    old = node_payload("h:1", None, gpus[:1], {}, [])
    del old["gb"]
    assert read_payload("n1", old).gpus[0].backend == ""


def test_tensor_split_stays_within_one_backend():
    node = Node(
        "a",
        (
            Gpu("a/gpu0", "amd", "RX 580", 4 * GiB, "HIP"),
            Gpu("a/gpu1", "amd", "RX 580", 4 * GiB, "Vulkan"),
        ),
    )
    assert solve([node], [ModelSpec("m", 6 * GiB)]).assignments == ()
    same = Node("a", tuple(Gpu(f"a/gpu{i}", "amd", "RX 580", 4 * GiB, "Vulkan") for i in range(2)))
    (a,) = solve([same], [ModelSpec("m", 6 * GiB)]).assignments
    assert a.gpus == ("a/gpu0", "a/gpu1")


def test_a_split_across_nodes_takes_one_backend_of_each_node():
    """Both views of a node's cards must not join one split's local part: the devices
    a split may use are one backend's, and the one-node fallback keeps the backends."""
    node = Node(
        "a",
        (
            Gpu("a/gpu0", "nvidia", "GTX 1080", 4 * GiB, "CUDA"),
            Gpu("a/gpu1", "nvidia", "GTX 780", 5 * GiB, "Vulkan"),
        ),
    )
    (dev,) = devices_of([node], {})["a"]
    assert dev.gpu == "a/gpu1"  # the backend with the most free bytes
    plan = solve_with_splits([node], [ModelSpec("m", 6 * GiB, split="never")], None, solve)
    assert plan.assignments == ()  # 4 + 5 GiB, but of two backends
    (a,) = solve_with_splits([node], [ModelSpec("m", 3 * GiB)], None, solve).assignments
    assert len(a.gpus) == 1


def test_a_split_primary_on_a_gpu_hides_the_node_s_other_backends(monkeypatch):
    monkeypatch.setattr(llama_factory, "split_layers", lambda path, host, shares: (31, shares))
    cuda = GpuInfo("gpu0", "nvidia", "GTX 1080", 8 * GiB, 8 * GiB, "", "", 0, "CUDA")
    vulkan = GpuInfo("gpu1", "nvidia", "GTX 1080", 8 * GiB, 8 * GiB, "", "", 0, "Vulkan")
    build = llama_factory.llama_factory([cuda, vulkan, cpu_device()], 512, 2, EngineConfig())
    spec = EngineSpec("m", Path("/m.gguf"), ("gpu0",), tensor_split=(11.0, 20.0))
    engine = build(replace(spec, rpc_servers=("127.0.0.1:5000",)))
    assert engine.env == {"CUDA_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": ""}
    # A split whose first layers stay on this host's CPU keeps its environment as it was.
    host = build(replace(spec, gpus=("cpu",), rpc_servers=("127.0.0.1:5000",), host_layers=5))
    assert host.env == {}
