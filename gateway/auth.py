"""Authentication: the API key for the OpenAI routes, the admin key (or loopback) for ``/admin``.

- ``--api-key``: ``/v1/*``, ``/tokenize`` and ``/detokenize`` need ``Authorization: Bearer <key>``;
  a missing or wrong key gets 401. ``/health``, ``/version`` and ``/metrics`` stay open (probes,
  Prometheus).
- ``--admin-key``: ``/admin/*`` needs it as a bearer token (401 otherwise). Without it,
  ``/admin/*`` answers only clients on a loopback address (403 for others).

Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.errors import APIError

api_bearer = HTTPBearer(auto_error=False, scheme_name="apiKey", description="the server's --api-key")
admin_bearer = HTTPBearer(auto_error=False, scheme_name="adminKey", description="the server's --admin-key")


def _matches(creds: HTTPAuthorizationCredentials | None, key: str) -> bool:
    return creds is not None and hmac.compare_digest(creds.credentials.encode(), key.encode())


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, "authentication_error", None, "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


async def require_api_key(request: Request, creds: HTTPAuthorizationCredentials | None = Security(api_bearer)):
    key = request.app.state.gateway.settings.api_key
    if key and not _matches(creds, key):
        raise _unauthorized("missing or incorrect API key: send `Authorization: Bearer <key>`"
                            if creds is None else "incorrect API key provided")


async def require_admin(request: Request, creds: HTTPAuthorizationCredentials | None = Security(admin_bearer)):
    key = request.app.state.gateway.settings.admin_key
    if key:
        if not _matches(creds, key):
            raise _unauthorized("admin endpoints need the admin key: send `Authorization: Bearer <admin key>`")
    elif not is_loopback(request):
        raise APIError(403, "admin endpoints answer only loopback clients unless the server has --admin-key",
                       "permission_error", None, "admin_loopback_only")
