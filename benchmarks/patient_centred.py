"""Benchmark (issue 16): patient-centred sweeps of images the explanation never saw, on the 64² phantom.

Takes the regression explanation of ``benchmarks/explain_gates.py`` (run it first), draws fresh phantoms (another
seed: held out from everything), places each on the patient generator's template and sweeps the top component
over its published range around the image's own score. Reports, per image: the registration residual against the
calibrated threshold; the reconstruction (the edit at its own scores) vs the image, in pixels and in PLS scores;
along the sweep, the ruler's driving factor (Spearman ρ) and how far each nuisance moves from the image's own
value (SD of the factor in real images); and the time to place + render one image's sweep (2 CPU cores).
Writes ``benchmarks/results/patient_centred.json``.

    .venv/bin/python benchmarks/patient_centred.py [--n 32] [--explanation runs/bench_gates/regression/explanation-patient]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from models.cgan import load_generator
from models.cnn import load_cnn
from models.data import ImageDataset
from models.phantom import NUISANCE, PhantomConfig, generate, ruler
from models.pls import images_to_scores, load_pls

RESULTS = Path(__file__).parent / "results" / "patient_centred.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--explanation", type=Path, default=Path("runs/bench_gates/regression/explanation-patient"))
    ap.add_argument("--frames", type=int, default=9)
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    G, gcfg, _ = load_generator(a.explanation / "gan" / "best")
    state = load_pls(a.explanation / "pls")
    model, spec = load_cnn(a.explanation.parent / "cnn")
    metrics = json.loads((a.explanation / "metrics.json").read_text())
    lo, hi = metrics["sweep"]["lo"][0], metrics["sweep"]["hi"][0]
    ds = ImageDataset(a.explanation.parent / "data")                      # the images it was explained on
    real = ds.load(np.arange(len(ds))).astype(np.float32)
    spread = ruler(real).std()
    fresh = torch.from_numpy(np.asarray(generate(PhantomConfig(n=a.n, size=gcfg.resolution, seed=77))[0], np.float32))
    own = torch.as_tensor(images_to_scores(model, fresh.numpy(), state), dtype=torch.float32)
    values = np.linspace(lo, hi, a.frames)
    rows, seconds = [], []
    for i in range(a.n):
        t = time.perf_counter()
        pose, residual, trusted = G.place(fresh[i:i + 1])
        c = own[i].repeat(a.frames, 1)
        c[:, 0] = torch.as_tensor(values, dtype=torch.float32)
        with torch.no_grad():
            frames = G.edit_image(fresh[i:i + 1].expand(a.frames, -1, -1, -1), pose.expand(a.frames, -1),
                                  own[i].expand(a.frames, -1), c)
            recon = G.edit_image(fresh[i:i + 1], pose, own[i:i + 1], own[i:i + 1])
        seconds.append(time.perf_counter() - t)
        meas = ruler(frames.numpy())
        base = ruler(fresh[i:i + 1].numpy()).iloc[0]
        drift = {f: float(np.max(np.abs(meas[f].to_numpy() - base[f])) / spread[f]) for f in NUISANCE}
        recon_scores = images_to_scores(model, recon.numpy(), state)[0]
        rows.append({"residual": float(residual[0]), "trusted": bool(trusted[0]),
                     "pixel_error": float((recon - fresh[i:i + 1]).abs().mean()),
                     "score_error_sd": float(np.abs(recon_scores - own[i].numpy()).max()),
                     "driving_rho": float(spearmanr(values, meas["heart_size"])[0]),
                     "worst_nuisance_move_sd": max(drift.values()), "worst_nuisance": max(drift, key=drift.get)})
    nn = torch.cdist(fresh.flatten(1), torch.from_numpy(real[:1000]).flatten(1)).min(1).values / fresh[0].numel()
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "torch": torch.__version__},
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "config": {"n_images": a.n, "frames": a.frames, "explanation": str(a.explanation), "sweep": [lo, hi],
                      "resolution": gcfg.resolution},
           "targets": {"pixel_error": "median <= real-vs-real nearest-neighbour distance",
                       "score_error_sd": "<= 0.25", "driving_rho": ">= 0.9",
                       "worst_nuisance_move_sd": "<= 0.15 from the image's own value"},
           "figures": {
               "trusted_fraction": float(np.mean([r["trusted"] for r in rows])),
               "pixel_error_median": float(np.median([r["pixel_error"] for r in rows])),
               "nn_distance_median_per_pixel_l2": float(nn.median()),
               "score_error_sd_max": float(np.max([r["score_error_sd"] for r in rows])),
               "driving_rho_median": float(np.median([r["driving_rho"] for r in rows])),
               "driving_rho_min": float(np.min([r["driving_rho"] for r in rows])),
               "worst_nuisance_move_sd_median": float(np.median([r["worst_nuisance_move_sd"] for r in rows])),
               "worst_nuisance_move_sd_p90": float(np.percentile([r["worst_nuisance_move_sd"] for r in rows], 90)),
               "seconds_per_image_p50": float(np.median(seconds)), "seconds_per_image_p99": float(np.percentile(seconds, 99))},
           "per_image": rows}
    for k, v in out["figures"].items():
        print(f"{k:34s} {v:.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
