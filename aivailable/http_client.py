"""The CLI's HTTP calls to a peer: JSON in and out, errors as one clear ClientError."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator


class ClientError(Exception):
    """A peer could not be reached or refused the request; the message is for the user."""


@contextlib.contextmanager
def open_request(
    url: str, method: str = "GET", body: dict | None = None, timeout: float = 30
) -> Iterator:
    """urlopen with a JSON body; HTTP and network errors become ClientError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
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
