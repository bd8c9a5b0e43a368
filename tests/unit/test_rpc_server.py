"""backends/rpc_server.py: the HELLO exchange, loopback-only endpoints, and the real child
process (llama.cpp built with GGML_RPC=on) answering with the library's version."""

from __future__ import annotations

import struct

import llama_cpp
import pytest

from aivailable.backends.rpc_server import (
    RpcServerError,
    RpcServerProcess,
    RpcVersion,
    check_loopback,
    hello_request,
    library_rpc_version,
    parse_hello_answer,
    rpc_hello,
)


def test_hello_request_is_cmd_14_and_24_bytes_of_caps():
    req = hello_request()
    assert req[0] == 14 and struct.unpack_from("<Q", req, 1)[0] == 24 and len(req) == 33


def test_hello_answer_parses_the_version_and_refuses_anything_else():
    answer = struct.pack("<Q", 28) + bytes([7, 1, 2, 0]) + bytes(24)
    assert parse_hello_answer(answer) == RpcVersion(7, 1, 2)
    with pytest.raises(RpcServerError):
        parse_hello_answer(answer[:-1])
    with pytest.raises(RpcServerError):
        parse_hello_answer(struct.pack("<Q", 27) + answer[8:])


def test_versions_order_and_print():
    assert RpcVersion.parse("7.0.0") == RpcVersion(7, 0, 0) < RpcVersion(7, 1, 0)
    assert str(RpcVersion(7, 0, 3)) == "7.0.3"


@pytest.mark.parametrize("endpoint", ["0.0.0.0:5000", "192.168.1.4:5000", "10.0.0.1:1"])
def test_only_loopback_endpoints(endpoint):
    with pytest.raises(ValueError):
        check_loopback(endpoint)
    assert check_loopback("127.0.0.1:5000") == ("127.0.0.1", 5000)


@pytest.mark.skipif(not llama_cpp.llama_supports_rpc(), reason="llama.cpp without RPC")
async def test_the_child_answers_hello_and_stops(tmp_path):
    server = RpcServerProcess(tmp_path / "cache", log_path=tmp_path / "rpc.log", n_threads=1)
    version = await server.start()
    assert version.major >= 7
    assert server.ready() and rpc_hello("127.0.0.1", server.port) == version
    assert version == await library_rpc_version(tmp_path / "probe")
    await server.stop()
    assert not server.alive() and not server.ready()
    assert b"Starting RPC server" in (tmp_path / "rpc.log").read_bytes()


@pytest.mark.skipif(not llama_cpp.llama_supports_rpc(), reason="llama.cpp without RPC")
def test_the_child_dies_with_its_parent(tmp_path):
    """A peer killed with -9 leaves no RPC server listening."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import asyncio, pathlib, sys\n"
        "from aivailable.backends.rpc_server import RpcServerProcess\n"
        "async def main():\n"
        f"    s = RpcServerProcess(pathlib.Path({str(tmp_path)!r}) / 'c', n_threads=1)\n"
        "    await s.start()\n"
        "    print(s.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as fh:  # a zombie until reaped counts as gone
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the RPC server outlived its parent")
