"""llama.cpp's RPC server as a child process of the peer: the helper side of a split model.

`python -m aivailable.backends.rpc_server --endpoint 127.0.0.1:PORT --cache-dir DIR` calls
`ggml_backend_rpc_start_server` through ctypes on the library llama-cpp-python ships
(built with GGML_RPC=on by tools/llama_wheel.sh) and serves until it is killed. It exposes
the node's GPUs, or the CPU device where the node has none, and keeps the tensors it was
sent in DIR, so that a restart does not make the primary resend the weights.

llama.cpp's RPC protocol has no authentication and no encryption ("never run the RPC
server on an open network"), so the endpoint must be a loopback address: other peers
reach it only through the TLS peer channel (peer/rpc_tunnel.py). The server handles one
client at a time, in order (its accept loop serves each connection to its end).

`rpc_hello()` speaks the protocol's first command, HELLO, whose answer carries the
server's protocol version: the peer reads the version it advertises in gossip from the
running library this way, not from a header it might have been built against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# ggml-rpc.cpp: RPC_CMD_HELLO is 14 in every protocol version ("must be always 14"); the
# request is conn_caps (24 bytes); the answer is major, minor, patch, padding, conn_caps.
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24
_HELLO_ANSWER = 4 + RPC_CONN_CAPS_SIZE
# ggml-backend.h: enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2


class RpcServerError(Exception):
    """The RPC server did not start, or did not answer like one."""


@dataclass(frozen=True, order=True)
class RpcVersion:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @classmethod
    def parse(cls, text: str) -> RpcVersion:
        major, minor, patch = (int(x) for x in text.split("."))
        return cls(major, minor, patch)


def hello_request() -> bytes:
    """| cmd (1 byte) | size (8 bytes, little endian) | conn_caps (all zero: plain TCP) |"""
    return bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE) + bytes(24)


def parse_hello_answer(data: bytes) -> RpcVersion:
    """| size (8 bytes) | major | minor | patch | padding | conn_caps |"""
    if len(data) != 8 + _HELLO_ANSWER or struct.unpack_from("<Q", data)[0] != _HELLO_ANSWER:
        raise RpcServerError(f"not an RPC HELLO answer ({len(data)} bytes)")
    return RpcVersion(data[8], data[9], data[10])


def rpc_hello(host: str, port: int, timeout_s: float = 2.0) -> RpcVersion:
    """The protocol version of the RPC server at host:port (blocking)."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(hello_request())
        data = b""
        while len(data) < 8 + _HELLO_ANSWER:
            chunk = sock.recv(8 + _HELLO_ANSWER - len(data))
            if not chunk:
                raise RpcServerError("the RPC server closed before answering HELLO")
            data += chunk
    return parse_hello_answer(data)


def check_loopback(endpoint: str) -> tuple[str, int]:
    """host, port of a loopback endpoint; anything else is refused (the protocol is clear)."""
    host, _, port = endpoint.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the RPC server listens on loopback only, not {host}")
    return host, int(port)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ggml_lib(name: str) -> ctypes.CDLL:
    """The copy of libggml / libggml-rpc that libllama itself uses. The wheel ships
    libggml.so and libggml.so.0 as two files, not links: dlopen of the other file would
    load a second ggml with its own device registry, which llama.cpp never sees. A bare
    soname matches the library already loaded under that soname."""
    import llama_cpp  # loads libllama and through it libggml*.so.0

    try:
        return ctypes.CDLL(f"{name}.so.0")
    except OSError:  # not loaded yet by soname (another layout): the package's own file
        lib = Path(llama_cpp.__file__).parent / "lib"
        path = next(p for p in (lib / f"{name}.so.0", lib / f"{name}.so") if p.exists())
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml, libggml-rpc) of llama-cpp-python, with the signatures used here."""
    ggml, rpc = ggml_lib("libggml"), ggml_lib("libggml-rpc")
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    return ggml, rpc


def pick_devices(ggml: ctypes.CDLL, want: str) -> list[int]:
    """The devices to expose: the GPUs (not other RPC devices), else the CPU."""
    gpus, cpus = [], []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = ggml.ggml_backend_dev_type(dev)
        name = ggml.ggml_backend_dev_name(dev).decode()
        if kind in (DEV_GPU, DEV_IGPU) and not name.startswith("RPC"):
            gpus.append(dev)
        elif kind == DEV_CPU:
            cpus.append(dev)
    if want == "cpu" or not gpus:
        if not cpus:
            raise RpcServerError("llama.cpp offers no CPU device")
        return cpus[:1]
    return gpus


def serve(endpoint: str, cache_dir: str | None, n_threads: int, device: str) -> None:
    """Blocks for good: llama.cpp's accept loop."""
    check_loopback(endpoint)
    ggml, rpc = _libs()
    devs = pick_devices(ggml, device)
    array = (ctypes.c_void_p * len(devs))(*devs)
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    rpc.ggml_backend_rpc_start_server(
        endpoint.encode(),
        cache_dir.encode() if cache_dir else None,
        n_threads,
        len(devs),
        array,
    )
    raise RpcServerError(f"llama.cpp's RPC server on {endpoint} returned (bind failed?)")


