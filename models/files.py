"""Cache files written whole or not at all, and checked before they are reused.

Everything the flows and the service keep to reuse later (cached features, the registration, checkpoints, the
kept generator and PLS state, downloaded explanations) is written with :func:`write_atomic`: into a temporary file
in the same folder, flushed and fsynced, then renamed over the target with ``os.replace``. A reader, or a crash
half-way, sees the previous file or the complete new one, never a part of one; concurrent writers each use their
own temporary name. Reuse goes through a check that the file is whole (:func:`load_npy`, :func:`load_torch`): a
truncated or inconsistent file counts as missing, so its caller makes it again instead of using it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

log = logging.getLogger("figan.files")


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` with ``write(binary file)``, atomically (see the module docstring); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                    # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    return write_atomic(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def _unusable(path: Path, why: str) -> None:
    log.warning(f"cache file {path} is not whole ({why}); it will be made again")


def load_npy(path: str | Path | None, rows: int | None = None) -> np.ndarray | None:
    """A cached ``.npy`` when it is whole (its header's shape and dtype account for exactly its size on disk) and,
    with ``rows``, has that many rows; None when it is missing or not (the caller makes it again)."""
    if path is None or not Path(path).is_file():
        return None
    path = Path(path)
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError("object arrays are not cached data")
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if path.stat().st_size != expected:
            _unusable(path, f"{path.stat().st_size} bytes on disk, its header describes {expected}")
            return None
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        _unusable(path, str(e))
        return None
    if rows is not None and (array.ndim < 1 or array.shape[0] != rows):
        _unusable(path, f"{array.shape[0] if array.ndim else 0} rows, expected {rows}")
        return None
    return array


def load_torch(path: str | Path | None, check: Callable[[Any], bool] = lambda obj: True) -> Any | None:
    """A cached ``torch.save`` file (tensors only: ``weights_only``) when it loads whole and ``check(obj)`` holds;
    None when it is missing or not (the caller makes it again)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        _unusable(Path(path), str(e)[:200])
        return None
    if not check(obj):
        _unusable(Path(path), "its content does not match what it caches")
        return None
    return obj
