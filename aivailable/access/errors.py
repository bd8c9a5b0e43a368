"""The access floor's error: a `peer.errors.ServiceError` of its own (401, 403, 413, 429, and
/cluster/keys' 400 and 404), so access/ knows nothing of the HTTP API above it; api/app.py's
error middleware sends it as HTTP."""

from __future__ import annotations

from peer.errors import ServiceError


class AccessError(ServiceError):
    """A request the access rules refuse, or a malformed key request."""
