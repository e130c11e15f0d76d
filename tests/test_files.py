"""Cache files are written whole or not at all and checked before reuse (models/files.py): a write that fails
half-way leaves the previous file and no temporary; a truncated or mismatched .npy or torch file reads as missing;
the explain stage's cached features, truncated on disk, are computed again and rewritten whole."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cnn import TrainConfig, train_cnn
from models.explain import ExplainConfig, prepare, stage_features
from models.files import load_npy, load_torch, save_npy, write_atomic


def _truncate(path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "cache" / "x.npy"
    save_npy(path, np.arange(6.0))

    def half_then_fail(f):
        f.write(b"\x93NUMPY partial")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        write_atomic(path, half_then_fail)
    assert np.array_equal(load_npy(path), np.arange(6.0)) and [p.name for p in path.parent.iterdir()] == ["x.npy"]


def test_truncated_or_mismatched_files_read_as_missing(tmp_path):
    npy, pt = tmp_path / "f.npy", tmp_path / "p.pt"
    save_npy(npy, np.ones((5, 3), np.float32))
    write_atomic(pt, lambda f: torch.save(torch.ones(5, 4), f))
    assert load_npy(npy, rows=5).shape == (5, 3) and load_npy(npy, rows=4) is None
    assert load_torch(pt, lambda t: len(t) == 5) is not None and load_torch(pt, lambda t: len(t) == 6) is None
    _truncate(npy)
    _truncate(pt)
    assert load_npy(npy) is None and load_torch(pt) is None
    assert load_npy(tmp_path / "missing.npy") is None and load_torch(None) is None


def test_truncated_cached_features_are_computed_again(disc_dataset, tmp_path):
    model, _ = train_cnn(disc_dataset, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
    run = prepare(disc_dataset, model, tmp_path / "run", ExplainConfig(fid_extractor="randconv"))
    shared = tmp_path / "cache" / "features.npy"
    want = stage_features(run, shared).copy()
    folder = run.out / "features.npy"
    assert np.array_equal(load_npy(folder, rows=120), want) and np.array_equal(load_npy(shared, rows=120), want)
    for f in (folder, shared):
        _truncate(f)
    again = prepare(disc_dataset, model, tmp_path / "run", ExplainConfig(fid_extractor="randconv"))
    assert np.allclose(stage_features(again, shared), want, atol=1e-6)
    assert load_npy(folder, rows=120) is not None and load_npy(shared, rows=120) is not None     # rewritten whole
    save_npy(shared, want[:7])                                          # another dataset's features: wrong rows
    folder.unlink()
    third = prepare(disc_dataset, model, tmp_path / "run", ExplainConfig(fid_extractor="randconv"))
    assert stage_features(third, shared).shape == want.shape and load_npy(shared, rows=120) is not None
