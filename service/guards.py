"""Checks every request passes before any route runs: the Host header, cross-site writes, and
(when asked for) the API key on reads.

- Host allow-list (`EMKUM_ALLOWED_HOSTS`): a service bound to 127.0.0.1 is still reachable from a
  page on any site through DNS rebinding (the page's name re-resolves to 127.0.0.1 and the browser
  sends that name as Host). Starlette's TrustedHostMiddleware does this check but answers plain
  text; this one answers the service's JSON error shape.
- Cross-site writes: with no key set, a form on any site could POST /items. Browsers say where a
  request comes from (`Sec-Fetch-Site`, and `Origin` on every POST); an unsafe method from another
  origin is refused unless that origin is in `EMKUM_TRUSTED_ORIGINS`. Clients that are not browsers
  send neither header and are unaffected. (The rule is the one Go 1.25's CrossOriginProtection uses.)
- `EMKUM_PROTECT_READS`: search, embed and item reads need the key too; health, readiness and
  metrics stay open for orchestrators and Prometheus.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.requests import Request

from service.errors import ApiError
from service.settings import Settings

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`host` (the Host header, port dropped) matches an entry: `*`, a name, or `*.example.com`."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # keep [::1] whole
    name = name.lower()
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def key_matches(given: str | None, settings: Settings) -> bool:
    """hmac.compare_digest keeps the time of a wrong key independent of how much of it was right."""
    expected = settings.api_key
    if expected is None:
        return True
    return hmac.compare_digest((given or "").encode(), expected.get_secret_value().encode())


def cross_site(request: Request, settings: Settings) -> str | None:
    """Why an unsafe request comes from another site's page, or None when it does not (or when the
    client is not a browser: no Sec-Fetch-Site, no Origin)."""
    if request.method not in UNSAFE_METHODS:
        return None
    origin = request.headers.get("origin")
    if origin is not None and origin in settings.trusted_origins:
        return None
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return None if site in ("same-origin", "none") else f"Sec-Fetch-Site: {site}"
    if origin is None:
        return None
    if origin == "null":
        return "an opaque origin"
    same = urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()
    return None if same else f"origin {origin!r}"


def check_request(request: Request, settings: Settings) -> None:
    """Raise ApiError when the request must not reach a route."""
    host = request.headers.get("host", "")
    if not host_allowed(host, settings.allowed_hosts):
        raise ApiError(400, "invalid_host", f"Host {host!r} is not in EMKUM_ALLOWED_HOSTS")
    why = cross_site(request, settings)
    if why is not None:
        raise ApiError(403, "cross_site_request", f"a cross-site {request.method} is refused ({why})")
    guarded = settings.protect_reads and request.url.path not in OPEN_PATHS
    if guarded and not key_matches(request.headers.get("x-api-key"), settings):
        raise ApiError(401, "unauthorized", "a valid X-API-Key header is required (EMKUM_PROTECT_READS)")
