"""Benchmark (issue 20): do the attribution maps find the shortcut? On the shortcut phantom (a burned-in corner
marker that predicts the label 90 % of the time), fresh phantoms are rendered twice from the same factors and
noise seed, with and without the marker. For images whose prediction depends on the marker (|Δ logit| when it is
removed, top half), Grad-CAM and the vanilla gradient should put far more of their mass inside the marker's box
(and its corner: the box grown by one Grad-CAM cell) than on the same images without it. Reports the mass fractions
(area fractions for reference) and the cost.

Uses the shortcut CNN of ``benchmarks/explain_gates.py`` (run it first). Writes
``benchmarks/results/attribution_shortcut.json``.

    .venv/bin/python benchmarks/attribution_shortcut.py [--n 64] [--cnn runs/bench_gates/shortcut/cnn]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.attribution import attribute, last_conv
from models.cnn import load_cnn
from models.phantom import FACTORS, PhantomConfig, _marker_box, generate, render

from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = Path(__file__).parent / "results" / "attribution_shortcut.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--cnn", type=Path, default=Path("runs/bench_gates/shortcut/cnn"))
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, spec = load_cnn(a.cnn)
    model.eval()
    size = spec.input_shape[-1]
    table = generate(PhantomConfig(n=a.n, size=size, seed=91, shortcut=True))[2]
    rows = [{f: float(table[f].iloc[i]) for f in FACTORS} for i in range(a.n)]
    with_marker = np.concatenate([render(pd.DataFrame([{**r, "marker": 1}]), size, 20_000 + i)[0]
                                  for i, r in enumerate(rows)])
    without = np.concatenate([render(pd.DataFrame([{**r, "marker": 0}]), size, 20_000 + i)[0]
                              for i, r in enumerate(rows)])
    x_m, x_0 = torch.from_numpy(with_marker), torch.from_numpy(without)
    with torch.no_grad():
        delta = (model(x_m) - model(x_0)).reshape(-1).numpy()
    depends = np.abs(delta) >= np.median(np.abs(delta))
    conv = last_conv(model)
    t = time.perf_counter()
    maps_m, maps_0 = attribute(model, x_m[depends], conv), attribute(model, x_0[depends], conv)
    seconds = time.perf_counter() - t
    box = _marker_box(size)
    area = np.zeros((size, size), bool)
    area[box] = True

    pad = size // 8                                  # one Grad-CAM cell of the last conv stage (stride 8 here)
    corner = np.zeros((size, size), bool)
    corner[max(0, box[0].start - pad):box[0].stop + pad, max(0, box[1].start - pad):box[1].stop + pad] = True

    def mass_in(region: np.ndarray, maps: np.ndarray) -> np.ndarray:
        m = np.clip(maps, 0, None)
        return m[:, region].sum(1) / np.maximum(m.reshape(len(m), -1).sum(1), 1e-12)

    figures = {"box_area_fraction": float(area.mean()), "corner_area_fraction": float(corner.mean()), "marker_logit_change_median": float(np.median(np.abs(delta))),
               "images_depending_on_marker": int(depends.sum()), "seconds_per_image": seconds / (2 * depends.sum())}
    for kind in maps_m:
        for name, region in (("box", area), ("corner", corner)):
            fm, f0 = mass_in(region, maps_m[kind]), mass_in(region, maps_0[kind])
            figures[f"{kind}_mass_in_{name}_with_marker"] = float(np.median(fm))
            figures[f"{kind}_mass_in_{name}_without_marker"] = float(np.median(f0))
        figures[f"{kind}_corner_ratio"] = (figures[f"{kind}_mass_in_corner_with_marker"]
                                           / max(figures[f"{kind}_mass_in_corner_without_marker"], 1e-12))
    out = {**provenance(),
           "config": {"n_images": a.n, "cnn": str(a.cnn), "gradcam_layer": conv, "size": size},
           "targets": {"gradcam_mass_in_corner_with_marker": "well above the corner's area fraction and above the "
                                                             "same images without the marker (ratio > 1)"},
           "figures": figures}
    write_results(RESULTS, out)


if __name__ == "__main__":
    main()
