"""The agent's one HTTP server module: small ASGI apps served by hypercorn's trio worker.

Three servers, each optional (port 0 turns it off), each on its own port:

* **metrics** (``metrics_bind:metrics_port``): ``GET /metrics`` for Prometheus;
* **health** (``health_bind:health_check_port``): ``/health/live``, ``/health/ready``
  and read-only ``GET /status`` (what ``bpfpipe diag`` and ``top`` read);
* **admin** (``admin_bind:admin_port``, loopback by default): everything that changes
  state or shows event contents (``/admin/...``). A bearer token is required when it
  binds beyond loopback, and honoured on loopback too when set.

HTTP parsing is hypercorn's (h11); this module only routes ASGI requests to handlers
and turns handler results into responses. A handler is ``async def (Request) ->
Response``; raising :class:`HttpError` gives a JSON error response. Request bodies
are read up to ``max_body_bytes`` (413 past it) before any handler runs.

A port that cannot be bound is a :class:`~pipeline.errors.ConfigError` naming the
key (exit 2), raised by :func:`bind`, which startup calls before anything slow.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio

from .errors import ConfigError

__all__ = [
    "HttpError",
    "Request",
    "Response",
    "Route",
    "asgi_app",
    "bearer_guard",
    "bind",
    "json_response",
    "serve",
]

log = logging.getLogger("bpfpipe.http")

DEFAULT_MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    """Lower-cased names; repeated headers joined with ``, ``."""
    body: bytes = b""
    receive: Callable[[], Awaitable[dict[str, Any]]] | None = None
    """The ASGI ``receive`` once the body is read: a streaming handler awaits it to
    learn that the client went away (``{"type": "http.disconnect"}``)."""

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON; a 400 :class:`HttpError` if it is not."""
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"body is not valid JSON: {exc}") from None


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Callable[[], Awaitable[bytes | None]] | None = None
    """For a streamed body: called until it returns None; each result is one chunk."""


class HttpError(Exception):
    """Raised by a handler: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler


def bearer_guard(token: str | None) -> Callable[[Request], None]:
    """A check that raises 401 unless the request carries ``Authorization: Bearer <token>``
    (compared in constant time); with ``token`` None it lets everything through."""

    def check(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HttpError(401, "missing or wrong bearer token", {"www-authenticate": "Bearer"})

    return check


def asgi_app(
    routes: Iterable[Route],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    guard: Callable[[Request], None] | None = None,
) -> Callable[..., Awaitable[None]]:
    """An ASGI app dispatching on (method, path): 404 for an unknown path, 405 for a
    known path with another method, 413 for a body over ``max_body_bytes``. ``guard``
    runs before every handler (e.g. :func:`bearer_guard`)."""
    table: dict[str, dict[str, Handler]] = {}
    for route in routes:
        table.setdefault(route.path, {})[route.method.upper()] = route.handler

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            response = await _dispatch(scope, receive)
        except HttpError as exc:
            response = json_response({"error": exc.message}, exc.status)
            response.headers.update(exc.headers)
        except Exception as exc:  # a handler bug is a 500 and a log line, never a dead server
            log.error("http handler failed", extra={"path": scope.get("path"), "error": repr(exc)})
            response = json_response({"error": f"internal error: {type(exc).__name__}"}, 500)
        await _send(send, response)

    async def _dispatch(scope: dict[str, Any], receive: Any) -> Response:
        methods = table.get(scope["path"])
        if methods is None:
            raise HttpError(404, f"no such endpoint: {scope['path']}")
        method = scope["method"].upper()
        handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if handler is None:
            raise HttpError(405, f"{method} not allowed here", {"allow": ", ".join(sorted(methods))})
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise HttpError(413, f"request body over {max_body_bytes} bytes")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "client went away")
            body += message.get("body", b"")
            if len(body) > max_body_bytes:
                raise HttpError(413, f"request body over {max_body_bytes} bytes")
            if not message.get("more_body", False):
                break
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        request = Request(method, scope["path"], query, headers, bytes(body), receive)
        if guard is not None:
            guard(request)
        return await handler(request)

    return app


async def _send(send: Any, response: Response) -> None:
    headers = [(b"content-type", response.content_type.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in response.headers.items()]
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if response.stream is None:
        await send({"type": "http.response.body", "body": response.body})
        return
    if response.body:
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
    while (chunk := await response.stream()) is not None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def bind(host: str, port: int, *, key: str) -> socket.socket:
    """A socket listening on ``host:port`` (connections wait in its backlog until
    :func:`serve` runs). Bind early, so a busy port fails startup with one line naming
    ``key`` before anything slow (a BPF compile) has happened."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
        sock.bind((host, port))
        sock.listen(128)  # claims the port for good (two bound, unlistened sockets may share it)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            problem = f"{host}:{port} is already in use (another bpfpipe, or another exporter?)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            problem = f"{host} is not an address of this machine"
        elif exc.errno == errno.EACCES:
            problem = f"not allowed to listen on {host}:{port}"
        else:
            problem = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise ConfigError(key, problem) from None
    return sock


async def serve(
    app: Callable[..., Awaitable[None]],
    sock: socket.socket,
    *,
    name: str,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the bound socket ``sock`` (from :func:`bind`; this takes it over)
    until cancelled. ``task_status.started(port)`` reports the port."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    host, port = sock.getsockname()[:2]
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
    config.accesslog = None
    config.errorlog = logging.getLogger("bpfpipe.http.server")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 5.0
    config.h11_max_incomplete_size = 16 * 1024  # request line + headers
    config.include_server_header = False
    async with trio.open_nursery() as nursery:
        await nursery.start(hypercorn_serve, app, config)
        log.info(f"{name} server listening", extra={"address": f"{host}:{port}"})
        task_status.started(port)
