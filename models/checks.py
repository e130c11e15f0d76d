"""The project's fidelity gates: does a FIGAN sequence show what the CNN actually uses?

The FIGAN paper shows sequences; these checks test them.

* **Faithfulness** — the audited CNN's output on the frames of component j's sweep. The output is read along
  that component's direction in target space (its PLS y-loading: for a regression CNN the prediction's sign
  follows the loading; for a classifier, the softmax probabilities projected on the loading), so a faithful
  sweep gives a Spearman ρ near +1 between sweep position and output, per noise seed.
* **Conditioning fidelity** — the generated images are pushed back through the CNN and the fitted PLS; the
  recomputed score of component j must follow the requested one. Pearson r along each sweep (pooled over seeds),
  and over random conditions drawn from the real score distribution (all components at once).
* **Ground truth** (phantoms) — the ruler measures every generative factor on every frame; per factor and
  component: Spearman ρ along the sweep and the *effect size* (change from the sweep's low to high end in SDs of
  the factor in real data), next to the effect that regressing the ruler's measures of the real images on the PLS
  scores predicts. Judge nuisances by effect size: Spearman turns any steady tiny drift into a large ρ.

Everything lands in one `metrics.json` (schema `figan.metrics/1`) built by `build_metrics`, plus a text summary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from .features import model_output
from .pls import PLSState, images_to_scores
from .sequences import SweepResult

SCHEMA = "figan.metrics/1"


@dataclass
class Thresholds:
    faithfulness: float = 0.9          # Spearman ρ, components explaining >= min_variance
    conditioning: float = 0.9          # Pearson r along sweeps, pooled over seeds
    min_variance_pct: float = 10.0     # components below this are reported but not gated
    fid_ratio: float = 2.0             # best FID <= ratio x real-vs-real floor
    diversity: float = 0.5             # seeds must differ at least half as much as real images do
    driving_rho: float = 0.9
    driving_effect_sd: float = 2.0
    nuisance_effect_sd: float = 0.15


def _safe_corr(fn, a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return 0.0
    return float(fn(a, b)[0])


def target_response(outputs: np.ndarray, task: str, state: PLSState, component: int) -> np.ndarray:
    """The CNN's output read along component j's direction in (standardised) target space."""
    out = np.asarray(outputs, dtype=np.float64)
    if task == "classification":
        e = np.exp(out - out.max(1, keepdims=True))
        out = e / e.sum(1, keepdims=True)
    q = np.asarray(state.y_loadings, dtype=np.float64)[:, component]
    return ((out - np.asarray(state.y_mean)) / np.asarray(state.y_scale)) @ q


def faithfulness(model: torch.nn.Module, sweep: SweepResult, task: str, state: PLSState,
                 transform: Callable | None = None, device="cpu") -> dict:
    S, Fr = sweep.frames.shape[:2]
    imgs = sweep.frames[:, :, :sweep.image_channels].reshape(S * Fr, sweep.image_channels, *sweep.frames.shape[-2:])
    out = model_output(model, imgs, batch_size=256, device=device, transform=transform)
    resp = target_response(out, task, state, sweep.component).reshape(S, Fr)
    rhos = [_safe_corr(spearmanr, sweep.values, resp[s]) for s in range(S)]
    return {"rho_per_seed": [round(r, 4) for r in rhos], "rho_mean": round(float(np.mean(rhos)), 4),
            "rho_min": round(float(np.min(rhos)), 4),
            "response_mean": [round(float(v), 4) for v in resp.mean(0)]}


def conditioning_sweep(model, sweep: SweepResult, state: PLSState, layer=None, transform=None, device="cpu") -> dict:
    S, Fr = sweep.frames.shape[:2]
    imgs = sweep.frames[:, :, :sweep.image_channels].reshape(S * Fr, sweep.image_channels, *sweep.frames.shape[-2:])
    scores = images_to_scores(model, imgs, state, layer=layer, transform=transform, device=device)
    got = scores[:, sweep.component].reshape(S, Fr)
    want = np.broadcast_to(sweep.values, (S, Fr))
    return {"r_pooled": round(_safe_corr(pearsonr, want.ravel(), got.ravel()), 4),
            "slope": round(float(np.polyfit(want.ravel(), got.ravel(), 1)[0]), 4),
            "recomputed_mean": [round(float(v), 4) for v in got.mean(0)]}


def conditioning_random(generate: Callable, z_dim: int, real_scores: np.ndarray, model, state: PLSState,
                        image_channels: int, n: int = 256, seed: int = 0, layer=None, transform=None,
                        device="cpu") -> dict:
    """Requested vs recomputed scores over conditions resampled from the real scores (all components at once)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(real_scores), (n,), generator=g)
    c = torch.as_tensor(np.asarray(real_scores)[rows.numpy()], dtype=torch.float32)
    z = torch.randn(n, z_dim, generator=g)
    imgs = generate(z, c)[:, :image_channels].numpy()
    got = images_to_scores(model, imgs, state, layer=layer, transform=transform, device=device)
    return {"r_per_component": [round(_safe_corr(pearsonr, c[:, j].numpy(), got[:, j]), 4) for j in range(c.shape[1])],
            "n": n}


