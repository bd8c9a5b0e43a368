"""The one error a client hears, from any floor: an HTTP status and an OpenAI-style body.

`ServiceError` carries the status, message, type, param, code and Retry-After of an error;
`body()` is the one OpenAI-style JSON body and `response()` the one HTTP response for it.
Every part raises it or a subclass of its own (peer/ `ForwardError`, aivailable/api
`ApiError`, aivailable/access `AccessError`, aivailable/cluster `ClusterError`), and the
API's error middleware (aivailable/api/app.py) sends whichever arrives. peer/ is the lowest
package that raises one, so the base lives here and imports nothing of aivailable/.
"""

from __future__ import annotations

import json
from typing import Any


class ServiceError(Exception):
    """An error for the client: `status` (HTTP), `message`, `type` (OpenAI's error type),
    `param` (the request field at fault), `code` (machine-readable), `retry_after` (seconds)."""

    TYPE = "invalid_request_error"  # a subclass's default type

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or self.TYPE
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None):
        return cls(400, message, param=param, code=code)

    @classmethod
    def not_found(cls, message: str, param: str | None = None, code: str | None = None):
        return cls(404, message, param=param, code=code)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def response(self):
        """The aiohttp response (imported here only: the pure modules that raise one, such as
        peer/availability.py, never load the web server)."""
        from aiohttp import web

        return web.json_response(
            self.body(), status=self.status, headers=self.headers(), dumps=json.dumps
        )
