"""The `aivailable` command: up, status, chat, deploy, undeploy."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from aivailable.config import ConfigError, load_config
from aivailable.http_client import ClientError, request_json

DEFAULT_URL = os.environ.get("AIVAILABLE_URL", "http://127.0.0.1:8000")


def _up_parser(sub) -> None:
    up = sub.add_parser("up", help="start a peer and join (or found) the cluster")
    up.add_argument("--config", help="TOML config file")
    up.add_argument("--name", help="node id (default: host name)")
    up.add_argument("--bind", help="listen address (default 127.0.0.1; a LAN needs 0.0.0.0)")
    up.add_argument("--advertise", help="address peers use to reach this one (needed with 0.0.0.0)")
    up.add_argument("--port", type=int, help="HTTP (TCP) and gossip (UDP) port (default 8000)")
    up.add_argument("--data-dir", help="Raft log, cluster secret and state")
    up.add_argument("--cache-dir", help="model cache (default ~/.cache/aivailable)")
    up.add_argument(
        "--join",
        action="append",
        metavar="HOST:PORT",
        help="a peer to join (repeatable), for networks without multicast",
    )
    up.add_argument("--no-mdns", action="store_true", help="do not announce or browse mDNS")
    up.add_argument(
        "--gpu",
        action="append",
        metavar="fake:NAME:VRAM",
        help="add a simulated GPU, e.g. 'fake:GTX 1080:8GiB' (repeatable)",
    )
    up.add_argument("--cluster-key-file", help="read the cluster secret here (created if absent)")
    up.add_argument("--token", help="join token from `aivailable token` on a cluster member")
    up.add_argument(
        "--model",
        metavar="SOURCE",
        help="model a new cluster deploys (default builtin:smollm2-135m; 'none' for none)",
    )
    up.add_argument(
        "--cpu",
        choices=("auto", "yes", "no"),
        help="offer the CPU as a model device: auto (only without GPUs), yes, no (routing only)",
    )
    up.add_argument("--n-ctx", type=int, help="context window per instance, tokens")
    up.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aivailable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    sub.add_parser("demo", help="three peers on 127.0.0.1 with simulated mixed GPUs")
    token = sub.add_parser("token", help="print a join token for another machine")
    for flag in ("--config", "--data-dir", "--cluster-key-file", "--bind", "--advertise", "--port"):
        token.add_argument(flag, type=int if flag == "--port" else str)
    token.add_argument(
        "--seed",
        action="append",
        metavar="HOST:PORT",
        help="peers the new machine contacts first (default: this peer)",
    )
    for name, text in (
        ("status", "show nodes, GPUs, leader and models"),
        ("chat", "chat with a model, streaming tokens"),
        ("deploy", "deploy a model to the cluster"),
        ("undeploy", "remove a model from the cluster"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--url", default=DEFAULT_URL, help=f"a peer's URL (default {DEFAULT_URL})")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the raw JSON")
        if name == "chat":
            p.add_argument("message", nargs="*", help="message (default: read lines from stdin)")
            p.add_argument("--model", default="smollm2-135m")
            p.add_argument("--max-tokens", type=int, default=256)
            p.add_argument("--temperature", type=float, default=0.7)
        if name == "deploy":
            p.add_argument("source", help="builtin:NAME or a GGUF path")
            p.add_argument("--name", help="model name (default from the source)")
            p.add_argument("--replicas", type=int, default=1)
            p.add_argument("--n-ctx", type=int, default=2048)
        if name == "undeploy":
            p.add_argument("name")
    return parser


def _up_overrides(args: argparse.Namespace) -> dict:
    return {
        "name": args.name,
        "bind": args.bind,
        "advertise": args.advertise,
        "port": args.port,
        "data_dir": args.data_dir,
        "cache_dir": args.cache_dir,
        "join": args.join,
        "mdns": False if args.no_mdns else None,
        "gpu": args.gpu,
        "cluster_key_file": args.cluster_key_file,
        "model": args.model,
        "cpu": args.cpu,
        "n_ctx": args.n_ctx,
        "log_level": args.log_level,
    }


def _token_overrides(args: argparse.Namespace) -> dict:
    return {
        "data_dir": args.data_dir,
        "cluster_key_file": args.cluster_key_file,
        "bind": args.bind,
        "advertise": args.advertise,
        "port": args.port,
    }


def cmd_token(args: argparse.Namespace) -> int:
    from peer.secret import SecretError, encode_join_token, read_secret

    try:
        config = load_config(_token_overrides(args), args.config)
        secret = read_secret(config.key_file)
    except FileNotFoundError:
        print(
            f"aivailable: no cluster secret at {config.key_file}: start a peer first",
            file=sys.stderr,
        )
        return 1
    except (ConfigError, SecretError) as exc:
        print(f"aivailable: {exc}", file=sys.stderr)
        return 2
    print(encode_join_token(secret, args.seed or [config.advertise_addr]))
    return 0


def use_token(token: str, config):
    """Store the token's secret as this peer's (refusing to replace a different one) and
    add its seeds to the peers to join."""
    import dataclasses

    from peer.secret import SecretError, parse_join_token, read_secret, write_secret

    parsed = parse_join_token(token)
    key = config.key_file
    if key.exists():
        if read_secret(key) != parsed.secret:
            raise SecretError(f"{key} holds another cluster's secret; move it away to join")
    else:
        key.parent.mkdir(parents=True, exist_ok=True)
        write_secret(key, parsed.secret)
    joins = tuple(dict.fromkeys((*config.join, *parsed.seeds)))
    return dataclasses.replace(config, join=joins)


def cmd_up(args: argparse.Namespace) -> int:

    from aivailable.gpu import parse_fake_gpu
    from aivailable.server import serve

    try:
        config = load_config(_up_overrides(args), args.config)
        for spec in config.gpu:
            parse_fake_gpu(spec)
        if args.token:
            config = use_token(args.token, config)
    except (ConfigError, ValueError) as exc:
        print(f"aivailable: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvloop

    from consensus import StorageError

    failed = False
    try:
        uvloop.run(serve(config, announce=lambda line: print(line, flush=True)))
    except* StorageError as group:  # a damaged log or a full disk: say so, not "cannot serve"
        failed = True
        for exc in group.exceptions:
            print(f"aivailable: {exc}", file=sys.stderr)
    except* OSError as group:  # the TaskGroup wraps a failed bind
        failed = True
        for exc in group.exceptions:
            print(
                f"aivailable: cannot serve on {config.bind}:{config.port}: {exc}", file=sys.stderr
            )
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from aivailable.status_view import render_status

    status = request_json(args.url.rstrip("/") + "/cluster/status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        render_status(status)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from aivailable.chat_client import chat_loop

    return chat_loop(
        args.url.rstrip("/"), args.model, " ".join(args.message), args.max_tokens, args.temperature
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    body = {"source": args.source, "replicas": args.replicas, "n_ctx": args.n_ctx}
    if args.name:
        body["name"] = args.name
    result = request_json(args.url.rstrip("/") + "/cluster/models", "POST", body)
    print(f"deployed {result.get('name')} ({result.get('replicas')} replica(s))")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    request_json(args.url.rstrip("/") + f"/cluster/models/{args.name}", "DELETE")
    print(f"undeployed {args.name}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aivailable.demo import main as demo_main

    return demo_main()


COMMANDS = {
    "demo": cmd_demo,
    "token": cmd_token,
    "up": cmd_up,
    "status": cmd_status,
    "chat": cmd_chat,
    "deploy": cmd_deploy,
    "undeploy": cmd_undeploy,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ClientError as exc:
        print(f"aivailable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
