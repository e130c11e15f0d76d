"""The project's fidelity gates: does a FIGAN sequence show what the CNN actually uses, in images that look real?

The FIGAN paper shows sequences; these checks test them, and each can fail:

* **Faithfulness** — the audited CNN's output on the frames of component j's sweep, read along that component's
  direction in target space (its PLS y-loading; see :func:`target_response` for every output layout: one
  logit, two logits, probabilities, multi-class, regression, several targets). Spearman ρ between sweep
  position and the reading, per seed; a faithful sweep gives ρ ≈ +1.
* **Independent reader** — the same reading through a small CNN the flow trains on the dataset's target with
  another architecture and seed (:mod:`models.reader`). The generator never saw it, so it cannot be fooled by
  features only the audited CNN reads.
* **Conditioning fidelity** — frames pushed back through the CNN and the fitted PLS: the recomputed score of
  component j must follow the requested one (Pearson r, pooled over seeds).
* **Ground truth** (phantoms, or any dataset with a ruler) — the ruler measures every generative factor on every
  frame. Per factor and component: the effect along the sweep (least-squares slope × span, in SD of the factor
  in real images) with a bootstrap 95 % interval over seeds, next to the effect that regressing the ruler's
  measures of the real images on the PLS scores predicts (with its own bootstrap interval over images). A
  nuisance fails when the generator's interval reaches more than 0.15 SD beyond the expected interval: the
  expected effect is itself estimated (its SE is ≈ 0.065 SD on 3 000 images), so it is compared as an interval.
* **Diversity that sees collapse** — at a fixed c, the spread across seeds of every nuisance the ruler measures
  (vs its spread in real images), and the mean pairwise pixel distance across seeds (vs across real images).
* **FID** on frames of single-component sweeps (what users see), against a real reference set the generator's
  patients are not drawn from, with the real-vs-real floor at the same n.

Everything lands in one `metrics.json` (schema ``figan.metrics/2``; :func:`check_schema` gives readers of another
schema a clear error), plus a text summary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from .features import model_output
from .fid import mean_pairwise_distance
from .pls import PLSState, images_to_scores
from .sequences import SweepResult

SCHEMA = "figan.metrics/2"


class SchemaError(ValueError):
    """metrics.json written under another schema than this reader understands."""


def check_schema(metrics: dict, where: str = "metrics.json") -> dict:
    """Return metrics unchanged when they follow SCHEMA; otherwise raise SchemaError naming both schemas."""
    got = metrics.get("schema") if isinstance(metrics, dict) else None
    if got != SCHEMA:
        raise SchemaError(f"{where} has schema {got!r} but this reader understands {SCHEMA!r}; "
                          f"re-run the explanation with this version of the platform (or read it with the "
                          f"platform version that wrote it)")
    return metrics


@dataclass
class Thresholds:
    faithfulness: float = 0.9          # Spearman ρ, components explaining >= min_variance_pct
    reader: float = 0.9                # Spearman ρ of the independent reader, same components
    conditioning: float = 0.9          # Pearson r along sweeps, pooled over seeds
    min_variance_pct: float = 10.0     # components below this are reported but not gated
    fid_ratio: float = 2.0             # sweep-frame FID <= ratio x real-vs-real floor
    diversity: float = 0.5             # seeds must differ at least half as much as real images do
    driving_rho: float = 0.9
    driving_effect_sd: float = 2.0
    nuisance_effect_sd: float = 0.15   # allowed distance of a nuisance's effect interval from the expected one
    shortcut_effect_sd: float = 1.0    # a planted shortcut "surfaces" along a component with this effect ...
    shortcut_rho: float = 0.5          # ... and this rank correlation


def _safe_corr(fn, a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return 0.0
    return float(fn(a, b)[0])


def _sweep_images(sweep: SweepResult) -> np.ndarray:
    S, Fr = sweep.frames.shape[:2]
    return sweep.frames[:, :, :sweep.image_channels].reshape(S * Fr, sweep.image_channels, *sweep.frames.shape[-2:])


# --------------------------------------------------------------------------------------------- reading outputs

def outputs_in_target_space(outputs: np.ndarray, task: str, state: PLSState) -> np.ndarray:
    """A CNN's raw outputs as values in the PLS target space (N, T).

    Classification (T = number of classes): one logit or one probability per image for two classes → [1 − p, p]
    (p = sigmoid(logit); a probability is kept as it is — either way monotone in the output); T logits →
    softmax; T probabilities (rows in [0, 1] summing to 1) → kept. Regression: T values, kept."""
    out = np.asarray(outputs, dtype=np.float64)
    out = out[:, None] if out.ndim == 1 else out.reshape(len(out), -1)
    T = len(np.atleast_1d(state.y_mean))
    if task == "classification":
        is_prob = bool(np.all((out >= 0) & (out <= 1)))
        if out.shape[1] == 1 and T == 2:
            p = out[:, 0] if is_prob else 1.0 / (1.0 + np.exp(-out[:, 0]))
            return np.column_stack([1 - p, p])
        if out.shape[1] == T:
            if is_prob and np.allclose(out.sum(1), 1.0, atol=1e-3):
                return out
            e = np.exp(out - out.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        raise ValueError(f"the CNN gives {out.shape[1]} output value(s) per image but the target has {T} classes; "
                         f"expected one logit/probability (two classes) or one value per class")
    if out.shape[1] != T:
        raise ValueError(f"the CNN gives {out.shape[1]} output value(s) per image but the target has {T} "
                         f"column(s); a regression CNN must output one value per target")
    return out


def target_response(outputs: np.ndarray, task: str, state: PLSState, component: int) -> np.ndarray:
    """The CNN's output read along component j's direction in (standardised) target space."""
    out = outputs_in_target_space(outputs, task, state)
    q = np.asarray(state.y_loadings, dtype=np.float64)[:, component]
    return ((out - np.asarray(state.y_mean)) / np.asarray(state.y_scale)) @ q


def _rho_along(values: np.ndarray, resp: np.ndarray) -> dict:
    rhos = [_safe_corr(spearmanr, values, resp[s]) for s in range(resp.shape[0])]
    return {"rho_per_seed": [round(r, 4) for r in rhos], "rho_mean": round(float(np.mean(rhos)), 4),
            "rho_min": round(float(np.min(rhos)), 4),
            "response_mean": [round(float(v), 4) for v in resp.mean(0)]}


def faithfulness(model: torch.nn.Module, sweep: SweepResult, task: str, state: PLSState,
                 transform: Callable | None = None, device="cpu") -> dict:
    """Spearman ρ between sweep position and the model's output read along the component (per seed)."""
    S, Fr = sweep.frames.shape[:2]
    out = model_output(model, _sweep_images(sweep), batch_size=256, device=device, transform=transform)
    return _rho_along(sweep.values, target_response(out, task, state, sweep.component).reshape(S, Fr))


