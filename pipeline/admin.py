"""The admin API (issue #9): the live config, on the admin server only.

* ``GET /admin/config`` — ``{"version": n, "config": {...}}``: the effective config
  (defaults, file, environment and flags merged; stage tables as given) and its
  version (1 at startup, +1 per reload that changed it).
* ``POST /admin/config`` — a JSON object, a *partial* config document, deep-merged
  over the effective config (tables merge, any other value — lists included, so
  ``stages`` — replaces) and applied as a reload (:mod:`pipeline.reload`): 200 with
  the :class:`~pipeline.reload.ReloadResult`; 400 ``{"error": "key.path: problem"}``
  when the result does not validate (the same checks, and messages, as the file's at
  startup), nothing applied; 503 when the pipeline is not running (starting or
  stopping).

Bodies are limited to :data:`MAX_BODY_BYTES` (413 past it), far above any real
partial config (a whole config file is at most 1 MiB, and typical ones are a few
hundred bytes). Responses are JSON. The bearer token (``admin_token_file``) is
checked by the admin server for every route (``bearer_guard``), so a request without
it is a 401 before anything here runs; these routes are never on the public
metrics/health port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from .config import Config
from .http import DEFAULT_MAX_BODY_BYTES, HttpError, Request, Response, Route, json_response
from .reload import NOT_RUNNING, Reloader

if TYPE_CHECKING:
    from ._graph import Pipeline

__all__ = ["MAX_BODY_BYTES", "AdminApi"]

MAX_BODY_BYTES = DEFAULT_MAX_BODY_BYTES
"""64 KiB: what the admin server reads of a request body (``asgi_app``'s default)."""


class AdminApi:
    def __init__(self, config: Config, reloader: Reloader) -> None:
        self.config = config
        self.reloader = reloader

    def routes(self, pipe: Pipeline) -> list[Route]:
        return [
            Route("GET", "/admin/config", self.get_config),
            Route("POST", "/admin/config", self.post_config),
        ]

    async def get_config(self, request: Request) -> Response:
        return json_response(self.reloader.effective())

    async def post_config(self, request: Request) -> Response:
        partial = request.json()
        if not isinstance(partial, dict):
            raise HttpError(400, "body: expected a JSON object (a partial config document)")
        result = await self.reloader.apply_document(partial)
        if result.ok:
            return json_response(msgspec.to_builtins(result))
        status = 503 if result.error == NOT_RUNNING else 400
        body = msgspec.to_builtins(result)
        return json_response(body, status)
