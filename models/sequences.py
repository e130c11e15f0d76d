"""FIGAN image sequences: sweep one PLS component through the conditional generator and summarise the change.

A FIGAN explanation of PLS component j is the *sequence* of images the conditional generator produces when the
j-th standardised score goes from low to high while everything else is held fixed. This module renders such
sweeps and turns them into artefacts a reader (or a web page) can use.

Design choices (and why):

* **Same noise for every frame of a seed.** For each seed, z is drawn once from
  ``torch.Generator().manual_seed(seed)`` (standard normal, CPU, so the same seed gives the same z on any
  device) and reused for all frames. Frames of one seed therefore differ *only* through c, which is what makes
  a sweep an explanation of the component rather than of the noise. Several seeds show which part of the
  change is consistent across instances (the reader sees rows that move alike) and feed ``eigen_image``.
* **The other components sit at ``base``** (default zeros: the mean of standardised scores). Sweep values are in
  standard deviations of the component's scores, hence the "c_1 = -2.0 SD" labels.
* **Generators are plain callables** ``generate(z, c) -> (N, C_out, H, W)`` in [0, 1]; the first
  ``image_channels`` channels are the image, the rest auxiliary segmentation probabilities. An ``nn.Module`` is
  put in eval mode for the sweep (batch-norm in training mode would make a frame depend on what else is in its
  batch) and restored afterwards. Rendering runs under ``torch.no_grad`` in batches of ``batch_size``.
* **Two summaries of the change.** ``eigen_image`` is the leading principal component of the pixel variation
  along the sweep after removing each seed's mean frame: one signed map of *where* the component acts, with the
  share of sweep variance it captures (a sweep that is well described by one direction gives ≈ 1).
  ``deviation_images`` are the frame-minus-base-frame differences averaged over seeds: *how* the image changes
  at each value. Both are shown with a diverging colormap (RdBu_r) on symmetric limits, so 0 is white, red is
  brighter and blue darker than the reference.
* **Writers use matplotlib's object API** (``Figure`` + Agg canvas), never pyplot: no global state, no display
  needed, safe in worker threads. GIFs are written with PIL (nearest-neighbour upscaling keeps pixels honest;
  "boomerang" plays the sweep forth and back: F + F-2 frames). Note that GIF encoders merge identical
  consecutive frames, so a component the generator ignores yields a one-frame (still) GIF.
* Human-facing text numbers components from 1 ("Component 1", "c_1"); the ``component`` argument is 0-based.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .layout import component_name

Generate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MAX_FRAMES = 256
MAX_PANEL_COLUMNS = 15
MASK_COLOURS = np.array([[1.0, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.45, 1.0], [1.0, 0.8, 0.0],
                         [0.9, 0.2, 0.9], [0.0, 0.9, 0.9]], dtype=np.float32)


# --------------------------------------------------------------------------------------------- validation

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _values_array(values, name: str = "values", min_len: int = 2) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {v.shape}")
    if len(v) < min_len:
        raise ValueError(f"{name} must have at least {min_len} frames, got {len(v)}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    return v


def _frames_array(frames, name: str = "frames") -> np.ndarray:
    f = np.asarray(frames, dtype=np.float32)
    if f.ndim != 5:
        raise ValueError(f"{name} must have shape (S, F, C, H, W), got {f.shape}")
    if f.shape[0] < 1 or f.shape[1] < 2:
        raise ValueError(f"{name} needs >= 1 seed and >= 2 frames, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")
    return f


def _check_image_channels(image_channels, n_channels: int) -> int:
    if not _is_int(image_channels) or not 1 <= int(image_channels) <= n_channels:
        raise ValueError(f"image_channels must be an int in 1..{n_channels} (the channels of the frames), "
                         f"got {image_channels!r}")
    return int(image_channels)


# --------------------------------------------------------------------------------------------- sweeps

def sweep_values(lo: float = -2.0, hi: float = 2.0, frames: int = 9) -> np.ndarray:
    """``frames`` evenly spaced values from lo to hi (both included), in SD units of the component's scores."""
    if not (isinstance(lo, (int, float, np.number)) and math.isfinite(lo)):
        raise ValueError(f"lo must be a finite number, got {lo!r}")
    if not (isinstance(hi, (int, float, np.number)) and math.isfinite(hi)):
        raise ValueError(f"hi must be a finite number, got {hi!r}")
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo}, hi={hi}")
    if not _is_int(frames) or not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be an int in 2..{MAX_FRAMES}, got {frames!r}")
    return np.linspace(float(lo), float(hi), int(frames))


