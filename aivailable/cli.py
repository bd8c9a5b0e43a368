"""The `aivailable` command: up, status, models, ps, chat, deploy, undeploy, pull, keys, usage."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from aivailable.config import ConfigError, load_config
from aivailable.http_client import ClientError, request_json, set_api_key

DEFAULT_URL = os.environ.get("AIVAILABLE_URL", "http://127.0.0.1:8000")


def _up_parser(sub) -> None:
    up = sub.add_parser("up", help="start a peer and join (or found) the cluster")
    up.add_argument("--config", help="TOML config file")
    up.add_argument("--name", help="node id (default: host name)")
    up.add_argument("--bind", help="listen address (default 127.0.0.1; a LAN needs 0.0.0.0)")
    up.add_argument("--advertise", help="address peers use to reach this one (needed with 0.0.0.0)")
    up.add_argument("--port", type=int, help="HTTP (TCP) and gossip (UDP) port (default 8000)")
    up.add_argument(
        "--data-dir",
        help="Raft log, cluster secret and state. If DATA_DIR/raft is damaged or lost, delete "
        "that directory and start again: the peer rejoins as a new Raft member (learner, then "
        "voter) and the leader retires its old id",
    )
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
    up.add_argument("--offline", action="store_true", help="use only the model cache; no downloads")
    up.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable)",
    )
    up.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export request spans to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318 "
        "(default: off, nothing is exported)",
    )
    up.add_argument(
        "--auth",
        choices=("on", "off"),
        help="require API keys (default: on when binding a non-loopback address; "
        "off is refused there)",
    )
    up.add_argument("--tls-cert", help="PEM certificate: serve clients https:// too")
    up.add_argument("--tls-key", help="PEM private key of --tls-cert")
    up.add_argument(
        "--admin-key-file",
        help="the first admin key of a new cluster (created here if absent; "
        "default DATA_DIR/admin.key)",
    )
    up.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aivailable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    sub.add_parser("demo", help="three peers on 127.0.0.1 with simulated mixed GPUs")
    sub.add_parser(
        "doctor", help="which GPUs this machine's llama.cpp build can drive, and why not"
    )
    token = sub.add_parser("token", help="print a join token for another machine")
    for flag in ("--config", "--data-dir", "--cluster-key-file", "--bind", "--advertise", "--port"):
        token.add_argument(flag, type=int if flag == "--port" else str)
    token.add_argument(
        "--seed",
        action="append",
        metavar="HOST:PORT",
        help="peers the new machine contacts first (default: this peer)",
    )
    pull = sub.add_parser("pull", help="download a model into the cache ahead of a deploy")
    pull.add_argument("source", help="hf://ORG/REPO:QUANT, hf://ORG/REPO/FILE.gguf, a URL, ...")
    pull.add_argument("--cache-dir", help="default: $AIVAILABLE_CACHE_DIR or ~/.cache/aivailable")
    keys = sub.add_parser("keys", help="create, list and revoke API keys (admin)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; its secret is shown once")
    create.add_argument("--role", choices=("user", "admin", "metrics"), default="user")
    create.add_argument("--models", help="comma-separated models a user key may use (default all)")
    create.add_argument("--rpm", type=int, help="requests per minute, cluster-wide")
    create.add_argument("--tpm", type=int, help="tokens per minute, cluster-wide")
    create.add_argument("--expires", help="a date (2027-01-31) or a duration (30d, 12h)")
    create.add_argument("--name", help="what the key is for")
    actions.add_parser("list", help="the keys, their limits and use in the last minute")
    revoke = actions.add_parser("revoke", help="revoke a key on every peer")
    revoke.add_argument("id")
    clients = [(a, None) for a in actions.choices.values()]
    usage = sub.add_parser("usage", help="requests and tokens per key, model and day (admin)")
    usage.add_argument("--key", help="one key's id (default: every key)")
    usage.add_argument("--since", help="from this day on (YYYY-MM-DD, UTC)")
    usage.add_argument("--json", action="store_true", help="print the raw JSON")
    clients.append((usage, "usage"))
    for name, text in (
        ("status", "show nodes, GPUs, leader and models"),
        ("models", "show the deployed models, their replicas and states"),
        ("ps", "show the model instances on each node, and downloads"),
        ("chat", "chat with a model, streaming tokens"),
        ("deploy", "deploy a model to the cluster"),
        ("undeploy", "remove a model from the cluster"),
    ):
        p = sub.add_parser(name, help=text)
        clients.append((p, name))
        if name in ("status", "models", "ps"):
            p.add_argument("--json", action="store_true", help="print the raw JSON")
        if name in ("status", "models"):
            p.add_argument(
                "--consistent",
                action="store_true",
                help="a linearizable read: include every write acknowledged before it "
                "(asks the leader; fails clearly when there is none)",
            )
        if name == "chat":
            p.add_argument("message", nargs="*", help="message (default: read lines from stdin)")
            p.add_argument("--model", default="smollm2-135m")
            p.add_argument("--max-tokens", type=int, default=256)
            p.add_argument("--temperature", type=float, default=0.7)
        if name == "deploy":
            p.add_argument(
                "source", help="builtin:NAME, hf://ORG/REPO:QUANT, hf://ORG/REPO/FILE.gguf, a URL"
            )
            p.add_argument("--name", help="model name (default from the source)")
            p.add_argument("--replicas", type=int, help="a fixed count (default 1)")
            p.add_argument("--n-ctx", type=int, default=2048)
            p.add_argument(
                "--split",
                choices=("auto", "never", "always"),
                default="auto",
                help="over several peers through llama.cpp RPC: auto (when no one peer "
                "fits), always, never",
            )
            p.add_argument(
                "--kv-type",
                choices=("f16", "q8_0", "q4_0"),
                default=None,
                help="KV cache type: q8_0 halves the cache per slot, q4_0 quarters it",
            )
            p.add_argument("--min", type=int, help="scale with demand: at least N replicas")
            p.add_argument("--max", type=int, help="scale with demand: at most M replicas")
            p.add_argument("--priority", type=int, help="higher keeps VRAM first (default 0)")
            p.add_argument(
                "--idle-unload",
                type=float,
                metavar="SECONDS",
                help="seconds without requests before a scaled model goes down to --min "
                "(default 300; negative: never)",
            )
        if name == "undeploy":
            p.add_argument("name")
    for p, _ in clients:
        p.add_argument("--url", default=DEFAULT_URL, help=f"a peer's URL (default {DEFAULT_URL})")
        p.add_argument(
            "--api-key",
            help="API key (default: $AIVAILABLE_API_KEY, else the data dir's admin.key)",
        )
        p.add_argument("--data-dir", help="where to look for admin.key")
    return parser


def client_key(args: argparse.Namespace, environ=os.environ) -> str | None:
    """--api-key, else $AIVAILABLE_API_KEY, else the admin key in the data dir (if readable)."""
    if getattr(args, "api_key", None):
        return args.api_key
    if environ.get("AIVAILABLE_API_KEY"):
        return environ["AIVAILABLE_API_KEY"]
    try:
        path = load_config({"data_dir": getattr(args, "data_dir", None)}, environ=environ)
        return path.admin_key_path.read_text().strip() or None
    except (OSError, ConfigError):
        return None


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
        "offline": True if args.offline else None,
        "cors_origins": args.cors_origin,
        "otlp_endpoint": args.otlp_endpoint,
        "log_level": args.log_level,
        "auth_mode": args.auth,
        "admin_key_file": args.admin_key_file,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
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


def _read_mode(args: argparse.Namespace) -> str:
    return "?consistent=1" if getattr(args, "consistent", False) else ""


def cmd_status(args: argparse.Namespace) -> int:
    from aivailable.status_view import render_status

    status = request_json(args.url.rstrip("/") + "/cluster/status" + _read_mode(args))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        render_status(status)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from aivailable.status_view import render_models

    status = request_json(args.url.rstrip("/") + "/cluster/status" + _read_mode(args))
    if args.json:
        print(json.dumps(status.get("models", []), indent=2))
    else:
        render_models(status)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from aivailable.status_view import render_ps

    status = request_json(args.url.rstrip("/") + "/cluster/status")
    if args.json:
        keys = ("node_id", "nodes", "downloads")
        print(json.dumps({k: status.get(k) for k in keys}, indent=2))
    else:
        render_ps(status)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from aivailable.chat_client import chat_loop

    return chat_loop(
        args.url.rstrip("/"), args.model, " ".join(args.message), args.max_tokens, args.temperature
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    body = {"source": args.source, "n_ctx": args.n_ctx}
    for key, value in (
        ("name", args.name),
        ("replicas", args.replicas),
        ("min_replicas", args.min),
        ("max_replicas", args.max),
        ("priority", args.priority),
        ("idle_unload_s", args.idle_unload),
    ):
        if value is not None:
            body[key] = value
    if args.split != "auto":
        body["split"] = args.split
    if args.kv_type:
        body["kv_type"] = args.kv_type
    result = request_json(args.url.rstrip("/") + "/cluster/models", "POST", body)
    if result.get("min_replicas") is not None:
        print(
            f"deployed {result.get('name')} ({result['min_replicas']}..{result['max_replicas']}"
            f" replicas with demand, starting at {result.get('replicas')})"
        )
    else:
        print(f"deployed {result.get('name')} ({result.get('replicas')} replica(s))")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    request_json(args.url.rstrip("/") + f"/cluster/models/{args.name}", "DELETE")
    print(f"undeployed {args.name}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from aivailable.models import store

    try:
        model = store.resolve(args.source, args.cache_dir, progress=True)
    except store.ModelSourceError as exc:
        print(f"aivailable: {exc}", file=sys.stderr)
        return 1
    print(model.path)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/") + "/cluster/keys"
    if args.action == "create":
        body = {"role": args.role, "name": args.name or ""}
        for field in ("models", "rpm", "tpm", "expires"):
            if getattr(args, field):
                body[field] = getattr(args, field)
        key = request_json(base, "POST", body)
        print(key["key"])
        print(
            f"created {key['role']} key {key['id']}: the line above is its secret, shown this "
            "once; the cluster keeps only its hash",
            file=sys.stderr,
        )
    elif args.action == "list":
        rows = request_json(base)["data"]
        print(f"{'ID':12}  {'ROLE':7}  {'NAME':20}  {'MODELS':20}  {'RPM':>6}  {'TPM':>8}  "
              f"{'EXPIRES':25}  {'REQ/1M':>6}  {'TOK/1M':>8}")  # fmt: skip
        for k in rows:
            print(
                f"{k['id']:12}  {k['role']:7}  {k['name'][:20]:20}  "
                f"{','.join(k['models'])[:20] or '*':20}  {k['rpm'] or '-':>6}  "
                f"{k['tpm'] or '-':>8}  {k['expires'] or 'never':25}  "
                f"{k['requests_1m']:>6}  {k['tokens_1m']:>8}"
            )
    else:
        request_json(f"{base}/{args.id}", "DELETE")
        print(f"revoked {args.id}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    query = "&".join(f"{k}={v}" for k, v in (("key", args.key), ("since", args.since)) if v)
    report = request_json(args.url.rstrip("/") + "/cluster/usage" + (f"?{query}" if query else ""))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'DAY':10}  {'KEY':12}  {'NAME':16}  {'MODEL':24}  {'REQUESTS':>8}  "
          f"{'PROMPT':>9}  {'COMPLETION':>10}")  # fmt: skip
    for r in report["data"]:
        print(
            f"{r['day']:10}  {r['key']:12}  {r['key_name'][:16]:16}  {r['model'][:24]:24}  "
            f"{r['requests']:>8}  {r['prompt_tokens']:>9}  {r['completion_tokens']:>10}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aivailable.demo import main as demo_main

    return demo_main()


def cmd_doctor(args: argparse.Namespace) -> int:
    from aivailable.gpu import doctor, probe_all, registry

    reg = registry.probe()
    print(doctor.report(reg, probe_all(reg=reg)))
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "doctor": cmd_doctor,
    "token": cmd_token,
    "up": cmd_up,
    "status": cmd_status,
    "models": cmd_models,
    "ps": cmd_ps,
    "chat": cmd_chat,
    "deploy": cmd_deploy,
    "undeploy": cmd_undeploy,
    "pull": cmd_pull,
    "keys": cmd_keys,
    "usage": cmd_usage,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("up", "demo", "token", "doctor"):
        set_api_key(client_key(args))
    try:
        return COMMANDS[args.command](args)
    except ClientError as exc:
        print(f"aivailable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
