"""A forwarded Responses stream whose host dies mid-way (docs/forward.md says why it is not
resumed as chat streams are): the client gets the whole events sent so far, then an error
and the end of the stream, and the official openai client raises instead of waiting; no
other replica is asked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import openai
import pytest
from aiohttp import web

from tests.unit.test_forward import front  # noqa: F401  (the fixture)


def responses_upstream(words: list[str], die_after: int | None = None):
    """A replica streaming Responses events, one delta per word; it can die after some."""
    seen = SimpleNamespace(bodies=[])

    def event(kind: str, **data) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.bodies.append(json.loads(await request.read()))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        obj = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
        await resp.write(event("response.created", response=obj, sequence_number=0))
        for i, word in enumerate(words):
            if die_after is not None and i == die_after:
                await resp.write(b'event: response.output_text.delta\ndata: {"del')
                request.transport.abort()  # half an event, then the host is gone
                return resp
            delta = {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": word}
            await resp.write(event("response.output_text.delta", sequence_number=i + 1, **delta))
        final = {**obj, "status": "completed"}
        await resp.write(event("response.completed", response=final, sequence_number=99))
        return resp

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", handle)
    return app, seen


async def test_a_responses_stream_whose_host_dies_ends_with_an_error(front):  # noqa: F811
    await front.add(responses_upstream(["One", " two", " three"], die_after=2), "a", depth=0)
    b = await front.add(responses_upstream([" three"]), "b", depth=5)
    client = openai.AsyncOpenAI(
        base_url=str(front.client.make_url("/v1")), api_key="x", max_retries=0
    )
    stream = await client.responses.create(model="m", input="count", stream=True)
    kinds, text = [], ""
    with pytest.raises(openai.APIError, match="replica a"):
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
    assert kinds == ["response.created"] + ["response.output_text.delta"] * 2
    assert text == "One two"  # whole events only: the broken half never reached the client
    assert b.bodies == []  # not resumed elsewhere
    assert front.reported == ["a"]
    await client.close()


async def test_the_broken_stream_ends_with_the_responses_error_event(front):  # noqa: F811
    """A Responses client that is not the SDK (Codex CLI, the Agents SDK's raw reader) reads
    the stream's own `error` event; the `error` object in it is what the SDK raises on."""
    await front.add(responses_upstream(["One", " two"], die_after=1), "a", depth=0)
    resp = await front.client.post(
        "/v1/responses", json={"model": "m", "input": "x", "stream": True}
    )
    text = await resp.text()
    blocks = [b for b in text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    head, data = blocks[-2].split("\n")
    assert head == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error" and error["code"] == "server_error"
    assert "replica a" in error["message"] and error["error"]["message"] == error["message"]
