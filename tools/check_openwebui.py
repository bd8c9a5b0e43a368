"""Open WebUI against a real AIvailable peer with auth on, end to end, driven like a user
through Open WebUI's own HTTP API.

    bash tools/openwebui_venv.sh                    # once: Open WebUI in its own venv
    .venv/bin/python tools/check_openwebui.py [--venv PATH] [--no-page]

A peer on loopback (`--auth on`, the embedded SmolLM2 on llama.cpp) and user keys made
through /cluster/keys; Open WebUI (`open-webui serve`) pointed at the peer's /v1 with one of
them. Then: sign up Open WebUI's first (admin) user, verify the connection, list the models
(only those the key may use), chat streamed and not, and read the peer's usage ledger for
that key; switch Open WebUI to a key scoped to another model and to a key revoked while
Open WebUI runs, and record what Open WebUI answers. Then headless Chromium asks
through Open WebUI's page (tools/openwebui_page.py), with its defaults and with its built-in
tools off, and saves a screenshot of each (`--no-page` skips this).

Everything runs in a network namespace of its own with loopback only (`unshare --net`, as
root), so no traffic can leave the machine; Open WebUI is also told it is offline. Prints a
table of checks and writes bench/results/openwebui.json; exits 1 if a check failed. Not part
of `make test` or CI: Open WebUI's venv is ~7 GB and it takes a minute to start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.local_peers import PeerProcess, free_port  # noqa: E402

MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
DEFAULT_VENV = Path(os.environ.get("AIVAILABLE_CACHE_DIR", Path.home() / ".cache/aivailable"))
DEFAULT_VENV = DEFAULT_VENV / "openwebui-venv"
INSIDE = "AIVAILABLE_OWUI_NETNS"  # set once re-executed inside the namespace


def call(method: str, url: str, token: str | None = None, body=None, timeout: float = 120):
    """-> (status, parsed JSON or text); HTTP errors are answers too."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def stream(url: str, token: str, body: dict, timeout: float = 180):
    """An SSE chat: -> (status, text of the deltas, usage or None, chunk count, error body)."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        with contextlib.suppress(ValueError):
            raw = json.loads(raw)
        return exc.code, "", None, 0, raw
    text, usage, chunks = [], None, 0
    with resp:
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            chunks += 1
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    return resp.status, "".join(text), usage, chunks, None


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        return ok

    def table(self) -> str:
        width = max(len(r["check"]) for r in self.rows)
        lines = [f"{'check':<{width}}  result  detail", "-" * (width + 40)]
        for r in self.rows:
            detail = r["detail"] if len(r["detail"]) < 90 else r["detail"][:87] + "..."
            lines.append(f"{r['check']:<{width}}  {'pass' if r['ok'] else 'FAIL':<6}  {detail}")
        passed = sum(r["ok"] for r in self.rows)
        lines.append(f"{passed} passed, {len(self.rows) - passed} failed")
        return "\n".join(lines)


class OpenWebUI:
    """`open-webui serve` from its own venv, on loopback, offline, its data in `data_dir`."""

    def __init__(self, venv: Path, data_dir: Path, api_base: str, api_key: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.venv = venv
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "open-webui.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_"))},
            "DATA_DIR": str(data_dir),
            "WEBUI_SECRET_KEY": secrets.token_hex(32),
            "OPENAI_API_BASE_URL": api_base,
            "OPENAI_API_KEY": api_key,
            "ENABLE_OLLAMA_API": "false",
            # No fetches from the internet: no model hub, no version check, no embedding model
            # (an OpenAI-engine embedder is only called for documents, which we do not send).
            "OFFLINE_MODE": "true",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "RAG_EMBEDDING_ENGINE": "openai",
            "ENABLE_VERSION_UPDATE_CHECK": "false",
            "ANONYMIZED_TELEMETRY": "false",
            "SCARF_NO_ANALYTICS": "true",
            "DO_NOT_TRACK": "true",
            # Background title/tag/follow-up chats would add requests to the key's usage.
            "ENABLE_TITLE_GENERATION": "false",
            "ENABLE_TAGS_GENERATION": "false",
            "ENABLE_FOLLOW_UP_GENERATION": "false",
            "ENABLE_AUTOCOMPLETE_GENERATION": "false",
            "WEBUI_AUTH": "true",
            "DEFAULT_MODELS": MODEL,
        }
        self.proc: subprocess.Popen | None = None

    def version(self) -> str:
        out = subprocess.run(
            [str(self.venv / "bin/python"), "-c",
             "import importlib.metadata as m; print(m.version('open-webui'))"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    def start(self) -> float:
        """Starts it and waits for /health: -> seconds it took."""
        start = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(self.venv / "bin/open-webui"), "serve", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=self.env, cwd=self.log_path.parent, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        while time.monotonic() - start < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"open-webui exited:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError):
                if call("GET", self.url + "/health", timeout=5)[0] == 200:
                    return time.monotonic() - start
            time.sleep(1)
        raise RuntimeError(f"open-webui did not start in 300 s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_usage(peer_url: str, key: str, done, within: float = 60) -> dict:
    """The key's own ledger (GET /v1/usage), summed over its rows, once `done(total)` holds
    (it is committed to the replicated state at a bounded rate, so it lags the answers by
    up to [access] usage_flush_s) or `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        _, body = call("GET", peer_url + "/v1/usage", key)
        total = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        for row in body.get("data", []) if isinstance(body, dict) else []:
            for field in total:
                total[field] += row[field]
        if done(total) or time.monotonic() > deadline:
            return total
        time.sleep(1)


def use_key(owui: OpenWebUI, token: str, peer_url: str, key: str) -> int:
    """Settings -> Connections -> OpenAI API, as the admin page saves it."""
    status, _ = call("POST", owui.url + "/openai/config/update", token, {
        "ENABLE_OPENAI_API": True, "OPENAI_API_BASE_URLS": [peer_url + "/v1"],
        "OPENAI_API_KEYS": [key], "OPENAI_API_CONFIGS": {},
    })  # fmt: skip
    return status


def error_text(body) -> str:
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        return json.dumps(err.get("message", err) if isinstance(err, dict) else err)
    return str(body)[:200]


def run_checks(owui: OpenWebUI, peer: PeerProcess, admin: str, keys: dict, c: Checks) -> dict:
    peer_v1 = peer.url + "/v1"
    chat_url = owui.url + "/api/chat/completions"
    status, user = call("POST", owui.url + "/api/v1/auths/signup", None, {
        "name": "Lab Admin", "email": "admin@example.invalid", "password": secrets.token_hex(12),
    })  # fmt: skip
    token = user.get("token") if isinstance(user, dict) else None
    c.add("sign up the first user", status == 200 and user.get("role") == "admin" and token,
          f"HTTP {status}, role {user.get('role') if isinstance(user, dict) else user}")  # fmt: skip

    status, body = call("POST", owui.url + "/openai/verify", token,
                        {"url": peer_v1, "key": keys["user"][0]})  # fmt: skip
    ids = [m["id"] for m in body.get("data", [])] if isinstance(body, dict) else []
    c.add("verify the connection (user key)", status == 200 and ids == [MODEL], f"{status} {ids}")

    status, body = call("GET", owui.url + "/api/models", token)
    models = body.get("data", []) if isinstance(body, dict) else []
    ids = [m["id"] for m in models]
    owners = {m.get("openai", {}).get("owned_by") for m in models}
    c.add("models list: only the key's models, from our peer",
          status == 200 and ids == [MODEL] and owners == {peer.name},
          f"{ids}, owned_by {sorted(map(str, owners))}")  # fmt: skip

    expected = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def counted(usage: dict | None) -> None:
        expected["requests"] += 1
        if usage:
            expected["prompt_tokens"] += usage["prompt_tokens"]
            expected["completion_tokens"] += usage["completion_tokens"]

    status, body = call("POST", chat_url, token,
                        {"model": MODEL, "messages": HELLO, "stream": False, "max_tokens": 40})  # fmt: skip
    text = body["choices"][0]["message"]["content"] if status == 200 else ""
    usage = body.get("usage") if isinstance(body, dict) else None
    counted(usage)
    c.add("chat, not streamed", status == 200 and text.strip() and usage, f"{status} {text!r}")

    status, text, usage, chunks, err = stream(chat_url, token, {
        "model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 40,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    counted(usage)
    c.add("chat, streamed (with usage)", status == 200 and text.strip() and usage and chunks > 2,
          f"{status}, {chunks} chunks: {text!r}, usage {usage}")  # fmt: skip

    status, text, usage, chunks, err = stream(chat_url, token, {
        "model": MODEL, "stream": True, "max_tokens": 24, "temperature": 0.2,
        "messages": [{"role": "system", "content": "You answer briefly."}, *HELLO],
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    counted(usage)
    c.add("chat, streamed, system prompt and sampling", status == 200 and text.strip(),
          f"{status}, {chunks} chunks: {text!r}")  # fmt: skip

    ledger = wait_usage(peer.url, keys["user"][0], lambda t: t == expected)
    c.add("usage ledger counts exactly those chats for the key (GET /v1/usage)",
          ledger == expected, f"ledger {ledger}, answers said {expected}")  # fmt: skip
    status, body = call("GET", f"{peer.url}/cluster/usage?key={keys['user'][1]}", admin)
    rows = body.get("by_key", []) if isinstance(body, dict) else []
    row = rows[0] if rows else {}
    c.add("admin's view (GET /cluster/usage?key=ID) agrees",
          status == 200 and row.get("requests") == expected["requests"]
          and row.get("key_name") == "open-webui", f"{status} {row}")  # fmt: skip

    # A key scoped to another model: Open WebUI shows no model, and says so when asked.
    c.add("switch to a key scoped to another model",
          use_key(owui, token, peer.url, keys["scoped"][0]) == 200)  # fmt: skip
    status, body = call("GET", owui.url + "/api/models", token)
    ids = [m["id"] for m in body.get("data", [])] if isinstance(body, dict) else body
    c.add("scoped key: models list is empty", status == 200 and ids == [], f"{status} {ids}")
    status, body = call("POST", chat_url, token, {"model": MODEL, "messages": HELLO})
    c.add("scoped key: a chat gets a clear error", 400 <= status < 500,
          f"{status} {error_text(body)}")  # fmt: skip

    # A key revoked while Open WebUI runs: it still lists the model it saw last (its own
    # fallback when a connection lists none), and relays our 401 on a chat.
    c.add("switch to a fresh key, then revoke it",
          use_key(owui, token, peer.url, keys["revoked"][0]) == 200
          and call("GET", owui.url + "/api/models", token)[0] == 200
          and call("DELETE", f"{peer.url}/cluster/keys/{keys['revoked'][1]}", admin)[0] == 200)  # fmt: skip
    status, body = call("POST", chat_url, token, {"model": MODEL, "messages": HELLO})
    c.add("revoked key: a chat gets our 401, relayed",
          status == 401 and "revoked" in error_text(body), f"{status} {error_text(body)}")  # fmt: skip
    status, text, usage, chunks, err = stream(chat_url, token,
                                              {"model": MODEL, "messages": HELLO, "stream": True})  # fmt: skip
    c.add("revoked key: a streamed chat gets our 401, relayed",
          status == 401 and "revoked" in error_text(err), f"{status} {error_text(err)}")  # fmt: skip
    status, body = call("POST", owui.url + "/openai/verify", token,
                        {"url": peer_v1, "key": keys["revoked"][0]})  # fmt: skip
    c.add("revoked key: verify connection fails clearly", status >= 400,
          f"{status} {error_text(body)}")  # fmt: skip
    status, body = call("GET", owui.url + "/api/models", token)
    ids = [m["id"] for m in body.get("data", [])] if isinstance(body, dict) else body
    c.add(
        "revoked key: Open WebUI keeps running, lists what it saw last",
        status == 200,
        f"{status} {ids}",
    )
    use_key(owui, token, peer.url, keys["user"][0])
    return {"token": token, "expected_usage": expected, "revoked_at": time.monotonic()}


def nothing_charged_to_the_revoked_key(peer, keys, found: dict, c: Checks) -> None:
    """Read once a whole usage flush ([access] usage_flush_s, 10 s) has passed since the
    revoked key's chats, so that nothing booked for it can still be on its way."""
    time.sleep(max(0.0, found["revoked_at"] + 12 - time.monotonic()))
    ledger = wait_usage(peer.url, keys["revoked"][0], lambda t: True)
    c.add("revoked key: nothing charged to it", ledger["requests"] == 0, f"{ledger}")


def page_checks(owui, peer, keys, found: dict, tmp: Path, out: Path, c: Checks) -> list[str]:
    """Open WebUI's page in Chromium, as a user types: first with its defaults, then with its
    built-in tools off (Admin -> Settings -> Models -> default capabilities)."""
    from tools.openwebui_page import chat_in_page

    token, key = found["token"], keys["user"][0]
    shots = [out.with_name(out.stem + "-defaults.png"), out.with_suffix(".png")]
    before = wait_usage(peer.url, key, lambda t: t == found["expected_usage"], within=5)
    # Its defaults send 36 built-in tools (memory, notes, calendar, ...) with every chat from
    # the page: about 6,000 prompt tokens, over the default model's 2,048-token context.
    try:
        text = chat_in_page(owui.url, token, MODEL, tmp / "chromium", shots[0])
    except AssertionError as exc:
        text = f"page: {exc}"
    c.add("page, Open WebUI's defaults: our context error, naming the tools, shown",
          "context holds" in text and "36 tools sent with it" in text, repr(text))  # fmt: skip
    status, _ = call("POST", owui.url + "/api/v1/configs/models", token, {
        "DEFAULT_MODELS": MODEL, "DEFAULT_PINNED_MODELS": None, "MODEL_ORDER_LIST": None,
        "DEFAULT_MODEL_METADATA": {"capabilities": {"builtin_tools": False}},
    })  # fmt: skip
    c.add("page: turn Open WebUI's built-in tools off", status == 200, f"HTTP {status}")
    try:
        text = chat_in_page(owui.url, token, MODEL, tmp / "chromium", shots[1])
    except AssertionError as exc:
        text = f"page: {exc}"
    # The engine's counts of the answered chat (the refused one above is booked as a
    # request with no tokens).
    grew = lambda t: t["completion_tokens"] > before["completion_tokens"]  # noqa: E731
    after = wait_usage(peer.url, key, grew)
    answered = grew(after) and after["prompt_tokens"] > before["prompt_tokens"]
    c.add("page, built-in tools off: answered by our peer, charged to the key",
          answered and text.strip() and "context holds" not in text,
          f"{text[:100]!r}; ledger {before} -> {after}")  # fmt: skip
    return [str(s.relative_to(ROOT)) for s in shots]


def start_peer(tmp: Path) -> tuple[PeerProcess, str, dict]:
    peer = PeerProcess(
        tmp, "owui-peer", "--no-mdns", "--auth", "on", "--offline",
        "--cluster-key-file", str(tmp / "cluster.key"),
    ).start()  # fmt: skip
    peer.wait_healthy(120)
    admin_file = peer.data_dir / "admin.key"
    peer.wait_until(admin_file.exists, 60, "the admin key")
    admin = admin_file.read_text().strip()
    os.environ["AIVAILABLE_API_KEY"] = admin  # for PeerProcess.status()
    peer.wait_model_ready(MODEL, 300)
    keys = {}
    for label, fields in (
        ("user", {"name": "open-webui", "models": MODEL}),
        ("scoped", {"name": "open-webui-other-model", "models": "some-other-model"}),
        ("revoked", {"name": "open-webui-revoked"}),
    ):
        status, made = call("POST", peer.url + "/cluster/keys", admin, {"role": "user", **fields})
        if status != 201:
            raise RuntimeError(f"could not create a key: {status} {made}")
        keys[label] = (made["key"], made["id"])
    return peer, admin, keys


def isolate(argv: list[str]) -> int:
    """Run this script again in a fresh network namespace with loopback only."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        sys.exit("needs root, unshare and ip for its own network namespace; or --no-isolate")
    inner = [sys.executable, str(Path(__file__).resolve()), *argv]
    script = 'ip link set lo up && exec "$@"'
    env = {**os.environ, INSIDE: "1"}
    return subprocess.call(["unshare", "--net", "sh", "-c", script, "sh", *inner], env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(os.environ.get("OPENWEBUI_VENV", DEFAULT_VENV)),
                    help="Open WebUI's venv (tools/openwebui_venv.sh; env OPENWEBUI_VENV)")  # fmt: skip
    ap.add_argument("--no-isolate", action="store_true",
                    help="run in this network namespace (Open WebUI is still told it is offline)")  # fmt: skip
    ap.add_argument("--no-page", action="store_true", help="skip the chats in Chromium")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/openwebui.json")
    args = ap.parse_args()
    if not (args.venv / "bin/open-webui").exists():
        sys.exit(f"no Open WebUI in {args.venv}: run bash tools/openwebui_venv.sh first")
    if not args.no_isolate and os.environ.get(INSIDE) != "1":
        return isolate(sys.argv[1:])

    c = Checks()
    started = datetime.now(UTC)
    facts: dict = {"isolated_netns": os.environ.get(INSIDE) == "1"}
    with tempfile.TemporaryDirectory(prefix="owui-check-") as tmp_name:
        tmp = Path(tmp_name)
        peer, owui = None, None
        try:
            t0 = time.monotonic()
            peer, admin, keys = start_peer(tmp)
            facts["peer_ready_s"] = round(time.monotonic() - t0, 1)
            owui = OpenWebUI(args.venv, tmp / "open-webui", peer.url + "/v1", keys["user"][0])
            facts["open_webui_version"] = owui.version()
            facts["open_webui_start_s"] = round(owui.start(), 1)
            found = run_checks(owui, peer, admin, keys, c)
            if not args.no_page:
                facts["screenshots"] = page_checks(owui, peer, keys, found, tmp, args.out, c)
            nothing_charged_to_the_revoked_key(peer, keys, found, c)
            log = owui.log()
            facts["open_webui_unreachable_attempts"] = log.count("Network is unreachable")
            c.add("Open WebUI's log has no traceback", "Traceback" not in log,
                  f"{log.count('Traceback')} tracebacks")  # fmt: skip
        except Exception as exc:  # a broken start is a failed check, with the logs' tails
            c.add("run", False, f"{type(exc).__name__}: {exc}")
            for part in (peer, owui):
                if part is not None:
                    print(f"--- {type(part).__name__} log tail ---\n{part.log()[-2000:]}")
        finally:
            if owui is not None:
                owui.stop()
            if peer is not None:
                peer.stop()
    print("\n" + c.table())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": started.isoformat(timespec="seconds"), **facts, "checks": c.rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if c.rows and all(r["ok"] for r in c.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
