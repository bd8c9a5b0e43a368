"""A user who types a Hugging Face model name: a real peer process deploys
`hf://ORG/REPO:QUANT`, downloads the real SmolLM2 GGUF from the imitation Hugging Face
server (tests/unit/hf_imitation.py, on loopback: this machine has no internet) through the
code path of a real download, checks it against the published SHA-256, and answers the
official openai client with it."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import openai
import pytest

from aivailable import cli
from aivailable.local_peers import PeerProcess
from aivailable.models import store
from tests.unit.hf_imitation import ImitationHub, Repo

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
FILE = "smollm2-135m-instruct-q4_1.gguf"


@pytest.fixture(scope="module")
def hf():
    """The imitation hub in a thread of its own, serving the embedded model's real bytes."""
    model = store.resolve("builtin:smollm2-135m").path.read_bytes()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="imitation-hf", daemon=True)
    thread.start()
    imitation = ImitationHub()
    imitation.repos[REPO] = Repo({FILE: model, "README.md": b"# SmolLM2\n"})
    asyncio.run_coroutine_threadsafe(imitation.__aenter__(), loop).result(30)
    try:
        yield imitation
    finally:
        asyncio.run_coroutine_threadsafe(imitation.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_hugging_face_model_name_is_deployed_downloaded_verified_and_served(hf, tmp_path):
    env = {"HF_ENDPOINT": hf.endpoint, "AIVAILABLE_CACHE_DIR": str(tmp_path / "cache")}
    peer = PeerProcess(tmp_path, "solo", "--no-mdns", "--model", "none", env=env).start()
    try:
        peer.wait_healthy()
        source = f"hf://{REPO}:Q4_1"
        args = ["deploy", source, "--name", "smol-hf", "--url", peer.url]
        assert cli.main(args) == 0
        model = next(m for m in peer.status()["models"] if m["name"] == "smol-hf")
        assert model["source"] == source
        peer.wait_model_ready("smol-hf")
        client = openai.OpenAI(base_url=peer.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="smol-hf",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            temperature=0,
        )
        assert reply.choices[0].message.content.strip()
    finally:
        peer.stop()
    cached = tmp_path / "cache" / "models" / "hf" / REPO / "main" / FILE
    expected = hashlib.sha256(hf.repos[REPO].files[FILE]).hexdigest()
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == expected
    assert [r.method for r in hf.served(f"/{REPO}/")] == ["GET"]  # the download itself
    assert len(hf.served("/cdn/")) == 1 and hf.served("/api/models/")  # listed to pick
