"""The service's access log: one JSON line per API request, none per published file.

BentoML's own access log formats and writes a line for every request; on a cached sequence GIF that was about half
of the worker's CPU per request (0.66 vs 1.33 ms, wrk at 4 connections), and so the largest part of the tail latency
under load. Published files are immutable bytes that Prometheus still counts (BentoML's metrics middleware, or
``figan_memory_first_responses_total`` for those answered from memory, :mod:`services.memory_first`), so their
per-request lines add nothing an operator needs. ``FIGAN_SERVICE_ACCESS_LOG`` chooses:

* ``api`` (default): BentoML's access log off; this middleware logs every request the API app answers except
  published files (:data:`PUBLISHED_FILE`): listing, version JSON, generation, uploads and their errors (a path
  that matches no route is answered 404 by BentoML before the app, unlogged);
* ``all``: BentoML's access log for every request (this middleware off);
* ``off``: no access log.

A plain ASGI middleware (no Starlette ``BaseHTTPMiddleware``: that one runs the app in a separate task per request).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Awaitable, Callable

from .contract import PUBLISHED_FILE

log = logging.getLogger("figan.access")

MODES = ("api", "all", "off")
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def access_log_mode(env: dict[str, str] | None = None) -> str:
    """``FIGAN_SERVICE_ACCESS_LOG`` (api | all | off; ``true``/``false`` are read as api/off)."""
    raw = (env if env is not None else os.environ).get("FIGAN_SERVICE_ACCESS_LOG", "api").strip().lower()
    mode = {"true": "api", "false": "off"}.get(raw, raw)
    if mode not in MODES:
        raise ValueError(f"FIGAN_SERVICE_ACCESS_LOG={raw!r}: use one of {', '.join(MODES)}")
    return mode


class ApiAccessLog:
    """Logs ``client (method=…,path=…) (status=…,length=…) N.NNNms`` at INFO for each HTTP request it sees, except
    published files, with the same fields BentoML's access log has."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or PUBLISHED_FILE.search(scope["path"]):
            await self.app(scope, receive, send)
            return
        t0, status, length = time.perf_counter(), 0, 0

        async def send_and_count(message: dict) -> None:
            nonlocal status, length
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                length += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            client = scope.get("client") or ("-", 0)
            path, root = scope["path"], scope.get("root_path", "")
            if root and not path.startswith(root):          # the path as the client sent it, mount prefix included
                path = root + path
            log.info("%s:%s (method=%s,path=%s) (status=%s,length=%d) %.3fms", client[0], client[1], scope["method"],
                     path, status or 500, length, 1000 * (time.perf_counter() - t0))