@dataclass
class SweepResult:
    """One component's sweep: ``frames[s, f]`` is the generator output for ``seeds[s]`` at ``values[f]``."""

    component: int                 # 0-based index into c
    values: np.ndarray             # (F,) sweep values (SD units)
    seeds: tuple[int, ...]         # (S,)
    frames: np.ndarray             # (S, F, C_out, H, W) float32 in [0, 1]
    image_channels: int            # the first image_channels of C_out are the image, the rest masks
    base: np.ndarray | None = field(default=None)  # (k,) values of the other components

    @property
    def images(self) -> np.ndarray:
        """(S, F, image_channels, H, W)"""
        return self.frames[:, :, :self.image_channels]

    @property
    def masks(self) -> np.ndarray | None:
        """(S, F, C_out - image_channels, H, W) or None when the generator emits no mask channels."""
        return self.frames[:, :, self.image_channels:] if self.frames.shape[2] > self.image_channels else None


def render_sweep(generate: Generate, z_dim: int, k: int, component: int, values, seeds: Sequence[int] = (0, 1, 2),
                 base=None, batch_size: int = 64, device: str | torch.device = "cpu",
                 image_channels: int | None = None) -> SweepResult:
    """Render component ``component`` of c over ``values`` for each seed (same z for all frames of a seed).

    ``base``: length-k values of c for the other components (default zeros; NaN asks a generator that starts
    from a real image, such as the patient generator, to keep that image's own score). ``image_channels``: how many of the
    generator's output channels are the image; None accepts only 1- or 3-channel output (no masks).
    """
    if not callable(generate):
        raise ValueError(f"generate must be a callable generate(z, c) -> images, got {type(generate).__name__}")
    if not _is_int(z_dim) or z_dim < 1:
        raise ValueError(f"z_dim must be an int >= 1, got {z_dim!r}")
    if not _is_int(k) or k < 1:
        raise ValueError(f"k (number of components) must be an int >= 1, got {k!r}")
    if not _is_int(component) or not 0 <= component < k:
        raise ValueError(f"component must be an int in 0..{k - 1} (0-based, k={k}), got {component!r}")
    v = _values_array(values, "values")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, np.ndarray)):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    seeds_t = tuple(seeds)
    if len(seeds_t) == 0 or not all(_is_int(s) for s in seeds_t):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    seeds_t = tuple(int(s) for s in seeds_t)
    if base is None:
        b = np.zeros(k, dtype=np.float64)
    else:
        b = np.asarray(base, dtype=np.float64).reshape(-1) if np.ndim(base) <= 1 else None
        if b is None or b.shape != (k,):
            raise ValueError(f"base must have length k={k}, got shape {np.shape(base)}")
        if np.isinf(b).any():
            raise ValueError(f"base must be finite (NaN = the seed's own value), got {b.tolist()}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

    S, Fn = len(seeds_t), len(v)
    z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds_t])  # (S, z)
    z_all = z[:, None, :].expand(S, Fn, z_dim).reshape(S * Fn, z_dim)
    c = np.repeat(b[None], Fn, axis=0)
    c[:, component] = v
    c_all = torch.from_numpy(c.astype(np.float32))[None].expand(S, Fn, k).reshape(S * Fn, k)

    module = generate if isinstance(generate, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    out: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for i in range(0, S * Fn, batch_size):
                zb = z_all[i:i + batch_size].contiguous().to(device)
                cb = c_all[i:i + batch_size].contiguous().to(device)
                y = generate(zb, cb)
                if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[0] != zb.shape[0]:
                    shape = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
                    raise ValueError(f"generate must return a tensor (N, C, H, W) with N={zb.shape[0]}, got {shape}")
                out.append(y.detach().float().cpu().numpy())
    finally:
        if module is not None:
            module.train(was_training)
    frames = np.concatenate(out, 0)
    frames = frames.reshape(S, Fn, *frames.shape[1:]).astype(np.float32, copy=False)
    if not np.isfinite(frames).all():
        raise ValueError("generate returned NaN or inf")
    c_out = frames.shape[2]
    if image_channels is None:
        if c_out not in (1, 3):
            raise ValueError(f"image_channels must be given when the generator emits {c_out} channels "
                             f"(image + mask channels)")
        ic = c_out
    else:
        ic = _check_image_channels(image_channels, c_out)
    return SweepResult(component=int(component), values=v, seeds=seeds_t, frames=frames, image_channels=ic,
                       base=b)


# --------------------------------------------------------------------------------------------- summaries

def eigen_image(frames, image_channels: int, values=None) -> tuple[np.ndarray, float]:
    """Leading principal component of the pixel variation along the sweep, across seeds.

    ``frames`` (S, F, C, H, W); only the first ``image_channels`` channels are used. Each seed's mean frame is
    subtracted, the S*F centred frames are stacked into (S*F, P) and the first right singular vector is
    returned as a unit-norm image (image_channels, H, W). Its sign is chosen so that the projection of the
    frames onto it increases with the sweep value (frame order, or ``values`` when given): red / positive
    pixels get brighter as the component increases. ``explained_ratio`` = s1² / Σ s²: the share of the sweep's
    pixel variance this one direction captures. A sweep that changes nothing gives zeros and 0.0.
    """
    f = _frames_array(frames)
    ic = _check_image_channels(image_channels, f.shape[2])
    S, Fn = f.shape[:2]
    x = f[:, :, :ic].astype(np.float64)
    shape = x.shape[2:]
    x = x - x.mean(axis=1, keepdims=True)
    m = x.reshape(S * Fn, -1)
    if values is None:
        t = np.arange(Fn, dtype=np.float64)
    else:
        t = _values_array(values, "values")
        if len(t) != Fn:
            raise ValueError(f"values has {len(t)} entries but frames has {Fn} frames")
    t = t - t.mean()
    total = float((m * m).sum())
    if total <= 0.0:
        return np.zeros(shape, np.float32), 0.0
    # SVD via the small (S*F)² Gram matrix: cheap for large images.
    gram = m @ m.T
    w, u = np.linalg.eigh(gram)
    lam, u1 = max(float(w[-1]), 0.0), u[:, -1]
    if lam <= 0.0:
        return np.zeros(shape, np.float32), 0.0
    v1 = (m.T @ u1) / math.sqrt(lam)
    v1 /= np.linalg.norm(v1)
    proj = (m @ v1).reshape(S, Fn)
    if float((proj * t[None]).sum()) < 0:
        v1 = -v1
    return v1.reshape(shape).astype(np.float32), float(min(lam / total, 1.0))


def deviation_images(frames, values, base_value: float = 0.0) -> np.ndarray:
    """Each frame minus the frame at the value closest to ``base_value``, averaged over seeds: (F, C, H, W)."""
    f = _frames_array(frames)
    v = _values_array(values, "values")
    if len(v) != f.shape[1]:
        raise ValueError(f"values has {len(v)} entries but frames has {f.shape[1]} frames")
    if not (isinstance(base_value, (int, float, np.number)) and math.isfinite(base_value)):
        raise ValueError(f"base_value must be a finite number, got {base_value!r}")
    b = int(np.argmin(np.abs(v - base_value)))
    return (f - f[:, b:b + 1]).mean(axis=0).astype(np.float32)


# --------------------------------------------------------------------------------------------- writers

def component_caption(component: int, pct_variance: float) -> str:
    """'Component 1 — 41.3 % of target variance' (component is 0-based)."""
    return f"Component {component + 1} — {pct_variance:.1f} % of target variance"


def _fmt_values(values: np.ndarray) -> list[str]:
    """Shortest fixed-point formatting (1..3 decimals) that keeps the labels distinct."""
    for d in (1, 2, 3):
        labels = [f"{x:.{d}f}" for x in values]
        if len(set(labels)) == len(labels):
            break
    return [lab[1:] if lab.startswith("-") and float(lab) == 0 else lab for lab in labels]  # no "-0.0"


def _columns(n: int, max_columns: int = MAX_PANEL_COLUMNS) -> np.ndarray:
    """Indices of at most max_columns evenly spaced frames, first and last included."""
    if n <= max_columns:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_columns)).astype(int))


