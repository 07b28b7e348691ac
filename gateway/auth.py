"""Authentication: the API key for the OpenAI routes, the admin key (or loopback) for ``/admin``.

- ``--api-key`` (repeatable): ``/v1/*``, ``/tokenize`` and ``/detokenize`` need
  ``Authorization: Bearer <key>`` with one of the keys; a missing or wrong key gets 401.
  ``/health`` and ``/version`` stay open (probes); ``/metrics`` too unless
  ``--metrics-need-admin``.
- ``--admin-key``: ``/admin/*`` needs it as a bearer token (401 otherwise). Without it,
  ``/admin/*`` answers only clients on a loopback address (403 for others).

Tenants: each API key is a tenant, named by a hash of the key (the key itself never leaves the
gateway). Unless ``--shared-prefix-cache``, the prefix-cache salt of a request is derived from its
tenant and its ``cache_salt`` field (:func:`cache_salt_for`), so two tenants never share KV blocks
and ``usage.prompt_tokens_details.cached_tokens`` (or time to first token) tells a tenant nothing
about another's prompts: the attack behind vLLM's CVE-2025-46570. Within a tenant, requests share
the cache unless they set different ``cache_salt`` values.

Keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
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


def api_keys(settings) -> list[str]:
    """Every accepted API key (``settings.api_keys``); empty: the API is open."""
    return [k for k in settings.api_keys if k]


def tenant_of(key: str) -> str:
    """The tenant name of an API key: a hash, so salts and logs never carry the key."""
    return "tenant-" + hashlib.sha256(b"pagedserve-tenant\0" + key.encode()).hexdigest()[:24]


async def require_api_key(request: Request, creds: HTTPAuthorizationCredentials | None = Security(api_bearer)):
    """Check the bearer key; sets ``request.state.tenant`` (None when the API is open)."""
    keys = api_keys(request.app.state.gateway.settings)
    request.state.tenant = None
    if not keys:
        return
    # Compare against every key (not stopping at a match) so timing does not tell which one matched.
    matched = [k for k in keys if _matches(creds, k)]
    if not matched:
        raise _unauthorized("missing or incorrect API key: send `Authorization: Bearer <key>`"
                            if creds is None else "incorrect API key provided")
    request.state.tenant = tenant_of(matched[0])


def cache_salt_for(request: Request, cache_salt: str | None) -> str | None:
    """The prefix-cache salt sent to the executor for a request with field ``cache_salt``.

    Without API keys (or with ``isolate_tenants`` off) it is ``cache_salt`` itself. Otherwise it is
    a hash of the tenant and ``cache_salt``: a tenant can share blocks only with itself, and a
    ``cache_salt`` splits its cache further.
    """
    tenant = getattr(request.state, "tenant", None)
    if tenant is None or not request.app.state.gateway.settings.isolate_tenants:
        return cache_salt
    salt = cache_salt or ""
    return "t:" + hashlib.sha256(f"{tenant}\0{len(salt)}:{salt}".encode()).hexdigest()


async def require_metrics_access(request: Request,
                                 creds: HTTPAuthorizationCredentials | None = Security(admin_bearer)):
    """``/metrics``: open, or guarded like ``/admin/*`` with ``metrics_need_admin``."""
    if request.app.state.gateway.settings.metrics_need_admin:
        await require_admin(request, creds)


async def require_admin(request: Request, creds: HTTPAuthorizationCredentials | None = Security(admin_bearer)):
    key = request.app.state.gateway.settings.admin_key
    if key:
        if not _matches(creds, key):
            raise _unauthorized("admin endpoints need the admin key: send `Authorization: Bearer <admin key>`")
    elif not is_loopback(request):
        raise APIError(403, "admin endpoints answer only loopback clients unless the server has --admin-key",
                       "permission_error", None, "admin_loopback_only")
