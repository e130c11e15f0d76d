"""The service's bounded caches: what it keeps in memory, by bytes, and the explanation folders on disk, by bytes.

* :class:`ByteLRU` — loaded generators, PLS states and CNNs (and the bytes of published files) in a
  ``cachetools.LRUCache`` whose size is counted in bytes (``getsizeof``: the tensors and arrays a value holds, see
  :func:`tensor_bytes`); beyond ``max_bytes`` the least recently used entries are dropped. A request that still
  holds an evicted model keeps using it; the next one loads it again. Each key is loaded by one thread at a time.
* :class:`DiskCache` — the folders ``<root>/<run_id>/`` of downloaded explanations, kept under ``max_bytes`` by
  deleting the least recently used ones, never one in use (a request reading or loading from it holds it with
  :meth:`DiskCache.in_use`). Folders left by an earlier process count with their modification time as last use.
  Each folder records the size of every file it was downloaded with (:func:`record_sizes`); a folder reused that
  no longer matches (:func:`is_whole`: a truncated or missing file) is downloaded again, never served.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from cachetools import LRUCache

from models.files import write_text_atomic

log = logging.getLogger("figan.service")
V = TypeVar("V")


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors and arrays ``value`` holds: a module's parameters and buffers (each storage once), numpy
    arrays, tensors, and those inside tuples, lists, dicts and dataclasses; ``bytes`` count their length; anything
    else 0."""
    seen: set[int] = set()

    def of_tensor(t: torch.Tensor) -> int:
        if t.device.type == "meta":
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    def walk(v: Any) -> int:
        if isinstance(v, torch.nn.Module):
            return sum(of_tensor(t) for t in (*v.parameters(), *v.buffers()))
        if isinstance(v, torch.Tensor):
            return of_tensor(v)
        if isinstance(v, np.ndarray):
            return int(v.nbytes)
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, (tuple, list)):
            return sum(walk(x) for x in v)
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return sum(walk(getattr(v, f.name)) for f in dataclasses.fields(v))
        return 0

    return walk(value)


class ByteLRU:
    """A thread-safe LRU cache bounded in bytes (``sizeof`` of each value) that loads each key once."""

    def __init__(self, max_bytes: int, sizeof: Callable[[Any], int] = tensor_bytes, what: str = "models"):
        self.max_bytes, self.what = int(max_bytes), what
        self._cache: LRUCache = LRUCache(maxsize=self.max_bytes, getsizeof=sizeof)
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable) -> Any | None:
        """The cached value (now the most recently used), or None."""
        with self._lock:
            return self._cache.get(key)

    def get_or_load(self, key: Hashable, load: Callable[[], V]) -> V:
        """The cached value of ``key``, else ``load()`` (one thread per key at a time), cached when it fits at all."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            value = load()
            self.put(key, value)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        """Cache ``value``, evicting least recently used entries; a value larger than the whole budget is not
        cached (its caller still uses it)."""
        with self._lock:
            try:
                self._cache[key] = value
            except ValueError:                  # cachetools: larger than maxsize
                log.warning(f"{self.what} cache: an entry is larger than the whole budget; not cached",
                            extra={"key": str(key), "max_bytes": self.max_bytes})

    def drop(self, keep: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key ``keep`` rejects; returns how many."""
        with self._lock:
            gone = [k for k in self._cache if not keep(k)]
            for k in gone:
                del self._cache[k]
            return len(gone)

    @property
    def bytes(self) -> int:
        return int(self._cache.currsize)

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._cache)


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


SIZES_FILE = ".cache-sizes.json"        # in each cached folder: relative path → bytes of every file in it


def record_sizes(folder: Path) -> None:
    """Write the size of every file of a just-downloaded folder into it (atomically, written last)."""
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != SIZES_FILE}
    write_text_atomic(folder / SIZES_FILE, json.dumps(sizes))


def is_whole(folder: Path) -> bool:
    """Whether a cached folder still holds every file it was downloaded with, each of its recorded size (a
    truncated or missing file, or no record, means it must be downloaded again)."""
    try:
        sizes = json.loads((folder / SIZES_FILE).read_text())
        return isinstance(sizes, dict) and all((folder / rel).stat().st_size == size for rel, size in sizes.items())
    except (OSError, ValueError):
        return False


class DiskCache:
    """Explanation folders ``<root>/<run_id>/`` under ``max_bytes``: least recently used first out, never one in
    use. ``names`` says which entries of ``root`` are cache folders (others, e.g. temporary downloads, are left
    alone)."""

    def __init__(self, root: Path, max_bytes: int, names: Callable[[str], bool]):
        self.root, self.max_bytes, self._names = Path(root), int(max_bytes), names
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        self._last_use: dict[str, float] = {}
        self._sizes: dict[str, int] = {}

    def touch(self, name: str) -> None:
        """Record a use of folder ``name`` (cheap: called per request)."""
        self._last_use[name] = time.time()

    @contextmanager
    def in_use(self, name: str) -> Iterator[None]:
        """Hold folder ``name`` while reading or loading from it: :meth:`collect` never deletes it meanwhile."""
        with self._lock:
            self._in_use[name] += 1
        self.touch(name)
        try:
            yield
        finally:
            with self._lock:
                self._in_use[name] -= 1
                if self._in_use[name] <= 0:
                    del self._in_use[name]

    def folders(self) -> Iterable[str]:
        try:
            return [e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False) and self._names(e.name)]
        except FileNotFoundError:
            return []

    def size(self, name: str) -> int:
        if name not in self._sizes:
            self._sizes[name] = folder_bytes(self.root / name)
        return self._sizes[name]

    def _last_used(self, name: str) -> float:
        if name in self._last_use:
            return self._last_use[name]
        try:
            return (self.root / name).stat().st_mtime
        except OSError:
            return 0.0

    def collect(self, on_evict: Callable[[str], None] = lambda name: None) -> list[str]:
        """Delete least recently used folders not in use until the rest fit ``max_bytes``; ``on_evict(name)`` runs
        first for each (to forget what memory holds of it). Returns the evicted names."""
        with self._lock:
            names = sorted(self.folders(), key=self._last_used)
            total = sum(self.size(n) for n in names)
            evicted = []
            for name in names:
                if total <= self.max_bytes:
                    break
                if self._in_use.get(name):
                    continue
                on_evict(name)
                size = self.size(name)
                if self._remove(name):
                    total -= size
                    evicted.append(name)
        if evicted:
            log.info("disk cache collected", extra={"evicted": evicted, "bytes": total, "max_bytes": self.max_bytes})
        return evicted

    def discard(self, name: str) -> None:
        """Delete folder ``name`` now (it is not whole), whether in use or not: the caller makes it again."""
        with self._lock:
            self._remove(name)

    def _remove(self, name: str) -> bool:
        trash = self.root / f".evicted-{name}-{uuid.uuid4().hex[:8]}"
        try:
            (self.root / name).rename(trash)            # atomic: readers see the whole folder or none
        except OSError:
            return False
        self._sizes.pop(name, None)
        self._last_use.pop(name, None)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(self.size(n) for n in self.folders())
