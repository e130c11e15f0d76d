"""Fidelity checks on a hand-made generator whose output is known: a disc whose radius is c_1."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from models import checks as C
from models.pls import fit_pls
from models.features import extract_features
from models.sequences import render_sweep, sweep_values
from tests.conftest import disc_images


def disc_generator(z, c):
    """radius = 4 + 1.2 c_1 (pixels); c_2 shifts the disc sideways; z adds faint texture."""
    r = (4 + 1.2 * c[:, 0]).numpy()
    shift = (1.5 * c[:, 1]).numpy() if c.shape[1] > 1 else None
    img = torch.from_numpy(disc_images(r, 16, shift))
    tex = 0.02 * torch.tanh(z[:, :1, None, None]) * torch.ones_like(img)
    return (img + tex).clamp(0, 1)


class AreaCNN(nn.Module):
    """A 'CNN' whose features are disc area (bright-pixel mean) plus distractors, and predicts the radius."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(256, 3)
        self.proj.weight.data = torch.randn(3, 256, generator=g) * 0.01
        self.fc = nn.Linear(4, 1)
        self.fc.weight.data = torch.tensor([[30.0, 0, 0, 0]])

    def forward(self, x):
        flat = x.flatten(1)
        feats = torch.cat([flat.mean(1, keepdim=True), self.proj(flat)], 1)
        return self.fc(feats)


def disc_ruler(images):
    imgs = np.asarray(images)[:, 0]
    area = (imgs > 0.5).sum(axis=(1, 2))
    xs = np.arange(imgs.shape[-1])
    cx = ((imgs > 0.5) * xs).sum(axis=(1, 2)) / np.maximum(area, 1)
    return pd.DataFrame({"radius": np.sqrt(area / np.pi), "center_x": cx})


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    c_true = rng.normal(size=(300, 2))
    real = disc_generator(torch.zeros(300, 4), torch.tensor(c_true, dtype=torch.float32)).numpy()
    model = AreaCNN().eval()
    feats = extract_features(model, real)
    radius = 4 + 1.2 * c_true[:, 0]
    state, scores = fit_pls(feats, radius, "regression", n_components=2)
    return model, state, scores, real


def test_checks_on_known_generator(fitted):
    model, state, scores, real = fitted
    sw = render_sweep(disc_generator, 4, 2, 0, sweep_values(-1.5, 1.5, 7), seeds=(0, 1))
    # the generator is conditioned on the *true* c_1 while the PLS score is standardised area: same ordering
    f = C.faithfulness(model, sw, "regression", state)
    assert f["rho_mean"] == pytest.approx(1.0) and len(f["rho_per_seed"]) == 2
    cond = C.conditioning_sweep(model, sw, state)
    assert cond["r_pooled"] > 0.95
    meas = disc_ruler(real)
    spread = meas.std().to_dict()
    gt = C.ground_truth(sw, disc_ruler, spread, C.expected_effects(scores, meas, spread)[0][0])
    assert gt["radius"]["rho"] == pytest.approx(1.0)
    assert gt["radius"]["effect_sd"] > 2.0
    assert abs(gt["center_x"]["effect_sd"]) < 0.15          # the sweep does not move the disc
    assert gt["radius"]["expected_effect_sd"] == pytest.approx(gt["radius"]["effect_sd"], rel=0.35)


def test_sweep_of_other_component_moves_disc_not_radius(fitted):
    model, state, scores, real = fitted
    sw = render_sweep(disc_generator, 4, 2, 1, sweep_values(-1.5, 1.5, 7), seeds=(0,))
    meas = disc_ruler(real)
    gt = C.ground_truth(sw, disc_ruler, meas.std().to_dict())
    assert gt["center_x"]["rho"] == pytest.approx(1.0) and abs(gt["radius"]["effect_sd"]) < 0.3