class RpcServerProcess:
    """One RPC server child of this peer: start, wait until it answers HELLO, stop."""

    def __init__(
        self,
        cache_dir: Path,
        log_path: Path | None = None,
        n_threads: int | None = None,
        device: str = "auto",
        port: int | None = None,
    ):
        self.cache_dir, self.log_path = cache_dir, log_path
        self.n_threads, self.device = n_threads, device
        self.port = port or 0
        self.version: RpcVersion | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ready(self) -> bool:
        """Running and it answered HELLO: a primary may connect now."""
        return self.version is not None and self.alive()

    def _spawn(self) -> None:
        from aivailable.backends.llama_runtime import physical_cores

        self.port = self.port or free_loopback_port()
        cmd = [sys.executable, "-m", "aivailable.backends.rpc_server"]
        cmd += ["--endpoint", self.endpoint, "--cache-dir", str(self.cache_dir)]
        cmd += ["--threads", str(self.n_threads or physical_cores()), "--device", self.device]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    async def start(self, timeout_s: float = 30.0) -> RpcVersion:
        """Spawns the child and returns once it answers HELLO (its version)."""
        if self.ready():
            assert self.version is not None
            return self.version
        self.version = None
        self._spawn()
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise RpcServerError(f"the RPC server on {self.endpoint} exited at start")
            try:
                self.version = await asyncio.to_thread(rpc_hello, "127.0.0.1", self.port, 1.0)
                return self.version
            except (OSError, RpcServerError) as exc:
                if time.monotonic() > deadline:
                    await self.stop()
                    raise RpcServerError(
                        f"no RPC server on {self.endpoint} after {timeout_s}s"
                    ) from exc
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """At once, for a peer on its way out (no loop to wait in)."""
        proc, self._proc, self.version = self._proc, None, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    async def stop(self, grace_s: float = 2.0) -> None:
        proc, self._proc, self.version = self._proc, None, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), grace_s)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)


_probed: RpcVersion | None = None


async def library_rpc_version(scratch: Path) -> RpcVersion | None:
    """The RPC protocol version of this process's llama.cpp, from a short-lived server's
    HELLO answer; None where the library has no RPC backend. Probed once per process."""
    global _probed
    if _probed is None:
        import llama_cpp

        if not llama_cpp.llama_supports_rpc():
            return None
        probe = RpcServerProcess(scratch, n_threads=1, device="cpu")
        try:
            _probed = await probe.start()
        finally:
            await probe.stop()
    return _probed


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aivailable.backends.rpc_server")
    p.add_argument("--endpoint", required=True, help="127.0.0.1:PORT (loopback only)")
    p.add_argument("--cache-dir", default=None, help="tensor cache (survives restarts)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    return p.parse_args(argv)


def die_with_parent() -> None:
    """A peer killed with -9 must not leave its RPC server listening (Linux: the kernel
    kills this process when its parent dies; elsewhere nothing is done)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    die_with_parent()
    # SIGTERM ends the process at once: llama.cpp's accept loop never returns by itself.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.endpoint, args.cache_dir, args.threads, args.device)
    return 1


if __name__ == "__main__":
    sys.exit(main())
