"""NVML and amdsmi readings (temperature, utilisation, ECC) over fake vendor modules: each
one optional, matched to llama.cpp's devices by PCI id, steadied, gossiped bounded, shown
in /cluster/status, `aivailable status` and `aivailable doctor`, with a health verdict."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import msgpack
import pytest
from rich.console import Console

from aivailable.cluster.payload import node_payload, read_payload
from aivailable.cluster.status import gpu_views
from aivailable.gpu import GpuInfo, amd, doctor, nvml, probe_all
from aivailable.gpu.info import HOT_C, health
from aivailable.gpu.readings import ECC_MAX, steady
from aivailable.gpu.registry import Registry, RegistryDevice
from aivailable.status_view import render_status

GiB = 1 << 30


class FakeNVMLError_NotSupported(Exception):  # noqa: N801 (pynvml's own spelling)
    pass


def fake_pynvml(cards: list[dict]) -> types.ModuleType:
    """A fake of nvidia-ml-py's pynvml: each card a dict of what it answers; a reading
    missing from the dict raises NotSupported, as an old GeForce does."""
    mod = types.ModuleType("pynvml")
    mod.NVML_TEMPERATURE_GPU = 0
    mod.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    mod.NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    mod.NVML_VOLATILE_ECC = 0
    mod.calls = []

    def answer(key, h, *args):
        mod.calls.append((key, args))
        if key not in cards[h]:
            raise FakeNVMLError_NotSupported("Not Supported")
        return cards[h][key]

    mod.nvmlInit = mod.nvmlShutdown = lambda: None
    mod.nvmlSystemGetDriverVersion = lambda: "550.54"
    mod.nvmlDeviceGetCount = lambda: len(cards)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: cards[h]["name"]
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=8 * GiB, free=6 * GiB)
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: (6, 1)
    mod.nvmlDeviceGetPciInfo = lambda h: SimpleNamespace(busId=cards[h]["pci"])
    mod.nvmlDeviceGetTemperature = lambda h, sensor: answer("temp", h, sensor)
    mod.nvmlDeviceGetTemperatureThreshold = lambda h, kind: answer("limit", h, kind)
    mod.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=answer("util", h), memory=3)
    mod.nvmlDeviceGetEccMode = lambda h: answer("ecc", h)
    mod.nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: answer(
        "ecc_errors", h, kind, counter
    )
    return mod


class FakeAmdSmiLibraryException(Exception):
    pass


def fake_amdsmi(cards: list[dict]) -> types.ModuleType:
    """A fake of ROCm's amdsmi: temperatures in millidegrees as its docs say, per sensor
    ("edge" / "hotspot"); a reading missing from the dict raises AMDSMI_STATUS_NOT_SUPPORTED."""
    mod = types.ModuleType("amdsmi")
    mod.AmdSmiMemoryType = SimpleNamespace(VRAM="vram")
    mod.AmdSmiTemperatureType = SimpleNamespace(EDGE="edge", HOTSPOT="hotspot")
    mod.AmdSmiTemperatureMetric = SimpleNamespace(CURRENT="current", CRITICAL="critical")

    def answer(h, key):
        if key not in cards[h]:
            raise FakeAmdSmiLibraryException("AMDSMI_STATUS_NOT_SUPPORTED")
        return cards[h][key]

    mod.amdsmi_init = mod.amdsmi_shut_down = lambda: None
    mod.amdsmi_get_processor_handles = lambda: list(range(len(cards)))
    mod.amdsmi_get_gpu_asic_info = lambda h: {
        "market_name": cards[h]["name"],
        "target_graphics_version": "gfx906",
    }
    mod.amdsmi_get_gpu_driver_info = lambda h: {"driver_version": "6.7.0"}
    mod.amdsmi_get_gpu_memory_total = lambda h, kind: 16 * GiB
    mod.amdsmi_get_gpu_memory_usage = lambda h, kind: 1 * GiB
    mod.amdsmi_get_gpu_device_bdf = lambda h: cards[h]["pci"]
    mod.amdsmi_get_temp_metric = lambda h, sensor, metric: answer(h, (sensor, metric))
    mod.amdsmi_get_gpu_activity = lambda h: answer(h, "activity")
    mod.amdsmi_get_gpu_ecc_enabled = lambda h: answer(h, "ecc_mask")
    mod.amdsmi_get_gpu_total_ecc_count = lambda h: answer(h, "ecc_count")
    return mod


TESLA = {
    "name": "Tesla P40",
    "pci": "00000000:01:00.0",
    "temp": 64,
    "limit": 92,
    "util": 37,
    "ecc": [1, 1],
    "ecc_errors": 0,
}
GEFORCE = {"name": "NVIDIA GeForce GTX 780", "pci": "00000000:02:00.0", "temp": 51}
MI50 = {
    "name": "Radeon Instinct MI50",
    "pci": "0000:03:00.0",
    ("edge", "current"): 71000,
    ("edge", "critical"): 100000,
    "activity": {"gfx_activity": 88, "umc_activity": 20, "mm_activity": "N/A"},
    "ecc_mask": 0b101,
    "ecc_count": {"correctable_count": 4, "uncorrectable_count": 2},
}
RX580 = {  # a consumer card: no edge sensor here, activity "N/A", no ECC
    "name": "Radeon RX 580",
    "pci": "0000:04:00.0",
    ("hotspot", "current"): 58,
    "activity": {"gfx_activity": "N/A"},
}


@pytest.fixture(autouse=True)
def fresh_amd_import(monkeypatch):
    monkeypatch.setattr(amd, "_import_failure", None)


def test_nvml_gives_every_reading_of_a_card_that_has_them(monkeypatch):
    mod = fake_pynvml([TESLA])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    (gpu,) = nvml.probe()
    assert (gpu.temperature, gpu.temp_limit, gpu.utilization) == (64, 92, 37)
    assert (gpu.ecc, gpu.ecc_errors, gpu.health) == (True, 0, "")
    # The uncorrected, volatile (since the driver loaded) count is the one asked for.
    assert ("ecc_errors", (1, 0)) in mod.calls


def test_a_card_answering_not_supported_loses_only_those_readings(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([GEFORCE, TESLA]))
    old, tesla = nvml.probe()
    assert (old.name, old.temperature, old.vram_total) == (GEFORCE["name"], 51, 8 * GiB)
    assert (old.temp_limit, old.utilization, old.ecc, old.ecc_errors) == (None, None, None, None)
    assert tesla.utilization == 37  # the next card is read as before


def test_amdsmi_readings_in_degrees_from_either_sensor_and_na_as_unknown(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi([MI50, RX580]))
    mi50, rx = amd.probe()
    assert (mi50.temperature, mi50.temp_limit, mi50.utilization) == (71, 100, 88)
    assert (mi50.ecc, mi50.ecc_errors) == (True, 2)
    assert mi50.health == "2 uncorrected ECC errors"
    assert (rx.temperature, rx.temp_limit, rx.utilization, rx.ecc) == (58, None, None, None)


def test_readings_follow_their_card_to_llama_cpp_s_devices_by_pci_id(monkeypatch):
    """Two backends on one node: CUDA drives the Tesla, Vulkan the MI50 (no ROCm build);
    the registry lists them in an order other than the vendor libraries'."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([GEFORCE, TESLA]))
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi([MI50]))
    reg = Registry(
        (
            RegistryDevice(0, "CUDA0", "Tesla P40", "CUDA", "gpu", GiB, 8 * GiB, "0000:01:00.0"),
            RegistryDevice(
                1, "Vulkan0", "AMD MI50", "Vulkan", "gpu", GiB, 16 * GiB, "0000:03:00.0"
            ),
            RegistryDevice(2, "CPU", "x86", "CPU", "cpu", GiB, GiB),
        ),
        ("CUDA", "Vulkan", "CPU"),
    )
    tesla, mi50, geforce = probe_all(reg=reg)
    assert (tesla.backend, tesla.temperature, tesla.utilization) == ("CUDA", 64, 37)
    assert (mi50.backend, mi50.temperature, mi50.ecc_errors) == ("Vulkan", 71, 2)
    # The GTX 780 CUDA does not list: unusable, and still read.
    assert (geforce.usable, geforce.temperature) == (False, 51)
    text = doctor.report(reg, [tesla, mi50, geforce])
    assert "64 °C (slows at 92 °C), 37% busy, ECC on: 0 uncorrected errors" in text
    assert "UNHEALTHY: 2 uncorrected ECC errors" in text


