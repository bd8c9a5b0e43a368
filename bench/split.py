"""A model split over RPC helpers, secured, against the same model unsplit and against
llama.cpp's own split (llama-server --rpc to plain rpc-server processes), in one run.

SmolLM2-135M, greedy, one stream, the paths' trials alternating so the shared machine's
load weighs on all alike. Every split path has the same layout: the first layers on the
primary's CPU, the rest over two RPC servers (one CPU device each):

- unsplit: our OpenAI API over one LlamaEngine worker (the serving stack of `aivailable up`);
- split, plain RPC: the same worker with --rpc straight to two RPC servers (no tunnel);
- split, secured: the same, through the peer's tunnels: loopback -> TLS 1.3 + signed
  WebSocket -> a helper peer process -> its RPC server (what peers run);
- llama-server --rpc: llama.cpp's server with --rpc to two `rpc-server` processes, both
  built by `make bench-anchor` from the same vendored sources (skipped, and said so,
  when absent).

Also load times: a split load with an empty tensor cache, with the cache warm (the RPC
servers restarted, the big tensors found by hash), and a single load.

    python bench/split.py [--quick] [--max-tokens N] [--trials N] [--threads N]

Prints a table and writes bench/results/split.json. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import free_port  # noqa: E402
from aivailable.models import store  # noqa: E402
from bench.forward import Child, wait_port  # noqa: E402
from bench.serve import api_trial, drained  # noqa: E402

MODEL = "smollm2-135m"
BIN = Path(os.environ.get("AIVAILABLE_CACHE_DIR", Path.home() / ".cache/aivailable"))
BIN = BIN / "anchor" / "bin"
N_CTX = 1024
# The split: 31 layer slots (30 layers + the output head): 10 on the primary's CPU, then
# 11 and 10 on the two helpers (what placement gives two equal helpers, roughly).
HOST_LAYERS, SHARES = 10, (11, 10)


async def serve_engine(port: int, threads: int, rpc: str, via: str, secret: bytes) -> None:
    """Our API over one LlamaEngine; `rpc`: its RPC servers, `via` "tunnel" to reach them
    through TunnelListeners to helper peers (rpc then names the helper peers' ports)."""
    from types import SimpleNamespace

    from aiohttp import web

    from aivailable.api.app import build_app
    from aivailable.api.openai_api import OpenAIApi
    from aivailable.backends.llama_engine import EngineConfig, LlamaEngine
    from aivailable.metrics import Metrics
    from peer.auth import PeerAuth
    from peer.rpc_tunnel import TunnelListener
    from peer.tls import peer_contexts, write_credentials

    path = store.resolve(f"builtin:{MODEL}").path
    config = EngineConfig(n_threads=threads, max_queue_wait=600)
    endpoints = [e for e in rpc.split(",") if e]
    _, tls_client = peer_contexts(*write_credentials(secret, Path(tempfile.mkdtemp())))
    async with asyncio.TaskGroup() as tg:
        if via == "tunnel":
            tunnels = [TunnelListener(PeerAuth(secret), tls_client, e) for e in endpoints]
            for t in tunnels:
                t.start()
                tg.create_task(t.serve())
            endpoints = [t.endpoint for t in tunnels]
        kwargs = {}
        if endpoints:
            kwargs = {"tensor_split": SHARES, "rpc_servers": endpoints}
        ngl = sum(SHARES) if endpoints else 0
        engine = LlamaEngine(MODEL, path, N_CTX, ngl, 256, n_parallel=1, config=config, **kwargs)
        started = time.perf_counter()
        await engine.start()
        load_s = time.perf_counter() - started
        instances = {MODEL: SimpleNamespace(engine=engine, error="", state="ready")}
        metrics = Metrics()
        routes = [OpenAIApi(lambda: instances, metrics, 4096, 600).routes()]
        runner = web.AppRunner(build_app(metrics, lambda: True, routes), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        print(f"ready {load_s:.3f}", flush=True)
        await asyncio.Event().wait()


async def serve_helper(port: int, rpc_port: int, secret: bytes) -> None:
    """A helper peer's part: the peer port (plain HTTP + peer TLS) with the tunnel route,
    joined to a local RPC server."""
    from aiohttp import web

    from peer.auth import PeerAuth
    from peer.rpc_tunnel import TUNNEL_PATH, tunnel_handler
    from peer.tls import DualSite, peer_contexts, write_credentials

    tls_server, _ = peer_contexts(*write_credentials(secret, Path(tempfile.mkdtemp())))
    auth = PeerAuth(secret)
    app = web.Application(middlewares=[auth.middleware])
    app.router.add_get(TUNNEL_PATH, tunnel_handler(lambda: ("127.0.0.1", rpc_port)))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = DualSite(runner, "127.0.0.1", port, tls_server, 10.0)
    await site.start()
    print("ready", flush=True)
    await site.serve()


def rpc_server(cache: Path, threads: int, anchor: bool) -> tuple[Child, int]:
    port = free_port()
    if anchor:
        argv = [str(BIN / "rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
        argv += ["-c"]  # its tensor cache, under $HOME/.cache/llama.cpp/rpc
    else:
        argv = [sys.executable, "-m", "aivailable.backends.rpc_server", "--endpoint"]
        argv += [f"127.0.0.1:{port}", "--cache-dir", str(cache), "--threads", str(threads)]
        argv += ["--device", "cpu"]
    child = drained(Child(argv, ready_line=None))
    wait_port(port, within=30)
    return child, port


def rig(name: str, cache: Path, threads: int, secret: bytes) -> tuple[str, str, list[Child]]:
    """(the engine's --rpc, how it reaches them, the processes) for one path."""
    if name == "unsplit":
        return "", "", []
    servers = [rpc_server(cache / str(i), threads, False) for i in range(2)]
    kids = [c for c, _ in servers]
    if name == "split, plain RPC":
        return ",".join(f"127.0.0.1:{p}" for _, p in servers), "", kids
    helpers = []
    for _, rpc_port in servers:
        port = free_port()
        argv = [sys.executable, __file__, "--role", "helper", "--port", str(port)]
        argv += ["--rpc-port", str(rpc_port), "--secret-hex", secret.hex()]
        kids.append(drained(Child(argv)))
        helpers.append(f"127.0.0.1:{port}")
    return ",".join(helpers), "tunnel", kids


def engine(port: int, threads: int, rpc: str, via: str, secret: bytes) -> tuple[Child, float]:
    argv = [sys.executable, __file__, "--role", "engine", "--port", str(port)]
    argv += ["--threads", str(threads), "--rpc", rpc, "--via", via, "--secret-hex", secret.hex()]
    child = Child(argv, ready_line=None)
    line = child.proc.stdout.readline()
    if not line.startswith(b"ready"):
        child.stop()
        raise RuntimeError(f"engine did not start: {line!r}")
    return drained(child), float(line.split()[1])


def anchor_server(port: int, threads: int, rpc: str) -> tuple[Child, float] | None:
    if not (BIN / "llama-server").exists() or not (BIN / "rpc-server").exists():
        return None
    path = store.resolve(f"builtin:{MODEL}").path
    argv = [str(BIN / "llama-server"), "-m", str(path), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "-np", "1", "-c", str(N_CTX), "-t", str(threads)]
    argv += ["-tb", str(threads), "--no-webui"]
    if rpc:  # else unsplit, on the CPU: how far our serving stack is from llama.cpp's own
        argv += ["--rpc", rpc, "-ngl", str(sum(SHARES)), "-ts", ",".join(str(s) for s in SHARES)]
    else:
        argv += ["-ngl", "0"]
    os.environ["LD_LIBRARY_PATH"] = f"{BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    started = time.perf_counter()
    child = drained(Child(argv, ready_line=None))
    import urllib.request

    for _ in range(600):  # the port opens before the model has loaded
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return child, time.perf_counter() - started
        except OSError:
            time.sleep(0.1)
    child.stop()
    return None


def summarize(trials: list[dict]) -> dict:
    return {
        "tok_s": statistics.median(t["per_stream"][0] for t in trials if t["per_stream"]),
        "ttft_ms": 1000 * statistics.median(t["ttfts"][0] for t in trials),
        "trials": len(trials),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two trials of 32 tokens")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="per process (worker, servers)")
    for hidden in ("--role", "--rpc", "--via", "--secret-hex"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, default="")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rpc-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop  # the loop `aivailable up` runs on

    if args.role == "engine":
        secret = bytes.fromhex(args.secret_hex)
        uvloop.run(serve_engine(args.port, args.threads, args.rpc, args.via, secret))
        return 0
    if args.role == "helper":
        uvloop.run(serve_helper(args.port, args.rpc_port, bytes.fromhex(args.secret_hex)))
        return 0
    trials, max_tokens = (2, 32) if args.quick else (args.trials, args.max_tokens)
    secret = secrets.token_bytes(32)
    work = Path(tempfile.mkdtemp(prefix="split-bench-"))
    children: list[Child] = []
    notes: list[str] = []
    loads: dict[str, float] = {}
    try:
        paths: dict[str, str] = {}
        for name in ("unsplit", "split, secured", "split, plain RPC"):
            # each split path its own RPC servers: a server serves one client at a time
            rpc, via, kids = rig(name, work / name.replace(" ", "_"), args.threads, secret)
            children += kids
            port = free_port()
            child, loads[name] = engine(port, args.threads, rpc, via, secret)
            children.append(child)
            paths[name] = f"http://127.0.0.1:{port}"
        anchor_rpc = (
            [rpc_server(work / "anchor", args.threads, True) for _ in range(2)]
            if (BIN / "rpc-server").exists()
            else []
        )
        children += [c for c, _ in anchor_rpc]
        anchor = None
        if anchor_rpc:
            port = free_port()
            anchor = anchor_server(
                port, args.threads, ",".join(f"127.0.0.1:{p}" for _, p in anchor_rpc)
            )
        if anchor is not None:
            port1 = free_port()
            alone = anchor_server(port1, args.threads, "")
            if alone is not None:
                children.append(alone[0])
                paths["llama-server unsplit"] = f"http://127.0.0.1:{port1}"
                loads["llama-server unsplit"] = alone[1]
        if anchor is None:
            notes.append(
                f"llama-server --rpc not measured: no {BIN}/llama-server and rpc-server (make bench-anchor)"
            )
        else:
            children.append(anchor[0])
            paths["llama-server --rpc"] = f"http://127.0.0.1:{port}"
            loads["llama-server --rpc"] = anchor[1]
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        for url in paths.values():  # warm-up
            asyncio.run(api_trial(url, 1, 8))
        for trial in range(trials):
            order = list(paths.items())
            order = order[trial % len(order) :] + order[: trial % len(order)]
            for name, url in order:
                runs[name].append(asyncio.run(api_trial(url, 1, max_tokens)))
    finally:
        for child in reversed(children):
            child.stop()
    table = {name: summarize(r) for name, r in runs.items()}
    cache = load_times(work, args.threads, secret)
    shutil.rmtree(work, ignore_errors=True)
    print_table(table, loads, cache, notes)
    out = ROOT / "bench" / "results" / "split.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL, "max_tokens": max_tokens, "trials": trials, "threads": args.threads,
            "layout": {"host_layers": HOST_LAYERS, "rpc_layers": SHARES}, "notes": notes}  # fmt: skip
    out.write_text(json.dumps({**meta, "paths": table, "load_s": loads, "cache": cache}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def load_times(work: Path, threads: int, secret: bytes) -> dict:
    """A secured split load with a fresh tensor cache, then again with the servers
    restarted on the warm cache; and a single load, for the ratio."""
    out = {}
    cache = work / "load"
    for name in ("cold cache", "warm cache"):
        rpc, via, kids = rig("split, secured", cache, threads, secret)
        try:
            child, out[name] = engine(free_port(), threads, rpc, via, secret)
            kids.append(child)
        finally:
            for child in reversed(kids):
                child.stop()
    child, out["single"] = engine(free_port(), threads, "", "", secret)
    child.stop()
    out["cached_files"] = sum(1 for _ in cache.rglob("*") if _.is_file())
    return out


def print_table(table: dict, loads: dict, cache: dict, notes: list[str]) -> None:
    print(f"\n{'path':<24}{'tok/s':>9}{'TTFT ms':>10}{'load s':>9}")
    for name, row in table.items():
        print(f"{name:<24}{row['tok_s']:>9.1f}{row['ttft_ms']:>10.1f}{loads.get(name, 0):>9.2f}")
    anchor = table.get("llama-server --rpc")
    if anchor:
        ratio = table["split, secured"]["tok_s"] / anchor["tok_s"]
        print(f"secured split / llama-server --rpc tok/s: {ratio:.2f}x (target >= 0.9x)")
    alone = table.get("llama-server unsplit")
    if alone:
        ratio = table["unsplit"]["tok_s"] / alone["tok_s"]
        print(f"our unsplit / llama-server unsplit tok/s: {ratio:.2f}x (the serving stacks)")
    ratio = table["split, secured"]["tok_s"] / table["split, plain RPC"]["tok_s"]
    print(f"secured split / plain-RPC split tok/s: {ratio:.2f}x (the tunnel's and TLS's cost)")
    print(
        f"load: split {cache['cold cache']:.2f} s (cold tensor cache), {cache['warm cache']:.2f} s"
        f" (warm, {cache['cached_files']} cached tensors), single {cache['single']:.2f} s"
    )
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