def _to_u8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _rgb(img: np.ndarray, image_channels: int) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) float: image channels as grey/RGB, mask channels as coloured overlays."""
    im = np.clip(img[:image_channels], 0, 1)
    rgb = np.repeat(im, 3, axis=0) if image_channels == 1 else im
    rgb = rgb.transpose(1, 2, 0).copy()
    for i, m in enumerate(img[image_channels:]):
        a = 0.35 * np.clip(m, 0, 1)[..., None]
        rgb = rgb * (1 - a) + MASK_COLOURS[i % len(MASK_COLOURS)] * a
    return rgb


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p


def save_gif(frames, path: str | Path, fps: float = 6, scale: int = 1, boomerang: bool = True) -> Path:
    """Animated GIF of (F, C, H, W) frames in [0, 1] (C = 1 or 3), looping forever.

    ``scale``: integer nearest-neighbour upscaling. ``boomerang``: play forth and back (F + F - 2 frames).
    """
    f = np.asarray(frames, dtype=np.float32)
    if f.ndim != 4 or f.shape[1] not in (1, 3):
        raise ValueError(f"frames must have shape (F, C, H, W) with C = 1 or 3, got {f.shape}")
    if f.shape[0] < 1:
        raise ValueError("frames must contain at least one frame")
    if not np.isfinite(f).all():
        raise ValueError("frames contains NaN or inf")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps <= 100:
        raise ValueError(f"fps must be a number in (0, 100], got {fps!r}")
    if not _is_int(scale) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    u8 = _to_u8(f)
    if scale > 1:
        u8 = u8.repeat(scale, axis=2).repeat(scale, axis=3)
    order = list(range(len(u8)))
    if boomerang and len(u8) > 2:
        order += list(range(len(u8) - 2, 0, -1))
    if u8.shape[1] == 1:
        imgs = [Image.fromarray(u8[i, 0], mode="L") for i in order]
    else:
        imgs = [Image.fromarray(u8[i].transpose(1, 2, 0), mode="RGB") for i in order]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    imgs[0].save(p, format="GIF", save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)),
                 loop=0, optimize=False, disposal=1)
    return p


def save_strip(result: SweepResult, path: str | Path, caption: str) -> Path:
    """PNG grid: rows = seeds, columns = sweep values ("c_1 = -2.0 SD"); mask channels as coloured overlays.

    At most 15 evenly spaced columns are drawn (first and last value included).
    """
    if not isinstance(result, SweepResult):
        raise ValueError(f"result must be a SweepResult, got {type(result).__name__}")
    f = _frames_array(result.frames, "result.frames")
    S = f.shape[0]
    cols = _columns(f.shape[1])
    labels = _fmt_values(result.values)
    H, W = f.shape[3:]
    cell = 1.25
    aspect = H / W
    fig = _new_figure(0.6 + cell * len(cols), 0.9 + cell * aspect * S)
    axes = fig.subplots(S, len(cols), squeeze=False)
    for r in range(S):
        for ci, fi in enumerate(cols):
            ax = axes[r, ci]
            ax.imshow(_rgb(f[r, fi], result.image_channels), vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"c_{result.component + 1} = {labels[fi]} SD", fontsize=7)
            if ci == 0:
                ax.set_ylabel(f"seed {result.seeds[r]}", fontsize=7)
    n_masks = f.shape[2] - result.image_channels
    sub = f"\nrows: noise seeds (same z along a row); coloured overlay: {n_masks} mask channel(s)" if n_masks else \
        "\nrows: noise seeds (same z along a row)"
    fig.suptitle(caption + sub, fontsize=8)
    return _save(fig, path)


def _symmetric_limit(a: np.ndarray) -> float:
    lim = float(np.abs(a).max()) if a.size else 0.0
    return lim if lim > 0 else 1.0


def save_eigen_png(eigen, path: str | Path, caption: str, explained_ratio: float | None = None) -> Path:
    """Eigen image (C, H, W) or (H, W) with RdBu_r on symmetric limits and a colorbar; one panel per channel."""
    e = np.asarray(eigen, dtype=np.float32)
    if e.ndim == 2:
        e = e[None]
    if e.ndim != 3 or e.shape[0] < 1:
        raise ValueError(f"eigen must have shape (C, H, W) or (H, W), got {np.shape(eigen)}")
    if not np.isfinite(e).all():
        raise ValueError("eigen contains NaN or inf")
    lim = _symmetric_limit(e)
    C = e.shape[0]
    names = ["R", "G", "B"] if C == 3 else [f"channel {i}" for i in range(C)]
    fig = _new_figure(max(4.8, 0.9 + 2.8 * C), 3.9)
    axes = fig.subplots(1, C, squeeze=False)[0]
    im = None
    for i in range(C):
        im = axes[i].imshow(e[i], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        axes[i].set_xticks([])
        axes[i].set_yticks([])
        if C > 1:
            axes[i].set_title(names[i], fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.85, label="loading (unit-norm PC)")
    sub = "leading PC of the sweep's pixel variation"
    if explained_ratio is not None:
        sub += f" ({100 * explained_ratio:.1f} % of it)"
    fig.suptitle(f"{caption}\n{sub}\nred = brighter as the component increases", fontsize=8)
    return _save(fig, path)


def save_deviation_png(dev, values, path: str | Path, caption: str, component: int | None = None) -> Path:
    """Deviation images (F, C, H, W) from the base frame, RdBu_r on limits symmetric and shared by all panels.

    Pass image channels only; with C > 1 the channels are averaged (a luminance-like change). At most 15
    evenly spaced panels are drawn.
    """
    d = np.asarray(dev, dtype=np.float32)
    if d.ndim != 4:
        raise ValueError(f"dev must have shape (F, C, H, W), got {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("dev contains NaN or inf")
    v = _values_array(values, "values", min_len=1)
    if len(v) != d.shape[0]:
        raise ValueError(f"values has {len(v)} entries but dev has {d.shape[0]} frames")
    m = d.mean(axis=1)
    cols = _columns(len(v))
    lim = _symmetric_limit(m[cols])
    labels = _fmt_values(v) if len(v) > 1 else [f"{v[0]:.1f}"]
    name = f"c_{component + 1}" if component is not None else "c"
    H, W = m.shape[1:]
    fig = _new_figure(max(4.8, 1.2 + 1.3 * len(cols)), 0.9 + 1.3 * H / W)
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    im = None
    for ax, fi in zip(axes, cols):
        im = ax.imshow(m[fi], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name} = {labels[fi]} SD", fontsize=7)
    fig.colorbar(im, ax=list(axes), shrink=0.9, label="Δ intensity")
    fig.suptitle(f"{caption}\nframe minus base frame, mean over seeds; red = brighter, blue = darker", fontsize=8)
    return _save(fig, path)


def write_component(out_dir: str | Path, result: SweepResult, pct_variance: float, fps: float = 6,
                    gif_scale: int | None = None, range_label: str | None = None) -> dict[str, Path]:
    """Write a component's GIF, strip, eigen and deviation PNGs and a small npz into the sequences folder
    ``out_dir``; returns their paths by kind (their names: :func:`models.layout.component_name`).

    Files: ``gif`` (seed 0, image channels, boomerang), ``strip``, ``eigen``, ``deviation`` and ``npz`` (values,
    frames_seed0 uint8 (F, C_out, H, W), eigen (C, H, W), eigen_ratio, deviation (F, C_img, H, W), component,
    pct_variance, image_channels, seeds). ``pct_variance`` is the component's share of explained target variance
    in percent (0..100). ``gif_scale`` defaults to the smallest integer that makes the GIF at least 128 px on its
    longer side. ``range_label`` (e.g. "2.5-97.5 % quantiles of the real scores") is added to every figure's
    caption so it says what range it shows.
    """
    if not isinstance(result, SweepResult):
        raise ValueError(f"result must be a SweepResult, got {type(result).__name__}")
    if not isinstance(pct_variance, (int, float, np.number)) or not math.isfinite(pct_variance) \
            or not 0.0 <= pct_variance <= 100.0:
        raise ValueError(f"pct_variance must be a percentage in [0, 100], got {pct_variance!r}")
    j = result.component + 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = _frames_array(result.frames, "result.frames")
    ic = result.image_channels
    H, W = f.shape[3:]
    scale = gif_scale if gif_scale is not None else max(1, math.ceil(128 / max(H, W)))
    caption = component_caption(result.component, float(pct_variance))
    if range_label:
        caption = f"{caption}; sweep: {range_label}"
    eigen, ratio = eigen_image(f, ic, result.values)
    dev = deviation_images(f[:, :, :ic], result.values)
    paths = {
        "gif": save_gif(f[0, :, :ic], out / component_name(j, "gif"), fps=fps, scale=scale),
        "strip": save_strip(result, out / component_name(j, "strip"), caption),
        "eigen": save_eigen_png(eigen, out / component_name(j, "eigen"), caption, explained_ratio=ratio),
        "deviation": save_deviation_png(dev, result.values, out / component_name(j, "deviation"), caption,
                                        component=result.component),
    }
    npz = out / component_name(j, "npz")
    np.savez_compressed(npz, values=np.asarray(result.values, np.float32), frames_seed0=_to_u8(f[0]),
                        eigen=eigen, eigen_ratio=np.float32(ratio), deviation=dev,
                        component=np.int64(result.component), pct_variance=np.float32(pct_variance),
                        image_channels=np.int64(ic), seeds=np.asarray(result.seeds, np.int64))
    paths["npz"] = npz
    return paths
