"""Real cases: patient-centred sweeps of real images, published beside the synthetic sweeps.

An auditor should see what a component does to *real* patients, not only to the generator's seeds. For each
component a handful of images from the FID reference set (images the patient generator never edits as seeds) are
picked across that component's score range; each is placed on the generator's template exactly as an upload to
the service would be, and swept over the published range with every other component at its own score. The frame
nearest the image's own score is outlined: there the image is itself, so every other frame is a counterfactual of
that patient. A case that registers worse than 99 % of the real images is labelled as such.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .layout import component_name
from .sequences import _fmt_values, _new_figure, _rgb, _save

N_CASES = 4


def pick_cases(scores: np.ndarray, candidates: np.ndarray, n: int = N_CASES) -> np.ndarray:
    """Indices (into ``scores``) of ``n`` distinct candidates whose scores sit nearest the (i + ½)/n quantiles of
    the candidates' scores: low to high, spread over the range rather than clustered at the mean."""
    candidates = np.asarray(candidates)
    if len(candidates) == 0:
        return candidates
    order = candidates[np.argsort(scores[candidates], kind="stable")]
    at = np.unique(np.round((np.arange(n) + 0.5) / n * len(order) - 0.5).astype(int).clip(0, len(order) - 1))
    return order[at]


def sweep_cases(G, images: torch.Tensor, scores: np.ndarray, cases: np.ndarray, component: int,
                values: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Frames (n, F, C, H, W) in [0, 1] of each case swept along ``component`` over ``values``, and per case its
    score, the frame nearest that score and its placement."""
    frames, info = [], []
    for i in cases:
        f, placement = G.sweep_image(images[i:i + 1], torch.as_tensor(scores[i]),
                                     torch.as_tensor(values[None], dtype=torch.float32), [component])
        frames.append(f[0].numpy())
        s = float(scores[i, component])
        info.append({"index": int(i), "score": round(s, 4), "own_score_frame": int(np.argmin(np.abs(values - s))),
                     **placement})
    return np.stack(frames), info


def save_cases_strip(frames: np.ndarray, values: np.ndarray, info: list[dict], component: int, path: Path,
                     image_channels: int, caption: str) -> Path:
    """PNG grid: rows = real cases (low → high score), columns = sweep values; the own-score frame outlined."""
    n, F = frames.shape[:2]
    labels = _fmt_values(values)
    fig = _new_figure(0.9 + 1.25 * F, 1.0 + 1.25 * n * frames.shape[3] / frames.shape[4])
    axes = fig.subplots(n, F, squeeze=False)
    for r in range(n):
        for c in range(F):
            ax = axes[r, c]
            ax.imshow(_rgb(frames[r, c], image_channels), vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            own = c == info[r]["own_score_frame"]
            for side in ax.spines.values():
                side.set_visible(own)
                side.set_color("#d62728")
                side.set_linewidth(2.5)
            if r == 0:
                ax.set_title(f"c_{component + 1} = {labels[c]} SD", fontsize=7)
            if c == 0:
                flag = "" if info[r]["trusted"] else "\n(poorly registered)"
                ax.set_ylabel(f"image {info[r]['index']}\nown {info[r]['score']:+.2f} SD{flag}", fontsize=7)
    fig.suptitle(caption + "\nrows: real images (not generator seeds), low → high own score; "
                 "red outline: the frame at the image's own score (the image itself)", fontsize=8)
    return _save(fig, path)


def write_real_cases(G, images: torch.Tensor, scores: np.ndarray, candidates: np.ndarray, lo: np.ndarray,
                     hi: np.ndarray, frames: int, out_dir: Path, image_channels: int,
                     paths: list[str] | None = None, n: int = N_CASES) -> list[dict]:
    """For every component, into the sequences folder ``out_dir``: its ``real_cases`` PNG and ``real_cases_json``
    (cases, their scores, own frame and placement; names: :func:`models.layout.component_name`). ``images``:
    (N, C, H, W) in [0, 1] at the generator's resolution; ``scores``: (N, k); ``candidates``: indices
    that may be shown (held out from the generator's seeds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    published = []
    for j in range(scores.shape[1]):
        values = np.linspace(float(lo[j]), float(hi[j]), frames)
        cases = pick_cases(scores[:, j], candidates, n)
        f, info = sweep_cases(G, images, scores, cases, j, values)
        if paths is not None:
            for row in info:
                row["path"] = paths[row["index"]]
        save_cases_strip(f[:, :, :image_channels], values, info, j, out_dir / component_name(j + 1, "real_cases"),
                         image_channels, f"Component {j + 1}: real cases, each swept around itself")
        doc = {"component": j + 1, "values": [round(float(v), 4) for v in values], "cases": info}
        (out_dir / component_name(j + 1, "real_cases_json")).write_text(json.dumps(doc, indent=1))
        published.append(doc)
    return published
