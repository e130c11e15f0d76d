"""Dataset format: round trip, streaming, and every bad-input case with a message that names the problem."""
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from models.data import DatasetError, DatasetMeta, ImageDataset, write_dataset, assign_splits
from tests.conftest import disc_images


def test_round_trip_8_and_16_bit(tmp_path):
    imgs = disc_images(np.array([2.0, 3.0, 4.0, 5.0]), 16)
    meta = DatasetMeta(name="d", target="y", task="regression")
    for bits in (8, 16):
        ds = write_dataset(tmp_path / f"d{bits}", meta, imgs, pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0]}), bits=bits)
        back = ds.load(range(4))
        assert back.shape == (4, 1, 16, 16) and back.dtype == np.float32
        assert np.abs(back - imgs).max() <= (1 / 255 if bits == 8 else 1 / 65535) + 1e-6
        assert ds.targets().ravel().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_rgb_and_classes(tmp_path):
    imgs = np.random.default_rng(0).random((6, 3, 8, 8)).astype(np.float32)
    meta = DatasetMeta(name="c", target="label", task="classification", class_names=["a", "b"])
    ds = write_dataset(tmp_path / "c", meta, imgs, pd.DataFrame({"label": ["a", "b"] * 3}))
    assert ds.image_shape == (3, 8, 8)
    assert ds.targets().tolist() == [0, 1] * 3


def test_streaming_reads_one_batch_at_a_time(disc_dataset, monkeypatch):
    calls = []
    orig = ImageDataset.read
    monkeypatch.setattr(ImageDataset, "read", lambda self, i: calls.append(i) or orig(self, i))
    it = disc_dataset.iter_batches(32)
    idx, batch = next(it)
    assert batch.shape == (32, 1, 16, 16)
    assert len(set(calls)) <= 33          # the first batch (+ the shape probe), not the whole dataset
    total = 32 + sum(len(b) for b, _ in it)
    assert total == len(disc_dataset) == 120


def test_existing_dataset_not_overwritten(disc_dataset):
    before = (disc_dataset.root / "manifest.csv").read_text()
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(disc_dataset.root, disc_dataset.meta, [], [])
    assert (disc_dataset.root / "manifest.csv").read_text() == before


def _make(tmp_path, rows, meta=None, images=None):
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    for i in range(len(rows)):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / f"images/{i}.png")
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta or {"name": "b", "target": "y", "task": "regression"}))
    return root


def test_missing_column(tmp_path):
    root = _make(tmp_path, [{"path": "images/0.png", "z": 1}])
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['y'\]"):
        ImageDataset(root)


def test_nan_target(tmp_path):
    root = _make(tmp_path, [{"path": "images/0.png", "y": 1.0}, {"path": "images/1.png", "y": float("nan")}])
    with pytest.raises(DatasetError, match="NaN/inf.*images/1.png"):
        ImageDataset(root)


def test_empty_dataset(tmp_path):
    root = _make(tmp_path, [])
    (root / "manifest.csv").write_text("path,y\n")
    with pytest.raises(DatasetError, match="empty"):
        ImageDataset(root)


def test_single_class(tmp_path):
    root = _make(tmp_path, [{"path": f"images/{i}.png", "label": "a"} for i in range(3)],
                 {"name": "b", "target": "label", "task": "classification", "class_names": ["a", "b"]})
    with pytest.raises(DatasetError, match="single class"):
        ImageDataset(root)


def test_corrupt_image_named(tmp_path):
    root = _make(tmp_path, [{"path": "images/0.png", "y": 1.0}, {"path": "images/1.png", "y": 2.0}])
    (root / "images/1.png").write_bytes(b"not a png")
    ds = ImageDataset(root)
    with pytest.raises(DatasetError, match="images/1.png.*corrupt"):
        ds.load([0, 1])


def test_mixed_sizes_policy(tmp_path):
    root = _make(tmp_path, [{"path": "images/0.png", "y": 1.0}, {"path": "images/1.png", "y": 2.0}])
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "images/1.png")
    with pytest.raises(DatasetError, match="images/1.png.*12x10.*8x8.*size=\\(H, W\\)"):
        ImageDataset(root).load([0, 1])
    assert ImageDataset(root, size=(8, 8)).load([0, 1]).shape == (2, 1, 8, 8)


def test_path_outside_folder(tmp_path):
    root = _make(tmp_path, [{"path": "../etc/passwd", "y": 1.0}])
    with pytest.raises(DatasetError, match="inside the dataset folder"):
        ImageDataset(root)


