"""The Responses API and the usage ledger on real peers (the real model): the official openai
client's responses.create, streamed and not, a function tool round trip and
previous_response_id through another peer than the first turn, directly and through a
routing-only peer; the ledger equals the engines' counts of a scripted set of requests
through every API, reads the same from both peers, and survives a kill -9 of every peer."""

from __future__ import annotations

import json
import signal
import time

import openai
import pytest

from tests.integration.test_access_peers import http, poll
from tests.integration.test_cluster_peers import Cluster
from tests.unit.responses_tools import WEATHER_TOOL

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def totals(peer, consistent: bool = False) -> dict | None:
    status, body, _ = http(
        "GET", peer.url + "/cluster/usage" + ("?consistent=1" if consistent else "")
    )
    if status != 200:
        return None
    rows = [r for r in body["data"] if r["model"] == MODEL]
    return {k: sum(r[k] for r in rows) for k in ("requests", "prompt_tokens", "completion_tokens")}


def served(peer) -> bool:
    return any(
        p["state"] == "ready"
        for m in peer.status()["models"]
        if m["name"] == MODEL
        for p in m["placements"]
    )


def test_responses_and_the_ledger_on_real_peers(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        a, b = cluster.start({"a": ["--gpu", "fake:GTX 1080:8GiB"], "b": ["--cpu", "no"]})
        for peer in (a, b):
            peer.wait_healthy()
        deploy = {"source": "builtin:smollm2-135m", "replicas": 1}
        poll(
            lambda: http("POST", a.url + "/cluster/models", deploy)[0] in (200, 201, 202),
            60,
            "deploy",
        )
        a.wait_model_ready(MODEL, 240)
        b.wait_until(lambda: served(b), 60, "the router to see the replica")  # it runs none
        expected = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

        def spent(prompt: int, completion: int) -> None:
            expected["requests"] += 1
            expected["prompt_tokens"] += prompt
            expected["completion_tokens"] += completion

        host, router = (openai.OpenAI(base_url=p.url + "/v1", api_key="x") for p in (a, b))
        # Not streamed, through the routing-only peer; the next turn on the host.
        first = router.responses.create(model=MODEL, input="Say hello.", max_output_tokens=12)
        spent(first.usage.input_tokens, first.usage.output_tokens)
        assert first.status in ("completed", "incomplete") and first.output_text
        second = host.responses.create(
            model=MODEL, input="Again.", previous_response_id=first.id, max_output_tokens=12
        )
        spent(second.usage.input_tokens, second.usage.output_tokens)
        assert second.usage.input_tokens > first.usage.input_tokens  # the history was in it
        # Streamed, through the router, continuing the host's response.
        stream = router.responses.create(
            model=MODEL,
            input="Once more.",
            previous_response_id=second.id,
            max_output_tokens=12,
            stream=True,
        )
        events = list(stream)
        assert events[0].type == "response.created" and events[-1].type in (
            "response.completed",
            "response.incomplete",
        )
        final = events[-1].response
        spent(final.usage.input_tokens, final.usage.output_tokens)
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == final.output_text
        # A function tool round trip: the grammar makes the answer a call.
        call_turn = router.responses.create(
            model=MODEL,
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_output_tokens=48,
        )
        spent(call_turn.usage.input_tokens, call_turn.usage.output_tokens)
        (call,) = [o for o in call_turn.output if o.type == "function_call"]
        assert call.name == "get_weather" and "city" in json.loads(call.arguments)
        answer = host.responses.create(
            model=MODEL,
            previous_response_id=call_turn.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            max_output_tokens=16,
        )
        spent(answer.usage.input_tokens, answer.usage.output_tokens)
        assert router.responses.retrieve(answer.id).output_text == answer.output_text
        # Every other API, through both peers.
        for peer in (a, b):
            chat = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
            }
            _, body, _ = http("POST", peer.url + "/v1/chat/completions", chat)
            spent(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
            text = {"model": MODEL, "prompt": "One, two,", "max_tokens": 6}
            _, body, _ = http("POST", peer.url + "/v1/completions", text)
            spent(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
            ollama = {**chat, "stream": False, "options": {"num_predict": 8}}
            ollama.pop("max_tokens")
            _, body, _ = http("POST", peer.url + "/api/chat", ollama)
            spent(body["prompt_eval_count"], body["eval_count"])
        # Committed within a flush interval or two, and the same from both peers.
        for peer in (a, b):
            poll(lambda p=peer: totals(p) == expected, 60, f"the ledger on {peer.name}")
        # kill -9 every peer, restart them: the ledger is still the engines' counts.
        for peer in (a, b):
            peer.signal(signal.SIGKILL)
        for peer in (a, b):
            peer.proc.wait(20)
        time.sleep(0.5)
        for peer in (a, b):
            peer.start()
        for peer in (a, b):
            peer.wait_healthy(90)
        a.wait_model_ready(MODEL, 240)
        for peer in (a, b):
            poll(lambda p=peer: totals(p, consistent=True) == expected, 90, "the ledger again")
    finally:
        cluster.stop_all()
