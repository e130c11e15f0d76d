"""Ports of the embedded platform: `figan up` refuses a configured port another process holds, at once and naming
the holder; a daemon is recorded only when the process answering its health URL is the one started; the platform
tests' own fixture (conftest.platform_env) never uses the default ports that a running `make demo` holds."""
from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
import time
from contextlib import ExitStack, contextmanager

import psutil
import pytest

import flows.explain  # noqa: F401 — imported up front: the timing below is of `figan up`'s check, not of imports
from flows.cli import main
from flows.platform import check_ports, down
from flows.procs import DaemonError, find_daemon, start_daemon
from flows.settings import Settings
from tests.conftest import free_ports

DEFAULT_PORTS = (Settings().receiver_port, Settings().service_port)


@contextmanager
def listening(port: int, host: str = "127.0.0.1"):
    """This process listening on ``port``, as another program would."""
    with socket.socket() as s:
        s.bind((host, port))
        s.listen()
        yield s


@pytest.mark.parametrize("var, what", [("FIGAN_RECEIVER_PORT", "webhook receiver"),
                                       ("FIGAN_SERVICE_PORT", "explanation service")])
def test_up_refuses_a_taken_port_at_once_naming_the_holder(platform_env, monkeypatch, capsys, var, what):
    (port,) = free_ports(1)
    monkeypatch.setenv(var, str(port))
    try:
        with listening(port):
            t0 = time.monotonic()
            assert main(["up"]) == 2
            seconds = time.monotonic() - t0
    finally:
        down(Settings.load(), log=lambda s: None)        # whatever a failing check would have started
    err = capsys.readouterr().err
    me = psutil.Process()
    assert f"port {port} (" in err and what in err and var in err and "already in use" in err
    assert f"{me.name()} (pid {os.getpid()}:" in err                            # who holds it
    assert seconds < 5, seconds                                                # before starting anything
    assert not (platform_env / "mlflow" / "server.json").exists()               # nothing was started
    assert not [p.name for p in platform_env.glob("*.json")]


def test_a_daemon_is_recorded_only_when_its_own_process_answers(tmp_path):
    impostor_port, real_port = free_ports(2)

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", impostor_port), Ok)   # answers /health: 200
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    try:
        with pytest.raises(DaemonError, match=rf"did not get port {impostor_port}: .* is answered by "
                                              rf".*pid {os.getpid()}.*not by the process started here") as e:
            start_daemon(tmp_path, "part", sleeper, f"http://127.0.0.1:{impostor_port}", timeout=30)
    finally:
        impostor.shutdown()
    started = int(str(e.value).split("started here (pid ")[1].split(")")[0])
    assert not psutil.pid_exists(started) or psutil.Process(started).status() == psutil.STATUS_ZOMBIE
    assert find_daemon(tmp_path, "part") is None and not (tmp_path / "part.json").exists()

    server = [sys.executable, "-m", "http.server", str(real_port), "--bind", "127.0.0.1"]
    d = start_daemon(tmp_path, "part", server, f"http://127.0.0.1:{real_port}", marker="http.server", health="/",
                     timeout=60)
    try:
        assert find_daemon(tmp_path, "part").pid == d.pid and (tmp_path / "part.json").is_file()
    finally:
        assert d.stop()


def test_platform_fixture_uses_its_own_home_and_free_ports(platform_env, tmp_path):
    settings = Settings.load()
    assert settings.home == platform_env and settings.home.is_relative_to(tmp_path)
    ports = (settings.receiver_port, settings.service_port)
    assert len(set(ports)) == 2 and not set(ports) & set(DEFAULT_PORTS)
    with ExitStack() as demo:                            # the defaults held, as by a platform `make demo` left running
        for port in DEFAULT_PORTS:
            try:
                demo.enter_context(listening(port, "0.0.0.0"))
            except OSError:
                pass                                     # held already (by a running demo, say)
        check_ports(settings)                            # the fixture's own ports are free
