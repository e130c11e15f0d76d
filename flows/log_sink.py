"""A daemon's output into a size-bounded, rotated log: ``python -m flows.log_sink <path>`` copies its stdin, line by
line, to ``path`` through :class:`logging.handlers.RotatingFileHandler`, and ends when the daemon (and every child
of it holding the pipe) has ended.

The embedded platform's daemons (MLflow, Prefect, worker, service) write to their stdout for months on a laptop; a
plain append-only file grows without bound. Rotation needs the writer's help (the daemon holds the file open), so
each daemon writes into a pipe and this small process owns the file: ``FIGAN_LOG_MAX_BYTES`` per file (default
20 MiB), ``FIGAN_LOG_BACKUPS`` older files (default 3: ``<path>.1`` … ``<path>.3``).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_MAX_BYTES = 20 * 2 ** 20
DEFAULT_BACKUPS = 3
REPO = Path(__file__).resolve().parents[1]


def popen_logged(cmd: list[str], log_path: Path, **popen_kwargs) -> subprocess.Popen:
    """Start ``cmd`` (``popen_kwargs`` as for :class:`subprocess.Popen`) with stdout and stderr going through a pipe
    to a sink process that owns ``log_path`` and rotates it. The sink ends with the last process holding the pipe
    (the daemon and its children); it runs in its own session, so stopping the daemon's group leaves it to drain."""
    limits()                                     # a bad FIGAN_LOG_* setting fails here, before anything starts
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    sink = subprocess.Popen([sys.executable, "-m", "flows.log_sink", str(log_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath})
    try:
        return subprocess.Popen(cmd, stdout=sink.stdin, stderr=subprocess.STDOUT, **popen_kwargs)
    finally:
        sink.stdin.close()


def limits(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(max bytes per file, backups) from ``FIGAN_LOG_MAX_BYTES`` / ``FIGAN_LOG_BACKUPS``."""
    env = os.environ if env is None else env
    out = []
    for var, default, least in (("FIGAN_LOG_MAX_BYTES", DEFAULT_MAX_BYTES, 1024), ("FIGAN_LOG_BACKUPS",
                                                                                  DEFAULT_BACKUPS, 1)):
        raw = env.get(var, str(default))
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not an integer") from None
        if value < least:
            raise ValueError(f"{var} must be at least {least}, got {value}")
        out.append(value)
    return out[0], out[1]


def copy_rotated(stream, path: Path, max_bytes: int, backups: int) -> None:
    """Every line of the binary ``stream`` into ``path``, rotated at ``max_bytes``, until end of file."""
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
    finally:
        handler.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m flows.log_sink <log file>", file=sys.stderr)
        return 2
    max_bytes, backups = limits()
    copy_rotated(sys.stdin.buffer, Path(argv[0]), max_bytes, backups)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
