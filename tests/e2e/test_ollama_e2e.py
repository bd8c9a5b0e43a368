"""The official `ollama` Python client against a real peer serving the real model, and
through a routing-only peer of the same cluster."""

import ollama
import pytest

from aivailable.local_peers import PeerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ollama")
    key = tmp / "cluster.key"
    host = PeerProcess(tmp, "host", "--no-mdns", "--cluster-key-file", str(key)).start()
    router = None
    try:
        host.wait_healthy()
        host.wait_model_ready()
        router = PeerProcess(
            tmp,
            "router",
            "--no-mdns",
            "--cluster-key-file",
            str(key),
            "--cpu",
            "no",
            "--model",
            "none",
            "--join",
            f"127.0.0.1:{host.port}",
        ).start()
        router.wait_healthy()
        router.wait_until(
            lambda: MODEL in [m["name"] for m in router.status()["models"]],
            60,
            "the model to be known",
        )
        yield host, router
    finally:
        if router is not None:
            router.stop()
        host.stop()


@pytest.mark.parametrize("via", ["host", "router"])
def test_list_show_chat_and_generate(peers, via):
    peer = peers[0] if via == "host" else peers[1]
    client = ollama.Client(host=peer.url, timeout=120)
    import httpx

    assert httpx.get(peer.url + "/api/version").json()["version"]  # the client has no call
    names = [m.model for m in client.list().models]
    assert f"{MODEL}:latest" in names
    assert client.show(f"{MODEL}:latest").modelinfo["context_length"] > 0
    reply = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi."}],
        options={"temperature": 0, "num_predict": 12},
    )
    assert reply.message.role == "assistant" and reply.message.content.strip() and reply.done
    assert 0 < reply.eval_count <= 12 and reply.prompt_eval_count > 5
    parts = list(
        client.chat(
            model=f"{MODEL}:latest",
            messages=[{"role": "user", "content": "Say hi."}],
            options={"temperature": 0, "num_predict": 12},
            stream=True,
        )
    )
    assert "".join(p.message.content for p in parts) == reply.message.content  # greedy: same text
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    generated = client.generate(
        model=MODEL, prompt="The capital of France is", options={"num_predict": 6, "temperature": 0}
    )
    assert generated.response and generated.done


def test_json_format_and_errors(peers):
    client = ollama.Client(host=peers[0].url, timeout=120)
    reply = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "A cat as JSON with name and age."}],
        format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    import json

    assert isinstance(json.loads(reply.message.content), dict)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    ps = client.ps()
    assert [m.model for m in ps.models] == [f"{MODEL}:latest"]
