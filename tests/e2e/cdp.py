"""A real headless Chromium driven over the DevTools protocol (the `websockets` package):
enough to open a page, run JavaScript in it and wait for what the page shows."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import websockets

from aivailable.local_peers import free_port

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


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise AssertionError(
            "the browser tests need Chromium (Debian package chromium; .ci/run installs it)"
        )
    return path


class Browser:
    def __init__(self, profile: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                chromium_path(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={self.port}",
                "--remote-debugging-address=127.0.0.1",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ws = None
        self._ids = 0

    async def __aenter__(self) -> Browser:
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = await asyncio.to_thread(self._pages)
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("Chromium did not open its DevTools port")
            await asyncio.sleep(0.2)
        self._ws = await websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=1 << 24)
        return self

    def _pages(self) -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
            return [t for t in json.load(r) if t["type"] == "page"]

    def _pages(self) -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
            return [t for t in json.load(r) if t["type"] == "page"]

    async def __aexit__(self, *exc) -> None:
        if self._ws is not None:
            await self._ws.close()
        self.proc.kill()
        self.proc.wait(10)

    async def call(self, method: str, **params) -> dict:
        self._ids += 1
        my_id = self._ids
        await self._ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def js(self, expression: str):
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 60, what: str = "") -> object:
        """Poll until `expression` is truthy (a DOM node does not cross the protocol as a
        value: test for it with `!!`)."""
        deadline = time.monotonic() + within
        while True:
            try:
                value = await self.js(expression)
            except AssertionError:
                value = None  # the page may be between loads
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the page never showed {what or expression} within {within} s"
                )
            await asyncio.sleep(0.25)
