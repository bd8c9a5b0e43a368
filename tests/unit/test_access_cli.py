"""`aivailable keys` and the CLI's key lookup, against a real peer app (in a thread)."""

import asyncio
import threading

import pytest
from aiohttp import web

from aivailable import cli, http_client
from tests.unit.test_access_guard import Peer


@pytest.fixture
def peer_url(monkeypatch):
    """The guarded app of test_access_guard on a real socket, served from its own loop."""
    monkeypatch.delenv("AIVAILABLE_API_KEY", raising=False)
    peer = Peer()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(peer.app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield peer, f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.run_until_complete(runner.cleanup())
    loop.close()
    http_client.set_api_key(None)


def test_keys_create_list_revoke_with_the_data_dirs_admin_key(
    peer_url, tmp_path, capsys, monkeypatch
):
    peer, url = peer_url
    admin, _ = peer.add_key("admin")
    (tmp_path / "admin.key").write_text(admin + "\n")
    common = ["--url", url, "--data-dir", str(tmp_path)]
    assert cli.main(["status", "--url", url, "--api-key", "wrong"]) == 1
    assert "401" in capsys.readouterr().err
    argv = ["keys", "create", "--role", "user", "--models", "a", "--rpm", "5", "--name", "lab"]
    assert cli.main([*argv, *common]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert secret.startswith("aiv-") and "shown this once" in out.err
    record = peer.state.access.lookup(secret, 0)
    assert record.models == ("a",) and record.rpm == 5 and record.name == "lab"
    assert cli.main(["keys", "list", *common]) == 0
    listing = capsys.readouterr().out
    assert record.id in listing and "lab" in listing and secret not in listing
    # The new user key may chat but not manage keys; the environment supplies it.
    http_client.set_api_key(None)
    monkeypatch.setenv("AIVAILABLE_API_KEY", secret)
    assert cli.main(["keys", "list", "--url", url]) == 1
    assert "403" in capsys.readouterr().err
    monkeypatch.delenv("AIVAILABLE_API_KEY")
    assert cli.main(["keys", "revoke", record.id, *common]) == 0
    assert peer.state.access.lookup(secret, 0) is None


def test_the_key_comes_from_the_flag_then_the_environment_then_the_data_dir(tmp_path):
    (tmp_path / "admin.key").write_text("from-file\n")
    parse = cli.build_parser().parse_args
    args = parse(["status", "--data-dir", str(tmp_path), "--api-key", "from-flag"])
    assert cli.client_key(args, {"AIVAILABLE_API_KEY": "from-env"}) == "from-flag"
    args = parse(["status", "--data-dir", str(tmp_path)])
    assert cli.client_key(args, {"AIVAILABLE_API_KEY": "from-env"}) == "from-env"
    assert cli.client_key(args, {}) == "from-file"
    args = parse(["status", "--data-dir", str(tmp_path / "none")])
    assert cli.client_key(args, {}) is None


def test_up_refuses_auth_off_on_a_lan_bind(capsys):
    assert cli.main(["up", "--bind", "0.0.0.0", "--auth", "off", "--port", "1"]) == 2
    assert "--auth off is refused" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["up", "--auth", "on", "--admin-key-file", "/x/k"])
    overrides = cli._up_overrides(args)
    assert overrides["auth_mode"] == "on" and overrides["admin_key_file"] == "/x/k"
