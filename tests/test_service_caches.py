"""The service's bounded caches (services/caches.py) on real modules and real folders: the byte-sized LRU of
loaded models evicts the least recently used beyond its budget and loads each key once; the disk cache keeps
the explanation folders under their budget, least recently used out first, never one in use."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from models.cgan import CGANConfig, Generator
from services.caches import ByteLRU, DiskCache, folder_bytes, tensor_bytes

RUN = "{:032x}"


def test_tensor_bytes_counts_parameters_and_buffers_once():
    G = Generator(CGANConfig(resolution=16, ngf=8, z_dim=8, k=2))
    want = sum(t.numel() * t.element_size() for t in (*G.parameters(), *G.buffers()))
    assert tensor_bytes(G) == want > 0
    assert tensor_bytes((G, G, CGANConfig())) == want                  # a shared module counts once
    assert tensor_bytes({"a": torch.zeros(10), "b": b"12345"}) == 45


def test_models_beyond_the_budget_evict_the_least_recently_used():
    nets = {i: torch.nn.Linear(100, 100) for i in range(3)}           # 40 400 bytes each
    size = tensor_bytes(nets[0])
    cache = ByteLRU(max_bytes=int(2.5 * size))
    loads = []

    def load(i):
        loads.append(i)
        return nets[i]

    cache.get_or_load(0, lambda: load(0))
    cache.get_or_load(1, lambda: load(1))
    assert cache.get_or_load(0, lambda: load(0)) is nets[0]             # a hit: 0 is now the most recent
    cache.get_or_load(2, lambda: load(2))                               # over budget: 1 goes
    assert loads == [0, 1, 2] and cache.keys() == [0, 2] and cache.bytes == 2 * size <= cache.max_bytes
    huge = torch.nn.Linear(1000, 1000)
    assert cache.get_or_load("huge", lambda: huge) is huge              # used, but larger than the whole budget
    assert "huge" not in cache.keys() and cache.keys() == [0, 2]


def test_each_model_is_loaded_once_under_concurrent_requests():
    cache = ByteLRU(max_bytes=10 ** 6)
    loads = []

    def slow():
        loads.append(1)
        time.sleep(0.2)
        return torch.nn.Linear(10, 10)

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get_or_load("g", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len({id(g) for g in got}) == 1


def _folder(root: Path, i: int, nbytes: int, age_s: float) -> str:
    name = RUN.format(i)
    (root / name / "sequences").mkdir(parents=True)
    (root / name / "sequences" / "component_1.gif").write_bytes(os.urandom(nbytes))
    t = time.time() - age_s
    os.utime(root / name, (t, t))
    return name


def test_disk_cache_keeps_the_folders_under_budget_least_recently_used_out(tmp_path):
    old, middle, new = (_folder(tmp_path, i, 1000, age) for i, age in ((1, 300), (2, 200), (3, 100)))
    (tmp_path / ".downloading-tmp").mkdir()                            # not a cache folder: left alone
    disk = DiskCache(tmp_path, max_bytes=2500, names=lambda n: len(n) == 32)
    disk.touch(old)                                                     # used now: the most recent
    forgotten = []
    assert disk.collect(forgotten.append) == [middle] == forgotten
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".downloading-tmp", old, new])
    assert folder_bytes(tmp_path) <= 2500 and disk.bytes == 2000


def test_a_folder_in_use_is_never_evicted(tmp_path):
    first, second = _folder(tmp_path, 1, 1000, 200), _folder(tmp_path, 2, 1000, 100)
    disk = DiskCache(tmp_path, max_bytes=1500, names=lambda n: len(n) == 32)
    with disk.in_use(first):                                            # oldest but in use: the other one goes
        disk.touch(second)
        assert disk.collect() == [second] and (tmp_path / first).is_dir()
    third = _folder(tmp_path, 3, 1000, 0)
    with disk.in_use(first), disk.in_use(third):                        # both in use: over budget, nothing goes
        assert disk.collect() == []
    disk.touch(third)
    assert disk.collect() == [first] and folder_bytes(tmp_path) <= 1500
