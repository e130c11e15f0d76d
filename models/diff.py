"""Explanation diff between two releases of a CNN (version n−1 and n), computed on the same images.

**What is compared, and why through scores.** Each release's explanation is a set of PLS components of *its own*
CNN's features. Two CNN versions have different feature spaces: a different architecture gives a different
number of features, and even the same architecture retrained from another seed learns its units in an arbitrary
order and rotation. PLS weight/loading vectors of the two versions therefore live in unrelated coordinate
systems, and principal angles between them (``scipy.linalg.subspace_angles`` on the loadings) would compare
numbers that do not correspond. They are only meaningful for two explanations of the *same* CNN (e.g. a data-only
release), which this module does not assume.

What both versions share is the images. Run both CNNs (each with its own fitted PLS) over one image set and every
component becomes a score vector in the same space R^N, one coordinate per image. On these:

* **Correlation matrix** ``corr[j, i]`` = Pearson r between the current component j+1 and the previous component
  i+1 over the shared images: "does this axis order the images the same way?". The sign is arbitrary in PLS (a
  component may come back flipped), so matching uses |r| and reports the sign.
* **Matching** — the one-to-one assignment maximising the summed |r| (Hungarian algorithm,
  ``scipy.optimize.linear_sum_assignment``). A pair counts as *matched* when |r| ≥ ``min_abs_corr``; the angle
  between the sign-aligned, centred score vectors is ``arccos |r|``.
* **Principal angles between the score subspaces** (``subspace_angles`` of the centred score matrices): the
  cosines are the canonical correlations between the two sets of components, so angles near 0° mean the two
  versions span the same directions of variation across images even when the individual components mix
  (e.g. c1 and c2 rotated into each other). With few images, chance canonical correlations are inflated
  (roughly sqrt(k/N)); use a few hundred images.
* **% explained target variance** of each matched pair (current − previous, in percentage points).
* **Flag** ``new_top_component_unmatched``: the current version's top component correlates with none of the
  previous version's ``top_n`` components at |r| ≥ ``min_abs_corr`` — the CNN now leans on something new first.

:func:`plot_matched` draws the matched pairs side by side (previous strip and eigen image, current eigen image
and strip) from the two explanations' ``sequences/component_<j>.npz`` files, the previous version's sweep
reversed and its eigen image negated when the pair's correlation is negative, so both rows read "as the
component increases".

numpy/scipy/matplotlib only; the caller computes the scores (``models.pls.images_to_scores``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import subspace_angles
from scipy.optimize import linear_sum_assignment

from .layout import component_name
SCHEMA = "figan.diff/1"

__all__ = ["SCHEMA", "DiffConfig", "score_correlations", "principal_angles", "match_components",
           "explanation_diff", "plot_matched"]


@dataclass
class DiffConfig:
    min_abs_corr: float = 0.5     # |r| at or above which two components count as the same axis
    top_n: int = 2                # the previous version's "top components" the new top one must match one of


# --------------------------------------------------------------------------------------------- numbers

def _as_scores(a, what: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{what} must be scores (N, k), got shape {np.shape(a)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    return x


def _check_pair(prev, cur) -> tuple[np.ndarray, np.ndarray]:
    p, c = _as_scores(prev, "previous scores"), _as_scores(cur, "current scores")
    if len(p) != len(c):
        raise ValueError(f"previous and current scores must be on the same images: {len(p)} vs {len(c)} rows")
    if len(p) < 3:
        raise ValueError(f"need scores of at least 3 shared images, got {len(p)}")
    return p, c


def score_correlations(prev_scores, cur_scores) -> np.ndarray:
    """Pearson r (k_cur, k_prev) between every current and every previous component over the shared images.

    A component with zero variance correlates 0 with everything."""
    p, c = _check_pair(prev_scores, cur_scores)
    p, c = p - p.mean(0), c - c.mean(0)
    sp, sc = np.linalg.norm(p, axis=0), np.linalg.norm(c, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (c.T @ p) / np.outer(sc, sp)
    return np.clip(np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)


def principal_angles(prev_scores, cur_scores) -> np.ndarray:
    """Principal angles (degrees, ascending) between the spans of the centred score vectors of both versions.

    cos(angle) are the canonical correlations between the two component sets."""
    p, c = _check_pair(prev_scores, cur_scores)
    return np.sort(np.degrees(subspace_angles(p - p.mean(0), c - c.mean(0))))


def match_components(corr, min_abs_corr: float = 0.5) -> list[dict]:
    """One-to-one matching of current to previous components maximising the summed |r| (Hungarian).

    Returns one dict per assigned pair (1-based component numbers), sorted by the current component: r, sign,
    angle_deg = arccos|r|, matched = |r| ≥ min_abs_corr."""
    r = np.asarray(corr, dtype=np.float64)
    rows, cols = linear_sum_assignment(np.abs(r), maximize=True)
    pairs = []
    for j, i in sorted(zip(rows.tolist(), cols.tolist())):
        v = float(r[j, i])
        pairs.append({"current": j + 1, "previous": i + 1, "r": round(v, 4), "sign": 1 if v >= 0 else -1,
                      "angle_deg": round(math.degrees(math.acos(min(1.0, abs(v)))), 2),
                      "matched": abs(v) >= min_abs_corr})
    return pairs


def explanation_diff(prev_scores, cur_scores, prev_pct=None, cur_pct=None, cfg: DiffConfig = DiffConfig(),
                     previous: str = "previous", current: str = "current") -> dict:
    """The diff of two explanations from their scores (N, k_prev) and (N, k_cur) on the same N images.

    ``prev_pct``/``cur_pct``: % of target variance per component (0..100) of each version, to report the change
    per matched pair. ``previous``/``current`` label the versions (e.g. ``"v1"``). Returns a JSON-ready dict
    (schema ``figan.diff/1``); see the module docstring for what each number means."""
    p, c = _check_pair(prev_scores, cur_scores)
    kp, kc = p.shape[1], c.shape[1]
    pp = None if prev_pct is None else [float(v) for v in prev_pct]
    cp = None if cur_pct is None else [float(v) for v in cur_pct]
    for pct, k, what in ((pp, kp, "prev_pct"), (cp, kc, "cur_pct")):
        if pct is not None and len(pct) != k:
            raise ValueError(f"{what} has {len(pct)} entries but the scores have {k} components")
    if not 0.0 <= cfg.min_abs_corr <= 1.0 or cfg.top_n < 1:
        raise ValueError(f"need 0 <= min_abs_corr <= 1 and top_n >= 1, got {cfg}")
    corr = score_correlations(p, c)
    angles = principal_angles(p, c)
    pairs = match_components(corr, cfg.min_abs_corr)
    for pair in pairs:
        if pp is not None and cp is not None:
            pair["pct_current"] = round(cp[pair["current"] - 1], 3)
            pair["pct_previous"] = round(pp[pair["previous"] - 1], 3)
            pair["delta_pct"] = round(pair["pct_current"] - pair["pct_previous"], 3)
    matched = [q for q in pairs if q["matched"]]
    top_n = min(cfg.top_n, kp)
    top_r = corr[0, :top_n]
    best = int(np.argmax(np.abs(top_r)))
    top = {"current_component": 1, "best_previous": best + 1, "r": round(float(top_r[best]), 4),
           "abs_r": round(float(abs(top_r[best])), 4), "top_n": top_n, "threshold": cfg.min_abs_corr,
           "matches_previous_top": bool(abs(top_r[best]) >= cfg.min_abs_corr)}
    return {
        "schema": SCHEMA,
        "method": "component scores of both versions on the same images (correlation, Hungarian matching, "
                  "principal angles between score subspaces)",
        "config": asdict(cfg),
        "n_images": int(len(p)),
        "previous": {"label": previous, "n_components": kp, "pct_target_variance": pp},
        "current": {"label": current, "n_components": kc, "pct_target_variance": cp},
        "correlation": np.round(corr, 4).tolist(),
        "principal_angles_deg": np.round(angles, 2).tolist(),
        "canonical_correlations": np.round(np.cos(np.radians(angles)), 4).tolist(),
        "pairs": pairs,
        "n_matched": len(matched),
        "unmatched_current": [j for j in range(1, kc + 1) if j not in {q["current"] for q in matched}],
        "unmatched_previous": [i for i in range(1, kp + 1) if i not in {q["previous"] for q in matched}],
        "top": top,
        "flags": {"new_top_component_unmatched": not top["matches_previous_top"]},
    }


# --------------------------------------------------------------------------------------------- picture

def _load_component(seq_dir: Path, component: int) -> dict | None:
    f = Path(seq_dir) / component_name(component, "npz")
    if not f.is_file():
        return None
    with np.load(f, allow_pickle=False) as z:
        ic = int(z["image_channels"])
        return {"frames": z["frames_seed0"][:, :ic].astype(np.float32) / 255.0, "eigen": z["eigen"],
                "values": z["values"], "pct": float(z["pct_variance"])}


def _strip(frames: np.ndarray, n: int = 5) -> np.ndarray:
    """(F, C, H, W) -> (H, n*W[, 3]) of n evenly spaced frames, grey or RGB, with 1-px white gaps."""
    idx = np.unique(np.round(np.linspace(0, len(frames) - 1, min(n, len(frames)))).astype(int))
    tiles = []
    for i in idx:
        im = frames[i]
        im = im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)
        tiles.append(im)
        tiles.append(np.ones_like(im[:, :1]))
    return np.concatenate(tiles[:-1], axis=1)


def plot_matched(diff: dict, prev_sequences: str | Path, cur_sequences: str | Path, path: str | Path,
                 frames: int = 5) -> Path | None:
    """PNG: one row per matched pair — previous strip | previous eigen | current eigen | current strip.

    Reads ``component_<j>.npz`` (written by ``models.sequences.write_component``) from both sequences folders;
    a negatively correlated previous component is shown reversed (strip) and negated (eigen image). Returns the
    path, or None when no matched pair has both npz files."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    for pair in diff["pairs"]:
        if not pair["matched"]:
            continue
        a, b = _load_component(Path(prev_sequences), pair["previous"]), _load_component(Path(cur_sequences),
                                                                                        pair["current"])
        if a is None or b is None:
            continue
        if pair["sign"] < 0:
            a["frames"], a["eigen"] = a["frames"][::-1], -a["eigen"]
        rows.append((pair, a, b))
    if not rows:
        return None
    prev_label, cur_label = diff["previous"]["label"], diff["current"]["label"]
    fig = Figure(figsize=(13.0, 0.7 + 1.6 * len(rows)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 4, squeeze=False, width_ratios=[frames, 1.25, 1.25, frames])
    for r, (pair, a, b) in enumerate(rows):
        flip = " (sign flipped)" if pair["sign"] < 0 else ""
        panels = [
            (_strip(a["frames"], frames), f"{prev_label} c{pair['previous']}{flip}: {a['pct']:.1f} %", None),
            (a["eigen"].mean(0), f"{prev_label} c{pair['previous']} eigen", "eigen"),
            (b["eigen"].mean(0), f"{cur_label} c{pair['current']} eigen", "eigen"),
            (_strip(b["frames"], frames), f"{cur_label} c{pair['current']}: {b['pct']:.1f} %", None),
        ]
        for ax, (img, title, kind) in zip(axes[r], panels):
            if kind == "eigen":
                lim = float(np.abs(img).max()) or 1.0
                ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"r = {pair['r']:+.2f}\n{pair['angle_deg']:.0f}°", fontsize=8)
    fig.suptitle(f"Matched components {prev_label} → {cur_label} on {diff['n_images']} shared images "
                 f"(strips: low → high score; eigen: red = brighter as the component increases)", fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
