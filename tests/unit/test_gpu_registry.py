"""llama.cpp's device registry as the judge of usable GPUs: merged with NVML/amdsmi over
faked registries, probed in a child that may fail, and read for real from the CPU build."""

from __future__ import annotations

import _ctypes
import sys
from types import SimpleNamespace

import pytest

from aivailable.gpu import GpuInfo, probe_all, registry
from aivailable.gpu.devices import merge, norm_pci
from aivailable.gpu.registry import Registry, RegistryDevice
from tests.unit.test_gpu_probes import NV_DEVICES, stand_in_pynvml

GiB = 1 << 30


def dev(index, name, desc, backend, total, pci="", ordinal=0, kind="gpu"):
    return RegistryDevice(index, name, desc, backend, kind, total, total, pci, ordinal)


CPU = dev(9, "CPU", "AMD EPYC", "CPU", 64 * GiB, kind="cpu")
GTX = GpuInfo("nvidia0", "nvidia", "NVIDIA GeForce GTX 1080", 8 * GiB, 7 * GiB, "470", "6.1", 0)
GTX = GpuInfo(**{**GTX.__dict__, "pci": "00000000:01:00.0"})


def test_a_card_only_vulkan_drives_is_a_usable_gpu_of_the_node():
    rx = dev(
        0, "Vulkan0", "AMD Radeon RX 580 Series (RADV POLARIS10)", "Vulkan", 8 * GiB, "0000:03:00.0"
    )
    (gpu,) = merge(Registry((rx, CPU), ("Vulkan", "CPU")), [])  # amdsmi sees nothing
    assert (gpu.vendor, gpu.backend, gpu.usable, gpu.index) == ("amd", "Vulkan", True, 0)
    assert (gpu.vram_total, gpu.key, gpu.name) == (8 * GiB, "0000:03:00.0", rx.description)


def test_a_card_nvml_sees_but_a_cpu_build_cannot_drive_is_unusable_with_the_rebuild():
    (gpu,) = merge(Registry((CPU,), ("RPC", "CPU")), [GTX])
    assert not gpu.usable and gpu.backend == "CUDA" and gpu.key == "0000:01:00.0"
    assert "no CUDA" in gpu.reason and "its backends: CPU" in gpu.reason
    assert "-DGGML_CUDA=on" in gpu.reason and "make vulkan" in gpu.reason


def test_a_card_the_cuda_backend_skips_names_its_compute_capability():
    kepler = GpuInfo("nvidia0", "nvidia", "Tesla K80", 12 * GiB, 12 * GiB, "470", "3.7", 0)
    (gpu,) = merge(Registry((CPU,), ("CUDA", "CPU")), [kepler])
    assert not gpu.usable and "does not list it" in gpu.reason and "3.7" in gpu.reason


def test_two_backends_on_one_node_and_one_card_seen_twice_counts_once():
    reg = Registry(
        (
            dev(0, "CUDA0", "NVIDIA GeForce GTX 1080", "CUDA", 8 * GiB, "0000:01:00.0"),
            dev(1, "Vulkan0", "NVIDIA GeForce GTX 1080", "Vulkan", 8 * GiB, "0000:01:00.0"),
            dev(2, "Vulkan1", "AMD Radeon RX 580", "Vulkan", 8 * GiB, "0000:03:00.0", 1),
            CPU,
        ),
        ("CUDA", "Vulkan", "CPU"),
    )
    gpus = merge(reg, [GTX])
    assert [(g.id, g.backend, g.vendor, g.index) for g in gpus] == [
        ("CUDA0", "CUDA", "nvidia", 0),
        ("Vulkan1", "Vulkan", "amd", 1),
    ]
    # NVML enriches the card it matched by PCI id: driver, compute, fresh free memory.
    assert (gpus[0].driver, gpus[0].compute, gpus[0].vram_free) == ("470", "6.1", 7 * GiB)


