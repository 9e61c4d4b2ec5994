"""Who may use the dashboard: one ASGI gate in front of the UI app and the mounted chat servers.

    binding   127.0.0.1 by default; any other interface only with an API key (run_ui refuses otherwise)
    host      bound to loopback, the Host header must name loopback too: a web page whose domain was
              re-pointed at 127.0.0.1 (DNS rebinding) cannot read the dashboard
    key       with --api-key, every request needs `Authorization: Bearer KEY` or the session cookie that
              /login sets (HttpOnly, SameSite=Strict); pages redirect to /login, the API answers 401
    writes    a request that changes something (POST) must carry the `X-Lorakit-UI` header the dashboard's
              scripts send, or a Bearer key: another site's form or script cannot add either without the
              browser asking first (CORS preflight), and nothing here says yes -- so no cross-site POST
              can start, stop or export a run
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lorakit.ui.runs import UIError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "lorakit_ui"
UI_HEADER = "x-lorakit-ui"
OPEN_PATHS = ("/login", "/static/app.css", "/static/icon.svg")  # reachable without the key (the login page and its style)


def check_binding(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise UIError(f"--host {host} makes the dashboard (runs, training, models) reachable from the network: "
                      "pass --api-key KEY (or set LORAKIT_API_KEY), or keep the default --host 127.0.0.1")


def session_token(api_key: str) -> str:
    """The cookie's value: derived from the key, so the key itself never sits in the browser's cookie jar."""
    return hmac.new(api_key.encode(), b"lorakit-ui-session", hashlib.sha256).hexdigest()


def _host_name(value: str) -> str:
    """'127.0.0.1:7860' -> '127.0.0.1', '[::1]:7860' -> '::1'."""
    return (urlsplit(f"//{value}").hostname or "").lower()


class Gate:
    """ASGI middleware: refuse what the rules above refuse; send /serve/<slot>/... to that chat server."""

    def __init__(self, app: Any, hub: Any, host: str, api_key: str | None):
        self.app, self.hub, self.api_key = app, hub, api_key
        self.loopback_only = host in LOOPBACK
        self.token = session_token(api_key) if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope["path"], scope["method"]
        if self.loopback_only and _host_name(headers.get("host", "")) not in LOOPBACK:
            await _reply(send, 403, {"error": "this dashboard answers on 127.0.0.1 / localhost only"})
            return
        if path == "/login" and self.token:
            await self._login(scope, receive, send, method)
            return
        bearer = self._bearer_ok(headers)
        if self.token and not bearer and not self._cookie_ok(headers) and path not in OPEN_PATHS:
            if path.startswith(("/api/", "/serve/")):
                await _reply(send, 401, {"error": "missing or wrong API key: send 'Authorization: Bearer KEY' or "
                                                  "log in at /login"})
            else:
                await _redirect(send, "/login")
            return
        if method not in ("GET", "HEAD", "OPTIONS") and not bearer and UI_HEADER not in headers:
            await _reply(send, 403, {"error": f"write requests need the {UI_HEADER} header (sent by the dashboard's "
                                              "own pages) or an Authorization: Bearer key"})
            return
        if path.startswith("/serve/"):
            await self._serve(scope, receive, send, path)
            return
        await self.app(scope, receive, send)

    def _bearer_ok(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return bool(self.api_key) and bool(token) and hmac.compare_digest(token.encode(), self.api_key.encode())

    def _cookie_ok(self, headers: dict[str, str]) -> bool:
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and self.token and hmac.compare_digest(value.encode(), self.token.encode()):
                return True
        return False

    async def _serve(self, scope: dict, receive: Any, send: Any, path: str) -> None:
        slot, _, rest = path[len("/serve/"):].partition("/")
        app = self.hub.app(slot)
        if app is None:
            await _reply(send, 404, {"error": f"no chat server {slot!r}: open the run in the chat page first"})
            return
        inner = dict(scope, path="/" + rest, raw_path=("/" + rest).encode(), root_path="")
        await app(inner, receive, send)

    async def _login(self, scope: dict, receive: Any, send: Any, method: str) -> None:
        if method != "POST":
            await _html(send, 200, LOGIN_PAGE.format(message=""))
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body") or len(body) > 10_000:
                break
        key = parse_qs(body.decode("utf-8", errors="replace")).get("key", [""])[0]
        if not (self.api_key and hmac.compare_digest(key.encode(), self.api_key.encode())):
            await _html(send, 401, LOGIN_PAGE.format(message="<p class='bad'>That is not the key this dashboard was "
                                                             "started with (--api-key).</p>"))
            return
        cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode())]})
        await send({"type": "http.response.body", "body": b""})


async def _reply(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _html(send: Any, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Any, location: str) -> None:
    await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location.encode())]})
    await send({"type": "http.response.body", "body": b""})


LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>lorakit · log in</title>
<link rel="stylesheet" href="/static/app.css"></head><body><main class="narrow"><h1>lorakit</h1>
<form method="post" action="/login" class="card"><label>API key <input type="password" name="key" autofocus></label>
<button type="submit">Log in</button>{message}</form></main></body></html>"""
