"""The forwarding hop: latency it adds and throughput through it, against calling the
serving peer directly and against HAProxy as the hop, in the same run.

Latency: a backend peer process serving the FakeEngine (no model, so only HTTP is
measured) is called sequentially, streaming, four ways in rotation: directly, through a
front peer process (OpenAIApi + Forwarder + peer-request HMAC, as in a cluster) over plain
HTTP ("forwarder") and over the peers' TLS ("fwd-tls", peer/tls.py, as `aivailable up`
runs), and through HAProxy (Debian's package, `mode http`). Time to first byte of the body and
total time, p50 and p99; "added" is each hop's figure minus the direct one.

Throughput: a real peer (`python -m aivailable up`, SmolLM2-135M through the model
store, llama.cpp on the CPU) is the bottleneck; several concurrent streams are sent
directly, through a front peer, and through HAProxy, in rotation, and tokens/s compared.

    python bench/forward.py [--quick] [--requests N] [--no-model]

Prints a table and writes bench/results/forward.json. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import PeerProcess, free_port  # noqa: E402

FAKE_MODEL = "fake"
REAL_MODEL = "smollm2-135m"
FAKE_REPLY = " ".join(f"tok{i}" for i in range(16))  # 16 streamed chunks
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


# ---------------------------------------------------------------- the role processes


async def serve_role(role: str, port: int, upstream: str, secret: bytes) -> None:
    """A peer's HTTP side in its own process: a FakeEngine backend, or a forwarding front."""
    from aiohttp import web

    from aivailable.api.app import build_app
    from aivailable.api.openai_api import OpenAIApi
    from aivailable.metrics import Metrics
    from peer.auth import PeerAuth
    from peer.availability import ModelAvailability, Replica
    from peer.forward import Forwarder
    from peer.tls import DualSite, peer_contexts, write_credentials
    from peer.upstream import UpstreamPool

    auth = PeerAuth(secret)
    credentials = write_credentials(secret, Path(tempfile.mkdtemp(prefix="aivailable-bench-")))
    tls_server, tls_client = peer_contexts(*credentials)
    metrics = Metrics()
    pool = None
    if role == "model":  # the serving stack of `aivailable up`, the real model, one process
        from types import SimpleNamespace

        from aivailable.backends.llama_engine import LlamaEngine
        from aivailable.models import store

        path = store.resolve(f"builtin:{REAL_MODEL}").path
        engine = LlamaEngine(REAL_MODEL, path, n_ctx=2048, n_gpu_layers=0, queue_limit=64)
        await engine.start()
        instances = {REAL_MODEL: SimpleNamespace(engine=engine, error="", state="ready")}
        api = OpenAIApi(lambda: instances, metrics, 4096, 300, owner="model")
    elif role == "backend":
        from types import SimpleNamespace

        from aivailable.backends.fake_engine import FakeEngine

        engine = FakeEngine(FAKE_MODEL, reply=FAKE_REPLY, queue_limit=1024, parallel=256)
        await engine.start()
        instances = {FAKE_MODEL: SimpleNamespace(engine=engine, error="", state="ready")}
        api = OpenAIApi(lambda: instances, metrics, 4096, 300, owner="backend")
    else:
        pool = UpstreamPool(auth, tls_client if role == "front-tls" else None)
        replica = Replica("upstream", upstream, False, "ready", 0)
        forwarder = Forwarder(
            pool, lambda m: [replica], lambda m: ModelAvailability("unknown"), "front"
        )
        api = OpenAIApi(lambda: {}, metrics, 4096, 300, owner="front", forwarder=forwarder)
    app = build_app(metrics, lambda: True, [api.routes()])
    app.middlewares.append(auth.middleware)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with asyncio.TaskGroup() as tg:
        if role == "backend":  # plain HTTP for the direct path, TLS for fwd-tls: one port
            site = DualSite(runner, "127.0.0.1", port, tls_server, 10.0)
            await site.start()
            accept = tg.create_task(site.serve())
        else:
            await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
            accept = None
        print("ready", flush=True)
        await stop.wait()
        if accept is not None:
            accept.cancel()
    if pool is not None:
        await pool.close()
    await runner.cleanup()
    if role == "model":
        await engine.stop()


