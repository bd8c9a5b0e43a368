"""The API floor's errors. Every error (this floor's `ApiError`, and those the floors below
raise: peer/, access/, cluster/) is a `peer.errors.ServiceError`, sent as HTTP once, by
api/app.py's error middleware (DESIGN.md rule 7)."""

from __future__ import annotations

from peer.errors import ServiceError


class ApiError(ServiceError):
    """An OpenAI-style error of a request the API itself refuses."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError.bad_request(message, param, code)


def not_found(message: str, param: str | None = None, code: str = "model_not_found") -> ApiError:
    return ApiError.not_found(message, param, code)