def conditioning_sweep(model, sweep: SweepResult, state: PLSState, layer=None, transform=None, device="cpu") -> dict:
    S, Fr = sweep.frames.shape[:2]
    scores = images_to_scores(model, _sweep_images(sweep), state, layer=layer, transform=transform, device=device)
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


# --------------------------------------------------------------------------------------------- ground truth

def expected_effects(real_scores: np.ndarray, real_factors: pd.DataFrame, spread: dict[str, float],
                     n_boot: int = 300, seed: int = 0) -> tuple[list[dict[str, float]], list[dict[str, tuple]]]:
    """For each component j and factor f: d(f)/d(c_j) in factor-SD per score-SD from a linear regression of the
    ruler's (or manifest's) factor values of real images on all PLS scores — what a faithful sweep should show —
    and its bootstrap 95 % interval over images (``n_boot`` resamples)."""
    X = np.column_stack([np.ones(len(real_scores)), real_scores])
    Y = real_factors.to_numpy(np.float64)
    sd = np.array([float(spread.get(name, np.std(Y[:, i]))) or 1.0 for i, name in enumerate(real_factors.columns)])
    beta = np.linalg.lstsq(X, Y, rcond=None)[0][1:] / sd                       # (k, factors)
    rng = np.random.default_rng(seed)
    boots = np.stack([np.linalg.lstsq(X[r], Y[r], rcond=None)[0][1:] / sd
                      for r in (rng.integers(0, len(X), len(X)) for _ in range(max(n_boot, 1)))])
    lo, hi = np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)
    names = list(real_factors.columns)
    point = [{name: float(beta[j, i]) for i, name in enumerate(names)} for j in range(len(beta))]
    ci = [{name: (float(lo[j, i]), float(hi[j, i])) for i, name in enumerate(names)} for j in range(len(beta))]
    return point, ci


