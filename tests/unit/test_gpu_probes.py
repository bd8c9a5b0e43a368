"""GPU probes, driven by stand-in vendor libraries put in sys.modules."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from aivailable.gpu import GpuInfo, amd, cpu_device, nvml, parse_fake_gpu, probe_all
from aivailable.gpu.fake import parse_size

GiB = 1 << 30


class StandInNVMLError(Exception):
    pass


def stand_in_pynvml(devices: list[dict], *, init_error: bool = False) -> types.ModuleType:
    """A module shaped like nvidia-ml-py's pynvml, serving the given devices."""
    mod = types.ModuleType("pynvml")
    mod.calls = []
    mod.NVMLError = StandInNVMLError

    def nvmlInit():
        mod.calls.append("init")
        if init_error:
            raise StandInNVMLError("NVML Shared Library Not Found")

    def device(handle):
        if devices[handle].get("broken"):
            raise StandInNVMLError("GPU is lost")
        return devices[handle]

    mod.nvmlInit = nvmlInit
    mod.nvmlShutdown = lambda: mod.calls.append("shutdown")
    mod.nvmlSystemGetDriverVersion = lambda: b"470.256.02"  # old pynvml returns bytes
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: device(h)["name"]
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        total=device(h)["total"],
        free=device(h)["free"],
        used=device(h)["total"] - device(h)["free"],
    )
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: device(h)["cc"]
    return mod


class StandInAmdSmiException(Exception):
    pass


def stand_in_amdsmi(devices: list[dict], *, old_api: bool = False, init_error: bool = False):
    """A module shaped like ROCm's amdsmi: new API (memory_total/usage in bytes) or the
    older one (vram_usage in MB)."""
    mod = types.ModuleType("amdsmi")
    mod.calls = []

    def amdsmi_init():
        mod.calls.append("init")
        if init_error:
            raise StandInAmdSmiException("AMDSMI_STATUS_DRIVER_NOT_LOADED")

    mod.amdsmi_init = amdsmi_init
    mod.amdsmi_shut_down = lambda: mod.calls.append("shutdown")
    mod.amdsmi_get_processor_handles = lambda: list(range(len(devices)))
    mod.amdsmi_get_gpu_asic_info = lambda h: {
        "market_name": devices[h]["name"],
        "target_graphics_version": devices[h]["gfx"],
        "vendor_id": "0x1002",
    }
    mod.amdsmi_get_gpu_driver_info = lambda h: {"driver_name": "amdgpu", "driver_version": "6.7.0"}
    if old_api:
        mod.amdsmi_get_gpu_vram_usage = lambda h: {
            "vram_total": devices[h]["total"] >> 20,
            "vram_used": (devices[h]["total"] - devices[h]["free"]) >> 20,
        }
    else:
        mod.AmdSmiMemoryType = SimpleNamespace(VRAM="vram", VIS_VRAM="vis", GTT="gtt")

        def total(h, kind):
            assert kind == "vram"
            return devices[h]["total"]

        def used(h, kind):
            assert kind == "vram"
            return devices[h]["total"] - devices[h]["free"]

        mod.amdsmi_get_gpu_memory_total = total
        mod.amdsmi_get_gpu_memory_usage = used
    return mod


@pytest.fixture(autouse=True)
def fresh_amd_import(monkeypatch):
    monkeypatch.setattr(amd, "_import_failure", None)


@pytest.fixture
def no_vendor_libs(monkeypatch):
    # None in sys.modules makes `import x` raise ImportError: no such library here.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "amdsmi", None)


NV_DEVICES = [
    {"name": "NVIDIA GeForce GTX 1080", "total": 8 * GiB, "free": 7 * GiB, "cc": (6, 1)},
    {"name": "Tesla K80", "total": 12 * GiB, "free": 12 * GiB, "cc": (3, 7)},
]
AMD_DEVICES = [{"name": "Radeon VII", "total": 16 * GiB, "free": 15 * GiB, "gfx": "gfx906"}]


def test_nvml_reports_each_gpu(monkeypatch):
    mod = stand_in_pynvml(NV_DEVICES)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    gpus = nvml.probe()
    assert gpus == [
        GpuInfo(
            "nvidia0", "nvidia", "NVIDIA GeForce GTX 1080", 8 * GiB, 7 * GiB, "470.256.02", "6.1", 0
        ),
        GpuInfo("nvidia1", "nvidia", "Tesla K80", 12 * GiB, 12 * GiB, "470.256.02", "3.7", 1),
    ]
    assert mod.calls == ["init", "shutdown"]


def test_nvml_without_library_means_no_nvidia_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", stand_in_pynvml(NV_DEVICES, init_error=True))
    assert nvml.probe() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert nvml.probe() == []


