"""The Ollama API on every peer, mapped onto the same engines and forwarding as /v1.

`/api/chat` and `/api/generate` (NDJSON streams, or one object with `"stream": false`),
`/api/tags`, `/api/ps`, `/api/show`, `/api/version`. A request is turned into the
OpenAI-style body that `validate.py` checks (Ollama's `options` become our sampling,
`format` becomes `response_format`), so both APIs share every rule and the grammar
sampler. Models keep their cluster names; an Ollama-style `name:tag` resolves to them.
Errors leave in Ollama's shape, `{"error": "..."}` (api/app.py's error middleware).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from aivailable.api.body import parse_json
from aivailable.api.errors import ApiError, bad_request, not_found
from aivailable.api.inference import Metered, visible_models
from aivailable.api.openai_api import OpenAIApi, engine_error
from aivailable.api.reads import marked, read_mode
from aivailable.api.validate import Parsed, parse_chat, parse_completion, parse_embeddings
from aivailable.backends.base import EngineError, Finished, TextDelta
from peer.forward import HeadersWithFirstChunk

NUM_PREDICT = "num_predict"  # Ollama's name for max_tokens, named in its errors
OLLAMA_VERSION = "0.6.0"  # the Ollama API level this speaks; clients check only its form
# Ollama option -> our request field (num_predict is handled apart: -1 means no limit).
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# What /api/ps says of a model that never expires (keep_alive -1, or a fixed deploy).
NEVER = "9999-12-31T23:59:59Z"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1");
    0 unloads at once, negative keeps it loaded. None when absent."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if value >= 0 else -1.0
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            return -1.0 if sign < 0 else float(text)
        except ValueError:
            pass
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
            return -1.0 if sign < 0 else seconds
    raise bad_request(
        "'keep_alive' must be seconds or a duration like \"5m\" (0 unloads, -1 keeps)",
        param="keep_alive",
    )


class OllamaApi:
    def __init__(self, openai: OpenAIApi, model_info: Callable[[str], dict] | None = None):
        """`model_info(name)`: what the cluster knows of a model (size, sha256, n_ctx)."""
        self._openai = openai
        self._limit = openai.max_tokens_limit  # Config.max_tokens_limit, as for /v1
        self._info = model_info or (lambda name: {})

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/version", self.version),
            web.get("/api/tags", self.tags),
            web.get("/api/ps", self.ps),
            web.post("/api/show", self.show),
            web.post("/api/chat", self.chat),
            web.post("/api/generate", self.generate),
            web.post("/api/embed", self.embed),
            web.post("/api/embeddings", self.embeddings_legacy),
        ]

    # --- models -------------------------------------------------------------------------

    def resolve(self, request: web.Request, name: Any) -> str:
        """An Ollama-style `name[:tag]` to the cluster's model name, among those this
        caller may see (a scoped key is told a model it may not use does not exist)."""
        if not isinstance(name, str) or not name:
            raise bad_request("'model' is required", param="model")
        names = self._openai.model_names(request)
        if name in names:
            return name
        base = name.rsplit(":", 1)[0]
        if base in names:
            return base
        raise not_found(f"model '{name}' not found")

    def _card(self, name: str) -> dict:
        info = self._info(name)
        return {
            "name": f"{name}:latest",
            "model": f"{name}:latest",
            "modified_at": _now(),
            "size": int(info.get("size") or 0),
            "digest": info.get("sha256") or "",
            "details": {
                "format": "gguf",
                "family": "",
                "parameter_size": "",
                "quantization_level": "",
            },
        }

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION})

    async def tags(self, request: web.Request) -> web.Response:
        """`?consistent=1`: a linearizable listing, as for /v1/models (api/reads.py)."""
        mode = await read_mode(request, self._openai.read_barrier)
        names = self._openai.model_names(request)
        return marked(web.json_response({"models": [self._card(n) for n in names]}), mode)

    async def ps(self, request: web.Request) -> web.Response:
        local = visible_models(self._openai.gate, request, self._openai.local_models())
        models = [
            {**self._card(n), "expires_at": self._expires_at(n), "size_vram": 0} for n in local
        ]
        return web.json_response({"models": models})

    def _expires_at(self, name: str) -> str:
        """When this instance goes if no request comes: the last request's keep_alive, else
        the deploy's idle_unload_s, counted from its last request; never for a fixed deploy
        (the cluster's scaling decides, from every replica's idle time)."""
        limit = self._info(name).get("idle_unload_s")
        engine = self._openai.local_engine(name)
        signals = engine.signals() if engine is not None else None
        if signals is not None and signals.keep_alive_s is not None:
            limit = signals.keep_alive_s
        if limit is None or limit < 0 or signals is None:
            return NEVER
        left = max(0.0, limit - signals.idle_s)
        return (datetime.now(UTC) + timedelta(seconds=left)).isoformat().replace("+00:00", "Z")

    async def show(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request)
        name = self.resolve(request, body.get("model") or body.get("name"))
        info = self._info(name)
        return web.json_response(
            {
                "modelfile": f"FROM {name}",
                "parameters": f"num_ctx {info.get('n_ctx', 2048)}",
                "template": "",
                "details": self._card(name)["details"],
                "model_info": {"context_length": info.get("n_ctx", 2048)},
                "capabilities": ["completion", "tools"],
            }
        )

    # --- generation ---------------------------------------------------------------------

    async def _body(self, request: web.Request) -> tuple[dict, bytes]:
        raw = await self._openai.read_body(request)
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body, raw

    def _openai_body(self, body: dict, model: str) -> dict:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise bad_request("'options' must be an object", param="options")
        out: dict[str, Any] = {"model": model, "stream": False}
        for ours, theirs in OPTIONS.items():
            if options.get(ours) is not None:
                out[theirs] = options[ours]
        # -1 (and Ollama's -2, "fill the context") mean "no bound of mine": the limit's.
        predict = options.get("num_predict")
        if predict is not None and (not isinstance(predict, int) or isinstance(predict, bool)):
            raise bad_request("'options.num_predict' must be an integer", param="num_predict")
        if predict is not None and predict > 0:
            out["max_tokens"] = predict
        fmt = body.get("format")
        if fmt == "json":
            out["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, dict):
            out["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "format", "schema": fmt},
            }
        elif fmt not in (None, ""):
            raise bad_request("'format' must be \"json\" or a JSON schema", param="format")
        if body.get("tools"):  # Ollama's clients send [] for none
            out["tools"] = body["tools"]
        return out

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, raw = await self._body(request)
        model = self.resolve(request, body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty list", param="messages")
        clean = [
            {k: m.get(k) for k in ("role", "content", "tool_calls") if k in m}
            for m in messages
            if isinstance(m, dict)
        ]
        for m in clean:  # Ollama's tool calls carry arguments as objects
            for call in m.get("tool_calls") or []:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                if isinstance(fn.get("arguments"), dict):
                    fn["arguments"] = json.dumps(fn["arguments"])
        parsed = parse_chat(
            {**self._openai_body(body, model), "messages": clean}, self._limit, NUM_PREDICT
        )
        return await self._run(request, body, raw, parsed, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body, raw = await self._body(request)
        model = self.resolve(request, body.get("model"))
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string", param="prompt")
        base = self._openai_body(body, model)
        if not prompt and body.get("keep_alive") is not None:
            # Ollama's load/unload idiom (`ollama stop` sends keep_alive 0 and no prompt).
            parsed = parse_chat(
                {**base, "messages": [{"role": "user", "content": " "}]}, self._limit, NUM_PREDICT
            )
            return await self._run(request, body, raw, parsed, chat=False, load_only=True)
        if body.get("raw"):
            parsed = parse_completion({**base, "prompt": prompt or " "}, self._limit, NUM_PREDICT)
        else:
            messages = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            messages.append({"role": "user", "content": prompt})
            parsed = parse_chat({**base, "messages": messages}, self._limit, NUM_PREDICT)
        return await self._run(request, body, raw, parsed, chat=False)

    async def embed(self, request: web.Request) -> web.StreamResponse:
        def answer(body: dict, result) -> dict:
            return {
                "model": body.get("model"),
                "embeddings": [list(v) for v in result.vectors],
                "prompt_eval_count": result.prompt_tokens,
            }

        return await self._embeddings(request, "input", answer)

    async def embeddings_legacy(self, request: web.Request) -> web.StreamResponse:
        """The older /api/embeddings: one `prompt`, one `embedding`."""
        return await self._embeddings(
            request, "prompt", lambda body, result: {"embedding": list(result.vectors[0])}
        )

    async def _embeddings(self, request: web.Request, field: str, answer) -> web.StreamResponse:
        """The embeddings of the inputs under `field`, rendered by `answer(body, result)`."""
        body, raw = await self._body(request)
        model = self.resolve(request, body.get("model"))
        parsed = parse_embeddings({"model": model, "input": body.get(field)})
        async with Metered(self._openai.gate, request, parsed) as meter:
            target = await self._openai.engine_or_forward(request, raw, model)
            if isinstance(target, web.StreamResponse):
                return target
            result = await self._openai.embed(target, model, parsed.request.inputs, meter)
            return meter.json_response(answer(body, result))

    async def _run(
        self,
        request: web.Request,
        body: dict,
        raw: bytes,
        parsed: Parsed,
        chat: bool,
        load_only: bool = False,
    ) -> web.StreamResponse:
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        async with Metered(self._openai.gate, request, parsed) as meter:
            target = await self._openai.engine_or_forward(request, raw, parsed.model)
            if isinstance(target, web.StreamResponse):
                return target  # the host's own Ollama API read keep_alive from the body
            if keep_alive is not None:
                target.keep_alive(keep_alive)
            if load_only:
                done = "unload" if keep_alive == 0 else "load"
                return web.json_response(
                    {
                        "model": body.get("model"),
                        "created_at": _now(),
                        "response": "",
                        "done": True,
                        "done_reason": done,
                    }
                )
            return await self._generate(request, body, target, meter, chat)

    async def _generate(
        self, request: web.Request, body: dict, target, meter: Metered, chat: bool
    ) -> web.StreamResponse:
        parsed = meter.parsed
        stream = body.get("stream", True) is not False
        started = time.monotonic()
        name = body.get("model")

        def piece(text: str) -> dict:
            if chat:
                return {
                    "model": name,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": text},
                    "done": False,
                }
            return {"model": name, "created_at": _now(), "response": text, "done": False}

        def final(text: str, done: Finished) -> dict:
            out = piece(text)
            if chat and parsed.functions:
                from aivailable.api import openai_render

                message, _ = openai_render.chat_message(text, done.finish_reason, parsed)
                if message.get("tool_calls"):
                    calls = [
                        {
                            "function": {
                                "name": c["function"]["name"],
                                "arguments": json.loads(c["function"]["arguments"]),
                            }
                        }
                        for c in message["tool_calls"]
                    ]
                    out["message"] = {"role": "assistant", "content": "", "tool_calls": calls}
            elapsed = int((time.monotonic() - started) * 1e9)
            return {
                **out,
                "done": True,
                "done_reason": "length" if done.finish_reason == "length" else "stop",
                "total_duration": elapsed,
                "prompt_eval_count": done.prompt_tokens,
                "eval_count": done.completion_tokens,
            }

        response: web.StreamResponse | None = None
        ndjson = {"Content-Type": "application/x-ndjson", **meter.headers()}
        pieces: list[str] = []
        try:
            async with contextlib.aclosing(target.generate(parsed.request)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
                        if stream and not parsed.functions:
                            if response is None:
                                response = HeadersWithFirstChunk(headers=ndjson)
                                await response.prepare(request)
                            await response.write(json.dumps(piece(event.text)).encode() + b"\n")
                    elif isinstance(event, Finished):
                        self._openai.count(meter, event)
                        text = "" if stream and not parsed.functions else "".join(pieces)
                        last = final(text, event)
                        if not stream:
                            return meter.json_response(last)
                        if response is None:
                            response = HeadersWithFirstChunk(headers=ndjson)
                            await response.prepare(request)
                        await response.write(json.dumps(last).encode() + b"\n" + meter.trailer())
        except EngineError as exc:
            error = engine_error(exc, parsed.model)
            if response is None:
                raise error from exc
            await response.write(json.dumps({"error": error.message}).encode() + b"\n")
        except asyncio.CancelledError:
            raise
        if response is None:
            raise ApiError(500, "the engine ended without finishing", type="server_error")
        await response.write_eof()
        return response
