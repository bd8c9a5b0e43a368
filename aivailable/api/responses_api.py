"""OpenAI's Responses API: `POST /v1/responses`, `GET|DELETE /v1/responses/{id}`.

The same path as chat: the body becomes a Parsed (responses_parse.py), runs inside Metered
(admitted, charged the engine's counts), through OpenAIApi.engine_or_forward (a peer without
a ready replica forwards the client's body unchanged, and the host runs all of this), with
tools and `text.format` through structured.py's grammars. `previous_response_id` is resolved
where the engine runs; stored responses live on the peer that answered (responses_store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from aiohttp import web

from aivailable.access.guard import KEY_RECORD
from aivailable.api import responses_render as render
from aivailable.api.body import parse_json
from aivailable.api.errors import ApiError
from aivailable.api.inference import Metered
from aivailable.api.openai_api import OpenAIApi, engine_error
from aivailable.api.responses_parse import ResponsesCall, parse_responses, previous_id
from aivailable.api.responses_store import (
    INTERNAL_PATH,
    PeerResponses,
    ResponseStore,
    node_of,
    owner_of,
    response_id,
)
from aivailable.backends.base import Engine, EngineError, Finished, TextDelta
from aivailable.metrics import Metrics
from peer.forward import FINAL_HEADER

ENDPOINT = "responses"  # the metrics' endpoint label


class ResponseMissing(ApiError):
    """A 404 about the response id, not the model: a forwarding peer relays it to the client
    instead of trying another replica (which would not have it either)."""

    def headers(self) -> dict[str, str]:
        return {**super().headers(), FINAL_HEADER: "1"}


def response_missing(rid: str, param: str | None = None) -> ApiError:
    return ResponseMissing(
        404, f"no response with id '{rid}' (it expired, or it is not yours)", param=param
    )


class ResponsesApi:
    def __init__(
        self,
        openai: OpenAIApi,
        metrics: Metrics,
        request_timeout_s: float,
        me: str,
        store: ResponseStore | None = None,
        peers: PeerResponses | None = None,
    ):
        """`me`: this node's name (the pointer in the ids it stores); `peers`: reads another
        peer's stored responses (None: only this peer's are found)."""
        self._openai = openai
        self._metrics = metrics
        self._timeout_s = request_timeout_s
        self._me = me
        self.store = store or ResponseStore()
        self._peers = peers

    def routes(self) -> list[web.RouteDef]:
        internal = INTERNAL_PATH
        return [
            web.post("/v1/responses", self.create),
            web.get("/v1/responses/{id}", self.retrieve),
            web.delete("/v1/responses/{id}", self.delete),
            web.get(internal, self.internal_get),
            web.delete(internal, self.internal_delete),
        ]

    # ---- stored responses ---------------------------------------------------------------

    async def _record(
        self, request: web.Request, rid: str, param: str | None = None, admin: bool = False
    ) -> dict:
        """The stored record of `rid` if it is the caller's (or, with `admin`, the caller is an
        admin), wherever it lives; else 404, as for an unknown id."""
        node = node_of(rid)
        record = None
        if node == self._me:
            record = self.store.get(rid)
        elif node is not None and self._peers is not None:
            record = await self._peers.call("GET", node, rid)
        if not isinstance(record, dict):
            raise response_missing(rid, param)
        key = request.get(KEY_RECORD)  # set by the guard on the peer the client called
        if record.get("owner") != owner_of(request.headers) and not (
            admin and key is not None and key.role == "admin"
        ):
            raise response_missing(rid, param)
        return record

    async def retrieve(self, request: web.Request) -> web.Response:
        record = await self._record(request, request.match_info["id"], admin=True)
        return web.json_response(record["response"])

    async def delete(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        await self._record(request, rid, admin=True)  # its owner, or an admin
        node = node_of(rid)
        if node == self._me:
            self.store.delete(rid)
        elif self._peers is not None:
            await self._peers.call("DELETE", node, rid)
        return web.json_response({"id": rid, "object": "response", "deleted": True})

    async def internal_get(self, request: web.Request) -> web.Response:
        """A peer asks for a record (signed: /internal/ is for peers only); it checks the
        owner itself, against its own caller."""
        record = self.store.get(request.match_info["id"])
        if record is None:
            raise response_missing(request.match_info["id"])
        return web.json_response(record)

    async def internal_delete(self, request: web.Request) -> web.Response:
        if not self.store.delete(request.match_info["id"]):
            raise response_missing(request.match_info["id"])
        return web.json_response({"deleted": True})

    # ---- POST /v1/responses -------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        api = self._openai
        raw = await api.read_body(request)
        body = parse_json(raw)
        call = parse_responses(body, api.max_tokens_limit)
        async with Metered(api.gate, request, call.parsed) as meter:
            target = await api.engine_or_forward(request, raw, call.parsed.model)
            if isinstance(target, web.StreamResponse):
                return target
            previous = previous_id(body)
            if previous is not None:  # the conversation so far, from whichever peer keeps it
                record = await self._record(request, previous, "previous_response_id")
                call = parse_responses(body, api.max_tokens_limit, tuple(record["items"]))
                meter.parsed = call.parsed
            return await self._local(request, target, meter, call)

    async def _local(
        self, request: web.Request, engine: Engine, meter: Metered, call: ResponsesCall
    ) -> web.StreamResponse:
        metrics, model = self._metrics, call.parsed.model
        started = time.monotonic()
        status = "200"
        try:
            if call.parsed.stream:
                return await self._stream(request, engine, meter, call, started)
            return await self._complete(request, engine, meter, call, started)
        except ApiError as exc:
            status = str(exc.status)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = "499"
            metrics.client_disconnects.labels(model).inc()
            raise
        finally:
            metrics.requests.labels(ENDPOINT, model, status).inc()
            metrics.latency.labels(ENDPOINT, model).observe(time.monotonic() - started)

    def _new(self, call: ResponsesCall) -> dict:
        rid = response_id(self._me, uuid.uuid4().hex)
        return render.skeleton(call, rid, int(time.time()))

    def _keep(self, request: web.Request, call: ResponsesCall, response: dict) -> None:
        if call.store:
            record = {"owner": owner_of(request.headers), "response": response}
            record["items"] = render.history(call, response)
            self.store.put(response["id"], record)

    def _first_token(self, model: str, started: float) -> None:
        self._metrics.ttft.labels(model).observe(time.monotonic() - started)

    def _timeout(self) -> ApiError:
        limit = self._timeout_s
        return ApiError(504, f"generation took longer than {limit:.0f}s", type="timeout")

    async def _complete(
        self,
        request: web.Request,
        engine: Engine,
        meter: Metered,
        call: ResponsesCall,
        started: float,
    ) -> web.Response:
        texts, _, done = await self._openai.generate_whole(engine, meter, started)
        items = render.output_items("".join(texts[0]), call)
        response = render.finished(self._new(call), items, done)
        self._keep(request, call, response)
        return meter.json_response(response)

    async def _stream(
        self,
        request: web.Request,
        engine: Engine,
        meter: Metered,
        call: ResponsesCall,
        started: float,
    ) -> web.StreamResponse:
        sse = render.EventStream()
        response_obj = self._new(call)
        # With tools the text may turn out to be a call: it is held and sent whole at the end.
        hold = bool(call.parsed.functions)
        item_id = render.new_id("msg")
        texts: list[str] = []
        events = engine.generate(call.parsed.request)
        out: web.StreamResponse | None = None
        try:
            async with asyncio.timeout(self._timeout_s), contextlib.aclosing(events):
                # The first event before the headers: a full queue still gets its status.
                event = await anext(events)
                out = meter.sse_response()
                await out.prepare(request)
                await out.write(
                    sse.event("response.created", response=response_obj)
                    + sse.event("response.in_progress", response=response_obj)
                )
                while not isinstance(event, Finished):
                    if isinstance(event, TextDelta) and event.text:
                        if not texts:
                            self._first_token(call.parsed.model, started)
                            if not hold:
                                await out.write(sse.message_start(0, item_id))
                        texts.append(event.text)
                        if not hold:
                            await out.write(sse.text_delta(0, item_id, event.text))
                    event = await anext(events)
                self._openai.count(meter, event)
                text = "".join(texts)
                if hold:
                    items = render.output_items(text, call)
                    chunk = b"".join(sse.item(i, item) for i, item in enumerate(items))
                else:
                    items = [render.message_item(item_id, text)]
                    chunk = b"" if texts else sse.message_start(0, item_id)
                    chunk += sse.message_end(0, items[0])
                final = render.finished(response_obj, items, event)
                kind = "response.completed" if final["status"] == "completed" else None
                chunk += sse.event(kind or "response.incomplete", response=final)
                await out.write(chunk)
                self._keep(request, call, final)
        except (EngineError, TimeoutError, StopAsyncIteration) as exc:
            if isinstance(exc, EngineError):
                error = engine_error(exc, call.parsed.model, len(call.parsed.functions))
            elif isinstance(exc, TimeoutError):
                error = self._timeout()
            else:
                error = ApiError(500, "the engine ended without finishing", type="server_error")
            if out is None:
                raise error from exc
            failed = {**response_obj, "status": "failed", "error": _error_of(error)}
            await out.write(
                sse.event("error", **_error_of(error), param=error.param)
                + sse.event("response.failed", response=failed)
            )
        await out.write(meter.trailer())
        await out.write_eof()
        return out


def _error_of(error: ApiError) -> dict:
    return {"code": error.code or error.type, "message": error.message}
