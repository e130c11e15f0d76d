"""The service's CPU-bound work (on-demand sweeps, uploaded images) on its own bounded queue.

``workers`` threads run the work and at most ``depth`` more requests wait for one; a request beyond that is
answered at once with **503 and ``Retry-After``** instead of waiting in a request thread (where every waiting
request would hold a thread, its upload and, once it ran, its frames, and the tail latency of everyone grows with
the pile). ``Retry-After`` is the time the work admitted now takes to drain: the mean run time of recent work
(an exponentially weighted mean) times the admitted requests per worker, at least 1 s.

The queue knows nothing of HTTP beyond the :class:`~services.contract.ServiceError` it raises.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from .contract import ServiceError

T = TypeVar("T")
RETRY_AFTER_MAX_S = 60
_EWMA = 0.2                     # weight of the newest run time in the mean


class GenerationQueue:
    """A thread pool of ``workers`` with room for ``depth`` waiting requests; thread-safe."""

    def __init__(self, workers: int, depth: int, first_guess_s: float = 0.2):
        if workers < 1 or depth < 0:
            raise ValueError(f"a generation queue needs >= 1 worker and depth >= 0, got {workers} and {depth}")
        self.workers, self.depth = workers, depth
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="figan-generate")
        self._lock = threading.Lock()
        self._admitted = 0                      # running + waiting
        self._mean_s = first_guess_s

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    def retry_after(self) -> int:
        """Seconds until the work admitted now has drained (estimate, 1..60)."""
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(self._mean_s * max(1, self._admitted) / self.workers)))

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on a worker; a 503 with ``Retry-After`` when workers and queue are full."""
        with self._lock:
            if self._admitted >= self.workers + self.depth:
                wait = self.retry_after()
                raise ServiceError(503, f"queue: {self._admitted} generations are running or waiting, the most this "
                                        f"service takes ({self.workers} at once + {self.depth} waiting); retry "
                                        f"after {wait} s", "queue", headers={"Retry-After": str(wait)},
                                   retry_after_s=wait)
            self._admitted += 1
        try:
            return self._pool.submit(self._timed, fn, args, kwargs)
        except BaseException:
            self._done(None)
            raise

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """:meth:`submit` awaited from the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _timed(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self._done(time.monotonic() - t0)

    def _done(self, seconds: float | None) -> None:
        with self._lock:
            self._admitted -= 1
            if seconds is not None:
                self._mean_s += _EWMA * (seconds - self._mean_s)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
