"""Background processes of the embedded platform (MLflow server, worker, service): start, find, stop.

Each daemon runs in its own session (its pid is its process-group id, so stopping it stops its children too),
records ``<home>/<name>.json`` (pid, url, command, log) for other processes (`figan down`, `figan status`) and
appends its output to ``<home>/logs/<name>.log``, rotated by :mod:`flows.log_sink`. A record whose process is gone, or whose pid now belongs to
another program, is treated as absent. Linux only (``/proc``).

**Ports.** A daemon is recorded only once its health URL answers *and* the socket listening on that port belongs to
the process started here (or one of its children, by ``psutil``): another program already on the port — e.g. a
second platform's worker — is never taken for ours. :func:`check_port_free` refuses a taken port before anything
starts, naming the port and who holds it (process name and pid, where this user may see them).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from .log_sink import limits as log_limits, popen_logged

__all__ = ["Daemon", "DaemonError", "PortTakenError", "start_daemon", "find_daemon", "stop_daemon",
           "check_port_free"]

# Popen handles of processes started by *this* process: polled so that an exited child is reaped (a zombie
# would still answer os.kill(pid, 0) and look alive).
_CHILDREN: dict[int, subprocess.Popen] = {}

# A direct opener: loopback health checks must never go through an HTTP(S)_PROXY.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DaemonError(RuntimeError):
    """A daemon could not be started or stopped; the message says why (with the log tail)."""


class PortTakenError(DaemonError):
    """A port the platform is configured to use is held by another process; the message names port and holder."""


# --------------------------------------------------------------------------------------------- ports

def _listening_pids(port: int) -> set[int | None]:
    """Pids of the sockets listening on TCP ``port`` (None for one this user may not see the owner of)."""
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return set()
    return {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def _describe(pid: int | None) -> str:
    if pid is None:
        return "a process of another user (its name and pid are not visible to this user)"
    try:
        p = psutil.Process(pid)
        return f"{p.name()} (pid {pid}: {' '.join(p.cmdline())[:160]})"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {pid}"


def _holders(port: int) -> str:
    """Who listens on ``port``, in words."""
    pids = sorted(_listening_pids(port), key=lambda p: (p is None, p or 0))
    return ", ".join(_describe(p) for p in pids) if pids else "a process this user cannot see"


def check_port_free(port: int, host: str, what: str) -> None:
    """Raise :class:`PortTakenError` when a server could not listen on ``host:port`` now (``what`` says what the
    platform needs the port for); a taken port's message names who holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)       # as servers do: TIME_WAIT is no holder
        try:
            s.bind((host, port))
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise PortTakenError(f"port {port} ({what}) cannot be used on {host}: {e.strerror}") from None
    raise PortTakenError(f"port {port} ({what}) is already in use on {host} by {_holders(port)}; stop that "
                         f"process or configure another port")


