"""Background processes of the embedded platform (MLflow server, worker, service): start, find, stop.

Each daemon runs in its own session (its pid is its process-group id, so stopping it stops its children too),
records ``<home>/<name>.json`` (pid, url, command, log) for other processes (`figan down`, `figan status`) and
appends its output to ``<home>/logs/<name>.log``. A record whose process is gone, or whose pid now belongs to
another program, is treated as absent. Linux only (``/proc``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["Daemon", "DaemonError", "start_daemon", "find_daemon", "stop_daemon"]

# Popen handles of processes started by *this* process: polled so that an exited child is reaped (a zombie
# would still answer os.kill(pid, 0) and look alive).
_CHILDREN: dict[int, subprocess.Popen] = {}

# A direct opener: loopback health checks must never go through an HTTP(S)_PROXY.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DaemonError(RuntimeError):
    """A daemon could not be started or stopped; the message says why (with the log tail)."""


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


def find_daemon(home: Path, name: str) -> Daemon | None:
    """The live daemon ``name`` recorded in ``home``, or None (a stale record is removed)."""
    path = _record(Path(home), name)
    try:
        d = Daemon(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if not d.alive():
        path.unlink(missing_ok=True)
        return None
    return d


def start_daemon(home: Path, name: str, cmd: list[str], url: str, env: dict[str, str] | None = None,
                 marker: str | None = None, health: str = "/health", timeout: float = 60) -> Daemon:
    """Start ``cmd`` in its own session (or return the live one already recorded) and wait until ``url + health``
    answers 200. On failure the process group is killed and :class:`DaemonError` carries the log tail."""
    home = Path(home).absolute()
    existing = find_daemon(home, name)
    if existing is not None:
        return existing
    log_path = home / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(log_path, "ab") as log:
        start = log.tell()
        log.write(f"=== {started} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    d = Daemon(name=name, home=str(home), pid=proc.pid, url=url, marker=marker or cmd[-1], log=str(log_path),
               started=started)
    _record(home, name).write_text(json.dumps(asdict(d), indent=2))
    deadline = time.monotonic() + timeout
    while not d.healthy(health):
        if proc.poll() is not None or time.monotonic() >= deadline:
            why = (f"exited with code {proc.returncode}" if proc.poll() is not None
                   else f"did not answer {url}{health} within {timeout:g} s")
            d.stop(timeout=5)
            raise DaemonError(f"{name} {why}; log tail ({log_path}):\n{_log_tail(log_path, start)}")
        time.sleep(0.25)
    return d


def stop_daemon(home: Path, name: str, timeout: float = 10) -> bool:
    d = find_daemon(home, name)
    return d.stop(timeout) if d is not None else False