def test_gates_and_summary(fitted):
    gt = lambda heart, shift, dev: {"heart": {"rho": 0.99, "effect_sd": heart},
                                    "shift": {"rho": 0.9, "effect_sd": shift, "deviation_beyond_expected_ci_sd": dev}}
    metrics = {"components": [
        {"component": 1, "pct_target_variance": 80.0, "faithfulness": {"rho_mean": 0.95},
         "reader": {"rho_mean": 0.93}, "conditioning": {"r_pooled": 0.97}, "ground_truth": gt(2.5, 0.05, 0.0)},
        {"component": 2, "pct_target_variance": 5.0, "faithfulness": {"rho_mean": 0.1}, "reader": {"rho_mean": 0.0},
         "conditioning": {"r_pooled": 0.2}}],
        "fid": {"best": 10.0, "floor": 6.0, "extractor": "x", "n_samples": 100},
        "diversity": {"pixel_ratio": 0.8, "factor_ratio": {"shift": 0.9}}}
    gates = C.evaluate_gates(metrics, C.Thresholds(), ["heart"], ["shift"])
    assert gates["faithfulness"]["pass"] and gates["faithfulness"]["components"] == [1]   # 5 % component not gated
    assert gates["fid"]["pass"] and gates["driving_factor"]["pass"] and gates["nuisance"]["pass"] and gates["all_pass"]
    assert C.verdict(gates) == {"verdict": "pass", "failing": []}
    metrics["components"][0]["ground_truth"] = gt(2.5, 0.4, 0.3)
    bad = C.evaluate_gates(metrics, C.Thresholds(), ["heart"], ["shift"])
    assert not bad["nuisance"]["pass"] and C.verdict(bad) == {"verdict": "fail", "failing": ["nuisance"]}
    metrics["diversity"]["factor_ratio"]["shift"] = 0.2
    assert C.evaluate_gates(metrics, C.Thresholds(), ["heart"], ["shift"])["diversity"]["worst"] == "shift"
    metrics["gates"], metrics["verdict"] = gates, C.verdict(gates)
    text = C.summary_text(metrics)
    assert "gate faithfulness: PASS" in text and "heart +2.50" in text and "VERDICT: PASS" in text


def test_every_output_layout_reads_the_same_direction():
    """One logit, one probability, two logits, two probabilities: the same ranking along a sweep."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 5))
    state, _ = fit_pls(feats, (feats[:, 0] > 0).astype(int), "classification", n_components=2, class_names=["a", "b"])
    logit = np.linspace(-3, 3, 7)
    p = 1 / (1 + np.exp(-logit))
    layouts = {"one logit": logit[:, None], "one probability": p[:, None],
               "two logits": np.stack([np.zeros(7), logit], 1), "two probabilities": np.stack([1 - p, p], 1)}
    sign = np.sign(state.y_loadings[1, 0])
    for name, out in layouts.items():
        resp = C.target_response(out, "classification", state, 0)
        assert np.all(np.diff(resp) * sign > 0), name
    with pytest.raises(ValueError, match="3 output value"):
        C.target_response(rng.normal(size=(7, 3)), "classification", state, 0)


def test_regression_with_several_targets_and_a_wrong_width():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 4))
    y = np.stack([feats[:, 0], feats[:, 1]], 1)
    state, _ = fit_pls(feats, y, "regression", n_components=2)
    assert C.target_response(y[:5], "regression", state, 0).shape == (5,)
    with pytest.raises(ValueError, match="one value per target"):
        C.target_response(y[:5, :1], "regression", state, 0)


def test_old_metrics_schema_gets_a_clear_error():
    with pytest.raises(C.SchemaError, match="figan.metrics/1.*figan.metrics/2"):
        C.check_schema({"schema": "figan.metrics/1"})
    assert C.check_schema({"schema": C.SCHEMA})["schema"] == "figan.metrics/2"


def test_classification_response_direction():
    """For a classifier, the response is the softmax read along the component's y-loading."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 5))
    y = (feats[:, 0] > 0).astype(int)
    state, _ = fit_pls(feats, y, "classification", n_components=2, class_names=["a", "b"])
    logits = np.stack([-np.linspace(-3, 3, 7), np.linspace(-3, 3, 7)], 1)
    resp = C.target_response(logits, "classification", state, 0)
    sign = np.sign(state.y_loadings[1, 0])
    assert np.all(np.diff(resp) * sign > 0)
