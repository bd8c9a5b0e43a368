"""A limited key against real peers with auth on: a host serving the real model and a
routing-only peer that forwards to it over the TLS peer channel. The key is charged what the
engine counted, whatever API and however it streams, and sees only the models it was given.
Driven by the official ollama and openai clients."""

import json
import urllib.request

import ollama
import openai
import pytest

from aivailable.local_peers import PeerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Say hello."}]


def call(url: str, key: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    key = tmp / "cluster.key"
    common = ("--no-mdns", "--auth", "on", "--cluster-key-file", str(key))
    host = PeerProcess(tmp, "host", *common).start()
    router = None
    try:
        host.wait_healthy()
        admin_file = host.data_dir / "admin.key"
        host.wait_until(admin_file.exists, 60, "the admin key")
        admin = admin_file.read_text().strip()
        host.wait_until(
            lambda: any(
                p["state"] == "ready"
                for m in call(host.url + "/cluster/status", admin)["models"]
                for p in m["placements"]
            ),
            180,
            "the model to be ready",
        )
        router = PeerProcess(
            tmp, "router", *common, "--cpu", "no", "--model", "none",
            "--join", f"127.0.0.1:{host.port}",
        ).start()  # fmt: skip
        router.wait_healthy()
        router.wait_until(
            lambda: (
                MODEL in [m["name"] for m in call(router.url + "/cluster/status", admin)["models"]]
            ),
            60,
            "the router to know the model",
        )
        yield host, router, admin
    finally:
        if router is not None:
            router.stop()
        host.stop()


def make_key(peer, admin: str, **fields) -> tuple[str, str]:
    made = call(peer.url + "/cluster/keys", admin, {"role": "user", **fields})
    return made["key"], made["id"]


def charged(peer, admin: str, key_id: str) -> int:
    keys = call(peer.url + "/cluster/keys", admin)["data"]
    return next(k["tokens_1m"] for k in keys if k["id"] == key_id)


def test_tpm_holds_through_the_routing_only_peer(peers):
    host, router, admin = peers
    key, key_id = make_key(router, admin, tpm=200, name="course")
    client = ollama.Client(host=router.url, timeout=120, headers={"Authorization": f"Bearer {key}"})
    engine_counts = 0
    refused = None
    for i in range(30):
        try:
            if i % 3 == 0:  # a stream, charged what it used, not its bound
                parts = list(
                    client.chat(
                        model=MODEL, messages=HELLO, stream=True, options={"num_predict": 12}
                    )
                )
                last = parts[-1]
            elif i % 3 == 1:
                last = client.generate(model=MODEL, prompt="Say hi.", options={"num_predict": 12})
            else:
                last = client.chat(model=MODEL, messages=HELLO, options={"num_predict": 12})
        except ollama.ResponseError as exc:
            refused = exc
            break
        engine_counts += last.prompt_eval_count + last.eval_count
        # The entry peer charged what the host's engine counted, answer by answer.
        assert charged(router, admin, key_id) == engine_counts
    assert refused is not None and refused.status_code == 429
    assert engine_counts >= 200
    # The OpenAI route is held by the same limit.
    oai = openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)


def test_a_scoped_key_sees_and_uses_only_its_models(peers):
    host, router, admin = peers
    key, _ = make_key(host, admin, models="some-other-model")
    for peer in (host, router):
        client = ollama.Client(host=peer.url, headers={"Authorization": f"Bearer {key}"})
        assert client.list().models == []
        assert client.ps().models == []
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(model=MODEL, messages=HELLO)
        assert refused.value.status_code == 404
        oai = openai.OpenAI(base_url=peer.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in oai.models.list()] == []
        with pytest.raises(openai.PermissionDeniedError):
            oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)


def test_num_predict_over_the_limit_is_refused(peers):
    host, router, admin = peers
    key, _ = make_key(host, admin)
    client = ollama.Client(host=router.url, headers={"Authorization": f"Bearer {key}"})
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model=MODEL, messages=HELLO, options={"num_predict": 1 << 20})
    assert refused.value.status_code == 400 and "num_predict" in str(refused.value)