def test_health_names_uncorrected_errors_and_a_card_at_its_limit():
    assert health(None, None, None) == "" and health(80, 92, 0) == ""
    assert health(92, 92, None) == "92 °C, at or over its limit of 92 °C"
    assert health(HOT_C, None, None).endswith(f"limit of {HOT_C} °C")  # no limit known
    assert health(99, 92, 1) == "1 uncorrected ECC error; 99 °C, at or over its limit of 92 °C"


def card(**readings) -> GpuInfo:
    base = GpuInfo("gpu0", "nvidia", "P40", 8 * GiB, 8 * GiB, "", "", 0, "CUDA")
    return GpuInfo(**{**base.__dict__, **readings})


def test_small_moves_are_held_back_so_an_idle_card_is_not_re_gossiped():
    before = [card(temperature=60, utilization=0, temp_limit=92)]
    held = steady(before, [card(temperature=63, utilization=4, temp_limit=92)])
    assert (held[0].temperature, held[0].utilization) == (60, 0)
    moved = steady(before, [card(temperature=66, utilization=40, temp_limit=92)])
    assert (moved[0].temperature, moved[0].utilization) == (66, 40)
    # A small move that crosses the limit is a health change: it goes out at once.
    hot = steady([card(temperature=90, temp_limit=92)], [card(temperature=92, temp_limit=92)])
    assert hot[0].temperature == 92 and hot[0].health
    # New ECC errors always go out; a card seen for the first time is taken as read.
    assert steady(before, [card(ecc_errors=1)])[0].ecc_errors == 1
    assert steady([], [card(temperature=61)])[0].temperature == 61


