"""The CLI's HTTP calls to a peer: JSON in and out, errors as one clear ClientError."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator


class ClientError(Exception):
    """A peer could not be reached or refused the request; the message is for the user."""


# The API key every request of this process sends (the CLI sets it from --api-key, the
# environment or the data dir's admin.key); None: $AIVAILABLE_API_KEY if set, else none.
_api_key: str | None = None


def set_api_key(key: str | None) -> None:
    global _api_key
    _api_key = key


def auth_headers() -> dict[str, str]:
    key = _api_key or os.environ.get("AIVAILABLE_API_KEY")
    return {"Authorization": f"Bearer {key.strip()}"} if key else {}


@contextlib.contextmanager
def open_request(
    url: str, method: str = "GET", body: dict | None = None, timeout: float = 30
) -> Iterator:
    """urlopen with a JSON body; HTTP and network errors become ClientError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **auth_headers()},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            yield resp
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ClientError(f"{exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ClientError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc


def request_json(url: str, method: str = "GET", body: dict | None = None, timeout: float = 30):
    with open_request(url, method, body, timeout) as resp:
        return json.loads(resp.read())