def test_nvml_broken_device_hides_only_itself(monkeypatch):
    devices = [dict(NV_DEVICES[0], broken=True), NV_DEVICES[1]]
    monkeypatch.setitem(sys.modules, "pynvml", stand_in_pynvml(devices))
    assert [(g.name, g.index) for g in nvml.probe()] == [("Tesla K80", 1)]


@pytest.mark.parametrize("old_api", [False, True])
def test_amdsmi_reports_each_gpu(monkeypatch, old_api):
    mod = stand_in_amdsmi(AMD_DEVICES, old_api=old_api)
    monkeypatch.setitem(sys.modules, "amdsmi", mod)
    assert amd.probe() == [
        GpuInfo("amd0", "amd", "Radeon VII", 16 * GiB, 15 * GiB, "6.7.0", "gfx906", 0)
    ]
    assert mod.calls == ["init", "shutdown"]


def test_amdsmi_init_failure_means_no_amd_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", stand_in_amdsmi(AMD_DEVICES, init_error=True))
    assert amd.probe() == []


def test_amdsmi_import_that_prints_and_raises_keyerror_is_contained(monkeypatch, tmp_path, capsys):
    """What amdsmi does without libamd_smi.so: print to stdout, then KeyError."""
    package = tmp_path / "amdsmi"
    package.mkdir()
    (package / "__init__.py").write_text(
        "print('Unable to find libamd_smi.so library try installing amd-smi-lib')\n"
        "_libraries = {}\n"
        "amdsmi_init = _libraries['libamd_smi.so'].amdsmi_init\n"
    )
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert amd.probe() == []
    assert amd.probe() == []  # remembered: not imported (and printed) again
    assert capsys.readouterr().out == ""
    assert "KeyError" in amd._import_failure and "Unable to find" in amd._import_failure


def test_probe_all_orders_vendors_then_fakes_with_node_local_ids(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", stand_in_pynvml(NV_DEVICES[:1]))
    monkeypatch.setitem(sys.modules, "amdsmi", stand_in_amdsmi(AMD_DEVICES))
    gpus = probe_all(["fake:GTX 1080:8GiB"], include_cpu=True)
    assert [(g.id, g.vendor, g.index) for g in gpus] == [
        ("gpu0", "nvidia", 0),
        ("gpu1", "amd", 0),
        ("gpu2", "fake", 0),
        ("cpu", "cpu", 0),
    ]
    assert [g.vendor for g in probe_all(["fake:A:1GiB"], real=False)] == ["fake"]


def test_probe_all_without_any_library_gives_only_fakes(no_vendor_libs):
    gpus = probe_all(["fake:GTX 1080:8GiB", "fake:Radeon RX 580:4096MiB"])
    assert [(g.id, g.name, g.vram_total) for g in gpus] == [
        ("gpu0", "GTX 1080", 8 * GiB),
        ("gpu1", "Radeon RX 580", 4096 << 20),
    ]
    assert probe_all([]) == []


def test_cpu_device_reports_ram():
    cpu = cpu_device()
    assert cpu.vendor == "cpu" and cpu.id == "cpu"
    assert 0 < cpu.vram_free <= cpu.vram_total


@pytest.mark.parametrize(
    ("spec", "name", "size"),
    [
        ("fake:GTX 1080:8GiB", "GTX 1080", 8 * GiB),
        ("fake:Tesla K80:12GB", "Tesla K80", 12 * 10**9),
        ("fake:RX 580:4096MiB", "RX 580", 4096 << 20),
        ("fake:tiny:512MB", "tiny", 512 * 10**6),
        ("fake:odd:name: 1.5 gib", "odd:name", int(1.5 * GiB)),
    ],
)
def test_parse_fake_gpu(spec, name, size):
    gpu = parse_fake_gpu(spec)
    assert (gpu.vendor, gpu.name, gpu.vram_total, gpu.vram_free) == ("fake", name, size, size)


@pytest.mark.parametrize(
    "spec",
    [
        "GTX 1080:8GiB",
        "fake:8GiB",
        "fake::8GiB",
        "fake:X:8",
        "fake:X:8XB",
        "fake:X:0GiB",
        "fake:X:-2GiB",
        "fake:X:",
        "nvidia:X:8GiB",
    ],
)
def test_parse_fake_gpu_rejects_bad_specs_clearly(spec):
    with pytest.raises(ValueError, match="bad GPU spec"):
        parse_fake_gpu(spec)


def test_parse_size_units():
    assert parse_size("1KiB") == 1024 and parse_size("1kb") == 1000 and parse_size("3B") == 3
    with pytest.raises(ValueError):
        parse_size("lots")
