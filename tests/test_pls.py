"""models.pls: planted-direction recovery, component choice, scores, persistence, plot, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from models.features import extract_features
from models.pls import PLSError, PLSState, fit_pls, images_to_scores, load_pls, plot_variance, save_pls


def _planted(n: int):
    rng = np.random.default_rng(0)
    f = 30
    z = rng.normal(size=(n, f))
    w = rng.normal(size=f)
    noise = 0.05 * rng.normal(size=n)
    # unequal feature scales and offsets (a separate stream, so the standardised data are the plain normals)
    extra = np.random.default_rng(1)
    scale, shift = extra.uniform(0.5, 3.0, f), extra.normal(size=f)
    x = z * scale + shift
    y = x @ w + noise
    return x, y, w, scale


@pytest.fixture(scope="module")
def planted():
    return _planted(400)


@pytest.fixture(scope="module")
def fitted(planted):
    x, y, _, _ = planted
    return fit_pls(x, y, "regression")


def test_recovers_planted_direction():
    x, y, w, _ = _planted(3000)
    state, _ = fit_pls(x, y, "regression")
    w_std = w * x.std(axis=0)  # y = Xs @ (w * sd) + const in the standardised space
    w1 = state.x_weights[:, 0]
    cos = abs(w1 @ w_std) / (np.linalg.norm(w1) * np.linalg.norm(w_std))
    # finite-sample expectation is ~1/sqrt(1 + F/N): 0.995 for N=3000, F=30 (0.96 at N=400)
    assert cos > 0.98
    ev = state.explained_target_variance
    assert ev[0] > 0.80
    assert ev.sum() <= 1.0 + 1e-9 and (ev >= 0).all()
    assert all(ev[j + 1] <= ev[j] + 0.02 for j in range(len(ev) - 1))
    table = state.variance_table()
    assert list(table.columns) == ["component", "pct_target_variance", "cumulative_pct"]
    np.testing.assert_allclose(table["cumulative_pct"].iloc[-1], 100 * ev.sum())
    # the k-component fit predicts the target well
    pred = state.predict(x)
    assert pred.shape == (3000,) and np.corrcoef(pred, y)[0, 1] > 0.99


def test_default_k_bounds(planted):
    x, y, _, _ = planted
    s, _ = fit_pls(x, y, "regression")
    assert 2 <= s.n_components <= 8
    assert s.n_components == 2  # component 1 alone passes 90 %, min_components lifts it to 2
    s, _ = fit_pls(x, y, "regression", min_components=1)
    assert s.n_components == 1
    s, _ = fit_pls(x, y, "regression", variance_threshold=1.0, max_components=5)
    assert s.n_components == 5
    s, _ = fit_pls(x[:, :3], y, "regression", min_components=6, max_components=8)
    assert s.n_components == 3  # capped by F
    s, _ = fit_pls(x[:4], y[:4], "regression", variance_threshold=1.0)
    assert s.n_components <= 3  # capped by N-1


def test_early_stop_when_target_fully_explained():
    x, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(50, 4)) - 0.0)
    x, _ = np.linalg.qr(x - x.mean(axis=0))  # centred orthonormal columns
    y = 3 * x[:, 0] + 1  # explained exactly by one component; NIPALS stops after it
    s, scores = fit_pls(x, y, "regression", variance_threshold=1.0)
    assert s.n_components == 1 and np.isclose(s.explained_target_variance[0], 1.0)
    with pytest.raises(PLSError, match="only 1 PLS component"):
        fit_pls(x, y, "regression", n_components=3)


def test_scores_unit_variance_and_transform_reproduces(planted, fitted):
    x, _, _, _ = planted
    state, scores = fitted
    assert scores.shape == (400, state.n_components)
    np.testing.assert_allclose(scores.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(scores.std(axis=0), 1, atol=1e-10)
    np.testing.assert_allclose(state.transform(x), scores, atol=1e-5)
    np.testing.assert_allclose(state.transform(x.astype(np.float32)), scores, atol=1e-4)
    raw = state.raw_scores(x)
    assert abs(np.corrcoef(raw.T)[0, 1]) < 1e-8  # PLS scores are orthogonal


def test_zero_variance_feature_kept(planted):
    x, y, _, _ = planted
    x2 = np.column_stack([x, np.full(len(x), 7.0)])
    s, scores = fit_pls(x2, y, "regression", n_components=3)
    assert s.n_features == 31 and s.x_scale[-1] == 1.0 and np.isfinite(scores).all()


def test_classification_three_classes():
    rng = np.random.default_rng(1)
    n = 300
    cls = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, 12)) * 2
    x = centres[cls] + rng.normal(size=(n, 12))
    s, scores = fit_pls(x, cls, "classification", class_names=["a", "b", "c"])
    assert s.task == "classification" and s.class_names == ["a", "b", "c"] and s.n_targets == 3
    assert 2 <= s.n_components <= 8 and scores.shape == (n, s.n_components)
    assert (s.predict(x) == cls).mean() > 0.9
    assert s.decision_function(x).shape == (n, 3)
    s2, _ = fit_pls(x, np.array(["a", "b", "c"])[cls], "classification", class_names=["a", "b", "c"])
    assert s2.equals(s)
    s3, _ = fit_pls(x, cls, "classification")
    assert s3.class_names == ["0", "1", "2"]


def test_multi_target_regression(planted):
    x, y, _, _ = planted
    yy = np.column_stack([y, x[:, 0] - x[:, 1]])
    s, _ = fit_pls(x, yy, "regression", n_components=4)
    assert s.n_targets == 2 and s.predict(x).shape == (400, 2)
    assert s.explained_target_variance.sum() <= 1 + 1e-9


def test_save_load_roundtrip_and_overwrite(tmp_path, planted, fitted):
    x, y, _, _ = planted
    state, scores = fitted
    d = save_pls(state, tmp_path / "pls")
    assert (d / "pls.npz").is_file() and json.loads((d / "pls.json").read_text())["format_version"] == 1
    back = load_pls(d)
    assert isinstance(back, PLSState) and back.equals(state)
    for name in ("x_mean", "x_scale", "x_weights", "x_loadings", "x_rotations", "y_loadings", "y_mean",
                 "y_scale", "score_mean", "score_sd", "explained_target_variance"):
        assert np.array_equal(getattr(back, name), getattr(state, name))
    assert np.array_equal(back.transform(x), state.transform(x))
    save_pls(state, d)  # the same state again: fine
    other, _ = fit_pls(x, y, "regression", n_components=3)
    with pytest.raises(PLSError, match="different PLS state; pass overwrite=True"):
        save_pls(other, d)
    save_pls(other, d, overwrite=True)
    assert load_pls(d).n_components == 3
    np.load(d / "pls.npz", allow_pickle=False)  # no pickled object inside
    with pytest.raises(PLSError, match="no pls.npz"):
        load_pls(tmp_path / "nowhere")


def test_plot_variance(tmp_path, fitted):
    p = plot_variance(fitted[0], tmp_path / "v" / "variance.png", title="planted")
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_images_to_scores():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    imgs = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    feats = extract_features(net, imgs)
    y = feats @ np.arange(1, 9) + np.random.default_rng(1).normal(size=40) * 0.01
    state, scores = fit_pls(feats, y, "regression", n_components=2)
    np.testing.assert_allclose(images_to_scores(net, imgs, state, batch_size=16), scores, atol=1e-5)
    with pytest.raises(PLSError, match="gives 4 features but the PLS state was fit on 8"):
        images_to_scores(net, imgs, state, layer="0")


@pytest.mark.parametrize("kwargs, match", [
    (dict(features="nan"), r"features contain NaN/inf in 2 row\(s\): 3, 7"),
    (dict(targets="nan"), r"targets contain NaN/inf in 1 row\(s\): 5"),
    (dict(n=2), "at least 3 samples"),
    (dict(short_targets=True), "features have 20 rows but targets have 19"),
    (dict(n_components=0), "n_components must be between 1 and 5"),
    (dict(n_components=6), "n_components must be between 1 and 5"),
    (dict(single_class=True), "single class"),
    (dict(constant_target=True), "constant"),
    (dict(task="ordinal"), "task must be 'regression' or 'classification'"),
    (dict(features="1d"), "2-D array"),
])
def test_bad_inputs(kwargs, match):
    rng = np.random.default_rng(2)
    n = kwargs.get("n", 20)
    x, y = rng.normal(size=(n, 5)), rng.normal(size=n)
    task = kwargs.get("task", "regression")
    if kwargs.get("features") == "nan":
        x[3, 1], x[7, 0] = np.nan, np.inf
    if kwargs.get("features") == "1d":
        x = x[:, 0]
    if kwargs.get("targets") == "nan":
        y[5] = np.nan
    if kwargs.get("short_targets"):
        y = y[:-1]
    if kwargs.get("single_class"):
        task, y = "classification", np.zeros(n, int)
    if kwargs.get("constant_target"):
        y = np.ones(n)
    with pytest.raises(PLSError, match=match):
        fit_pls(x, y, task, n_components=kwargs.get("n_components"))
