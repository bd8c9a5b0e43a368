"""A real peer process serving the real SmolLM2 model, driven by the official openai client.

The peer runs with auth on: the client uses a user key made with the admin key the peer
wrote to its data dir; status and metrics calls use the admin key ($AIVAILABLE_API_KEY).
"""

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from aivailable.local_peers import PeerProcess, get_json

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    peer = PeerProcess(tmp_path_factory.mktemp("e2e"), "solo", "--no-mdns", "--auth", "on").start()
    saved = os.environ.get("AIVAILABLE_API_KEY")
    try:
        peer.wait_healthy()
        key_file = peer.data_dir / "admin.key"
        peer.wait_until(key_file.exists, 60, "the admin key")
        os.environ["AIVAILABLE_API_KEY"] = key_file.read_text().strip()  # get_json, the CLI
        peer.wait_model_ready()
        yield peer
    finally:
        peer.stop()
        if saved is None:
            os.environ.pop("AIVAILABLE_API_KEY", None)
        else:
            os.environ["AIVAILABLE_API_KEY"] = saved


def admin_get(url: str) -> str:
    headers = {"Authorization": "Bearer " + os.environ["AIVAILABLE_API_KEY"]}
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=10).read().decode()


@pytest.fixture(scope="module")
def user_key(peer) -> str:
    request = urllib.request.Request(
        peer.url + "/cluster/keys",
        data=json.dumps({"role": "user", "name": "e2e"}).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer " + os.environ["AIVAILABLE_API_KEY"],
        },
    )
    return json.loads(urllib.request.urlopen(request, timeout=30).read())["key"]


@pytest.fixture
def client(peer, user_key):
    return openai.OpenAI(base_url=peer.url + "/v1", api_key=user_key, max_retries=0, timeout=120)


def test_a_wrong_key_is_refused_the_way_openai_refuses_it(peer):
    wrong = openai.OpenAI(base_url=peer.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.code == "invalid_api_key"


def instance(peer) -> dict:
    return next(i for i in peer.status()["nodes"][0]["instances"] if i["model"] == MODEL)


def test_models_lists_the_embedded_model(client):
    assert MODEL in [m.id for m in client.models.list()]


def test_chat_without_streaming_answers_with_usage(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 24


def test_chat_streams_tokens(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=24,
            temperature=0,  # a sampled answer may be two words long
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert text.strip() and len(content_chunks) > 1
    # One chunk per token, or fewer: tokens ready together travel in one chunk.
    assert len(content_chunks) <= chunks[-1].usage.completion_tokens <= 24


def test_completions_with_and_without_streaming(client):
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text and reply.usage.completion_tokens <= 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert streamed == reply.choices[0].text  # greedy decoding is deterministic


def test_max_tokens_stops_with_length(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 100."}],
        max_tokens=5,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5


def test_seeded_sampling_repeats(client):
    def ask():
        return (
            client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=16, temperature=0.9, seed=1234
            )
            .choices[0]
            .message.content
        )

    assert ask() == ask()


def test_error_cases_get_openai_errors_and_the_peer_keeps_serving(client, peer):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature="hot")
    request = urllib.request.Request(
        peer.url + "/v1/chat/completions",
        data=b"{oops",
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + client.api_key},
    )
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=10)
    assert raw.value.code == 400 and "error" in json.loads(raw.value.read())
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4).choices


def test_eight_parallel_streaming_clients_all_complete(peer, user_key):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Name a colour. ({i})"}],
            max_tokens=12,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return "".join(pieces)

    async def main():
        async with openai.AsyncOpenAI(
            base_url=peer.url + "/v1", api_key=user_key, max_retries=0, timeout=300
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    answers = asyncio.run(main())
    assert len(answers) == 8 and all(a.strip() for a in answers)


def test_a_client_that_disconnects_frees_its_slot(client, peer):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story."}],
        max_tokens=1500,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while instance(peer)["queue_depth"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert instance(peer)["queue_depth"] == 0
    metrics = admin_get(peer.url + "/metrics")
    assert f'aivailable_client_disconnects_total{{model="{MODEL}"}}' in metrics


def test_a_killed_worker_is_reported_restarted_and_serves_again(client, peer):
    before = instance(peer)
    os.kill(before["pid"], signal.SIGKILL)
    peer.wait_until(
        lambda: instance(peer)["restarts"] == before["restarts"] + 1,
        60,
        "the restart to be reported",
    )
    peer.wait_model_ready()
    after = instance(peer)
    assert after["pid"] != before["pid"]
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert reply.choices[0].message.content
    metrics = admin_get(peer.url + "/metrics")
    assert f'aivailable_engine_restarts{{model="{MODEL}"}} 1.0' in metrics
    assert get_json(peer.url + "/healthz")["status"] == "ok"


def test_the_cli_chats_and_shows_status(peer):
    import subprocess
    import sys

    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "aivailable",
            "chat",
            "--url",
            peer.url,
            "--max-tokens",
            "12",
            "Say hi.",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    status = subprocess.run(
        [sys.executable, "-m", "aivailable", "status", "--url", peer.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert status.returncode == 0, status.stderr
    assert "solo" in status.stdout and "smollm2-135m" in status.stdout and "ready" in status.stdout
