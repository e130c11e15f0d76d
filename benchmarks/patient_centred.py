"""Benchmark (issue 16): patient-centred sweeps of images the explanation never saw, on the 64² phantom, judged
against the *true counterfactual* of each image.

Takes the regression explanation of ``benchmarks/explain_gates.py`` (run it first) and draws fresh phantoms
(another seed: held out from everything). Each is placed on the patient generator's template, as an upload to the
service would be, and swept over the top component's published range around its own score. Because the phantom
is rendered from known factors, the same patient can also be re-rendered *truly* along the sweep: its driving
factors moved by what one SD of the component means in the real data (regression of the true heart size and
vascular fullness on the scores), every nuisance and the pixel noise unchanged. Reports:

* placement and reconstruction: registration residual vs the calibrated threshold, the edit at its own scores vs
  the image (pixels, PLS scores), against the real-vs-real nearest-neighbour distance;
* the ruler's driving factor along the sweep (Spearman ρ);
* each nuisance's move over the sweep (least-squares change, in SD of the factor in real images) on the generated
  frames, on the true counterfactual frames, and their difference — the move the generator adds. The ruler reads
  a driving change partly as a nuisance change (e.g. a fuller vessel tree shifts the lung centroid it uses for
  position); the true counterfactual carries that reading error too, so the difference is what the generator
  itself moves;
* pixels, on the frame farthest from the image's own score, after a 3x3 blur (noise off): where the true
  counterfactual differs from the image by more than 0.02, the fraction of that change the edit misses
  (|edit − truth| / |truth − image|, pooled over images; 0 = reproduced, 1 = nothing done); elsewhere, how much the
  edit changes the image though the truth does not (mean absolute change, grey levels in [0, 1]);
* time to place + render one image's sweep (2 CPU cores).

``--refit`` fits the patient generator again with the current code from the explanation's own images, scores,
registration (``gan/pose.pt``) and patient pool — what the explain flow's training stage does — so a change to the
generator is measured without re-running the whole explanation.

Writes ``benchmarks/results/patient_centred.json``.

    .venv/bin/python benchmarks/patient_centred.py [--n 32] [--refit] [--explanation runs/bench_gates/regression/explanation-patient]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from models import layout
from models.cgan import load_generator
from models.patient_generator import PatientGenerator, PatientGeneratorConfig
from models.cnn import load_cnn
from models.data import ImageDataset
from models.phantom import DRIVING, FACTORS, NUISANCE, RANGES, PhantomConfig, generate, render, ruler
from models.pls import images_to_scores, load_pls

from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = Path(__file__).parent / "results" / "patient_centred.json"
NAMED_NUISANCES = ("shift_x", "shift_y", "exposure", "body_scale")   # the issue's: position, exposure, body size
CHANGED = 0.02          # grey-level change (blurred) that counts as "the true counterfactual changed this pixel"


def driving_per_score_sd(ds: ImageDataset, scores: np.ndarray, component: int) -> dict[str, float]:
    """Change of each true driving factor per SD of a component's score in the real data (all scores regressed
    together, so the other components are held)."""
    X = np.column_stack([np.ones(len(scores)), scores])
    Y = ds.manifest[list(DRIVING)].to_numpy(np.float64)
    beta = np.linalg.lstsq(X, Y, rcond=None)[0]
    return dict(zip(DRIVING, beta[1 + component].tolist()))


def true_counterfactuals(row: pd.Series, own: float, values: np.ndarray, slope: dict[str, float], size: int,
                         seed: int) -> np.ndarray:
    """The same phantom (same nuisances, noise and vessel jitter: one seed) re-rendered with its driving factors
    moved along the component to each sweep value: (F, 1, size, size)."""
    frames = []
    base = {f: float(row[f]) for f in FACTORS}
    for v in values:
        moved = {**base, **{f: float(np.clip(base[f] + b * (v - own), *RANGES[f])) for f, b in slope.items()}}
        frames.append(render(pd.DataFrame([moved]), size, seed)[0][0])
    return np.stack(frames)


def fitted_move(values: np.ndarray, readings: np.ndarray, sd: float) -> float:
    """Least-squares change of a reading over the whole sweep, in SD of the factor in real images (robust to the
    ruler's frame-to-frame reading error, unlike a maximum over frames)."""
    return float(np.polyfit(values, readings / sd, 1)[0] * (values[-1] - values[0]))


def smooth(x: np.ndarray) -> np.ndarray:
    """Anatomy without the pixel noise (3x3 box blur), to compare frames with the true counterfactual."""
    t = torch.from_numpy(np.asarray(x, np.float32))
    return torch.nn.functional.avg_pool2d(t, 3, 1, 1, count_include_pad=False).numpy()


def summary(moves: np.ndarray, rng: np.random.Generator) -> dict:
    boot = [moves[rng.integers(0, len(moves), len(moves))].mean() for _ in range(1000)]
    return {"abs_median": float(np.median(np.abs(moves))), "abs_p90": float(np.percentile(np.abs(moves), 90)),
            "mean": float(moves.mean()), "mean_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}


def refit_generator(explanation: Path, ds: ImageDataset, resolution: int) -> PatientGenerator:
    """The patient generator fitted again by the current code on the explanation's images, PLS scores, cached
    registration and pool (the images outside the FID reference, drawn as the explain flow draws them)."""
    cfg = json.loads((explanation / layout.CONFIG).read_text())["config"]
    src = ds if ds.image_shape[-1] == resolution else ImageDataset(ds.root, size=(resolution, resolution))
    images = torch.from_numpy(src.load(np.arange(len(src))).astype(np.float32))
    scores = pd.read_csv(explanation / layout.SCORES).filter(regex=r"^c\d+$").to_numpy(np.float32)
    perm = np.random.default_rng(cfg["seed"] + 3).permutation(len(images))
    pool = np.sort(perm[min(cfg["fid_samples"], len(images) // 2):])
    return PatientGenerator.fit(images, torch.from_numpy(scores), pool,
                                PatientGeneratorConfig(register_iters=cfg["register_iters"]),
                                pose=torch.load(explanation / layout.POSE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--explanation", type=Path, default=Path("runs/bench_gates/regression/explanation-patient"))
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--refit", action="store_true", help="fit the generator again with the current code first")
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    G, gcfg, _ = load_generator(a.explanation / layout.GENERATOR_DIR)
    if a.refit:
        G = refit_generator(a.explanation, ImageDataset(a.explanation.parent / "data"), gcfg.resolution)
    state = load_pls(a.explanation / layout.PLS_DIR)
    model, spec = load_cnn(a.explanation.parent / "cnn")
    metrics = json.loads((a.explanation / layout.METRICS).read_text())
    lo, hi = metrics["sweep"]["lo"][0], metrics["sweep"]["hi"][0]
    ds = ImageDataset(a.explanation.parent / "data")                      # the images it was explained on
    real = ds.load(np.arange(len(ds))).astype(np.float32)
    spread = ruler(real)[list(NUISANCE)].std()
    slope = driving_per_score_sd(ds, images_to_scores(model, real, state), 0)
    table = generate(PhantomConfig(n=a.n, size=gcfg.resolution, seed=77))[2]
    fresh_np = np.concatenate([render(pd.DataFrame([{f: float(table[f].iloc[i]) for f in FACTORS}]), gcfg.resolution,
                                      10_000 + i)[0] for i in range(a.n)])
    fresh = torch.from_numpy(fresh_np)
    own = torch.as_tensor(images_to_scores(model, fresh_np, state), dtype=torch.float32)
    values = np.linspace(lo, hi, a.frames)
    rows, seconds = [], []
    gen_moves, true_moves = ({f: [] for f in NUISANCE} for _ in range(2))
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
        truth = true_counterfactuals(table.iloc[i], float(own[i, 0]), values, slope, gcfg.resolution, 10_000 + i)
        meas, meas_true = ruler(frames.numpy()), ruler(truth)
        for f in NUISANCE:
            gen_moves[f].append(fitted_move(values, meas[f].to_numpy(), spread[f]))
            true_moves[f].append(fitted_move(values, meas_true[f].to_numpy(), spread[f]))
        recon_scores = images_to_scores(model, recon.numpy(), state)[0]
        far = int(np.argmax(np.abs(values - float(own[i, 0]))))       # the frame farthest from its own score
        gen_s, true_s, orig_s = smooth(frames.numpy()[far]), smooth(truth[far]), smooth(fresh_np[i])
        changed = np.abs(true_s - orig_s) > CHANGED                    # where the true counterfactual differs
        rows.append({"residual": float(residual[0]), "trusted": bool(trusted[0]),
                     "pixel_error": float((recon - fresh[i:i + 1]).abs().mean()),
                     "score_error_sd": float(np.abs(recon_scores - own[i].numpy()).max()),
                     "driving_rho": float(spearmanr(values, meas["heart_size"])[0]),
                     "driving_rho_true_counterfactual": float(spearmanr(values, meas_true["heart_size"])[0]),
                     "changed_pixels": int(changed.sum()),
                     "inside_error": float(np.abs(gen_s - true_s)[changed].sum()),
                     "inside_true_change": float(np.abs(true_s - orig_s)[changed].sum()),
                     "outside_change": float(np.abs(gen_s - orig_s)[~changed].mean()),
                     "nuisance_move_sd": {f: gen_moves[f][-1] for f in NUISANCE},
                     "nuisance_move_true_sd": {f: true_moves[f][-1] for f in NUISANCE}})
    rng = np.random.default_rng(0)
    nuisance = {}
    for f in NUISANCE:
        g, tr = np.asarray(gen_moves[f]), np.asarray(true_moves[f])
        nuisance[f] = {"generated": summary(g, rng), "true_counterfactual": summary(tr, rng),
                       "added_by_generator": summary(g - tr, rng)}
    nn = torch.cdist(fresh.flatten(1), torch.from_numpy(real[:1000]).flatten(1)).min(1).values / fresh[0].numel()
    out = {**provenance(),
           "config": {"n_images": a.n, "frames": a.frames, "explanation": str(a.explanation), "sweep": [lo, hi],
                      "resolution": gcfg.resolution, "driving_per_score_sd": slope, "refit": a.refit,
                      "pose_slopes_shown": G.pose_slopes[0].tolist(), "noise_slope_shown": float(G.noise_slopes[0])},
           "targets": {"pixel_error": "median <= real-vs-real nearest-neighbour distance",
                       "score_error_sd": "<= 0.25", "driving_rho": ">= 0.9",
                       "nuisance_added_abs_median_sd": "<= 0.15: each nuisance's move over the sweep beyond the "
                                                       "true counterfactual's (nuisances fixed)",
                       "nuisance_added_abs_p90_sd_max_named": "<= 0.15: the same per image, 90th percentile, for "
                                                              "position, exposure and body size"},
           "figures": {
               "trusted_fraction": float(np.mean([r["trusted"] for r in rows])),
               "pixel_error_median": float(np.median([r["pixel_error"] for r in rows])),
               "nn_distance_median_per_pixel_l2": float(nn.median()),
               "score_error_sd_max": float(np.max([r["score_error_sd"] for r in rows])),
               "driving_rho_median": float(np.median([r["driving_rho"] for r in rows])),
               "driving_rho_min": float(np.min([r["driving_rho"] for r in rows])),
               "nuisance_added_abs_median_sd_max": max(v["added_by_generator"]["abs_median"] for v in nuisance.values()),
               "nuisance_added_abs_p90_sd_max": max(v["added_by_generator"]["abs_p90"] for v in nuisance.values()),
               "nuisance_added_abs_p90_sd_max_named": max(nuisance[f]["added_by_generator"]["abs_p90"]
                                                          for f in NAMED_NUISANCES),
               "nuisance_generated_abs_median_sd_max": max(v["generated"]["abs_median"] for v in nuisance.values()),
               "true_change_missed_fraction": float(sum(r["inside_error"] for r in rows)
                                                    / max(sum(r["inside_true_change"] for r in rows), 1e-9)),
               "collateral_change_outside_median": float(np.median([r["outside_change"] for r in rows])),
               "seconds_per_image_p50": float(np.median(seconds)), "seconds_per_image_p99": float(np.percentile(seconds, 99))},
           "nuisances": nuisance, "per_image": rows}
    for f, v in nuisance.items():
        print(f"  {f:11s} " + "   ".join(f"{part}: |med| {s['abs_median']:.3f} p90 {s['abs_p90']:.3f} mean {s['mean']:+.3f}"
                                          for part, s in v.items()))
    write_results(RESULTS, out)


if __name__ == "__main__":
    main()