def ground_truth(sweep: SweepResult, ruler: Callable[[np.ndarray], pd.DataFrame], spread: dict[str, float],
                 expected_per_sd: dict[str, float] | None = None) -> dict:
    """Per factor: Spearman ρ along the sweep (mean over seeds), effect size in SD of the real data (mean over
    seeds), and the effect the real data predict for the same sweep (regression of the factor on the scores)."""
    S, Fr = sweep.frames.shape[:2]
    imgs = sweep.frames[:, :, :sweep.image_channels].reshape(S * Fr, sweep.image_channels, *sweep.frames.shape[-2:])
    meas = ruler(imgs)
    span = float(sweep.values[-1] - sweep.values[0])
    res = {}
    for name in meas.columns:
        v = meas[name].to_numpy(np.float64).reshape(S, Fr)
        sd = float(spread.get(name, np.nan))
        rhos = [_safe_corr(spearmanr, sweep.values, v[s]) for s in range(S)]
        # effect from a least-squares line per seed: robust to a noisy single end frame
        slopes = [np.polyfit(sweep.values, v[s], 1)[0] for s in range(S)]
        if not (np.isfinite(sd) and sd > 0):
            continue          # a factor that does not vary in the real data (e.g. no shortcut marker planted)
        effect = float(np.mean(slopes)) * span / sd
        row = {"rho": round(float(np.mean(rhos)), 4), "effect_sd": round(effect, 4)}
        if expected_per_sd is not None and name in expected_per_sd:
            row["expected_effect_sd"] = round(float(expected_per_sd[name]) * span, 4)
        res[name] = row
    return res


def expected_effects(real_scores: np.ndarray, real_factors: pd.DataFrame, spread: dict[str, float]) -> list[dict[str, float]]:
    """For each component j and factor f: d(f)/d(c_j) in factor-SD per score-SD from a linear regression of the
    ruler's (or manifest's) factor values of real images on all PLS scores. What a faithful sweep should show."""
    X = np.column_stack([np.ones(len(real_scores)), real_scores])
    out = [dict() for _ in range(real_scores.shape[1])]
    for name in real_factors.columns:
        y = real_factors[name].to_numpy(np.float64)
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        sd = float(spread.get(name, np.std(y))) or 1.0
        for j in range(real_scores.shape[1]):
            out[j][name] = float(beta[j + 1]) / sd
    return out


