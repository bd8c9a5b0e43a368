"""The dashboard in a real headless Chromium: it renders the cluster from /cluster/status."""

import asyncio
import subprocess

import pytest

from aivailable.local_peers import PeerProcess
from tests.e2e.cdp import CHROMIUM_FLAGS, Browser, chromium_path

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def rendered_dom(url: str, profile) -> str:
    result = subprocess.run(
        [
            chromium_path(),
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
    # its llama.cpp backend (a simulated GPU's is "fake") and that placement may use it
    assert '<span class="backend">fake</span> · usable ·' in dom
    assert "<td>smollm2-135m</td>" in dom and 'class="state ready"' in dom
    assert "leader dash" in dom


def test_a_real_chat_through_the_page_and_live_charts(tmp_path):
    """Two turns typed into the playground stream answers; the load chart gains points and
    shows the tokens; a deploy and an undeploy from the page reach the cluster."""
    peer = PeerProcess(tmp_path, "play", "--no-mdns").start()
    try:
        peer.wait_healthy()
        peer.wait_model_ready()
        asyncio.run(drive_the_page(peer.url, tmp_path / "profile"))
        peer.wait_until(
            lambda: "copy" not in [m["name"] for m in peer.status()["models"]], 60, "the undeploy"
        )
    finally:
        peer.stop()


async def drive_the_page(url: str, profile) -> None:
    async with Browser(profile) as page:
        await page.open(url + "/")
        await page.wait_for("document.querySelector('#model option')?.value", what="the model list")
        for turn, question in enumerate(["Say hello.", "And goodbye?"], start=1):
            await page.js(
                f"document.getElementById('prompt').value = {question!r}; document.getElementById('send').click(); 1"
            )
            await page.wait_for(
                f"document.querySelectorAll('#conversation .msg.assistant[data-done=\"1\"]').length === {turn}",
                120,
                f"answer {turn}",
            )
        messages = await page.js(
            "[...document.querySelectorAll('#conversation .msg')].map(m => [m.className, m.textContent])"
        )
        assert [m[0] for m in messages] == ["msg user", "msg assistant"] * 2
        assert all(m[1].strip() for m in messages) and "[error]" not in "".join(
            m[1] for m in messages
        )
        # The charts are fed by /metrics every 2 s: more points over time, and the chat's tokens.
        chart = "document.querySelector('#charts svg.rate[data-model=\"smollm2-135m\"]')"
        first = int(await page.wait_for(f"{chart}?.dataset.points", 30, "the load chart"))
        await page.wait_for(
            f"Number({chart}.dataset.points) >= {first + 2}", 30, "new chart points"
        )
        await page.wait_for(
            "Number(document.querySelector('#charts svg.rate').dataset.max) > 0 || "
            "document.querySelector('#charts .sub').textContent.includes('peak')",
            30,
            "the token rate",
        )
        # Deploy and undeploy from the page.
        await page.js(
            "document.getElementById('deploy-source').value = 'builtin:smollm2-135m';"
            "document.getElementById('deploy-name').value = 'copy';"
            "document.querySelector('#deploy button').click(); 1"
        )
        row = "!!document.querySelector('#models tr[data-model=\"copy\"]')"
        try:
            await page.wait_for(row, 60, "the new model's row")
        except AssertionError as exc:
            said = await page.js("document.getElementById('deploy-result').textContent")
            raise AssertionError(f"{exc}; the page said: {said!r}") from None
        await page.js("document.querySelector('#models button[data-model=\"copy\"]').click(); 1")
        await page.wait_for(
            "!document.querySelector('#models tr[data-model=\"copy\"]')", 60, "the row to go"
        )
