"""What a failed explanation waits for before it is tried again: one classification of errors, shared by the flow's
task retries, the failure it records on the version (:func:`flows.explain.record_failure`) and the worker's policy
(:func:`flows.trigger.decide`).

* **contract** — :class:`flows.registry.ContractError`: the registered CNN (its tags, model files, dataset) does not
  meet the contract. Tried again when the version's contract tags change.
* **transient** — what a retry can fix: ``OSError`` (connection, timeout, file system; ``requests``' errors are
  OSErrors), MLflow errors with an HTTP status of 408, 429 or 5xx, ``httpx`` transport errors and 5xx answers
  (Prefect's API), subprocess timeouts, out of memory, a data version the data store cannot deliver (yet). Tried
  again after ``retry_backoff`` × 2^(attempts−1) s, at most ``max_attempts`` times.
* **program** — everything else: ``TypeError``, ``AttributeError``, ``NameError``, ``KeyError``,
  ``AssertionError``, ``ValueError``, a ``RuntimeError`` of torch, an MLflow 4xx, ... The same code on the same
  inputs raises it again, so a retry only burns compute: tried again when the code, the explain config or the
  contract tags change (:func:`program_fingerprint`).
"""
from __future__ import annotations

import hashlib
import subprocess
import traceback
from functools import lru_cache
from pathlib import Path

import httpx
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from . import registry as R
from .data import DataVersionError
from .settings import Settings

CONTRACT, TRANSIENT, PROGRAM = "contract", "transient", "program"
REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("models", "flows")            # the code an explanation runs
_TRANSIENT_TYPES = (OSError, MemoryError, torch.OutOfMemoryError, subprocess.TimeoutExpired, httpx.TransportError,
                    DataVersionError)
_TRANSIENT_HTTP = frozenset({408, 429})


def failure_kind(exc: BaseException) -> str:
    """``contract``, ``transient`` or ``program`` (see the module docstring)."""
    if isinstance(exc, R.ContractError):
        return CONTRACT
    if isinstance(exc, _TRANSIENT_TYPES):
        return TRANSIENT
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return TRANSIENT if status >= 500 or status in _TRANSIENT_HTTP else PROGRAM
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return TRANSIENT if status >= 500 or status in _TRANSIENT_HTTP else PROGRAM
    return PROGRAM


def describe(exc: BaseException) -> str:
    """The error as a version's ``figan.error`` shows it: type and message, and for a programming error where it
    was raised (file:line in function, the innermost frame)."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if failure_kind(exc) == PROGRAM and frames:
        last = frames[-1]
        path = Path(last.filename)
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        text += f" (at {shown}:{last.lineno} in {last.name})"
    return text


def code_digest(root: Path = REPO) -> str:
    """A hash of every Python file under ``models/`` and ``flows/`` of ``root`` (this checkout): changes when the
    code an explanation runs changes (read again only when a file's size or modification time changed)."""
    files = sorted(p for d in CODE_DIRS for p in (root / d).rglob("*.py"))
    return _digest(root, tuple((p.relative_to(root).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                               for p in files))


@lru_cache(maxsize=8)
def _digest(root: Path, signature: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, _, _ in signature:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _config_text(settings: Settings) -> str:
    """The explain config as configured (the file's text, not its parsed value: a config that does not parse is a
    config too) and the device."""
    path = settings.explain_config
    if path is None:
        text = "(defaults)"
    else:
        try:
            text = Path(path).read_text()
        except OSError:
            text = f"(missing {path})"
    return f"{text}\ndevice={settings.device}"


def program_fingerprint(client: MlflowClient, settings: Settings, name: str, version: str | int) -> str:
    """What a programming error was raised on: the code (:func:`code_digest`), the explain config and the
    version's contract tags. A version that failed with one is tried again only when this changes."""
    blob = "|".join((code_digest(), _config_text(settings), R.contract_fingerprint(client, name, version)))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