def evaluate_gates(metrics: dict, th: Thresholds, driving: Sequence[str] = (), nuisance: Sequence[str] = ()) -> dict:
    """Pass/fail of every gate, with the numbers that decided it."""
    comps = metrics["components"]
    gated = [c for c in comps if c["pct_target_variance"] >= th.min_variance_pct] or comps[:1]
    gates = {}
    gates["faithfulness"] = {
        "threshold": th.faithfulness, "components": [c["component"] for c in gated],
        "values": [c["faithfulness"]["rho_mean"] for c in gated],
        "pass": all(c["faithfulness"]["rho_mean"] >= th.faithfulness for c in gated)}
    gates["conditioning"] = {
        "threshold": th.conditioning, "components": [c["component"] for c in gated],
        "values": [c["conditioning"]["r_pooled"] for c in gated],
        "pass": all(c["conditioning"]["r_pooled"] >= th.conditioning for c in gated)}
    fid = metrics.get("fid") or {}
    if fid.get("best") is not None and fid.get("floor"):
        gates["fid"] = {"threshold_ratio": th.fid_ratio, "value_ratio": round(fid["best"] / fid["floor"], 3),
                        "extractor": fid.get("extractor"), "pass": fid["best"] <= th.fid_ratio * fid["floor"]}
    div = metrics.get("diversity")
    if div is not None:
        gates["diversity"] = {"threshold": th.diversity, "value": div["ratio"], "pass": div["ratio"] >= th.diversity}
    gt = comps[0].get("ground_truth")
    if gt and driving:
        top = comps[0]
        best = max(driving, key=lambda f: abs(gt.get(f, {}).get("effect_sd", 0) or 0))
        d = gt[best]
        nuis = {f: gt[f]["effect_sd"] for f in nuisance if f in gt}
        worst = max(nuis, key=lambda f: abs(nuis[f])) if nuis else None
        gates["ground_truth"] = {
            "component": top["component"], "driving_factor": best, "driving_rho": d["rho"],
            "driving_effect_sd": d["effect_sd"], "worst_nuisance": worst,
            "worst_nuisance_effect_sd": nuis.get(worst) if worst else None,
            "thresholds": {"driving_rho": th.driving_rho, "driving_effect_sd": th.driving_effect_sd,
                           "nuisance_effect_sd": th.nuisance_effect_sd},
            "pass": abs(d["rho"]) >= th.driving_rho and abs(d["effect_sd"]) >= th.driving_effect_sd
                    and all(abs(v) <= th.nuisance_effect_sd for v in nuis.values())}
    gates["all_pass"] = all(g["pass"] for g in gates.values() if isinstance(g, dict))
    return gates


def summary_text(metrics: dict) -> str:
    """A short human-readable summary of metrics.json."""
    lines = [f"FIGAN explanation of {metrics.get('cnn', {}).get('name', 'CNN')} on {metrics.get('dataset', {}).get('name', '?')}"]
    fid = metrics.get("fid") or {}
    if fid.get("best") is not None:
        lines.append(f"FID best {fid['best']:.2f} at step {fid.get('best_step')} (floor {fid.get('floor', float('nan')):.2f}; "
                     f"extractor: {fid.get('extractor')})")
    if metrics.get("diversity"):
        lines.append(f"Diversity across noise seeds: {metrics['diversity']['ratio']:.2f} x real-image spread")
    lines.append(f"{'comp':>4} {'%var':>6} {'faithful ρ':>11} {'cond r':>7}  top factors (effect, SD)")
    for c in metrics["components"]:
        gt = c.get("ground_truth") or {}
        top = sorted(gt.items(), key=lambda kv: -abs(kv[1].get("effect_sd", 0) or 0))[:3]
        tops = ", ".join(f"{k} {v['effect_sd']:+.2f}" for k, v in top)
        lines.append(f"{c['component']:>4} {c['pct_target_variance']:>6.1f} {c['faithfulness']['rho_mean']:>11.3f} "
                     f"{c['conditioning']['r_pooled']:>7.3f}  {tops}")
    gates = metrics.get("gates") or {}
    for name, g in gates.items():
        if isinstance(g, dict):
            lines.append(f"gate {name}: {'PASS' if g['pass'] else 'FAIL'}")
    if "all_pass" in gates:
        lines.append(f"all gates: {'PASS' if gates['all_pass'] else 'FAIL'}")
    return "\n".join(lines) + "\n"