def test_gossip_carries_readings_bounded_and_status_shows_them_with_health():
    gpus = [
        card(temperature=71, utilization=88, ecc_errors=2, temp_limit=100),
        GpuInfo("gpu1", "amd", "RX 580", 8 * GiB, 8 * GiB, "", "", 0, "Vulkan"),
    ]
    read = read_payload("n1", node_payload("h:1", None, gpus, {}, []))
    first, second = gpu_views(read)
    assert (first["temperature"], first["utilization"], first["ecc_errors"]) == (71, 88, 2)
    assert first["temp_limit"] == 100 and first["health"] == "2 uncorrected ECC errors"
    assert (second["temperature"], second["health"]) == (None, "")
    # No readings at all (fake GPUs, cards only llama.cpp sees): not a byte more.
    assert "gh" not in node_payload("h:1", None, gpus[1:], {}, [])


def test_a_gpu_s_readings_cost_at_most_nine_bytes_of_payload():
    wild = card(temperature=10**6, utilization=-5, ecc_errors=10**12, temp_limit=200)
    for n in (1, 8):
        bare = node_payload("h:1", None, [card()] * n, {}, [])
        full = node_payload("h:1", None, [wild] * n, {}, [])
        extra = len(msgpack.packb(full)) - len(msgpack.packb(bare))
        assert extra <= 9 * n + 4  # + the "gh" key (3 bytes) and the list's header (1)
    (view,) = gpu_views(read_payload("n1", node_payload("h:1", None, [wild], {}, [])))
    assert (view["utilization"], view["ecc_errors"]) == (0, ECC_MAX)


@pytest.mark.parametrize("gh", ["nonsense", [[1, 2]], [["hot", None, -1, 1e9, "x"]], [None]])
def test_malformed_readings_from_another_version_read_as_unknown(gh):
    payload = node_payload("h:1", None, [card()], {}, [])
    payload["gh"] = gh
    read = read_payload("n1", payload)
    assert len(read.gpus) == 1 and len(read.readings) == 1
    assert all(x is None or isinstance(x, int) for x in read.readings[0])


def test_aivailable_status_shows_readings_and_the_health_problem():
    status = {
        "nodes": [
            {
                "id": "n1",
                "state": "alive",
                "gpus": gpu_views(
                    read_payload(
                        "n1",
                        node_payload("h:1", None, [card(temperature=97, utilization=5)], {}, []),
                    )
                ),
            }
        ],
        "models": [],
    }
    console = Console(record=True, width=200)
    render_status(status, console)
    text = console.export_text()
    assert "97 °C 5% busy" in text and "unhealthy: 97 °C, at or over its limit of 95" in text


def test_the_fakes_speak_the_installed_libraries_names():
    """Every function and constant the probes call exists in the real nvidia-ml-py and
    amdsmi installed here (amdsmi read as source: importing it needs libamd_smi.so)."""
    import importlib.util
    from pathlib import Path

    import pynvml

    for name in dir(fake_pynvml([TESLA])):
        if name.startswith(("nvml", "NVML_")):
            assert hasattr(pynvml, name), name
    spec = importlib.util.find_spec("amdsmi")
    source = (Path(spec.origin).parent / "amdsmi_interface.py").read_text()
    for name in dir(fake_amdsmi([MI50])):
        if name.startswith("amdsmi_"):
            assert f"\ndef {name}(" in source, name
    for enum, members in (
        ("AmdSmiTemperatureType", ("EDGE", "HOTSPOT")),
        ("AmdSmiTemperatureMetric", ("CURRENT", "CRITICAL")),
    ):
        body = source.split(f"\nclass {enum}(", 1)[1].split("\nclass ", 1)[0]
        assert all(f"\n    {m} = " in body for m in members), enum
