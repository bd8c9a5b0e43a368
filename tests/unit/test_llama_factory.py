"""The real engine factory: which devices a worker sees, and what it offloads."""

from pathlib import Path

from aivailable.backends.base import EngineSpec
from aivailable.backends.llama_engine import EngineConfig
from aivailable.backends.llama_factory import device_env, llama_factory, n_gpu_layers_for
from aivailable.gpu import GpuInfo, cpu_device, parse_fake_gpu

GIB = 1 << 30


def gpu(gpu_id, vendor, index):
    return GpuInfo(gpu_id, vendor, "G", 8 * GIB, 8 * GIB, "", "", index=index)


def test_a_worker_sees_only_its_real_gpus_through_its_vendor_s_variable():
    assert device_env([]) == {}
    assert device_env([parse_fake_gpu("fake:X:8GiB"), cpu_device()]) == {}
    assert device_env([gpu("gpu0", "nvidia", 0), gpu("gpu2", "nvidia", 2)]) == {
        "CUDA_VISIBLE_DEVICES": "0,2"
    }
    assert device_env([gpu("gpu1", "amd", 1)]) == {"HIP_VISIBLE_DEVICES": "1"}


def test_the_factory_offloads_on_real_gpus_and_splits_only_over_several():
    gpus = [gpu("gpu0", "nvidia", 0), gpu("gpu1", "nvidia", 1), cpu_device()]
    build = llama_factory(gpus, n_ctx=1024, queue_limit=3, config=EngineConfig())
    one = build(EngineSpec("m", Path("/m.gguf"), ("gpu1",), tensor_split=(1.0,)))
    assert (one.n_gpu_layers, one.env, one.tensor_split) == (
        -1,
        {"CUDA_VISIBLE_DEVICES": "1"},
        None,
    )
    assert (one.n_ctx, one.queue_limit, one.kind) == (1024, 3, "chat")
    two = build(
        EngineSpec("m", Path("/m.gguf"), ("gpu0", "gpu1"), n_ctx=4096, tensor_split=(0.5, 0.5))
    )
    assert (two.n_ctx, two.tensor_split) == (4096, (0.5, 0.5))
    cpu = build(EngineSpec("e", Path("/e.gguf"), (cpu_device().id,), kind="embedding"))
    # A CPU instance on a GPU node sees no GPU: llama.cpp would offload ops to one otherwise.
    assert (cpu.n_gpu_layers, cpu.env, cpu.kind) == (0, {"CUDA_VISIBLE_DEVICES": ""}, "embedding")


def vk(gpu_id, index, usable=True):
    return GpuInfo(gpu_id, "amd", "RX 580", 8 * GIB, 8 * GIB, "", "", index, "Vulkan", usable)


def test_the_variable_follows_the_backend_and_hides_the_node_s_other_backends():
    cuda = GpuInfo("gpu0", "nvidia", "GTX 1080", 8 * GIB, 8 * GIB, "", "", 0, "CUDA")
    node = [cuda, vk("gpu1", 0), vk("gpu2", 1)]
    env = device_env([node[2]], node, parent={"GGML_VK_VISIBLE_DEVICES": "1,3"})
    # Vulkan1 is the parent's second listed device; CUDA is hidden from this worker.
    assert env == {"GGML_VK_VISIBLE_DEVICES": "3", "CUDA_VISIBLE_DEVICES": ""}
    # The parent listed no Vulkan devices: VulkanN is not the loader's index, so no pin.
    assert device_env([node[1]], node, parent={}) == {"CUDA_VISIBLE_DEVICES": ""}
    assert device_env([cuda], node, parent={"CUDA_VISIBLE_DEVICES": "2"}) == {
        "CUDA_VISIBLE_DEVICES": "2",
        "GGML_VK_VISIBLE_DEVICES": "",
    }


def test_a_card_the_build_cannot_drive_gets_no_offload():
    dead = vk("gpu0", 0, usable=False)
    assert n_gpu_layers_for([dead]) == 0 and device_env([dead], [dead], parent={}) == {}
    assert n_gpu_layers_for([vk("gpu0", 0)]) == -1


def test_a_worker_hides_amd_gpus_with_an_invalid_index():
    amd = GpuInfo("gpu0", "amd", "Radeon VII", 16 * GIB, 16 * GIB, "", "gfx906", 0, "HIP")
    assert device_env([cpu_device()], [amd], parent={}) == {"HIP_VISIBLE_DEVICES": "-1"}
    assert device_env([amd], [amd], parent={}) == {"HIP_VISIBLE_DEVICES": "0"}
