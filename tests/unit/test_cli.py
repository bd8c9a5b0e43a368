"""The CLI: flags reach the config, bad input is a clear error, status renders as tables."""

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from rich.console import Console

from aivailable import cli
from aivailable.status_view import render_status, vram_bar

STATUS = {
    "node_id": "a",
    "leader": "a",
    "term": 3,
    "nodes": [
        {
            "id": "a",
            "addr": "127.0.0.1:1",
            "state": "alive",
            "gpus": [
                {
                    "id": "a/gpu0",
                    "vendor": "fake",
                    "name": "GTX 1080",
                    "vram_total": 8 << 30,
                    "vram_free": 6 << 30,
                }
            ],
            "instances": [{"model": "m", "state": "ready"}],
        },
        {"id": "c", "addr": "127.0.0.1:3", "state": "dead", "gpus": [], "instances": []},
    ],
    "models": [
        {
            "name": "m",
            "replicas": 1,
            "placements": [{"node": "a", "gpus": ["a/gpu0"], "state": "ready"}],
        }
    ],
}


def test_up_flags_become_config_overrides():
    args = cli.build_parser().parse_args(
        [
            "up",
            "--name",
            "n1",
            "--port",
            "9000",
            "--gpu",
            "fake:GTX 1080:8GiB",
            "--gpu",
            "fake:RX 580:8GiB",
            "--join",
            "h:1",
            "--no-mdns",
        ]
    )
    overrides = cli._up_overrides(args)
    assert overrides["gpu"] == ["fake:GTX 1080:8GiB", "fake:RX 580:8GiB"]
    assert overrides["mdns"] is False and overrides["port"] == 9000 and overrides["join"] == ["h:1"]


def test_up_rejects_a_bad_fake_gpu_before_starting(capsys):
    assert cli.main(["up", "--gpu", "fake:broken", "--port", "1"]) == 2
    assert "fake" in capsys.readouterr().err


def test_vram_bar_shows_used_over_total():
    assert vram_bar(8 << 30, 6 << 30, width=4) == "[#---] 2.0 GiB/8.0 GiB"
    assert vram_bar(0, 0) == "-"


def test_status_renders_nodes_gpus_and_models():
    out = io.StringIO()
    render_status(STATUS, Console(file=out, width=160, color_system=None))
    text = out.getvalue()
    for expected in ("leader a", "GTX 1080", "2.0 GiB/8.0 GiB", "dead", "a[a/gpu0] ready"):
        assert expected in text


GET_PATHS: list[str] = []  # what the fake peer was asked for, in order


@pytest.fixture
def fake_peer():
    """A stand-in peer answering /cluster/status and refusing deploys, on a real socket."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            GET_PATHS.append(self.path)
            body = json.dumps(STATUS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = json.dumps({"error": {"message": "'replicas' must be an integer"}}).encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def test_status_command_prints_json(fake_peer, capsys):
    assert cli.main(["status", "--url", fake_peer, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["leader"] == "a"


def test_status_and_models_read_consistently_when_asked(fake_peer, capsys):
    assert cli.main(["models", "--url", fake_peer, "--json"]) == 0
    assert cli.main(["status", "--url", fake_peer, "--json", "--consistent"]) == 0
    assert cli.main(["models", "--url", fake_peer, "--json", "--consistent"]) == 0
    assert GET_PATHS[-3:] == [
        "/cluster/status",
        "/cluster/status?consistent=1",
        "/cluster/status?consistent=1",
    ]


def test_client_errors_are_one_clear_line(fake_peer, capsys):
    assert cli.main(["deploy", "builtin:x", "--url", fake_peer]) == 1
    assert "400: 'replicas' must be an integer" in capsys.readouterr().err
    assert cli.main(["status", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_a_join_token_carries_the_secret_and_seeds(tmp_path, capsys):
    from aivailable.config import load_config
    from peer.secret import SecretError, load_or_create_secret, read_secret

    (tmp_path / "a").mkdir()
    secret = load_or_create_secret(tmp_path / "a" / "cluster.key")
    assert cli.main(["token", "--data-dir", str(tmp_path / "a"), "--port", "9001"]) == 0
    token = capsys.readouterr().out.strip()
    joiner = load_config({"data_dir": tmp_path / "b", "join": ["x:1"]}, environ={})
    joined = cli.use_token(token, joiner)
    assert read_secret(tmp_path / "b" / "cluster.key") == secret
    assert joined.join == ("x:1", "127.0.0.1:9001")
    other = load_config({"data_dir": tmp_path / "c"}, environ={})
    (tmp_path / "c").mkdir()
    load_or_create_secret(tmp_path / "c" / "cluster.key")
    with pytest.raises(SecretError, match="another cluster"):
        cli.use_token(token, other)


def test_token_without_a_secret_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["token", "--data-dir", str(tmp_path)]) == 1
    assert "start a peer first" in capsys.readouterr().err


def test_up_reports_a_full_disk_as_a_full_disk(monkeypatch, tmp_path, capsys):
    import asyncio

    from aivailable import server
    from consensus import StorageFull

    async def serve_on_a_full_disk(config, announce):
        async with asyncio.TaskGroup() as tg:  # as the peer's own TaskGroup wraps it
            tg.create_task(asyncio.to_thread(_raise, StorageFull("the disk is full: test")))

    monkeypatch.setattr(server, "serve", serve_on_a_full_disk)
    assert cli.main(["up", "--port", "1", "--no-mdns", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "cannot serve" not in err


def _raise(exc: Exception) -> None:
    raise exc
