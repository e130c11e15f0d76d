"""Fan-out over versions on a Dask task runner (prefect-dask): the concurrency limit holds, every target gets a row
in order, one failure does not stop the others. A stand-in replaces the explain flow (the real flow runs in
tests/test_flows_explain.py and tests/test_team_config.py); it is a real nested Prefect flow run."""
from __future__ import annotations

import threading
import time

import pytest

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.fanout import _normalise, dask_runner, explain_many, run_windowed

_lock = threading.Lock()
_state = {"now": 0, "max": 0, "calls": []}
_first_two = threading.Barrier(2, timeout=60)


def _enter(version: str) -> int:
    with _lock:
        _state["now"] += 1
        _state["max"] = max(_state["max"], _state["now"])
        _state["calls"].append(version)
        return len(_state["calls"])


def _leave() -> None:
    with _lock:
        _state["now"] -= 1


@flow(name="fake-explain")
def _fake_explain(name: str, version: str) -> dict:
    n = _enter(version)
    if n <= 2:
        _first_two.wait()            # the first two run at the same time, or this times out (BrokenBarrierError)
    time.sleep(0.3)
    _leave()
    if version == "3":
        raise ValueError("figan.task: missing")
    return {"status": "done", "run_id": f"run-{version}", "key": "k", "new": True}


def fake_runner(name: str, version: str, stop_after=None) -> dict:     # module level: Dask pickles it by name
    return _fake_explain(name, version)


def test_fanout_runs_in_parallel_and_isolates_failures():
    _state.update(now=0, max=0, calls=[])
    _first_two.reset()
    targets = [("cnn-a", "1"), ("cnn-a", "2"), ("cnn-a", "3"), {"name": "cnn-b", "version": 4}, ("cnn-b", "5")]
    rows = explain_many(targets, max_concurrent=2, processes=False, runner=fake_runner)
    assert [(r["name"], r["version"]) for r in rows] == [("cnn-a", "1"), ("cnn-a", "2"), ("cnn-a", "3"),
                                                          ("cnn-b", "4"), ("cnn-b", "5")]
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done", "done"], rows
    assert "figan.task" in rows[2]["error"] and rows[4]["run_id"] == "run-5"
    assert sorted(_state["calls"]) == ["1", "2", "3", "4", "5"]
    assert _state["max"] == 2, _state


@task(cache_policy=NO_CACHE)
def _sleepy(i: int) -> int:
    _enter(str(i))
    time.sleep(0.2)
    _leave()
    return i * i


def test_window_limits_a_bigger_cluster():
    """Four Dask workers, a window of two: never more than two at once (the limit holds on any cluster)."""
    _state.update(now=0, max=0, calls=[])

    @flow(task_runner=dask_runner(4, processes=False))
    def fan() -> list:
        return run_windowed(lambda t: _sleepy.submit(int(t[1])), [("x", str(i)) for i in range(8)], limit=2)

    assert fan() == [i * i for i in range(8)]
    assert 1 <= _state["max"] <= 2, _state


def test_fanout_rejects_bad_input():
    with pytest.raises(ValueError, match="twice"):
        _normalise([("m", "1"), ("m", 1)])
    with pytest.raises(ValueError, match="max_concurrent"):
        explain_many([("m", "1")], max_concurrent=0)
    assert explain_many([], max_concurrent=2) == []
