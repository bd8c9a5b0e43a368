"""The dashboard in a real headless Chromium: it renders the cluster from /cluster/status."""

import shutil
import subprocess

import pytest

from aivailable.local_peers import PeerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Flags for a closed network: no background fetches, no sandbox as root, fresh profile.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def rendered_dom(url: str, profile) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "the dashboard test needs Chromium (Debian package chromium; .ci/run installs it)"
        )
    result = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout


def test_the_dashboard_shows_nodes_gpus_and_models(tmp_path, monkeypatch):
    """With auth on: the page gets the admin key from its #key= link (kept in sessionStorage)."""
    peer = PeerProcess(
        tmp_path, "dash", "--no-mdns", "--auth", "on", "--gpu", "fake:GTX 1080:8GiB"
    ).start()
    try:
        peer.wait_healthy()
        key_file = peer.data_dir / "admin.key"
        peer.wait_until(key_file.exists, 60, "the admin key")
        admin = key_file.read_text().strip()
        monkeypatch.setenv("AIVAILABLE_API_KEY", admin)  # for wait_model_ready's status calls
        peer.wait_model_ready()
        locked = rendered_dom(peer.url + "/", tmp_path / "profile-nokey")
        dom = rendered_dom(peer.url + "/#key=" + admin, tmp_path / "profile")
    finally:
        peer.stop()
    assert "needs an API key" in locked and "<h3>dash" not in locked
    assert "<h3>dash" in dom  # the node card, built by the page's script
    assert "GTX 1080 (fake)" in dom and "/ 8.0 GiB" in dom  # the GPU with its VRAM bar
    assert "<td>smollm2-135m</td>" in dom and 'class="state ready"' in dom
    assert "leader dash" in dom