def test_without_pci_ids_cuda_devices_match_nvml_in_order_and_vulkan_by_name():
    k80 = GpuInfo("nvidia1", "nvidia", "Tesla K80", 12 * GiB, 12 * GiB, "470", "3.7", 1)
    gtx = GpuInfo("nvidia0", "nvidia", "NVIDIA GeForce GTX 1080", 8 * GiB, 7 * GiB, "470", "6.1", 0)
    reg = Registry(
        (
            dev(0, "CUDA0", "GTX 1080", "CUDA", 8 * GiB),
            dev(1, "Vulkan0", "Tesla K80", "Vulkan", 12 * GiB),
        ),
        ("CUDA", "Vulkan"),
    )
    gpus = merge(reg, [gtx, k80])
    assert [(g.name, g.backend, g.usable) for g in gpus] == [
        ("NVIDIA GeForce GTX 1080", "CUDA", True),
        ("Tesla K80", "Vulkan", True),  # past CUDA 12, still driven through Vulkan
    ]


def test_an_unreadable_registry_keeps_the_vendor_cards_usable():
    (gpu,) = merge(Registry(error="the device probe exited with -11"), [GTX])
    assert gpu.usable and gpu.backend == "CUDA"


def test_probe_all_numbers_usable_registry_gpus_then_undriven_cards_then_fakes(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", stand_in_pynvml(NV_DEVICES[:1]))
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    lavapipe = dev(0, "Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)", "Vulkan", 2 * GiB)
    reg = Registry((lavapipe, CPU), ("Vulkan", "CPU"))
    gpus = probe_all(["fake:A:1GiB"], reg=reg)
    assert [(g.id, g.vendor, g.backend, g.usable) for g in gpus] == [
        ("gpu0", "other", "Vulkan", True),
        ("gpu1", "nvidia", "CUDA", False),  # the GTX: NVML has it, no CUDA in this build
        ("gpu2", "fake", "fake", True),
    ]


def test_pci_ids_of_nvml_and_ggml_compare_equal():
    assert norm_pci("00000000:01:00.0") == norm_pci("0000:01:00.0") == "0000:01:00.0"


def test_a_child_that_crashes_or_hangs_gives_an_error_not_an_exception(tmp_path):
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    crash.chmod(0o755)
    reg = registry.probe(python=str(crash))
    assert reg.devices == () and "exited with 139: Segmentation fault" in reg.error
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    assert "did not answer in 1 s" in registry.probe(python=str(hang), timeout=1).error


def test_a_library_without_the_registry_symbols_is_an_error(tmp_path):
    (tmp_path / "libggml.so").symlink_to(_ctypes.__file__)  # loads, has no ggml symbols
    reg = registry.read_in_process(tmp_path)
    assert reg.devices == () and "lacks ggml_backend_" in reg.error
    assert "no libggml" in registry.read_in_process(tmp_path / "empty").error


def test_the_installed_build_reports_its_cpu_device():
    reg = registry.probe()
    assert reg.error == "", reg.error
    cpu = [d for d in reg.devices if d.backend == "CPU"]
    assert len(cpu) == 1 and cpu[0].kind == "cpu" and cpu[0].total > 0
    assert "CPU" in reg.backends and cpu[0].free > 0


@pytest.mark.parametrize("text", ["", "{", '{"devices": [{"bogus": 1}]}'])
def test_an_unreadable_answer_is_an_error(monkeypatch, text):
    done = SimpleNamespace(returncode=0, stdout=text, stderr="")
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: done)
    assert registry.probe().error


def test_doctor_names_the_backends_each_card_and_why_one_is_not_usable():
    from aivailable.gpu import doctor

    reg = Registry((CPU,), ("RPC", "CPU", "Vulkan"), library="/x/libggml.so")
    text = doctor.report(reg, merge(reg, [GTX]))
    assert "backends: RPC, CPU, Vulkan" in text
    assert "GGML_VK_VISIBLE_DEVICES" in text  # Vulkan built in, no device listed
    assert "NVIDIA GeForce GTX 1080: NOT usable" in text and "-DGGML_CUDA=on" in text


def test_the_peer_reads_the_registry_once(monkeypatch):
    """Each read inits every backend (a CUDA context per card): once per process."""
    calls = []
    monkeypatch.setattr(registry, "_cache", None)
    monkeypatch.setattr(registry, "probe", lambda: calls.append(1) or Registry(backends=("CPU",)))
    assert registry.cached() is registry.cached()
    assert len(calls) == 1
