"""The gates can fail: known generators of discs through the real explain stages and checks.

A disc dataset whose target is the disc's radius (position and brightness are nuisances), a small CNN-like model
that reads the disc's size, and four generators G(z, c): a faithful one (radius from c₁, position/brightness
from z), one that also shifts the disc with c₁, one that ignores z, one that ignores c. Only the faithful one
may pass; each of the others must fail the gate that describes its flaw. Seconds each.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from models.cgan import CGANConfig
from models.data import DatasetMeta, ImageDataset, write_dataset
from models.explain import ExplainConfig, PatientFit, prepare, stage_checks, stage_features, stage_images, \
    stage_pls, stage_sequences

SIZE, N = 32, 320
YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def disc(radius: float, cx: float, brightness: float, noise: np.ndarray) -> np.ndarray:
    d = np.sqrt((XX - (SIZE - 1) / 2 - cx) ** 2 + (YY - (SIZE - 1) / 2) ** 2)
    img = brightness / (1 + np.exp(-2.0 * (radius - d))) + 0.05 + noise
    return np.clip(img, 0, 1)[None].astype(np.float32)


def disc_ruler(images: np.ndarray) -> pd.DataFrame:
    """Radius from the bright area, x-position from its centroid, brightness from its mean level."""
    x = np.asarray(images, np.float32)[:, 0]
    mask = x > 0.35
    area = mask.sum((1, 2)).clip(1)
    cx = (mask * XX).sum((1, 2)) / area - (SIZE - 1) / 2
    brightness = (x * mask).sum((1, 2)) / area
    return pd.DataFrame({"radius": np.sqrt(area / np.pi), "cx": cx, "brightness": brightness})


class DiscNet(nn.Module):
    """Reads the disc's size (its bright area at two levels); its final Linear is fitted to the radius."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(_size_features(x))


def _size_features(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([(x > 0.35).float().mean((1, 2, 3)).sqrt(), (x > 0.25).float().mean((1, 2, 3)).sqrt()], 1)


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> tuple[ImageDataset, DiscNet]:
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"radius": rng.uniform(3, 9, N), "cx": rng.uniform(-4, 4, N),
                         "brightness": rng.uniform(0.6, 1.0, N)})
    rows["target"] = rows["radius"]
    images = [disc(r.radius, r.cx, r.brightness, rng.normal(0, 0.02, (SIZE, SIZE)))
              for r in rows.itertuples()]
    root = tmp_path_factory.mktemp("discs") / "data"
    meta = DatasetMeta(name="discs", target="target", task="regression",
                       factors={"driving": ["radius"], "nuisance": ["cx", "brightness"]})
    ds = write_dataset(root, meta, images, rows)
    model = DiscNet()
    x = torch.from_numpy(np.stack(images))
    with torch.no_grad():
        f = _size_features(x).double()
        X1 = torch.cat([f, torch.ones(N, 1, dtype=torch.float64)], 1)
        beta = torch.linalg.lstsq(X1, torch.as_tensor(rows["radius"].to_numpy())[:, None]).solution
        model.fc.weight.copy_(beta[:2, 0][None].float())
        model.fc.bias.copy_(beta[2].float())
    return ds, model.eval()


def _uniform(z: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * (0.5 * (1 + torch.erf(z / np.sqrt(2)))).numpy()


def make_generator(kind: str, radius_of_c):
    """G(z, c) → (N, 1, 32, 32) in [0, 1]; NaN in c (the patient convention) reads as the mean score 0."""
    def generate(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c1 = torch.nan_to_num(c[:, 0].float(), nan=0.0).numpy()
        radius = radius_of_c(c1)
        cx, bright = _uniform(z[:, 1], -4, 4), _uniform(z[:, 2], 0.6, 1.0)
        if kind == "shifts":
            cx = cx + 1.5 * c1
        if kind == "ignores_z":
            cx, bright = np.zeros_like(cx), np.full_like(bright, 0.8)
        if kind == "ignores_c":
            radius = _uniform(z[:, 0], 3, 9)
        out = []
        for i in range(len(z)):
            seed = 0 if kind == "ignores_z" else int(abs(float(z[i, 3])) * 1e6)
            noise = np.random.default_rng(seed).normal(0, 0.02, (SIZE, SIZE))
            out.append(disc(float(radius[i]), float(cx[i]), float(bright[i]), noise))
        return torch.from_numpy(np.stack(out))
    return generate


def explain_with(kind: str, discs, tmp_path: Path) -> dict:
    ds, model = discs
    cfg = ExplainConfig(n_components=1, fid_extractor="randconv", fid_samples=150, check_seeds=32, frames=7,
                        reader_epochs=8)
    run = prepare(ds, model, tmp_path / kind, cfg, ruler=disc_ruler, cnn_name="discnet")
    stage_features(run)
    stage_pls(run)
    stage_images(run)
    radius = ds.manifest["radius"].to_numpy()
    a, b = np.polyfit(run.scores[:, 0], radius, 1)[::-1]
    run.result = PatientFit(step=cfg.steps, seconds=0.0, n_pool=0)
    gcfg = CGANConfig(resolution=SIZE, image_channels=1, mask_channels=0, k=1, z_dim=4)
    stage_sequences(run, generator=(make_generator(kind, lambda c1: np.clip(a + b * c1, 1.5, 12)), gcfg))
    return stage_checks(run)


def failing(metrics: dict) -> set[str]:
    return set(metrics["verdict"]["failing"])


def test_faithful_disc_generator_passes_every_gate(discs, tmp_path):
    m = explain_with("faithful", discs, tmp_path)
    assert m["verdict"] == {"verdict": "pass", "failing": []}, m["gates"]
    gt = m["components"][0]["ground_truth"]
    assert gt["radius"]["rho"] > 0.95 and gt["radius"]["effect_sd"] > 2
    assert abs(gt["cx"]["effect_sd"]) < 0.15


def test_disc_that_also_moves_fails_the_nuisance_gate(discs, tmp_path):
    m = explain_with("shifts", discs, tmp_path)
    assert "nuisance" in failing(m)
    assert m["gates"]["nuisance"]["worst_factor"] == "cx"
    assert not {"faithfulness", "conditioning", "diversity"} & failing(m)


def test_generator_ignoring_z_fails_diversity(discs, tmp_path):
    m = explain_with("ignores_z", discs, tmp_path)
    assert "diversity" in failing(m)
    assert m["diversity"]["pixel_ratio"] < 0.05


def test_generator_ignoring_c_fails_conditioning_and_the_reader(discs, tmp_path):
    m = explain_with("ignores_c", discs, tmp_path)
    assert {"conditioning", "reader", "faithfulness"} <= failing(m)
    assert m["verdict"]["verdict"] == "fail"
