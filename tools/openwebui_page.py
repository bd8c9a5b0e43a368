"""Open WebUI's own page in headless Chromium (tests/e2e/cdp.py): signed in with the token
its sign-up gave, ask one question the way a user types it, and save a screenshot once the
answer from our peer shows. For tools/check_openwebui.py --screenshot.

    .venv/bin/python tools/openwebui_page.py URL TOKEN OUT.png    # against a running one
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.cdp import Browser  # noqa: E402

QUESTION = "Say hello to the lab in one sentence."
# The last assistant message's text, once Open WebUI has rendered one.
ANSWER_JS = """(() => {
  const all = document.querySelectorAll('#response-content-container');
  const last = all[all.length - 1];
  return last ? last.innerText.trim() : '';
})()"""
DONE_JS = "!!document.querySelector('#continue-response-button')"


async def _chat(url: str, token: str, model: str, profile: Path) -> tuple[str, bytes]:
    async with Browser(profile) as page:
        await page.call("Page.enable")
        await page.call(
            "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
            mobile=False,
        )  # fmt: skip
        await page.open(url + "/auth")
        await page.wait_for("document.readyState === 'complete'", 60, "the sign-in page")
        await page.js(f"localStorage.setItem('token', {json.dumps(token)})")
        await page.open(url + "/")
        await page.wait_for("!!document.querySelector('#chat-input')", 120, "the chat input")
        # A first visit may open the "what's new" dialog over the page.
        await page.js(
            "document.querySelectorAll('button').forEach(b => "
            "{ if (/okay, let's go/i.test(b.innerText)) b.click(); })"
        )
        await page.wait_for(
            f"document.body.innerText.includes({json.dumps(model)})", 60, "the model selected"
        )
        await page.js("document.querySelector('#chat-input').focus()")
        await page.call("Input.insertText", text=QUESTION)
        await page.wait_for(
            "!!document.querySelector('#send-message-button:not([disabled])')", 30, "send"
        )
        await page.js("document.querySelector('#send-message-button').click()")
        # Done when the answer's toolbar shows (an error shows it too).
        await page.wait_for(DONE_JS, 240, "the answer to finish")
        answer = await page.js(ANSWER_JS)
        shot = await page.call("Page.captureScreenshot", format="png")
    return answer, base64.b64decode(shot["data"])


def chat_in_page(url: str, token: str, model: str, profile: Path, out: Path) -> str:
    """The text the page shows as the answer (or as its error); AssertionError when the
    page never showed what it should."""
    answer, png = asyncio.run(_chat(url, token, model, profile))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return answer


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as profile:
        print(
            chat_in_page(sys.argv[1], sys.argv[2], "smollm2-135m", Path(profile), Path(sys.argv[3]))
        )
