"""Who may talk to the service: a Host allowlist (against DNS rebinding), a cross-origin check on state-changing
requests (against CSRF) and an optional bearer token — one pure ASGI middleware, ``RequestGuard``, in this order:

1. **Host.** The Host header must name loopback (``localhost``, 127.0.0.0/8, ``::1``), be an IP address, be the
   bound ``--host``, or match an ``--allow-host`` pattern (``name``, ``*.example.com``, ``*``); the port is ignored.
   Else 400. A DNS-rebinding page reaches the server under its own DNS name, which is none of these; an IP address
   cannot be rebound. A request without Host is not from a browser and passes.
2. **Origin**, for every method but GET/HEAD/OPTIONS (the GET routes only read). A browser says where a request
   comes from: ``Sec-Fetch-Site`` must be ``same-origin`` or ``none``; without it, ``Origin`` (else ``Referer``) must
   be this server, the same host:port as the Host header. Else 403. A request with none of the three is not from a
   browser (curl, httpx) and passes. This is Go's ``net/http.CrossOriginProtection``, plus Referer for old browsers.
3. **Token**, when one is set: every request but GET/HEAD ``/health`` (readiness for load balancers) carries it as
   ``Authorization: Bearer TOKEN``, as ``?token=TOKEN``, or in the cookie a ``?token=`` request sets (HttpOnly,
   SameSite=Lax, one per port, so the page's fetches and ``<img>`` thumbnails carry it). Else 401. ``GET /?token=…``
   redirects to ``/`` so the token leaves the address bar. Compared with ``hmac.compare_digest``.

Example:
    >>> app.add_middleware(RequestGuard, policy=AccessPolicy(token="s3cret-token", hosts=("gpu-box",)))
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse, RedirectResponse

from ..errors import ProbeError

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/health"})  # readiness probes carry no token
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token: also safe in a cookie


def host_name(value: str) -> str:
    """The name in a Host header or --host/--allow-host value: 'LocalHost:8000' -> 'localhost', '[::1]:80' -> '::1',
    'example.com.' -> 'example.com'."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # name:port (an IPv6 address without brackets has several colons)
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: an address only this machine reaches."""
    name = host_name(host)
    return name == "localhost" or (is_ip(name) and ipaddress.ip_address(name).is_loopback)


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve beyond loopback without a token, unless told ``insecure``."""
    if token is None and not insecure and not is_loopback(host):
        raise ProbeError(f"--host {host} lets other machines reach the service, and it has no token: pass --token "
                         "TOKEN (or set PROBE_TOKEN), or --insecure to serve it without authentication")


def check_token(token: str | None) -> None:
    if token is not None and not TOKEN_CHARS.fullmatch(token):
        raise ProbeError("the token may use letters, digits and -._~+/ (then =), so it fits a header, a URL and a "
                         "cookie; e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")


@dataclass(frozen=True)
class AccessPolicy:
    token: str | None = None  # None: no authentication (the loopback default)
    hosts: tuple[str, ...] = ()  # Host names served besides loopback and IP addresses: the bound host, --allow-host

    def host_problem(self, host: str | None) -> str | None:
        """Why this Host header is refused (DNS rebinding), or None."""
        if host is None:
            return None
        name = host_name(host)
        if name == "localhost" or is_ip(name):
            return None
        for pattern in map(host_name, self.hosts):
            if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
                return None
        return (f"Host header {host!r} is not allowed (DNS-rebinding protection); to serve this name pass "
                f"--allow-host {name}")

    def token_problem(self, presented: list[str]) -> str | None:
        """Why these credentials are refused, or None when one of them is the token (compared in constant time)."""
        assert self.token is not None
        expected = self.token.encode()
        if any(hmac.compare_digest(p.encode("utf-8", "replace"), expected) for p in presented):
            return None
        how = ("send the header 'Authorization: Bearer TOKEN', or open /?token=TOKEN in the browser "
               "(the token given to --token or PROBE_TOKEN)")
        return f"{'wrong token' if presented else 'this server needs its token'}: {how}"


def cross_origin_problem(method: str, headers: Headers) -> str | None:
    """Why a state-changing request from a browser is refused as cross-origin (CSRF), or None."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return None if site in ("same-origin", "none") else \
            f"cross-origin {method} refused: the browser marks it Sec-Fetch-Site: {site} (CSRF protection)"
    for header in ("origin", "referer"):
        value = headers.get(header)
        if value is None:
            continue
        source = urlsplit(value).netloc.lower() if value != "null" else "null"
        if source and source == headers.get("host", "").lower():
            return None
        return (f"cross-origin {method} refused: it comes from {value} ({header.title()}), not from this server "
                f"({headers.get('host')}); state-changing requests come from this server's page or from non-browser "
                "clients (CSRF protection)")
    return None  # no browser says where it comes from: curl, httpx, a script


def _refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close", **(headers or {})})


class RequestGuard:
    """ASGI middleware applying an ``AccessPolicy`` to every HTTP request (see the module docstring)."""

    def __init__(self, app, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; the service has no websockets
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        if problem := self.policy.host_problem(headers.get("host")):
            log.warning("refused %s %s: %s", method, path, problem)
            return await _refuse(400, problem)(scope, receive, send)
        if method not in SAFE_METHODS and (problem := cross_origin_problem(method, headers)):
            log.warning("refused %s %s: %s", method, path, problem)
            return await _refuse(403, problem)(scope, receive, send)
        if self.policy.token is None or (method in ("GET", "HEAD") and path in OPEN_PATHS):
            return await self.app(scope, receive, send)

        port = (scope.get("server") or (None, None))[1]
        cookie = f"probe-token-{port}" if port else "probe-token"  # per port: servers side by side keep theirs
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        from_query = [v for k, v in query if k == "token"]
        presented = list(from_query)
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            presented.append(value.strip())
        if cookie in (jar := cookie_parser(headers.get("cookie", ""))):
            presented.append(jar[cookie])
        if problem := self.policy.token_problem(presented):
            return await _refuse(401, problem, {"WWW-Authenticate": 'Bearer realm="probe"'})(scope, receive, send)
        if not from_query or self.policy.token_problem(from_query):
            return await self.app(scope, receive, send)

        # authenticated by ?token=: remember it in a cookie, so the page's requests and <img> carry it
        set_cookie = f"{cookie}={self.policy.token}; Path=/; HttpOnly; SameSite=Lax"
        if scope.get("scheme") == "https":
            set_cookie += "; Secure"
        if method == "GET" and path == "/":  # the page: drop the token from the address bar (and history)
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            response = RedirectResponse(scope.get("root_path", "") + "/" + (f"?{rest}" if rest else ""), 303,
                                        headers={"Set-Cookie": set_cookie})
            return await response(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"set-cookie", set_cookie.encode("latin-1"))]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)
