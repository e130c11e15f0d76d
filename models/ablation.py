"""The FIGAN paper's three experiments as one grid: training sample size x resolution x auxiliary segmentation.

Features and PLS depend on neither axis, so they are computed once and shared by every cell; each cell trains its
own GAN into its own folder and lands in one comparison table (FID with its extractor, faithfulness, ground truth,
time)."""
from __future__ import annotations

import importlib.util
import itertools
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .layout import FEATURES
from .cnn import load_cnn
from .data import ImageDataset
from .explain import ExplainConfig, compute_features, explain, resolve_device
from .files import load_npy, save_npy


def cell_name(size: int | None, res: int | None, masks: bool) -> str:
    return f"n{size or 'all'}_r{res or 'native'}_{'mask' if masks else 'nomask'}"


def summarise(metrics: dict) -> dict:
    comps = metrics["components"]
    gated = [c for c in comps if c["pct_target_variance"] >= 10] or comps[:1]
    gates = metrics["gates"]
    row = {"fid": metrics["fid"]["best"], "fid_floor": metrics["fid"]["floor"],
           "faithfulness_min": min(c["faithfulness"]["rho_mean"] for c in gated),
           "reader_min": min(c["reader"]["rho_mean"] for c in gated),
           "conditioning_min": min(c["conditioning"]["r_pooled"] for c in gated),
           "diversity_pixels": metrics["diversity"]["pixel_ratio"], "seconds": metrics["timings_s"]["total"],
           "img_per_s": metrics["training"].get("img_per_s"), "verdict": metrics["verdict"]["verdict"]}
    if "driving_factor" in gates:
        row.update(gt_driving_rho=gates["driving_factor"]["rho"], gt_driving_effect_sd=gates["driving_factor"]["effect_sd"])
    if "nuisance" in gates:
        row.update(gt_worst_nuisance_deviation_sd=gates["nuisance"]["worst_deviation_sd"])
    return row


def run_grid(data: str | Path, cnn: str | Path, out: str | Path, base: ExplainConfig,
             sizes: list[int | None], resolutions: list[int | None], masks: list[bool]) -> pd.DataFrame:
    ds = ImageDataset(data)
    model, spec = load_cnn(cnn)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(masks) and not ds.has_masks:
        raise ValueError(f"--masks on needs a dataset with masks; {ds.name} has none")
    shared = out / FEATURES
    features = load_npy(shared, rows=len(ds))
    if features is None:
        features = compute_features(model, ds, base.layer, resolve_device(base.device))
        save_npy(shared, features)
    rows = []
    for size, res, m in itertools.product(sizes, resolutions, masks):
        name = cell_name(size, res, m)
        cell = out / name
        cell.mkdir(exist_ok=True)
        if load_npy(cell / FEATURES, rows=len(ds)) is None:
            save_npy(cell / FEATURES, features)
        cfg = replace(base, max_images=size, resolution=res, use_masks=m)
        metrics = explain(ds, model, cell, cfg, task=spec.task, input_shape=tuple(spec.input_shape),
                          cnn_name=spec.arch)
        rows.append({"cell": name, "n_images": size or len(ds), "resolution": metrics["training"]["resolution"],
                     "masks": m, **summarise(metrics), "fid_extractor": metrics["fid"]["extractor"]})
    table = pd.DataFrame(rows)
    table.to_csv(out / "ablation.csv", index=False)
    (out / "ablation.md").write_text(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    return table


def _has_tabulate() -> bool:
    return importlib.util.find_spec("tabulate") is not None    # pandas.to_markdown needs it
