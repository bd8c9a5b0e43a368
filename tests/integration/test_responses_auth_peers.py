"""Stored responses across real peers with auth on (`--auth on`, user keys): a conversation
continued with `previous_response_id` on another host than the one that answered, and through
a routing-only peer, with the official openai client; GET and DELETE of a response through
any peer; another user key can neither read, delete nor continue it, an admin key can read
it; and the peers' own route (`/internal/responses/{id}`) refuses anything unsigned."""

from __future__ import annotations

import openai
import pytest

from aivailable.api.responses_store import node_of
from peer.auth import PeerAuth
from tests.integration.test_access_peers import auth_cluster, http, poll  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def ready_on(peer, admin: str) -> set[str]:
    """The nodes where `peer` sees a ready replica of MODEL."""
    status, body, _ = http("GET", peer.url + "/cluster/status", key=admin)
    if status != 200:
        return set()
    return {
        p["node"]
        for m in body["models"]
        if m["name"] == MODEL
        for p in m["placements"]
        if p["state"] == "ready"
    }


def test_stored_responses_cross_peers_with_auth_on(auth_cluster):  # noqa: F811  (the fixture)
    a = auth_cluster.add("a", "--gpu", "fake:G:8GiB")
    b = auth_cluster.add("b", "--gpu", "fake:G:8GiB")
    router = auth_cluster.add("c", "--cpu", "no")  # no device: it only routes
    admin = auth_cluster.admin_key()
    deploy = {"source": "builtin:smollm2-135m", "replicas": 2}
    poll(
        lambda: http("POST", a.url + "/cluster/models", deploy, admin)[0] in (200, 201, 202),
        60,
        "the deploy",
    )
    for peer in (a, b, router):
        poll(lambda p=peer: ready_on(p, admin) == {"a", "b"}, 300, f"{peer.name} to see both")
    keys = []
    for name in ("alice", "bob"):
        status, made, _ = http(
            "POST", a.url + "/cluster/keys", {"role": "user", "name": name}, admin
        )
        assert status == 201
        keys.append(made["key"])
    alice, bob = keys
    for peer in (a, b, router):
        poll(lambda p=peer: http("GET", p.url + "/v1/models", key=bob)[0] == 200, 10, "keys")

    def client(peer, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=peer.url + "/v1", api_key=key, max_retries=0, timeout=120)

    # The first turn answered (and kept) on a, the second on b, which fetches the history.
    first = client(a, alice).responses.create(model=MODEL, input="Say hi.", max_output_tokens=8)
    assert node_of(first.id) == "a" and first.output_text
    second = client(b, alice).responses.create(
        model=MODEL, input="Again.", previous_response_id=first.id, max_output_tokens=8
    )
    assert node_of(second.id) == "b"
    assert second.usage.input_tokens > first.usage.input_tokens  # the history was in it
    # Through the routing-only peer: forwarded to a host, which finds b's turn on b.
    third = client(router, alice).responses.create(
        model=MODEL, input="Once more.", previous_response_id=second.id, max_output_tokens=8
    )
    assert node_of(third.id) in ("a", "b")
    assert third.usage.input_tokens > second.usage.input_tokens
    for peer in (a, b, router):  # any peer finds any of alice's responses
        for turn in (first, second, third):
            assert client(peer, alice).responses.retrieve(turn.id).output_text == turn.output_text

    # Bob can neither read, delete nor continue alice's conversation, from any peer.
    for peer in (a, b, router):
        with pytest.raises(openai.NotFoundError):
            client(peer, bob).responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            client(peer, bob).responses.delete(second.id)
    with pytest.raises(openai.NotFoundError) as refused:
        client(router, bob).responses.create(
            model=MODEL, input="Mine now.", previous_response_id=first.id, max_output_tokens=4
        )
    assert refused.value.body["param"] == "previous_response_id"
    # An admin key may read any response, from any peer.
    assert client(router, admin).responses.retrieve(first.id).output_text == first.output_text
    # Without a key, nothing.
    assert http("GET", router.url + f"/v1/responses/{first.id}")[0] == 401

    # The peers' own route: unsigned is refused, with no key, a user key or the admin key;
    # signed with the cluster's secret for that peer it answers, for another peer it is not.
    path = f"/internal/responses/{first.id}"
    for key in (None, alice, admin):
        for method in ("GET", "DELETE"):
            status, body, _ = http(method, a.url + path, key=key)
            assert status == 401, (method, key, body)
    signer = PeerAuth(auth_cluster.secret)
    for_a = signer.signed_headers("GET", path, b"", f"127.0.0.1:{a.port}")
    assert http("GET", b.url + path, headers=for_a)[0] == 401  # meant for a, sent to b
    status, record, _ = http("GET", a.url + path, headers=for_a)
    assert status == 200 and record["response"]["id"] == first.id
    stranger = PeerAuth(b"another cluster's secret, 32 b.")
    forged = stranger.signed_headers("GET", path, b"", f"127.0.0.1:{a.port}")
    assert http("GET", a.url + path, headers=forged)[0] == 401

    # Alice deletes her first turn through the router: gone from a, for everyone.
    client(router, alice).responses.delete(first.id)
    for peer in (a, b):
        with pytest.raises(openai.NotFoundError):
            client(peer, alice).responses.retrieve(first.id)
    assert client(b, alice).responses.retrieve(second.id).output_text == second.output_text