def test_mask_paths_and_symlinks_cannot_leave_the_folder(tmp_path):
    root = _make(tmp_path, [{"path": "images/0.png", "y": 1.0, "mask": "/etc/passwd"}])
    with pytest.raises(DatasetError, match="mask '/etc/passwd' must be relative"):
        ImageDataset(root)
    root = _make(tmp_path / "b", [{"path": "images/0.png", "y": 1.0}, {"path": "images/1.png", "y": 2.0}])
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    (root / "images/1.png").unlink()
    (root / "images/1.png").symlink_to(outside)
    with pytest.raises(DatasetError, match="images/1.png.*leads outside the dataset folder"):
        ImageDataset(root).load([0, 1])


def test_other_formats_and_decompression_bombs_are_refused_by_name(tmp_path, monkeypatch):
    root = _make(tmp_path, [{"path": "images/0.png", "y": 1.0}, {"path": "images/1.png", "y": 2.0}])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images/1.png", format="BMP")   # named .png
    with pytest.raises(DatasetError, match="images/1.png.*not a PNG/JPEG/TIFF image"):
        ImageDataset(root).load([0, 1])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images/1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)                    # 8x8 = 64 > 2 x 16: a "bomb"
    with pytest.raises(DatasetError, match="images/0.png.*decompression bomb"):
        ImageDataset(root).load([0, 1])


def test_splits_reproducible():
    a, b = assign_splits(100, 3), assign_splits(100, 3)
    assert (a == b).all() and set(a) == {"train", "val", "test"}


# --------------------------------------------------------------------------------------------- dataset.yaml

GOOD_META = {"name": "b", "target": "y", "task": "regression", "description": "tiny",
             "factors": {"driving": ["r"], "nuisance": ["cx"]}}


@pytest.mark.parametrize("change, field, why", [
    ({"factors": ["r", "cx"]}, "factors", "must be a mapping of driving/nuisance/shortcut"),
    ({"factors": {"driving": ["r"], "confounders": ["cx"]}}, "factors", r"has unknown group\(s\) \['confounders'\]"),
    ({"factors": {"driving": "r"}}, "factors", r"group\(s\) \['driving'\] must be non-empty lists"),
    ({"factors": {"driving": [1]}}, "factors", r"group\(s\) \['driving'\]"),
    ({"target": 5}, "target", "must be a column name or a non-empty list of column names"),
    ({"target": ["y", 2]}, "target", "must be a column name"),
    ({"target": []}, "target", "must be a column name"),
    ({"name": ["b"]}, "name", "must be a non-empty string"),
    ({"task": "ordinal"}, "task", "must be 'regression' or 'classification'"),
    ({"class_names": "ab"}, "class_names", "must be a non-empty list of class names"),
    ({"class_names": ["a", "a"]}, "class_names", "must not repeat a class name"),
    ({"description": 3}, "description", "must be a string"),
])
def test_every_dataset_yaml_field_is_type_checked(tmp_path, change, field, why):
    rows = [{"path": f"images/{i}.png", "y": float(i), "r": i, "cx": -i} for i in range(3)]
    assert ImageDataset(_make(tmp_path / "ok", rows, GOOD_META)).meta.factors == GOOD_META["factors"]
    with pytest.raises(DatasetError, match=rf"dataset.yaml: {field} {why}.*got "):
        ImageDataset(_make(tmp_path, rows, {**GOOD_META, **change}))


def test_unknown_and_missing_dataset_yaml_fields_are_named(tmp_path):
    rows = [{"path": "images/0.png", "y": 1.0}]
    with pytest.raises(DatasetError, match=r"unknown field\(s\) \['factor'\]; dataset.yaml has \['name', 'target'"):
        ImageDataset(_make(tmp_path / "a", rows, {"name": "b", "target": "y", "task": "regression",
                                                    "factor": {"driving": ["y"]}}))
    with pytest.raises(DatasetError, match=r"missing field\(s\) \['task'\]"):
        ImageDataset(_make(tmp_path / "b", rows, {"name": "b", "target": "y"}))
    meta = ImageDataset(_make(tmp_path / "c", rows, {"name": "b", "target": "y", "task": "regression",
                                                     "class_names": None})).meta
    assert meta.class_names is None                                  # an optional field may be null


def test_factors_must_be_numeric_manifest_columns(tmp_path):
    rows = [{"path": f"images/{i}.png", "y": float(i), "r": i, "cx": "left"} for i in range(3)]
    with pytest.raises(DatasetError, match=r"factors name column\(s\) \['shift'\] that the manifest lacks"):
        ImageDataset(_make(tmp_path / "a", rows, {**GOOD_META, "factors": {"nuisance": ["shift"]}}))
    with pytest.raises(DatasetError, match="factor column 'cx' must hold finite numbers"):
        ImageDataset(_make(tmp_path / "b", rows, GOOD_META))
