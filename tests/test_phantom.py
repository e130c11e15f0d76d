"""The chest phantom: reproducible, nuisances independent of the target, a ruler that reads every factor back."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.data import DatasetError, ImageDataset
from models.phantom import (DRIVING, FACTORS, NUISANCE, RANGES, PhantomConfig, factor_spread, generate, render,
                            ruler, sample_factors, write_phantom)

RULER_SEED = 31_337  # fresh phantoms: used nowhere else (the ruler calibrates on its own fixed seed)


def _corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


@pytest.fixture(scope="module")
def fresh64():
    imgs, _, table = generate(PhantomConfig(n=300, size=64, seed=RULER_SEED, shortcut=True, shortcut_strength=0.5))
    return imgs, table, ruler(imgs)


def test_same_seed_same_images_and_table():
    cfg = PhantomConfig(n=40, size=32, seed=7, masks=True, shortcut=True)
    a_img, a_mask, a_tab = generate(cfg)
    b_img, b_mask, b_tab = generate(PhantomConfig(n=40, size=32, seed=7, masks=True, shortcut=True))
    assert a_img.dtype == np.float32 and a_img.shape == (40, 1, 32, 32)
    assert 0.0 <= a_img.min() and a_img.max() <= 1.0
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    pd.testing.assert_frame_equal(a_tab, b_tab)
    c_img, _, c_tab = generate(PhantomConfig(n=40, size=32, seed=8))
    assert not np.allclose(a_img, c_img) and not np.allclose(a_tab["heart_size"], c_tab["heart_size"])


def test_table_columns_target_formula_and_splits():
    cfg = PhantomConfig(n=600, size=16, seed=3, target_noise=0.0, w_heart=1.0, w_vascular=0.5)
    _, masks, table = generate(cfg)
    assert masks is None
    assert {"target", "label", "split", *FACTORS} <= set(table.columns) and "marker" not in table.columns
    z = {k: (table[k] - np.mean(RANGES[k])) / ((RANGES[k][1] - RANGES[k][0]) / np.sqrt(12)) for k in DRIVING}
    np.testing.assert_allclose(table["target"], z["heart_size"] + 0.5 * z["vascular_fullness"], atol=1e-9)
    np.testing.assert_array_equal(table["label"], (table["target"] > 0).astype(int))
    assert set(table["split"]) == {"train", "val", "test"}
    for k, (lo, hi) in RANGES.items():
        assert lo <= table[k].min() and table[k].max() <= hi, k


def test_nuisances_independent_of_target():
    _, _, table = generate(PhantomConfig(n=1000, size=16, seed=21))
    for k in NUISANCE:
        assert abs(_corr(table[k], table["target"])) < 0.15, k
    assert _corr(table["heart_size"], table["target"]) > 0.5
    assert _corr(table["vascular_fullness"], table["target"]) > 0.3


def test_nuisance_zero_switches_nuisances_off():
    table = sample_factors(PhantomConfig(nuisance=0.0), 50, np.random.default_rng(0))
    for k in NUISANCE:
        assert table[k].std() < 1e-12, k
    assert (table["noise"] == 0).all() and (table["rotation"] == 0).all()


def test_ruler_accuracy_64(fresh64):
    _, table, measured = fresh64
    assert list(measured.columns) == [*FACTORS, "marker"]
    for k in FACTORS:
        bound = 0.8 if k == "noise" else 0.9
        assert _corr(measured[k], table[k]) >= bound, (k, _corr(measured[k], table[k]))
    assert (measured["marker"] == table["marker"]).mean() >= 0.95


@pytest.mark.parametrize("size,bound,noise_bound", [(32, 0.85, 0.8), (128, 0.9, 0.8)])
def test_ruler_accuracy_other_sizes(size, bound, noise_bound):
    imgs, _, table = generate(PhantomConfig(n=300, size=size, seed=RULER_SEED + size,
                                            shortcut=True, shortcut_strength=0.5))
    measured = ruler(imgs)
    for k in FACTORS:
        b = noise_bound if k == "noise" else bound
        assert _corr(measured[k], table[k]) >= b, (size, k, _corr(measured[k], table[k]))
    assert (measured["marker"] == table["marker"]).mean() >= 0.95


def test_ruler_is_calibrated_in_manifest_units(fresh64):
    _, table, measured = fresh64
    for k in FACTORS:  # unbiased along the range: slope ~1, small offset relative to the spread
        slope, icpt = np.polyfit(table[k], measured[k], 1)
        assert 0.85 < slope < 1.15, (k, slope)
        assert abs((measured[k] - table[k]).mean()) < 0.25 * table[k].std(), k


def test_ruler_tolerates_blur_and_8bit(fresh64):
    from scipy import ndimage
    imgs, table, _ = fresh64
    soft = np.round(ndimage.gaussian_filter(imgs, (0, 0, 0.8, 0.8)) * 255) / 255
    measured = ruler(soft)
    for k in ("heart_size", "vascular_fullness", "shift_y", "rotation", "body_scale"):
        assert _corr(measured[k], table[k]) >= 0.9, k
    assert (measured["marker"] == table["marker"]).mean() >= 0.95


def test_ruler_input_shapes_and_errors():
    imgs, _, _ = generate(PhantomConfig(n=3, size=32, seed=1))
    a, b = ruler(imgs), ruler(imgs[:, 0])
    pd.testing.assert_frame_equal(a, b)
    assert len(ruler(np.zeros((0, 1, 32, 32), np.float32))) == 0
    with pytest.raises(ValueError, match="square"):
        ruler(np.zeros((2, 1, 32, 40), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        ruler(np.full((1, 32, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        ruler(np.zeros((2, 2, 32, 32), np.float32))


def test_masks_shape_and_labels():
    imgs, masks, _ = generate(PhantomConfig(n=12, size=48, seed=4, masks=True))
    assert masks.shape == (12, 48, 48) and masks.dtype == np.int64
    assert set(np.unique(masks)) == {0, 1, 2}
    x = imgs[:, 0]
    assert x[masks == 2].mean() > x[masks == 1].mean() + 0.1  # heart bright, lungs dark
    assert (masks == 1).mean() > 0.08 and (masks == 2).mean() > 0.02


def test_masks_follow_the_geometry():
    base = pd.DataFrame([{k: float(np.mean(RANGES[k])) for k in FACTORS}])
    base["noise"] = 0.0
    moved = base.assign(shift_x=0.08)
    _, m0 = render(base, 64, masks=True)
    _, m1 = render(moved, 64, masks=True)
    cx = lambda m: np.nonzero(m[0] == 1)[1].mean()  # noqa: E731
    assert cx(m1) - cx(m0) == pytest.approx(0.08 * 64, abs=1.0)


def test_shortcut_marker_follows_label_and_ruler_sees_it():
    imgs, _, table = generate(PhantomConfig(n=300, size=32, seed=5, shortcut=True, shortcut_strength=0.9))
    assert _corr(table["marker"], table["label"]) > 0.6
    measured = ruler(imgs, marker_score=True)
    assert (measured["marker"] == table["marker"]).mean() >= 0.95
    assert measured.loc[table["marker"] == 1, "marker_score"].min() > measured.loc[table["marker"] == 0,
                                                                                  "marker_score"].max()
    _, _, off = generate(PhantomConfig(n=50, size=16, seed=5))
    assert "marker" not in off.columns


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_write_phantom_round_trip(tmp_path, task):
    cfg = PhantomConfig(n=20, size=32, seed=9, task=task, masks=True, shortcut=True, name=f"ph-{task}")
    ds = write_phantom(tmp_path / "ph", cfg)
    reopened = ImageDataset(tmp_path / "ph")
    imgs, masks, table = generate(cfg)
    assert len(reopened) == 20 and reopened.image_shape == (1, 32, 32) and reopened.has_masks
    assert reopened.meta.task == task and reopened.name == f"ph-{task}"
    assert reopened.meta.factors == {"driving": list(DRIVING), "nuisance": list(NUISANCE), "shortcut": ["marker"]}
    if task == "regression":
        assert reopened.meta.target == "target"
        np.testing.assert_allclose(reopened.targets()[:, 0], table["target"], rtol=1e-9)
    else:
        assert reopened.meta.target == "label" and reopened.class_names == ["normal", "enlarged"]
        np.testing.assert_array_equal(reopened.targets(), table["label"])
    np.testing.assert_allclose(reopened.factors()[list(FACTORS)], table[list(FACTORS)], rtol=1e-9)
    assert list(reopened.manifest["split"]) == list(table["split"])
    x, m = reopened.load(range(20), masks=True)
    assert np.abs(x - imgs).max() <= 0.5 / 255 + 1e-6  # 8-bit PNG of the very same pixels
    np.testing.assert_array_equal(m, masks)
    with pytest.raises(DatasetError, match="overwrite"):
        write_phantom(tmp_path / "ph", cfg)
    assert len(write_phantom(tmp_path / "ph", PhantomConfig(n=5, size=16), overwrite=True)) == 5
    assert len(ds) == 20


def test_streamed_blocks_match_generate(tmp_path, monkeypatch):
    import models.phantom as ph
    monkeypatch.setattr(ph, "BLOCK", 8)  # several blocks, the last one partial
    cfg = PhantomConfig(n=19, size=16, seed=2)
    imgs, _, table = generate(cfg)
    ds = write_phantom(tmp_path / "b", cfg)
    assert np.abs(ds.load(range(19)) - imgs).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_allclose(ds.manifest["heart_size"], table["heart_size"])


@pytest.mark.parametrize("kwargs,field", [
    ({"n": 0}, "n"), ({"size": 8}, "size"), ({"size": 1024}, "size"), ({"seed": -1}, "seed"),
    ({"task": "segmentation"}, "task"), ({"shortcut_strength": 0.3}, "shortcut_strength"),
    ({"shortcut_strength": 1.5}, "shortcut_strength"), ({"nuisance": 2.0}, "nuisance"),
    ({"target_noise": -1.0}, "target_noise"), ({"w_heart": float("nan")}, "w_heart"), ({"name": " "}, "name"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"PhantomConfig\.{field}\b"):
        PhantomConfig(**kwargs)


def test_both_weights_zero_is_an_error():
    with pytest.raises(ValueError, match="w_heart and w_vascular"):
        PhantomConfig(w_heart=0.0, w_vascular=0.0)


def test_render_rejects_missing_factors():
    with pytest.raises(ValueError, match="heart_size"):
        render(pd.DataFrame({"rotation": [0.0]}), 32)


def test_factor_spread():
    _, _, table = generate(PhantomConfig(n=400, size=16, seed=6, shortcut=True))
    spread = factor_spread(table)
    assert set(spread) == {*FACTORS, "marker"}
    lo, hi = RANGES["rotation"]
    assert spread["rotation"] == pytest.approx((hi - lo) / np.sqrt(12), rel=0.15)
    with pytest.raises(ValueError, match="factor"):
        factor_spread(pd.DataFrame({"x": [1.0, 2.0]}))
