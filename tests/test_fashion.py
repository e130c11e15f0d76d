"""Fashion-MNIST -> dataset folder: real package data when installed, plus a tiny synthetic IDX source."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from models.data import DatasetError, ImageDataset
from models.fashion import (ENV_VAR, FASHION_CLASSES, find_source, load_fashion_mnist, read_idx,
                            write_fashion_mnist)


def _real_source() -> Path:
    try:
        return find_source()
    except DatasetError as e:
        pytest.skip(f"Debian package dataset-fashion-mnist is absent and no copy was found: {e}")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    body = head + np.ascontiguousarray(arr, np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


@pytest.fixture
def fake_source(tmp_path) -> Path:
    """20 train + 5 test images per class; pixel value encodes (class, index) so rows can be traced."""
    src = tmp_path / "fmnist"
    src.mkdir()
    for kind, per_class, compress in (("train", 20, True), ("t10k", 5, False)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        np.random.default_rng(0).shuffle(labels)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        images[:] = (labels * 20 + 10)[:, None, None]
        images[:, 0, 0] = np.arange(len(labels)) % 256
        _write_idx(src / f"{kind}-images-idx3-ubyte", images, compress)
        _write_idx(src / f"{kind}-labels-idx1-ubyte", labels, compress)
    return src


# --------------------------------------------------------------------------------------------- real data

def test_real_shirt_vs_tshirt_subset(tmp_path):
    src = _real_source()
    ds = write_fashion_mnist(tmp_path / "ds", task="shirt_vs_tshirt", n=200, seed=1)
    assert isinstance(ds, ImageDataset) and len(ds) == 200
    assert ds.meta.task == "classification" and ds.meta.target == "label"
    assert ds.class_names == ["t-shirt", "shirt"]
    counts = np.bincount(ds.targets(), minlength=2)
    assert abs(int(counts[0]) - int(counts[1])) <= 4
    m = ds.manifest
    assert set(m["split"]) == {"train", "val", "test"}
    assert (m.loc[m["split"] == "test", "source_split"] == "test").all()
    assert (m.loc[m["split"] != "test", "source_split"] == "train").all()
    # split proportions of the source: 10800 train / 1200 val / 2000 test out of 14000
    share = m["split"].value_counts() / len(m)
    assert share["train"] == pytest.approx(10800 / 14000, abs=0.02)
    assert share["val"] == pytest.approx(1200 / 14000, abs=0.02)
    assert share["test"] == pytest.approx(2000 / 14000, abs=0.02)
    assert set(m["source_label"]) == {0, 6}
    assert (m["class_name"] == np.array(ds.class_names)[m["label"]]).all()
    # pixels are the source pixels
    raw = load_fashion_mnist(src)
    x = ds.load([0, 199])
    for j, i in enumerate((0, 199)):
        r = m.iloc[i]
        np.testing.assert_allclose(x[j, 0], raw[r["source_split"]][0][r["source_index"]] / 255.0, atol=1e-6)
    assert ds.image_shape == (1, 28, 28)


def test_real_10class_resized(tmp_path):
    _real_source()
    ds = write_fashion_mnist(tmp_path / "ds", task="10class", n=200, size=32, seed=0)
    assert ds.class_names == FASHION_CLASSES and len(ds) == 200
    assert ds.image_shape == (1, 32, 32)
    assert (np.bincount(ds.targets(), minlength=10) == 20).all()
    assert set(ds.manifest["split"]) == {"train", "val", "test"}
    x = ds.load(range(8))
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1


def test_real_subsample_is_seeded(tmp_path):
    _real_source()
    a = write_fashion_mnist(tmp_path / "a", n=50, seed=3).manifest
    b = write_fashion_mnist(tmp_path / "b", n=50, seed=3).manifest
    c = write_fashion_mnist(tmp_path / "c", n=50, seed=4).manifest
    assert a["source_index"].tolist() == b["source_index"].tolist() != c["source_index"].tolist()


# --------------------------------------------------------------------------------------------- synthetic source

def test_read_idx_gzip_and_plain(fake_source):
    imgs = read_idx(fake_source / "train-images-idx3-ubyte.gz")
    assert imgs.shape == (200, 28, 28) and imgs.dtype == np.uint8
    assert read_idx(fake_source / "t10k-labels-idx1-ubyte").shape == (50,)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02\x00\x00")
    with pytest.raises(DatasetError, match="unsigned byte"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], ">u4").tobytes() + b"\x01\x02")
    with pytest.raises(DatasetError, match="declares shape"):
        read_idx(short)


def test_synthetic_full_conversion_splits_and_labels(fake_source, tmp_path):
    ds = write_fashion_mnist(tmp_path / "ds", task="shirt_vs_tshirt", source=fake_source)
    m = ds.manifest
    assert len(ds) == 50  # 2 classes x (20 train + 5 test)
    assert (m["split"] == "val").sum() == 4 and (m["split"] == "test").sum() == 10
    assert m.groupby("split")["label"].nunique().eq(2).all()  # stratified val
    x = ds.load(range(len(ds)))[:, 0, 5, 5]
    expected = (m["source_label"].to_numpy() * 20 + 10) / 255.0
    np.testing.assert_allclose(x, expected, atol=1e-6)


def test_env_var_source(fake_source, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(fake_source))
    assert find_source() == fake_source
    ds = write_fashion_mnist(tmp_path / "ds", task="10class", n=30, size=16)
    assert len(ds) == 30 and ds.image_shape == (1, 16, 16)


def test_missing_source_dir_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        write_fashion_mnist(tmp_path / "ds", source=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="lacks"):
        find_source(tmp_path / "empty")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=ENV_VAR):
        find_source()
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"task": "shoes"}, "task"), ({"n": 1}, "n must be"), ({"size": 4}, "size"), ({"seed": -2}, "seed"),
    ({"n": 10_000}, "n=10000"),
])
def test_bad_arguments(fake_source, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_fashion_mnist(tmp_path / "ds", source=fake_source, **kwargs)


def test_overwrite_guard(fake_source, tmp_path):
    write_fashion_mnist(tmp_path / "ds", n=10, source=fake_source)
    with pytest.raises(DatasetError, match="overwrite"):
        write_fashion_mnist(tmp_path / "ds", n=10, source=fake_source)
    assert len(write_fashion_mnist(tmp_path / "ds", n=12, source=fake_source, overwrite=True)) == 12
