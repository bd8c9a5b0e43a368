"""A small standalone gossip-only agent (the real peer folds Gossip and Discovery in).

    python -m peer --name n1 --port 7101 --bind 127.0.0.1 --gpu "fake:GTX 1080:8GiB" \\
        --data-dir /tmp/n1 [--join 127.0.0.1:7102] [--no-mdns] [--cluster-key-file PATH]

Serves POST /gossip/pushpull, GET /cluster/status (DESIGN.md's node shape) and GET /healthz
on TCP --port; gossips on UDP --port. SIGTERM leaves the cluster gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from peer.config import GossipConfig
from peer.crypto import Keyring
from peer.discovery import Discovery
from peer.gossip import Gossip
from peer.secret import load_or_create_secret, parse_join_token, write_secret

VERSION = "0.1.0"
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"bad size {text!r}: use e.g. 8GiB, 12GB, 4096MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def parse_fake_gpu(spec: str, node: str, index: int) -> dict:
    """fake:NAME:VRAM (NAME may contain spaces and colons) -> a DESIGN.md gpu entry."""
    kind, _, rest = spec.partition(":")
    name, _, vram = rest.rpartition(":")
    if kind != "fake" or not name or not vram:
        raise ValueError(f"bad --gpu {spec!r}: use fake:NAME:VRAM")
    size = parse_size(vram)
    return {"id": f"{node}/gpu{index}", "vendor": "fake", "name": name, "vram_total": size,
            "vram_free": size}  # fmt: skip


def node_status(view) -> dict:
    p = view.payload
    return {
        "id": view.id,
        "addr": view.addr,
        "port": view.port,
        "state": view.state,
        "incarnation": view.incarnation,
        "gpus": p.get("gpus", []),
        "instances": p.get("instances", []),
        "load": p.get("load", {}),
        "version": p.get("version"),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m peer", description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--advertise", help="address peers reach us at (needed with --bind 0.0.0.0)")
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--gpu", action="append", default=[])
    ap.add_argument("--join", action="append", default=[])
    ap.add_argument("--no-mdns", action="store_true")
    ap.add_argument("--cluster-key-file", type=Path)
    ap.add_argument("--token", help="a join token: cluster secret plus seed addresses")
    return ap


def load_secret(args) -> tuple[bytes, list[str]]:
    args.data_dir.mkdir(parents=True, exist_ok=True)
    path = args.cluster_key_file or args.data_dir / "cluster.key"
    seeds: list[str] = []
    if args.token:
        token = parse_join_token(args.token)
        seeds = list(token.seeds)
        if not path.exists():
            write_secret(path, token.secret)
    return load_or_create_secret(path), seeds


async def serve(args) -> None:
    secret, token_seeds = load_secret(args)
    keyring = Keyring.from_secret(secret)
    gpus = [parse_fake_gpu(spec, args.name, i) for i, spec in enumerate(args.gpu)]
    payload = {"gpus": gpus, "instances": [], "load": {"queue": 0}, "version": VERSION}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with aiohttp.ClientSession() as session:
        gossip = Gossip(
            GossipConfig(), args.name, args.bind, args.port, keyring, session,
            seeds=[*args.join, *token_seeds], payload=payload, advertise_host=args.advertise,
        )  # fmt: skip

        async def status(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "node_id": args.name,
                    "leader": None,
                    "term": 0,
                    "nodes": [node_status(v) for v in gossip.members()],
                    "models": [],
                    "gossip": gossip.metrics_snapshot(),
                }
            )

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application()
        app.add_routes([*gossip.routes(), web.get("/cluster/status", status),
                        web.get("/healthz", healthz)])  # fmt: skip
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.bind, args.port).start()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(gossip.run())]
                if not args.no_mdns:
                    discovery = Discovery(args.name, keyring.cluster_id, args.bind, args.port,
                                          gossip.peer_found, version=VERSION,
                                          announce_host=args.advertise)  # fmt: skip
                    tasks.append(tg.create_task(discovery.run()))
                print(json.dumps({"ready": args.name, "port": args.port}), flush=True)
                await stop.wait()
                await gossip.leave()
                for task in tasks:
                    task.cancel()
        finally:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except Exception as exc:  # a bad flag, a port in use, an unreadable key file
        print(f"error: {exc!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
