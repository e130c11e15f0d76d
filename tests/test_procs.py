"""Background processes of the embedded platform (real processes, real files): daemon logs are rotated by
flows.log_sink, and what a dead daemon leaves in its process group is stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.log_sink import limits
from flows.procs import find_daemon, start_daemon, stop_daemon
from tests.conftest import free_ports

REPO = Path(__file__).resolve().parents[1]


def test_the_sink_rotates_at_the_size_and_keeps_the_backups(tmp_path):
    log = tmp_path / "part.log"
    lines = [f"line {i:05d} " + "x" * 90 for i in range(1000)]                   # ~100 KB
    subprocess.run([sys.executable, "-m", "flows.log_sink", str(log)], input="\n".join(lines).encode(), cwd=REPO,
                   env={"FIGAN_LOG_MAX_BYTES": "10000", "FIGAN_LOG_BACKUPS": "2", "PATH": "/usr/bin:/bin"},
                   check=True, timeout=60)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["part.log", "part.log.1", "part.log.2"]
    assert all(f.stat().st_size <= 10000 for f in files)
    assert log.read_text().splitlines()[-1] == lines[-1]                         # the newest line is in the log
    kept = (tmp_path / "part.log.2").read_text() + (tmp_path / "part.log.1").read_text() + log.read_text()
    assert kept.splitlines() == lines[-len(kept.splitlines()):]                   # in order, nothing garbled


def test_a_daemon_writes_through_the_sink(tmp_path, monkeypatch):
    monkeypatch.setenv("FIGAN_LOG_MAX_BYTES", "4096")
    monkeypatch.setenv("FIGAN_LOG_BACKUPS", "1")
    (port,) = free_ports(1)
    chatty = [sys.executable, "-c", "import http.server, sys\n"
              f"for i in range(400): print('hello', i, 'y' * 40)\n"
              f"http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"]
    d = start_daemon(tmp_path, "chatty", chatty, f"http://127.0.0.1:{port}", marker="http.server", health="/",
                     timeout=60)
    try:
        log = tmp_path / "logs" / "chatty.log"
        deadline = time.monotonic() + 20
        while "hello 399" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the daemon's last line never reached its log"
            time.sleep(0.2)
        assert log.stat().st_size <= 4096 and (tmp_path / "logs" / "chatty.log.1").stat().st_size <= 4096
        assert not (tmp_path / "logs" / "chatty.log.2").exists()
    finally:
        assert d.stop()


def test_bad_log_limits_are_refused_before_anything_starts(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="FIGAN_LOG_BACKUPS='many' is not an integer"):
        limits({"FIGAN_LOG_BACKUPS": "many"})
    monkeypatch.setenv("FIGAN_LOG_MAX_BYTES", "10")
    with pytest.raises(ValueError, match="FIGAN_LOG_MAX_BYTES must be at least 1024, got 10"):
        start_daemon(tmp_path, "never", [sys.executable, "-c", "pass"], "http://127.0.0.1:9")
    assert not (tmp_path / "logs").exists() and not (tmp_path / "never.json").exists()


def test_the_children_of_a_dead_daemon_are_stopped(tmp_path):
    """A daemon killed by the OOM killer leaves its children running (e.g. the Prefect worker's flow-run processes);
    `figan down` (stop_daemon) and the next start of that part stop them."""
    (port,) = free_ports(1)
    parent = [sys.executable, "-c", "import http.server, subprocess, sys\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
              f"http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"]
    for finish in ("down", "up again"):
        d = start_daemon(tmp_path, "worker", parent, f"http://127.0.0.1:{port}", marker="http.server", health="/",
                         timeout=60)
        (child,) = psutil.Process(d.pid).children()
        os.kill(d.pid, signal.SIGKILL)                                   # the daemon dies, its child lives on
        psutil.Process(d.pid).wait(10) if psutil.pid_exists(d.pid) else None
        assert find_daemon(tmp_path, "worker") is None and child.is_running()
        if finish == "down":
            assert stop_daemon(tmp_path, "worker") is True
        else:
            again = start_daemon(tmp_path, "worker", parent, f"http://127.0.0.1:{port}", marker="http.server",
                                 health="/", timeout=60)
            assert again.stop()
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert stop_daemon(tmp_path, "worker") is False and not (tmp_path / "worker.json").exists()


@pytest.mark.platform                       # starts a real MLflow server twice (~30 s): not the fast lane
def test_the_embedded_mlflow_keeps_its_port_across_restarts(tmp_path):
    """The worker, the service and MLflow's webhooks hold the server's URL: a restart takes the same port."""
    from flows.mlflow_server import start_server, stop_server

    first = start_server(tmp_path / "mlflow")
    try:
        assert stop_server(tmp_path / "mlflow")
        second = start_server(tmp_path / "mlflow")
        assert second.port == first.port and second.pid != first.pid
    finally:
        stop_server(tmp_path / "mlflow")
