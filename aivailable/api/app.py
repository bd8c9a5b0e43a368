"""The peer's one aiohttp application: error translation, health, metrics, and the rooms' routes."""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Callable, Iterable

from aiohttp import web

from aivailable.api.cors import add_cors_headers, cors_middleware
from aivailable.api.errors import ApiError
from aivailable.api.request_id import add_request_id_header, request_id_middleware
from aivailable.metrics import Metrics
from peer.errors import ServiceError

log = logging.getLogger(__name__)
DASHBOARD = importlib.resources.files("aivailable.api") / "dashboard.html"
OLLAMA_PREFIX = "/api/"  # the Ollama API's routes (aivailable/api/ollama_api.py)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as an OpenAI-style JSON body; nothing crashes the peer. The one
    place an error of any floor (a peer.errors.ServiceError) becomes HTTP."""
    try:
        return await handler(request)
    except ServiceError as exc:
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        if request.match_info.route.resource is None:  # the router's own 404/405
            message = f"no route for {request.method} {request.path}"
        else:  # a handler's own HTTP error: keep what it said
            message = exc.text or exc.reason
        return error_response(request, ApiError(exc.status, message, type=kind))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(request, ApiError(500, "internal server error", type="server_error"))


def error_response(request: web.Request, exc: ServiceError) -> web.Response:
    """An error in the shape of the API asked: Ollama's `{"error": "..."}` under /api/,
    OpenAI's body everywhere else."""
    if request.path.startswith(OLLAMA_PREFIX):
        return web.json_response({"error": exc.message}, status=exc.status, headers=exc.headers())
    return exc.response()


def build_app(
    metrics: Metrics,
    is_serving: Callable[[], bool],
    route_groups: Iterable[list[web.RouteDef]],
    on_scrape: Callable[[], None] = lambda: None,
    middlewares: Iterable = (),
    client_max_size: int = 64 << 20,  # Raft snapshots travel in one request
    cors_origins: Iterable[str] = (),
) -> web.Application:
    """`middlewares` run inside the error translation (e.g. peer request signing); request
    ids and CORS (for `cors_origins` only) wrap everything, errors included."""
    cors = [cors_middleware(cors_origins)] if cors_origins else []
    app = web.Application(
        middlewares=[request_id_middleware, *cors, error_middleware, *middlewares],
        client_max_size=client_max_size,
    )
    app.on_response_prepare.append(add_request_id_header)  # streamed responses too
    if cors:
        app.on_response_prepare.append(add_cors_headers)

    async def healthz(request: web.Request) -> web.Response:
        if not is_serving():
            raise ApiError(503, "starting", type="service_unavailable", retry_after=1)
        return web.json_response({"status": "ok"})

    async def metrics_endpoint(request: web.Request) -> web.Response:
        on_scrape()  # gauges that are cheaper to read on demand than to keep current
        return web.Response(
            body=metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    page = DASHBOARD.read_text()

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.add_routes(
        [
            web.get("/", dashboard),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics_endpoint),
        ]
    )
    for routes in route_groups:
        app.add_routes(routes)
    return app