def _owns_port(pid: int, port: int) -> bool:
    """Whether the socket listening on ``port`` belongs to process ``pid``, one of its descendants or a member of
    its process group (a daemon is a group leader; a child that outlived its parent stays in the group)."""
    try:
        family = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return False
    return bool(_listening_pids(port) & (family | set(_group_members(pid))))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process-group id) of a process, None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()     # the command name may contain spaces and parentheses
    return fields[0], int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _proc_stat(int(entry.name))
        if st is not None and st[1] == pgid and st[0] != "Z":
            members.append(int(entry.name))
    return sorted(members)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no live process is left in the group (reaping our own child); False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        _reap(pgid)
        if not _group_members(pgid):
            proc = _CHILDREN.pop(pgid, None)
            if proc is not None:
                proc.wait(timeout=1)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _log_tail(path: Path, start: int = 0, chars: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(start, path.stat().st_size - chars))
            return f.read().decode(errors="replace").strip()
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Daemon:
    """A recorded background process group: ``marker`` must appear in its command line (guards pid reuse)."""
    name: str
    home: str
    pid: int
    url: str
    marker: str
    log: str
    started: str = ""

    def alive(self) -> bool:
        _reap(self.pid)
        st = _proc_stat(self.pid)
        return st is not None and st[0] != "Z" and self.marker in _cmdline(self.pid)

    def healthy(self, path: str = "/health", timeout: float = 2.0) -> bool:
        try:
            with _DIRECT.open(f"{self.url}{path}", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def rss_bytes(self) -> int:
        return sum(_rss_bytes(p) for p in _group_members(self.pid)) if self.alive() else 0

    def stop(self, timeout: float = 10) -> bool:
        """SIGTERM the process group, SIGKILL after ``timeout`` s; True if a live process was stopped."""
        was_alive = self.alive()
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            if not was_alive or self._gone(0):
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            if self._gone(wait):
                break
        else:
            raise DaemonError(f"{self.name} (pid {self.pid}) survived SIGKILL: {_group_members(self.pid)}")
        _record(Path(self.home), self.name).unlink(missing_ok=True)
        return was_alive

    def _gone(self, timeout: float) -> bool:
        return wait_group_gone(self.pid, timeout)


def _record(home: Path, name: str) -> Path:
    return home / f"{name}.json"


def free_port(host: str = "127.0.0.1", wanted: int = 0) -> int:
    """``wanted`` when a server could listen on it on ``host`` now, else a free port the system picks. The probe
    binds as servers do (``SO_REUSEADDR``): connections of a stopped server still in TIME_WAIT do not count as
    taken, a listening socket does."""
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


def find_daemon(home: Path, name: str) -> Daemon | None:
    """The live daemon ``name`` recorded in ``home``, or None (a stale record is removed)."""
    path = _record(Path(home), name)
    try:
        d = Daemon(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if not d.alive():
        if not _group_members(d.pid):           # kept while orphans of a dead daemon remain (stop_daemon)
            path.unlink(missing_ok=True)
        return None
    return d


def start_daemon(home: Path, name: str, cmd: list[str], url: str, env: dict[str, str] | None = None,
                 marker: str | None = None, health: str = "/health", timeout: float = 60,
                 port: int | None = None) -> Daemon:
    """Start ``cmd`` in its own session (or return the live one already recorded), wait until ``url + health``
    answers 200 from the started process itself (the socket listening on ``port``, by default the URL's, belongs to
    it or a child of it), then record it. On failure the process group is killed and :class:`DaemonError` carries
    the reason and the log tail."""
    log_limits()                                 # a bad FIGAN_LOG_* setting fails here, before anything starts
    home = Path(home).absolute()
    existing = find_daemon(home, name)
    if existing is not None:
        return existing
    stop_daemon(home, name)                      # what a dead predecessor left in its group (its children)
    port = port or urllib.parse.urlsplit(url).port
    log_path = home / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(log_path, "ab") as log:
        start = log.tell()
        log.write(f"=== {started} starting: {' '.join(cmd)}\n".encode())
    proc = popen_logged(cmd, log_path, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                        stdin=subprocess.DEVNULL, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    d = Daemon(name=name, home=str(home), pid=proc.pid, url=url, marker=marker or cmd[-1], log=str(log_path),
               started=started)
    deadline = time.monotonic() + timeout
    while True:
        why = None
        if proc.poll() is not None:
            why = f"exited with code {proc.returncode}"
        elif d.healthy(health):
            if port is None or _owns_port(proc.pid, port):
                break
            why = (f"did not get port {port}: {url}{health} is answered by {_holders(port)}, not by the process "
                   f"started here (pid {proc.pid})")
        elif time.monotonic() >= deadline:
            why = f"did not answer {url}{health} within {timeout:g} s"
        if why is not None:
            d.stop(timeout=5)
            raise DaemonError(f"{name} {why}; log tail ({log_path}):\n{_log_tail(log_path, start)}")
        time.sleep(0.25)
    _record(home, name).write_text(json.dumps(asdict(d), indent=2))
    return d


def stop_daemon(home: Path, name: str, timeout: float = 10) -> bool:
    """Stop the daemon ``name`` and everything in its process group; True if anything was running.

    A daemon that died (killed by the OOM killer, say) can leave children behind in its group, e.g. the worker's
    explain processes. Its record still names the group, and POSIX does not reuse a pid while a process group of
    that id exists, so whatever is left in the group is the dead daemon's: it is stopped too."""
    d = find_daemon(home, name)
    if d is not None:
        return d.stop(timeout)
    try:
        dead = Daemon(**json.loads(_record(Path(home), name).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return False
    orphans = _group_members(dead.pid)
    if orphans:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            try:
                os.killpg(dead.pid, sig)
            except ProcessLookupError:
                break
            if wait_group_gone(dead.pid, wait):
                break
    _record(Path(home), name).unlink(missing_ok=True)
    return bool(orphans)
