"""The embedded default MLflow tracking server: one `mlflow server` process tree per home folder.

The platform needs a tracking server + Model Registry even on a laptop with nothing else running. This module
starts one as a background process whose whole state lives in a *home* folder::

    <home>/mlflow.db            SQLite backend store (experiments, runs, registered models, tags)
    <home>/artifacts/           artifact store, served *through* the server (clients see ``mlflow-artifacts:``
                                URIs and never touch the folder, so the same code works against a remote server)
    <home>/mlflow-server.log    the server's stdout + stderr (appended, rotated; each start is marked)
    <home>/mlflow-server.pid    the process id (= process-group id: the server runs in its own session)
    <home>/server.json          {"uri", "pid", "host", "port", "started", ...} for other processes (CLI down/status)
    <home>/last-port            the port of the last start, taken again at the next start when it is free
    <home>/webhook.key          the Fernet key encrypting webhook secrets, generated once and reused, so webhooks
                                registered before a restart stay usable

Design choices:

* **Lean process tree.** ``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (otherwise MLflow 3
  spawns a job runner with its own workers: ~10 processes, ~2.9 GB RSS). What remains is the ``mlflow server``
  launcher and one uvicorn worker.
* **Webhooks to local receivers.** Registry-registration triggers are delivered as webhooks to a receiver on the
  same host, so ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``.
  The server binds to loopback by default; anything else is the caller's explicit choice.
* **Findable and stoppable from any process.** The server runs in a new session (its pid is its process-group
  id); ``stop()`` signals the whole group: SIGTERM, then SIGKILL after ``timeout``. ``find_server`` trusts the
  recorded pid only while that process is alive *and* is an MLflow server (guards against pid reuse).
* **A stable address.** A restarted server takes the port it had before (when still free), so the worker, the
  service and webhooks registered with its URL keep reaching it; a first start picks a free port.
* **Idempotent start.** ``start_server`` on a home that already has a live server returns that server. A lock
  file serialises concurrent starts on one home, so two processes cannot both spawn a server.
* **Clear failures.** If the process exits, ``GET /health`` does not answer within ``timeout`` seconds or is answered
  by another process than the one started (its port was taken meanwhile), the process group is killed and
  :class:`MlflowServerError` says why (with the tail of the log).

Linux only (``/proc`` is read to find the server's processes and their memory).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .log_sink import popen_logged
from .procs import (_CHILDREN, _DIRECT, _cmdline, _group_members, _holders, _log_tail, _owns_port, _proc_stat,
                    _reap, _rss_bytes, wait_group_gone)

__all__ = ["MlflowServer", "MlflowServerError", "start_server", "find_server", "stop_server"]

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
LOG_FILE = "mlflow-server.log"
PID_FILE = "mlflow-server.pid"
INFO_FILE = "server.json"
LAST_PORT_FILE = "last-port"
KEY_FILE = "webhook.key"
LOCK_FILE = ".server.lock"



class MlflowServerError(RuntimeError):
    """The MLflow server could not be started or stopped; the message says why (with the log tail)."""


# ----------------------------------------------------------------------------------------------- the server

@dataclass
class MlflowServer:
    """A running (or recorded) `mlflow server` process group rooted at ``home``."""
    uri: str
    pid: int
    home: Path
    host: str = "127.0.0.1"
    port: int = 0
    started: str = ""
    startup_seconds: float | None = field(default=None, compare=False)

    def alive(self) -> bool:
        """True while the recorded process exists, is not a zombie and is an MLflow server."""
        _reap(self.pid)
        st = _proc_stat(self.pid)
        if st is None or st[0] == "Z":
            return False
        return "mlflow" in _cmdline(self.pid)

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when ``GET /health`` answers 200."""
        try:
            with _DIRECT.open(f"{self.uri}/health", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def processes(self) -> list[int]:
        """Pids of every live process of the server (its process group: launcher + uvicorn worker)."""
        return _group_members(self.pid) if self.alive() else []

    def rss_bytes(self) -> int:
        """Resident memory of all the server's processes together."""
        return sum(_rss_bytes(p) for p in self.processes())

    def stop(self, timeout: float = 10) -> bool:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; True if a live server was stopped.

        Removes the pidfile and server.json of the home when they still describe this server."""
        was_alive = self.alive()
        if was_alive:
            self._signal_group(signal.SIGTERM)
            if not self._wait_gone(timeout):
                self._signal_group(signal.SIGKILL)
                if not self._wait_gone(5):
                    raise MlflowServerError(f"MLflow server pid {self.pid} ({self.uri}) survived SIGKILL: "
                                            f"processes {_group_members(self.pid)} still running")
        self._forget()
        return was_alive

    # -- internals
    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_gone(self, timeout: float) -> bool:
        return wait_group_gone(self.pid, timeout)

    def _forget(self) -> None:
        info = _read_info(self.home)
        if info is None or int(info.get("pid", -1)) == self.pid:
            for name in (INFO_FILE, PID_FILE):
                (self.home / name).unlink(missing_ok=True)

    def to_dict(self) -> dict:
        return {"uri": self.uri, "pid": self.pid, "host": self.host, "port": self.port, "started": self.started,
                "home": str(self.home), "backend_store_uri": _backend_uri(self.home),
                "artifacts_destination": str(self.home / ARTIFACTS_DIR), "log": str(self.home / LOG_FILE)}


# ----------------------------------------------------------------------------------------------- helpers

def _backend_uri(home: Path) -> str:
    return f"sqlite:///{home / DB_FILE}"


def _read_info(home: Path) -> dict | None:
    try:
        return json.loads((home / INFO_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _free_port(host: str, wanted: int = 0) -> int:
    """``wanted`` when it can be bound on ``host`` now, else a free port the system picks. The probe binds as the
    server will (``SO_REUSEADDR``, as uvicorn and gunicorn do): the connections of the last server on that port
    linger in TIME_WAIT for a minute, which stops a plain bind but not the server's, while a port someone listens on
    stays refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if wanted:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, wanted))
                return wanted
        except OSError:
            pass
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _last_port(home: Path) -> int:
    try:
        return int((home / LAST_PORT_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def _client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _webhook_key(home: Path) -> str:
    """A Fernet key (url-safe base64 of 32 random bytes), generated once per home and reused."""
    path = home / KEY_FILE
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


@contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    with open(home / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": _webhook_key(home),
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        # the server caches each event's webhook list; 60 s (MLflow's default) would miss registrations made
        # just after `figan up` subscribed
        "MLFLOW_WEBHOOK_CACHE_TTL": os.environ.get("MLFLOW_WEBHOOK_CACHE_TTL", "2"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _mlflow_executable() -> list[str]:
    """The `mlflow` CLI of the running interpreter's environment (a venv need not be activated)."""
    exe = Path(sys.executable).parent / "mlflow"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]


# ----------------------------------------------------------------------------------------------- public API

def find_server(home: Path) -> MlflowServer | None:
    """The live server recorded in ``home``, or None (stale records of a dead server are removed)."""
    home = Path(home).resolve()
    info = _read_info(home)
    if info is None:
        return None
    try:
        server = MlflowServer(uri=info["uri"], pid=int(info["pid"]), home=home, host=info.get("host", ""),
                              port=int(info.get("port", 0)), started=info.get("started", ""))
    except (KeyError, TypeError, ValueError):
        return None
    if not server.alive():
        server._forget()
        return None
    return server


def start_server(home: Path, host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = 60) -> MlflowServer:
    """Start (or return the already running) MLflow tracking server of ``home``; waits for ``GET /health``.

    ``port=None`` takes the port of the last start when it is free, else a free port. Raises :class:`MlflowServerError` with the log tail when the server exits
    or is not healthy within ``timeout`` seconds (it is then killed)."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    with _home_lock(home):
        existing = find_server(home)
        if existing is not None:
            _wait_healthy(existing, None, timeout, log_start=0)
            return existing

        (home / ARTIFACTS_DIR).mkdir(exist_ok=True)
        port = port if port is not None else _free_port(host, wanted=_last_port(home))
        log_path = home / LOG_FILE
        cmd = _mlflow_executable() + [
            "server",
            "--backend-store-uri", _backend_uri(home),
            "--artifacts-destination", str(home / ARTIFACTS_DIR),
            "--host", host, "--port", str(port), "--workers", "1"]
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with open(log_path, "ab") as log:
            log_start = log.tell()
            log.write(f"=== {started} starting: {' '.join(cmd)}\n".encode())
        t0 = time.monotonic()
        proc = popen_logged(cmd, log_path, cwd=home, env=_server_env(home), stdin=subprocess.DEVNULL,
                            start_new_session=True)               # the log rotated by flows.log_sink
        _CHILDREN[proc.pid] = proc
        server = MlflowServer(uri=f"http://{_client_host(host)}:{port}", pid=proc.pid, home=home, host=host,
                              port=port, started=started)
        (home / PID_FILE).write_text(f"{proc.pid}\n")
        (home / INFO_FILE).write_text(json.dumps(server.to_dict(), indent=2))
        (home / LAST_PORT_FILE).write_text(f"{port}\n")
        try:
            _wait_healthy(server, proc, timeout, log_start)
        except BaseException:
            server.stop(timeout=5)
            raise
        server.startup_seconds = round(time.monotonic() - t0, 2)
        return server


def _wait_healthy(server: MlflowServer, proc: subprocess.Popen | None, timeout: float, log_start: int) -> None:
    deadline = time.monotonic() + timeout
    log_path = server.home / LOG_FILE
    while True:
        if proc is not None and proc.poll() is not None:
            raise MlflowServerError(f"MLflow server for {server.home} exited with code {proc.returncode} "
                                    f"before answering {server.uri}/health; log tail ({log_path}):\n"
                                    f"{_log_tail(log_path, log_start)}")
        if proc is None and not server.alive():
            raise MlflowServerError(f"MLflow server pid {server.pid} for {server.home} died while starting; "
                                    f"log tail ({log_path}):\n{_log_tail(log_path, log_start)}")
        if server.healthy():
            if proc is None or _owns_port(proc.pid, server.port):
                return
            raise MlflowServerError(f"MLflow server for {server.home} did not get port {server.port}: "
                                    f"{server.uri}/health is answered by {_holders(server.port)}, not by the "
                                    f"server started here (pid {proc.pid})")
        if time.monotonic() >= deadline:
            raise MlflowServerError(f"MLflow server for {server.home} did not answer {server.uri}/health within "
                                    f"{timeout:g} s; log tail ({log_path}):\n{_log_tail(log_path, log_start)}")
        time.sleep(0.25)


def stop_server(home: Path, timeout: float = 10) -> bool:
    """Stop the server recorded in ``home``; True if one was running."""
    home = Path(home).resolve()
    with _home_lock(home) if home.is_dir() else _nullcontext():
        server = find_server(home)
        return server.stop(timeout) if server is not None else False


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield
