"""The outer layer every request passes before any endpoint (pure ASGI, so bodies are counted as they stream).

In order: the ``Host`` header must name this server (a DNS-rebinding page cannot reach it under another name); a
request carrying an ``Origin`` header must come from the server's own origin or a configured one (a web page the
radiologist visits cannot drive the server, even with "simple" form posts that skip CORS preflight); CORS answers
name only those origins, never ``*``; request bodies are limited (``Content-Length`` checked up front, streamed
bytes counted: 413 with the limit); responses carry ``nosniff``, ``no-referrer`` and frame protections.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
CORS_METHODS = b"GET, POST, PUT, DELETE, OPTIONS"
CORS_HEADERS = b"authorization, content-type, accept"


class BodyTooLarge(Exception):
    pass


async def _reply(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += SECURITY_HEADERS + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


def host_name(host: str) -> str:
    """The name part of a Host header value (``[::1]:8000`` -> ``[::1]``, ``a.b:80`` -> ``a.b``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class GuardMiddleware:
    """Host and Origin checks, CORS for configured origins, body-size limits, security headers.

    Args:
        app: The wrapped ASGI app.
        hosts: Accepted Host names (see :func:`host_name`).
        origins: Extra accepted origins (``scheme://host[:port]``); the server's own origin is always accepted.
        body_limit: ``(method, path) -> max bytes`` of the request body.
    """

    def __init__(self, app: ASGIApp, hosts: set[str], origins: set[str],
                 body_limit: Callable[[str, str], int]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if not host or host_name(host) not in self.hosts:
            await _reply(send, 421 if host else 400, "unknown Host header; this server answers only to its own names "
                         "(configure --allowed-host)")
            return
        origin = _header(scope, b"origin")
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            o = origin.rstrip("/").lower()
            if o != own and o not in self.origins:
                await _reply(send, 403, f"requests from origin {origin!r} are not allowed (configure --cors-origin)")
                return
            if o != own:
                cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and origin is not None:
            await _reply(send, 200, "ok", cors + [(b"access-control-allow-methods", CORS_METHODS),
                                                 (b"access-control-allow-headers", CORS_HEADERS),
                                                 (b"access-control-max-age", b"600")])
            return
        limit = self.body_limit(scope["method"], scope["path"])
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _reply(send, 400, "bad Content-Length header")
                return
            if n > limit:
                await _reply(send, 413, f"request body of {n} bytes is over the limit of {limit} bytes")
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS + cors
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await _reply(send, 413, f"request body is over the limit of {limit} bytes")
        except Exception as e:  # noqa: BLE001 - the body limit may surface wrapped by the form parser
            if is_body_too_large(e) and not started:
                await _reply(send, 413, f"request body is over the limit of {limit} bytes")
            else:
                raise


def is_body_too_large(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, BodyTooLarge):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