def conditional_spread(real_scores: np.ndarray, real_factors: pd.DataFrame) -> dict[str, float]:
    """Per factor, the SD real images show at a fixed c: the residual SD of its regression on the scores."""
    X = np.column_stack([np.ones(len(real_scores)), real_scores])
    Y = real_factors.to_numpy(np.float64)
    resid = Y - X @ np.linalg.lstsq(X, Y, rcond=None)[0]
    return dict(zip(real_factors.columns, resid.std(0).tolist()))


def _interval_distance(ci: tuple[float, float], ref: tuple[float, float]) -> float:
    """How far the interval ci reaches beyond the reference interval (0 when inside)."""
    return max(0.0, ref[0] - ci[0], ci[1] - ref[1])


def ground_truth(sweep: SweepResult, ruler: Callable[[np.ndarray], pd.DataFrame], spread: dict[str, float],
                 expected_per_sd: dict[str, float] | None = None,
                 expected_ci_per_sd: dict[str, tuple[float, float]] | None = None,
                 n_boot: int = 1000, seed: int = 0) -> dict:
    """Per factor: Spearman ρ along the sweep (mean over seeds), effect in SD of the real data (mean over seeds,
    from a least-squares line per seed) with a bootstrap 95 % interval over seeds, and the effect the real data
    predict for the same sweep (regression of the factor on the scores) with its interval."""
    S, Fr = sweep.frames.shape[:2]
    meas = ruler(_sweep_images(sweep))
    span = float(sweep.values[-1] - sweep.values[0])
    rng = np.random.default_rng(seed)
    boot_rows = rng.integers(0, S, (n_boot, S))
    res = {}
    for name in meas.columns:
        sd = float(spread.get(name, np.nan))
        if not (np.isfinite(sd) and sd > 0):
            continue          # a factor that does not vary in the real data (e.g. no shortcut marker planted)
        v = meas[name].to_numpy(np.float64).reshape(S, Fr)
        effects = np.polyfit(sweep.values, v.T, 1)[0] * span / sd             # (S,)
        boots = effects[boot_rows].mean(1)
        ci = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))
        row = {"rho": round(float(np.mean([_safe_corr(spearmanr, sweep.values, v[s]) for s in range(S)])), 4),
               "effect_sd": round(float(effects.mean()), 4), "ci95": [round(ci[0], 4), round(ci[1], 4)],
               "n_seeds": S}
        if expected_per_sd is not None and name in expected_per_sd:
            exp = float(expected_per_sd[name]) * span
            exp_ci = tuple(float(e) * span for e in (expected_ci_per_sd or {}).get(name, (expected_per_sd[name],) * 2))
            row["expected_effect_sd"] = round(exp, 4)
            row["expected_ci95"] = [round(exp_ci[0], 4), round(exp_ci[1], 4)]
            row["deviation_from_expected_sd"] = round(max(abs(ci[0] - exp), abs(ci[1] - exp)), 4)
            row["deviation_beyond_expected_ci_sd"] = round(_interval_distance(ci, exp_ci), 4)
        res[name] = row
    return res


# --------------------------------------------------------------------------------------------- diversity

