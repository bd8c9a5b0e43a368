"""Devices from llama.cpp's own registry: what the installed build can actually drive.

NVML and amdsmi say which cards are in the machine; only ggml's device registry says
which of them this llama-cpp-python build can use (a CPU-only wheel on a CUDA box drives
none; a Vulkan build drives an RX 580 that amdsmi cannot see). The registry is read
through ctypes in a child process (`main(["--json"])` prints it as JSON):
a GPU driver may hang or crash on init, and a library without some symbol must not take
the peer down. Nothing here loads a model.

    reg = probe()             # Registry(devices=(RegistryDevice, ...), backends, error)
    reg = read_in_process()   # the same, here (what the child runs)
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROBE_TIMEOUT_S = 30.0  # lavapipe's first init compiles nothing; a stuck driver does hang
# Read once per process: each read inits every backend (a CUDA context on every card, held
# memory for a second), and the peer's 5 s polls get fresh free memory from NVML/amdsmi.
CACHE_TTL_S: float | None = None

# ggml_backend_dev_type (ggml-backend.h), in enum order.
_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")
# ggml's backend (reg) names -> the names used here; HIP builds register as "ROCm".
_BACKENDS = {"cuda": "CUDA", "rocm": "HIP", "hip": "HIP", "vulkan": "Vulkan", "metal": "Metal"}
GPU_BACKENDS = ("CUDA", "HIP", "Vulkan", "Metal", "SYCL", "MUSA", "OpenCL", "CANN")


@dataclass(frozen=True)
class RegistryDevice:
    index: int  # position in ggml's device list (this build, this environment)
    name: str  # ggml's device name: "CUDA0", "Vulkan0", "CPU"
    description: str  # the driver's name for it: "NVIDIA GeForce GTX 1080", "llvmpipe (...)"
    backend: str  # "CUDA", "HIP", "Vulkan", "Metal", "CPU", or ggml's own name for others
    kind: str  # "cpu", "gpu", "igpu", "accel", "meta" (ggml_backend_dev_type)
    free: int  # bytes
    total: int  # bytes
    pci: str = ""  # "0000:01:00.0" (lower case) when the backend knows it
    ordinal: int = 0  # index among this backend's devices: the N of CUDA_VISIBLE_DEVICES

    @property
    def is_gpu(self) -> bool:
        """A device a model can be offloaded to (RPC devices are other machines')."""
        return self.kind in ("gpu", "igpu") and self.backend in GPU_BACKENDS


@dataclass(frozen=True)
class Registry:
    devices: tuple[RegistryDevice, ...] = ()
    backends: tuple[str, ...] = ()  # every backend the build registered, with a device or not
    error: str = ""  # why the registry could not be read; "" when it was
    library: str = ""  # the libggml that was asked
    env: dict[str, str] = field(default_factory=dict)  # the device env vars it was read under

    @property
    def gpus(self) -> tuple[RegistryDevice, ...]:
        return tuple(d for d in self.devices if d.is_gpu)


# Env vars that change which devices a backend lists; the probe records them so a worker
# pinned later maps its backend-local index back through the same list.
DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
DEVICE_ENV += ("GGML_VK_VISIBLE_DEVICES",)


def backend_name(reg_name: str) -> str:
    return _BACKENDS.get(reg_name.lower(), reg_name)


def lib_dir() -> Path | None:
    """llama-cpp-python's lib/ directory, found without importing the package (its import
    pulls numpy and loads libllama: more than a device listing needs)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _fn(lib: ctypes.CDLL, name: str, restype, *argtypes):
    """lib.name with its signature, or None when this build lacks the symbol."""
    try:
        f = getattr(lib, name)
    except AttributeError:
        return None
    f.restype, f.argtypes = restype, list(argtypes)
    return f


class _Caps(ctypes.Structure):
    _fields_ = [(n, ctypes.c_bool) for n in ("async_", "host_buffer", "from_host_ptr", "events")]


class _Props(ctypes.Structure):
    # ggml_backend_dev_props as of ggml 0.9 (device_id is newer than the struct itself).
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("description", ctypes.c_char_p),
        ("memory_free", ctypes.c_size_t),
        ("memory_total", ctypes.c_size_t),
        ("type", ctypes.c_int),
        ("device_id", ctypes.c_char_p),
        ("caps", _Caps),
    ]


def _text(raw: bytes | None) -> str:
    return raw.decode(errors="replace") if raw else ""


def read_in_process(directory: Path | None = None) -> Registry:
    """Ask libggml in this process which backends and devices it has."""
    directory = directory or lib_dir()
    if directory is None:
        return Registry(error="llama-cpp-python is not installed")
    path = directory / "libggml.so"
    if not path.exists():
        found = sorted(directory.glob("libggml.*")) if directory.is_dir() else []
        if not found:
            return Registry(error=f"no libggml in {directory}")
        path = found[0]
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return Registry(error=f"cannot load {path}: {e}", library=str(path))
    p, sz = ctypes.c_void_p, ctypes.c_size_t
    need = {
        "reg_count": _fn(lib, "ggml_backend_reg_count", sz),
        "reg_get": _fn(lib, "ggml_backend_reg_get", p, sz),
        "reg_name": _fn(lib, "ggml_backend_reg_name", ctypes.c_char_p, p),
        "dev_count": _fn(lib, "ggml_backend_dev_count", sz),
        "dev_get": _fn(lib, "ggml_backend_dev_get", p, sz),
        "dev_name": _fn(lib, "ggml_backend_dev_name", ctypes.c_char_p, p),
        "dev_desc": _fn(lib, "ggml_backend_dev_description", ctypes.c_char_p, p),
        "dev_type": _fn(lib, "ggml_backend_dev_type", ctypes.c_int, p),
        "dev_memory": _fn(
            lib, "ggml_backend_dev_memory", None, p, ctypes.POINTER(sz), ctypes.POINTER(sz)
        ),
        "dev_reg": _fn(lib, "ggml_backend_dev_backend_reg", p, p),
    }
    missing = sorted(k for k, f in need.items() if f is None)
    if missing:
        return Registry(
            error=f"{path.name} lacks ggml_backend_{', '.join(missing)}", library=str(path)
        )
    f = need
    if f["reg_count"]() == 0:
        # A GGML_BACKEND_DL build registers nothing until its backend modules are loaded.
        load = _fn(lib, "ggml_backend_load_all_from_path", None, ctypes.c_char_p)
        if load is not None:
            load(str(directory).encode())
    backends = tuple(
        backend_name(_text(f["reg_name"](f["reg_get"](i)))) for i in range(f["reg_count"]())
    )
    # device_id came with ggml_version() or before it: only then is _Props the real layout.
    get_props = _fn(lib, "ggml_backend_dev_get_props", None, p, ctypes.POINTER(_Props))
    if _fn(lib, "ggml_version", ctypes.c_char_p) is None:
        get_props = None
    devices, ordinals = [], {}
    for i in range(f["dev_count"]()):
        dev = f["dev_get"](i)
        free, total = sz(0), sz(0)
        f["dev_memory"](dev, ctypes.byref(free), ctypes.byref(total))
        kind = f["dev_type"](dev)
        backend = backend_name(_text(f["reg_name"](f["dev_reg"](dev))))
        pci = ""
        if get_props is not None:
            props = _Props()
            get_props(dev, ctypes.byref(props))
            pci = _text(props.device_id).lower()
        devices.append(
            RegistryDevice(
                index=i,
                name=_text(f["dev_name"](dev)),
                description=_text(f["dev_desc"](dev)),
                backend=backend,
                kind=_KINDS[kind] if 0 <= kind < len(_KINDS) else f"type{kind}",
                free=int(free.value),
                total=int(total.value),
                pci=pci,
                ordinal=ordinals.get(backend, 0),
            )
        )
        ordinals[backend] = ordinals.get(backend, 0) + 1
    env = {k: os.environ[k] for k in DEVICE_ENV if k in os.environ}
    return Registry(tuple(devices), backends, "", str(path), env)


def to_json(reg: Registry) -> str:
    return json.dumps(asdict(reg))


def from_json(text: str) -> Registry:
    data = json.loads(text)
    devices = tuple(RegistryDevice(**d) for d in data.get("devices", ()))
    return Registry(
        devices,
        tuple(data.get("backends", ())),
        str(data.get("error", "")),
        str(data.get("library", "")),
        dict(data.get("env", {})),
    )


def probe(python: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Registry:
    """The registry as a child process sees it, with this process's environment. A child
    that hangs, crashes or prints nonsense gives a Registry with `error` set, never raises."""
    # -c, not -m: the package imports this module first, and runpy would warn of it.
    code = "import sys; from aivailable.gpu.registry import main; sys.exit(main(['--json']))"
    cmd = [python or sys.executable, "-c", code]
    env = dict(os.environ)
    # The child must import this package even when the peer runs from a source tree.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH", "")) if x)
    # The workers run with this order (llama_engine.py): CUDAn must mean the same card here.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Registry(
            error=f"the device probe did not answer in {timeout:.0f} s (a hung driver?)"
        )
    except OSError as e:
        return Registry(error=f"cannot run the device probe: {e}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Registry(error=f"the device probe exited with {done.returncode}: {tail}")
    try:
        return from_json(lines[-1])
    except (ValueError, TypeError, KeyError) as e:
        return Registry(error=f"the device probe's answer is unreadable: {e}")


_cache: tuple[float, Registry] | None = None
_cache_lock = threading.Lock()


def cached(ttl: float | None = CACHE_TTL_S) -> Registry:
    """probe(), once per process, or once per `ttl` seconds."""
    global _cache
    with _cache_lock:
        if _cache is not None and (ttl is None or time.monotonic() - _cache[0] < ttl):
            return _cache[1]
        reg = probe()
        _cache = (time.monotonic(), reg)
        return reg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reg = read_in_process()
    if "--json" in argv:
        print(to_json(reg), flush=True)
        return 0
    if reg.error:
        print(f"llama.cpp registry unreadable: {reg.error}")
        return 1
    print(f"{reg.library}: backends {', '.join(reg.backends) or 'none'}")
    for d in reg.devices:
        gib = 1 << 30
        print(
            f"  {d.name:10} {d.backend:7} {d.kind:5} {d.free / gib:7.2f} / {d.total / gib:7.2f} GiB"
            f"  {d.description} {d.pci}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
