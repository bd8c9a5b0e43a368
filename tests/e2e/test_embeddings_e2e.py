"""Embeddings from a real peer: the embedded SmolLM2 deployed as an embedding model, used
through the official openai client and langchain-openai's OpenAIEmbeddings."""

import base64
import json
import math
import struct
import urllib.request

import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from aivailable.local_peers import PeerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "smol-embed"
DIMENSIONS = 576  # SmolLM2-135M's hidden size


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    peer = PeerProcess(
        tmp_path_factory.mktemp("embed"), "solo", "--no-mdns", "--model", "none"
    ).start()
    try:
        peer.wait_healthy()
        deploy = {
            "name": MODEL,
            "source": "builtin:smollm2-135m",
            "kind": "embedding",
            "n_parallel": 1,
        }
        assert post_json(peer.url + "/cluster/models", deploy)["kind"] == "embedding"
        peer.wait_model_ready(MODEL)
        yield peer
    finally:
        peer.stop()


def test_openai_embeddings(peer):
    client = openai.OpenAI(base_url=peer.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.embeddings.create(
        model=MODEL, input=["a red apple", "a red apple", "a blue car"]
    )
    vectors = [d.embedding for d in reply.data]
    assert all(len(v) == DIMENSIONS for v in vectors)
    assert vectors[0] == vectors[1] != vectors[2]  # equal inputs, equal vectors
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    assert reply.usage.prompt_tokens > 0
    # One by one gives the same vectors as a batch.
    alone = client.embeddings.create(model=MODEL, input="a blue car").data[0].embedding
    assert alone == pytest.approx(vectors[2], abs=1e-6)
    # base64: little-endian float32, as OpenAI sends it.
    b64 = client.embeddings.create(model=MODEL, input="a blue car", encoding_format="base64")
    packed = base64.b64decode(b64.data[0].embedding)
    assert struct.unpack(f"<{DIMENSIONS}f", packed) == pytest.approx(vectors[2], abs=1e-6)
    with pytest.raises(openai.BadRequestError):  # a chat against an embedding model
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_langchain_openai_embeddings(peer):
    embeddings = OpenAIEmbeddings(
        model=MODEL,
        base_url=peer.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,  # no tiktoken: the texts go as they are
    )
    docs = embeddings.embed_documents(["the cat sat", "on the mat"])
    query = embeddings.embed_query("the cat sat")
    assert len(docs) == 2 and len(query) == DIMENSIONS
    assert query == pytest.approx(docs[0], abs=1e-6)