def diversity(generate: Callable, z_dim: int, real_scores: np.ndarray, real_images: np.ndarray,
              image_channels: int, ruler: Callable | None = None, spread: dict[str, float] | None = None,
              factors: Sequence[str] = (), n_conditions: int = 8, n_seeds: int = 16, seed: int = 0,
              marginal_spread: dict[str, float] | None = None) -> dict:
    """Spread across seeds at a fixed c vs spread across real images.

    * ``pixel_ratio``: mean pairwise pixel (L2) distance across seeds at one c, averaged over conditions, over the
      same distance between random real images (n_seeds of them at a time);
    * ``factor_ratio`` (with a ruler): per factor, SD across seeds at one c (averaged over conditions) over
      ``spread``: the SD real images show at one c (the residual SD of the factor's regression on the scores —
      a factor the scores predict varies less at fixed c, in real data too); ``factor_ratio_marginal`` over its
      plain SD in real images (``marginal_spread``). A generator that ignores z gives 0 for all."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(real_scores), (n_conditions,), generator=g)
    c = torch.as_tensor(np.asarray(real_scores)[rows.numpy()], dtype=torch.float32).repeat_interleave(n_seeds, 0)
    z = torch.randn(n_conditions * n_seeds, z_dim, generator=g)
    with torch.no_grad():
        fake = generate(z, c)[:, :image_channels].float().numpy()
    fake = fake.reshape(n_conditions, n_seeds, *fake.shape[1:])
    rng = np.random.default_rng(seed)
    real = np.asarray(real_images, dtype=np.float32)
    real_d = np.mean([mean_pairwise_distance(real[rng.choice(len(real), n_seeds, replace=False)].reshape(n_seeds, -1))
                      for _ in range(n_conditions)])
    fake_d = np.mean([mean_pairwise_distance(f.reshape(n_seeds, -1)) for f in fake])
    out = {"pixel_ratio": round(float(fake_d / max(real_d, 1e-12)), 4), "n_conditions": n_conditions,
           "n_seeds": n_seeds}
    if ruler is not None and spread:
        meas = ruler(fake.reshape(-1, *fake.shape[2:]))
        ratios, marginal = {}, {}
        for f in factors:
            if f in meas.columns and spread.get(f, 0) > 0:
                sd_seeds = float(meas[f].to_numpy(np.float64).reshape(n_conditions, n_seeds).std(1, ddof=1).mean())
                ratios[f] = round(sd_seeds / spread[f], 4)
                if marginal_spread and marginal_spread.get(f, 0) > 0:
                    marginal[f] = round(sd_seeds / marginal_spread[f], 4)
        out["factor_ratio"] = ratios
        if marginal:
            out["factor_ratio_marginal"] = marginal
    return out


# --------------------------------------------------------------------------------------------- gates

def gated_components(metrics: dict, th: Thresholds) -> list[dict]:
    comps = metrics["components"]
    return [c for c in comps if c["pct_target_variance"] >= th.min_variance_pct] or comps[:1]


def evaluate_gates(metrics: dict, th: Thresholds, driving: Sequence[str] = (), nuisance: Sequence[str] = (),
                   shortcut: Sequence[str] = ()) -> dict:
    """Pass/fail of every gate, with the numbers that decided it."""
    gated = gated_components(metrics, th)
    ids = [c["component"] for c in gated]
    gates = {}

    def per_component(name: str, value: Callable[[dict], float], threshold: float) -> None:
        vals = [value(c) for c in gated]
        gates[name] = {"threshold": threshold, "components": ids, "values": vals,
                       "pass": all(v >= threshold for v in vals)}

    per_component("faithfulness", lambda c: c["faithfulness"]["rho_mean"], th.faithfulness)
    if all("reader" in c for c in gated):
        per_component("reader", lambda c: c["reader"]["rho_mean"], th.reader)
    per_component("conditioning", lambda c: c["conditioning"]["r_pooled"], th.conditioning)
    fid = metrics.get("fid") or {}
    if fid.get("best") is not None and fid.get("floor"):
        gates["fid"] = {"threshold_ratio": th.fid_ratio, "value_ratio": round(fid["best"] / fid["floor"], 3),
                        "extractor": fid.get("extractor"), "n": fid.get("n_samples"),
                        "pass": fid["best"] <= th.fid_ratio * fid["floor"]}
    div = metrics.get("diversity")
    if div is not None:
        values = {"pixels": div["pixel_ratio"], **(div.get("factor_ratio") or {})}
        worst = min(values, key=values.get)
        gates["diversity"] = {"threshold": th.diversity, "values": values, "worst": worst,
                              "pass": values[worst] >= th.diversity}
    top = gated[0]
    gt = top.get("ground_truth")
    if gt and driving:
        best = max(driving, key=lambda f: abs(gt.get(f, {}).get("effect_sd", 0) or 0))
        d = gt[best]
        gates["driving_factor"] = {
            "component": top["component"], "factor": best, "rho": d["rho"], "effect_sd": d["effect_sd"],
            "thresholds": {"rho": th.driving_rho, "effect_sd": th.driving_effect_sd},
            "pass": abs(d["rho"]) >= th.driving_rho and abs(d["effect_sd"]) >= th.driving_effect_sd}
    if nuisance and all(c.get("ground_truth") for c in gated):
        devs = {(c["component"], f): c["ground_truth"][f]["deviation_beyond_expected_ci_sd"]
                for c in gated for f in nuisance if "deviation_beyond_expected_ci_sd" in c["ground_truth"].get(f, {})}
        if devs:
            (wc, wf) = max(devs, key=devs.get)
            gates["nuisance"] = {"threshold_sd": th.nuisance_effect_sd, "components": ids, "worst_component": wc,
                                 "worst_factor": wf, "worst_deviation_sd": devs[(wc, wf)],
                                 "pass": all(v <= th.nuisance_effect_sd for v in devs.values())}
    if shortcut and any(c.get("ground_truth") for c in metrics["components"]):
        found = [(c["component"], f, c["ground_truth"][f]) for c in metrics["components"]
                 for f in shortcut if f in (c.get("ground_truth") or {})]
        if found:
            comp, f, row = max(found, key=lambda t: abs(t[2]["effect_sd"]))
            gates["shortcut_surfaces"] = {
                "component": comp, "factor": f, "effect_sd": row["effect_sd"], "rho": row["rho"],
                "thresholds": {"effect_sd": th.shortcut_effect_sd, "rho": th.shortcut_rho},
                "pass": abs(row["effect_sd"]) >= th.shortcut_effect_sd and abs(row["rho"]) >= th.shortcut_rho}
    gates["all_pass"] = all(g["pass"] for g in gates.values() if isinstance(g, dict))
    return gates


def verdict(gates: dict) -> dict:
    """{"verdict": "pass" | "fail", "failing": [gate names]} from evaluate_gates' output."""
    failing = [name for name, g in gates.items() if isinstance(g, dict) and not g["pass"]]
    return {"verdict": "fail" if failing else "pass", "failing": failing}


