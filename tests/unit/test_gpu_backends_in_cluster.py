"""Backends and the usable flag beyond the probe: gossip carries them, placement splits
an instance only within one backend, and never sees a card the build cannot drive."""

from __future__ import annotations

from aivailable.cluster.payload import node_payload, read_payload
from aivailable.gpu import GpuInfo
from placement import Gpu, ModelSpec, Node, solve

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
