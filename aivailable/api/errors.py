"""Errors raised anywhere in request handling, translated to HTTP once (DESIGN.md rule 7)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class ApiError(Exception):
    """An OpenAI-style error: status, message, type, and the parameter at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return error_response(self)


def error_response(error: Any) -> web.Response:
    """The HTTP response for an ApiError, or a peer/ error of the same shape (status, body(),
    retry_after: peer.forward.ForwardError), which peer/ raises without knowing the API."""
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return web.json_response(error.body(), status=error.status, headers=headers, dumps=json.dumps)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "model_not_found") -> ApiError:
    return ApiError(404, message, param=param, code=code)