def summary_text(metrics: dict) -> str:
    """A short human-readable summary of metrics.json."""
    lines = [f"FIGAN explanation of {metrics.get('cnn', {}).get('name', 'CNN')} on {metrics.get('dataset', {}).get('name', '?')}"]
    v = metrics.get("verdict")
    if v:
        lines.append(f"VERDICT: {v['verdict'].upper()}" + (f" (failing: {', '.join(v['failing'])})" if v["failing"] else ""))
    sweep = metrics.get("sweep") or {}
    if sweep.get("range"):
        lines.append(f"Sweeps span {sweep['range']}")
    fid = metrics.get("fid") or {}
    if fid.get("best") is not None:
        lines.append(f"FID {fid['best']:.2f} (floor {fid.get('floor') or float('nan'):.2f}, n={fid.get('n_samples')}; "
                     f"extractor: {fid.get('extractor')}; {fid.get('protocol', '')})")
    div = metrics.get("diversity")
    if div:
        extra = ", ".join(f"{k} {v:.2f}" for k, v in (div.get("factor_ratio") or {}).items())
        lines.append(f"Diversity across seeds at fixed c: pixels {div['pixel_ratio']:.2f} x real" + (f"; {extra}" if extra else ""))
    lines.append(f"{'comp':>4} {'%var':>6} {'faithful ρ':>11} {'reader ρ':>9} {'cond r':>7}  top factors (effect, SD)")
    for c in metrics["components"]:
        gt = c.get("ground_truth") or {}
        top = sorted(gt.items(), key=lambda kv: -abs(kv[1].get("effect_sd", 0) or 0))[:3]
        tops = ", ".join(f"{k} {v['effect_sd']:+.2f}" for k, v in top)
        reader = c.get("reader", {}).get("rho_mean")
        lines.append(f"{c['component']:>4} {c['pct_target_variance']:>6.1f} {c['faithfulness']['rho_mean']:>11.3f} "
                     f"{reader if reader is not None else float('nan'):>9.3f} {c['conditioning']['r_pooled']:>7.3f}  {tops}")
    gates = metrics.get("gates") or {}
    for name, g in gates.items():
        if isinstance(g, dict):
            lines.append(f"gate {name}: {'PASS' if g['pass'] else 'FAIL'}")
    if "all_pass" in gates:
        lines.append(f"all gates: {'PASS' if gates['all_pass'] else 'FAIL'}")
    return "\n".join(lines) + "\n"