class Child:
    """A process this bench started; stopped by its pid only."""

    def __init__(self, argv: list[str], ready_line: bytes | None = b"ready"):
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        if ready_line is not None:
            line = self.proc.stdout.readline()
            if ready_line not in line:
                self.stop()
                raise RuntimeError(f"{argv[:3]} did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_role(role: str, port: int, secret: bytes, upstream: str = "") -> Child:
    argv = [sys.executable, __file__, "--role", role, "--port", str(port)]
    argv += ["--upstream", upstream, "--secret-hex", secret.hex()]
    return Child(argv)


HAPROXY_CFG = """
global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 310s
    timeout server 310s
    option http-keep-alive
frontend hop
    bind 127.0.0.1:{port}
    default_backend peer
backend peer
    http-reuse always
    server upstream {upstream}
"""


def start_haproxy(port: int, upstream: str, tmp: Path) -> Child | None:
    binary = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if binary is None:
        return None
    cfg = tmp / f"haproxy-{port}.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, upstream=upstream))
    child = Child([binary, "-db", "-f", str(cfg)], ready_line=None)
    wait_port(port)
    return child


def wait_port(port: int, within: float = 10) -> None:
    import socket

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# ---------------------------------------------------------------- measuring


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used: /proc/PID/schedstat (ns), else /proc/PID/stat (ticks)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def timed_stream(session, url: str, body: dict) -> tuple[float, float, int]:
    """(time to first body byte, total time, content chunks) of one streaming request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            if first is None:
                first = time.perf_counter() - start
            if raw.startswith(b"data: {"):
                chunk = json.loads(raw[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    tokens += 1
    return first or 0.0, time.perf_counter() - start, tokens


async def latency(paths: dict[str, str], requests: int, hop_pids: dict[str, int]) -> dict:
    import aiohttp

    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    samples = {name: {"ttfb": [], "total": []} for name in paths}
    names = list(paths)
    async with aiohttp.ClientSession() as session:
        for name in names:  # warm-up: connections, caches
            for _ in range(20):
                await timed_stream(session, paths[name], body)
        cpu_before = {name: cpu_seconds(pid) for name, pid in hop_pids.items()}
        for i in range(requests):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate order
                ttfb, total, tokens = await timed_stream(session, paths[name], body)
                assert tokens == len(FAKE_REPLY.split()), (name, tokens)
                samples[name]["ttfb"].append(ttfb)
                samples[name]["total"].append(total)
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in hop_pids.items()}
    out = {}
    for name, s in samples.items():
        out[name] = {
            f"{kind}_{p}_ms": round(
                (statistics.median(s[kind]) if p == "p50" else pct(s[kind], 99)) * 1000, 3
            )
            for kind in ("ttfb", "total")
            for p in ("p50", "p99")
        }
        out[name]["ttfb_min_ms"] = round(min(s["ttfb"]) * 1000, 3)
        if name in cpu:  # the hop process's own CPU time per request it relayed
            out[name]["hop_cpu_us_per_request"] = round(cpu[name] / requests * 1e6, 1)
    for name in names[1:]:
        for key in list(out["direct"]):
            out[name][f"added_{key}"] = round(out[name][key] - out["direct"][key], 3)
    return {"requests_per_path": requests, "paths": out}


async def throughput(
    paths: dict[str, str], streams: int, per_stream: int, max_tokens: int, rounds: int
) -> dict:
    import aiohttp

    body = {
        "model": REAL_MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    totals = {name: {"tokens": 0, "seconds": 0.0, "ttft": []} for name in paths}
    names = list(paths)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for name in names:  # warm-up
            await timed_stream(session, paths[name], {**body, "max_tokens": 4})
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:

                async def client(url=paths[name]):
                    results = []
                    for _ in range(per_stream):
                        results.append(await timed_stream(session, url, body))
                    return results

                start = time.perf_counter()
                done = await asyncio.gather(*(client() for _ in range(streams)))
                totals[name]["seconds"] += time.perf_counter() - start
                for results in done:
                    for ttfb, _, tokens in results:
                        totals[name]["tokens"] += tokens
                        totals[name]["ttft"].append(ttfb)
    out = {}
    for name, t in totals.items():
        out[name] = {
            "tokens": t["tokens"],
            "seconds": round(t["seconds"], 2),
            "tokens_per_s": round(t["tokens"] / t["seconds"], 2),
            "ttft_p50_ms": round(statistics.median(t["ttft"]) * 1000, 1),
        }
    for name in names[1:]:
        out[name]["over_direct"] = round(
            out[name]["tokens_per_s"] / out["direct"]["tokens_per_s"], 3
        )
    return {
        "streams": streams,
        "requests_per_stream": per_stream,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "paths": out,
    }


# ---------------------------------------------------------------- the run


def run_latency(tmp: Path, secret: bytes, requests: int) -> tuple[dict, list[str]]:
    notes = []
    children: list[Child] = []
    try:
        backend_port, front_port, haproxy_port = free_port(), free_port(), free_port()
        children.append(start_role("backend", backend_port, secret))
        backend = f"127.0.0.1:{backend_port}"
        front = start_role("front", front_port, secret, backend)
        children.append(front)
        tls_port = free_port()
        front_tls = start_role("front-tls", tls_port, secret, backend)
        children.append(front_tls)
        paths = {
            "direct": f"http://{backend}",
            "forwarder": f"http://127.0.0.1:{front_port}",
            "fwd-tls": f"http://127.0.0.1:{tls_port}",
        }
        pids = {"forwarder": front.proc.pid, "fwd-tls": front_tls.proc.pid}
        haproxy = start_haproxy(haproxy_port, backend, tmp)
        if haproxy is None:
            notes.append("haproxy is not installed (apt-get install -y haproxy): not measured")
        else:
            children.append(haproxy)
            paths["haproxy"] = f"http://127.0.0.1:{haproxy_port}"
            pids["haproxy"] = haproxy.proc.pid
        return asyncio.run(latency(paths, requests, pids)), notes
    finally:
        for child in children:
            child.stop()


def run_throughput(tmp: Path, secret: bytes, quick: bool) -> tuple[dict | None, list[str]]:
    try:
        import aivailable.backends.llama_engine  # noqa: F401
    except ImportError as exc:
        return None, [f"throughput with the real model not measured: {exc}"]
    notes = []
    children: list[Child] = []
    # The model peer shares the bench's cluster key, so the front's signed requests hold.
    key = tmp / "cluster.key"
    key.write_text(secret.hex() + "\n")
    key.chmod(0o600)
    peer = PeerProcess(tmp, "model-peer", "--no-mdns", "--cluster-key-file", str(key)).start()
    try:
        try:
            peer.wait_healthy()
            peer.wait_model_ready(REAL_MODEL, timeout=300)
            upstream = f"127.0.0.1:{peer.port}"
            served_by = "python -m aivailable up"
        except AssertionError as exc:
            # The peer process could not serve (e.g. rooms not yet integrated on this
            # branch): the same serving stack (OpenAIApi + LlamaEngine) in a bench process.
            errors = [ln.strip(" |") for ln in str(exc).splitlines() if "Error" in ln]
            notes.append(f"`aivailable up` did not serve ({(errors or ['?'])[-1][:160]}); "
                         "the model peer is the bench's own OpenAIApi + LlamaEngine process")  # fmt: skip
            port = free_port()
            children.append(start_role("model", port, secret))
            upstream = f"127.0.0.1:{port}"
            served_by = "bench model role (OpenAIApi + LlamaEngine)"
        front_port, haproxy_port = free_port(), free_port()
        children.append(start_role("front", front_port, secret, upstream))
        paths = {"direct": f"http://{upstream}", "forwarder": f"http://127.0.0.1:{front_port}"}
        haproxy = start_haproxy(haproxy_port, upstream, tmp)
        if haproxy is None:
            notes.append("haproxy is not installed: throughput through it not measured")
        else:
            children.append(haproxy)
            paths["haproxy"] = f"http://127.0.0.1:{haproxy_port}"
        if quick:
            result = asyncio.run(throughput(paths, 4, 1, 32, 1))
        else:
            result = asyncio.run(throughput(paths, 4, 1, 64, 6))
        result["model_peer"] = served_by
        return result, notes
    finally:
        for child in children:
            child.stop()
        peer.stop()


def print_tables(results: dict) -> None:
    lat = results["latency"]
    keys = ("ttfb_p50_ms", "ttfb_p99_ms", "total_p50_ms", "total_p99_ms", "ttfb_min_ms")
    titles = ("TTFB p50", "TTFB p99", "total p50", "total p99", "TTFB min")
    print(
        f"latency, ms (FakeEngine, streaming {len(FAKE_REPLY.split())} tokens, "
        f"{lat['requests_per_path']} sequential requests per path, rotated)"
    )
    header = (
        f"{'hop':>9} | "
        + " | ".join(f"{t:>9}" for t in titles)
        + " | "
        + " | ".join(f"{'+' + t:>10}" for t in titles)
        + f" | {'hop CPU us/req':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, row in lat["paths"].items():
        added = [row.get(f"added_{k}") for k in keys]
        cpu = row.get("hop_cpu_us_per_request")
        print(
            f"{name:>9} | "
            + " | ".join(f"{row[k]:>9.3f}" for k in keys)
            + " | "
            + " | ".join(f"{a:>+10.3f}" if a is not None else f"{'':>10}" for a in added)
            + f" | {(f'{cpu:.0f}' if cpu is not None else ''):>14}"
        )
    tp = results.get("throughput")
    if tp:
        print()
        print(
            f"throughput (SmolLM2-135M on llama.cpp, {tp['streams']} concurrent streams x "
            f"{tp['requests_per_stream']} requests x {tp['max_tokens']} tokens, {tp['rounds']} rounds)"
        )
        header = f"{'hop':>9} | {'tokens':>6} | {'seconds':>7} | {'tok/s':>7} | {'TTFT p50 ms':>11} | {'/direct':>7}"
        print(header)
        print("-" * len(header))
        for name, row in tp["paths"].items():
            ratio = f"{row['over_direct']:.3f}" if "over_direct" in row else ""
            print(
                f"{name:>9} | {row['tokens']:>6} | {row['seconds']:>7.2f} | "
                f"{row['tokens_per_s']:>7.2f} | {row['ttft_p50_ms']:>11.1f} | {ratio:>7}"
            )
    for note in results["notes"]:
        print(f"note: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--requests", type=int, help="latency requests per path (default 500)")
    parser.add_argument("--no-model", action="store_true", help="skip the real-model throughput")
    parser.add_argument(
        "--role", choices=["backend", "front", "front-tls", "model"], help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--secret-hex", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        import uvloop  # as the peer process runs

        uvloop.run(serve_role(args.role, args.port, args.upstream, bytes.fromhex(args.secret_hex)))
        return 0

    secret = secrets.token_bytes(32)
    requests = args.requests or (100 if args.quick else 500)
    results: dict = {"notes": []}
    with tempfile.TemporaryDirectory() as tmp:
        results["latency"], notes = run_latency(Path(tmp), secret, requests)
        results["notes"] += notes
        if args.no_model:
            results["notes"].append("throughput with the real model skipped (--no-model)")
        else:
            results["throughput"], notes = run_throughput(Path(tmp), secret, args.quick)
            results["notes"] += notes
    results["cpus"] = os.cpu_count()
    results["load_avg_at_end"] = os.getloadavg()
    print_tables(results)
    out = ROOT / "bench" / "results" / "forward.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
