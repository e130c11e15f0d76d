"""The service's bounded generation queue (services/work_queue.py) with real threads: work beyond the workers waits
in the queue, work beyond the queue is refused at once with a 503 that carries Retry-After, and the queue takes
work again once it has drained."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.contract import ServiceError
from services.work_queue import RETRY_AFTER_MAX_S, GenerationQueue


def test_work_beyond_workers_and_depth_is_refused_with_retry_after():
    queue = GenerationQueue(workers=2, depth=1)
    gate = threading.Event()
    started = []

    def work(i: int) -> int:
        started.append(i)
        gate.wait(10)
        return i

    futures = [queue.submit(work, i) for i in range(3)]          # two run, one waits
    deadline = time.monotonic() + 5
    while len(started) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(started) == [0, 1] and queue.admitted == 3
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as refused:
        queue.submit(work, 3)
    assert time.monotonic() - t0 < 0.5
    err = refused.value
    assert err.code == 503 and err.field == "queue" and "2 at once + 1 waiting" in err.message
    assert int(err.headers["Retry-After"]) == err.extra["retry_after_s"] >= 1
    gate.set()
    assert [f.result(5) for f in futures] == [0, 1, 2]
    assert queue.admitted == 0
    assert queue.submit(work, 4).result(5) == 4                  # drained: takes work again
    queue.shutdown()


def test_retry_after_follows_the_measured_run_time():
    queue = GenerationQueue(workers=1, depth=3, first_guess_s=0.01)
    for _ in range(10):
        queue.submit(time.sleep, 0.3).result(5)
    gate = threading.Event()
    held = [queue.submit(gate.wait, 10) for _ in range(4)]
    with pytest.raises(ServiceError) as refused:
        queue.submit(gate.wait, 10)
    # ~0.3 s per run (the weighted mean has nearly converged) x 4 admitted on 1 worker: about 1.1-1.2 s → 2 s
    assert refused.value.headers["Retry-After"] == "2"
    gate.set()
    for f in held:
        f.result(5)
    assert 1 <= queue.retry_after() <= RETRY_AFTER_MAX_S
    queue.shutdown()


def test_errors_of_the_work_reach_the_caller_and_free_the_place():
    queue = GenerationQueue(workers=1, depth=0)

    def bad() -> None:
        raise ServiceError(409, "version: nope", "version")

    with pytest.raises(ServiceError, match="nope"):
        asyncio.run(queue.run(bad))
    assert queue.admitted == 0 and asyncio.run(queue.run(lambda: 7)) == 7
    queue.shutdown()


def test_a_queue_needs_a_worker():
    with pytest.raises(ValueError, match=">= 1 worker"):
        GenerationQueue(workers=0, depth=1)
