"""Published files from memory, answered ahead of the whole HTTP stack.

A published file (a component's GIF, strip, frames, eigen and deviation images, a version's metrics) never changes,
and once the service holds it in memory answering it takes microseconds. The stack in front of the API does not:
BentoML's middleware (Prometheus metrics, tracing, timeout, concurrency limit, request context), then Starlette's and
FastAPI's routing cost about 0.7 ms of CPU per request. That cost, not the answer, set the tail latency under load
(measured with wrk at 32 connections on two cores: 1 200 req/s, p99 103 ms).

:class:`MemoryFirst` is a plain ASGI layer around BentoML's application. For a ``GET`` it asks ``answer(scope)``,
which returns a complete response only when everything needed is already in memory and the request is allowed;
anything else (``None``) goes down the normal path unchanged: cold explanations, files not yet in memory, refused or
malformed requests, every error answer and every other route. The layer counts what it answers in Prometheus
(``figan_memory_first_responses_total`` by status), since BentoML's metrics middleware never sees those requests.

No library installs an ASGI layer in front of BentoML's own middleware: BentoML's documented hook for it is the
``service_class`` argument of ``bentoml.service``, which :func:`memory_first_service` uses.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import bentoml

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]
Answer = Callable[[Scope], Callable[[Scope, Callable, Callable], Awaitable[None]] | None]

RESPONSES = bentoml.metrics.Counter(name="figan_memory_first_responses", labelnames=["status"],
                                    documentation="Published files answered from memory ahead of the HTTP stack")


class MemoryFirst:
    """Answers a ``GET`` with ``answer(scope)`` when that gives a response; passes everything else to ``app``."""

    def __init__(self, app: ASGIApp, answer: Answer) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            response = self.answer(scope)
            if response is not None:
                RESPONSES.labels(status=str(response.status_code)).inc()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def memory_first_service(answer: Answer) -> type[bentoml.Service]:
    """A BentoML service class whose ASGI application is wrapped in :class:`MemoryFirst` with ``answer``."""

    class MemoryFirstService(bentoml.Service):
        __slots__ = ()

        def to_asgi(self, is_main: bool = True) -> ASGIApp:
            return MemoryFirst(super().to_asgi(is_main), answer)

    return MemoryFirstService
