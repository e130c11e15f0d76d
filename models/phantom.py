"""A chest-radiograph-like phantom whose generative factors are known, and a ruler that measures them back.

Why: FIGAN explains a CNN by sweeping a learned direction with a conditional GAN. On real data nobody knows
which image properties *should* move along that sweep; on this phantom we do. The target depends on two
DRIVING factors only; six NUISANCE factors vary independently of it; an optional SHORTCUT (a burned-in corner
marker) can be tied to the label. The ruler reads every factor off pixels alone, so GAN-generated sequences can
be scored: "along the explanation, heart_size moved 1.8 SD, rotation 0.05 SD".

Geometry. The anatomy is drawn in a *body frame* (u right, v down; the thorax half-width is 1 at its widest).
An image point is ``x = t + s * R(theta) @ (u, v)`` in normalised image coordinates ([-1, 1] across the image,
y down), where R rotates counter-clockwise as seen on screen. Rendering inverts that map per pixel (numpy
grids, no loops over pixels), so every structure is evaluated analytically at its body coordinates, edges are
anti-aliased, and details finer than a pixel (ribs, vessels, clavicles) fade to their mean instead of aliasing.
Layers, as relative attenuation (soft tissue = 1):

* trunk: straight-ish sides (slight barrel), rounded shoulders, neck; a little darker towards the flanks;
  air outside (0.04);
* lungs (0.30): ellipses narrowing to the apices, cut below by domed hemidiaphragms, crossed by faint curved
  rib bands (+0.10) and a vessel tree branching from the hila (a closed-form angular comb that splits twice;
  contrast and calibre grow with vascular_fullness); clavicles and a faint spine;
* heart (1.06): an ellipse with a fixed right border that grows to the patient's left (image right, as in a PA
  film) and upwards from the diaphragm; below the diaphragm it merges with the liver;
* abdomen below the diaphragm: flat soft tissue (where exposure and noise are read).

Pixel value = exposure * relative attenuation + N(0, noise^2), clipped to [0, 1]. The optional marker is a
small saturated square (0.95) in the top-left corner of the image (not the body: it ignores the geometry).

Factors and units (manifest column = ruler column):

====================  ====================================================================================
heart_size            cardiothoracic ratio: heart width / thorax width (body frame, so independent of zoom)
vascular_fullness     0..1 vessel contrast/calibre
shift_x, shift_y      translation of the body centre, fraction of the image width/height
rotation              degrees, counter-clockwise on screen
exposure              soft-tissue grey level (the body intensity level; the global gain)
noise                 SD of the additive Gaussian pixel noise
body_scale            thorax width / image width
marker                1 when the corner marker is present (only with ``shortcut=True``; the ruler always
                      reports it)
====================  ====================================================================================

All factors are sampled independently from uniform distributions; target = w_heart * z(heart_size) +
w_vascular * z(vascular_fullness) + target_noise * N(0, 1), where z uses the *sampling distribution's* mean
and SD (so it does not depend on the sample); label = target > 0.

Streaming. Images are made in blocks of ``BLOCK`` rows, block b seeded by ``SeedSequence([seed, b])``, so
``generate`` and ``write_phantom`` produce identical pixels and a 20 000 x 256² set never sits in memory.

The ruler. (1) Light Gaussian smoothing (sigma = size/64 px) and a rough level (75th percentile). (2) The body
silhouette's left/right edges row by row (sub-pixel): the chord midpoints give rotation (slope) and shift_x,
the chord widths body_scale. (3) shift_y is the centroid of soft "lung" pixels in the right lung (image left),
which the heart never reaches. (4) The image is resampled into the body frame: exposure = median grey of the
abdomen; heart_size = bright share of the lower left lung (the heart covers more of it as it grows);
vascular_fullness = mean grey of the lung zones the heart never reaches. (5) noise = robust SD (MAD) of a
Laplacian residual over the abdomen, on the unsmoothed pixels. (6) marker = the brightest smoothed grey in the
corner square, scored 0 at soft-tissue grey and 1 at the marker's. Each raw measure goes through a monotone
one-dimensional calibration (raw = polynomial(true), inverted), fitted once per process (cached, ~1 s) on
reference phantoms at 64² with a fixed seed. Only edges, centroids, medians and region means are used, so a
little blur, noise, 8-bit quantisation or a mild gamma (GAN output, PNG files) changes the readings little.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from scipy import ndimage

from models.data import DatasetError, DatasetMeta, ImageDataset, assign_splits, write_dataset

DRIVING: tuple[str, ...] = ("heart_size", "vascular_fullness")
NUISANCE: tuple[str, ...] = ("shift_x", "shift_y", "rotation", "exposure", "noise", "body_scale")
SHORTCUT: tuple[str, ...] = ("marker",)
FACTORS: tuple[str, ...] = DRIVING + NUISANCE
RULER_COLUMNS: tuple[str, ...] = FACTORS + SHORTCUT
CLASS_NAMES: list[str] = ["normal", "enlarged"]
BLOCK = 256  # rows rendered per block; fixed so generate() and write_phantom() agree pixel for pixel

# Sampling ranges (uniform) at nuisance=1; nuisance ranges shrink towards their centre as nuisance -> 0.
RANGES: dict[str, tuple[float, float]] = {
    "heart_size": (0.36, 0.56),
    "vascular_fullness": (0.10, 0.90),
    "shift_x": (-0.08, 0.08),
    "shift_y": (-0.08, 0.08),
    "rotation": (-10.0, 10.0),
    "exposure": (0.40, 0.62),
    "noise": (0.004, 0.05),
    "body_scale": (0.58, 0.76),
}

# Relative attenuation of each layer (soft tissue = 1) and fixed anatomy in body units.
_AIR, _LUNG, _RIB, _CLAVICLE, _SPINE, _HEART, _VESSEL = 0.04, 0.30, 0.10, 0.10, 0.05, 1.06, 0.60
_RIB_PERIOD, _RIB_MEAN = 0.21, 12870 / 65536  # mean of ((1 + cos) / 2) ** 8
_LUNG_C = ((-0.49, -0.20), (0.49, -0.20))  # lung centres (u, v)
_LUNG_AX = (0.40, 0.84)                      # lung semi-axes (a_u, b_v); the apex tapers, the diaphragm cuts
_DOME_TOP, _DOME_SIDE = 0.20, 0.46           # diaphragm height at the lung centre / at the costophrenic angle
_HILA = ((-0.20, -0.14), (0.20, -0.16))
_HEART_RIGHT = -0.22                         # fixed right heart border (image left)
_HEART_ASPECT = 0.72                         # semi-height / semi-width
_HEART_BASE = 0.26                           # heart centre height = _HEART_BASE - 0.25 * semi-height
_MARKER = (0.035, 0.035, 0.09)               # top-left square: (x0, y0, side), fractions of the image
_MARKER_LEVEL = 0.95


@dataclass
class PhantomConfig:
    n: int = 2000
    size: int = 64
    seed: int = 0
    task: str = "regression"
    w_heart: float = 1.0
    w_vascular: float = 0.7
    target_noise: float = 0.2
    nuisance: float = 1.0
    shortcut: bool = False
    shortcut_strength: float = 0.9
    masks: bool = False
    name: str = "phantom"

    def __post_init__(self) -> None:
        validate_config(self)

    @property
    def target_column(self) -> str:
        return "label" if self.task == "classification" else "target"

    @property
    def factor_groups(self) -> dict[str, list[str]]:
        groups = {"driving": list(DRIVING), "nuisance": list(NUISANCE)}
        if self.shortcut:
            groups["shortcut"] = list(SHORTCUT)
        return groups


def validate_config(cfg: PhantomConfig) -> PhantomConfig:
    """Raise ValueError naming the first bad field; return cfg unchanged when it is usable."""
    def bad(field_: str, why: str) -> ValueError:
        return ValueError(f"PhantomConfig.{field_} {why} (got {getattr(cfg, field_)!r})")

    if not isinstance(cfg.n, (int, np.integer)) or isinstance(cfg.n, bool) or cfg.n < 1:
        raise bad("n", "must be an integer >= 1")
    if not isinstance(cfg.size, (int, np.integer)) or isinstance(cfg.size, bool) or not 16 <= cfg.size <= 512:
        raise bad("size", "must be an integer in 16..512")
    if not isinstance(cfg.seed, (int, np.integer)) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise bad("seed", "must be a non-negative integer")
    if cfg.task not in ("regression", "classification"):
        raise bad("task", "must be 'regression' or 'classification'")
    for f in ("w_heart", "w_vascular", "target_noise", "nuisance"):
        v = getattr(cfg, f)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise bad(f, "must be a finite number")
    if cfg.w_heart == 0 and cfg.w_vascular == 0:
        raise ValueError("PhantomConfig.w_heart and w_vascular are both 0: the target would be pure noise")
    if cfg.target_noise < 0:
        raise bad("target_noise", "must be >= 0")
    if not 0 <= cfg.nuisance <= 1:
        raise bad("nuisance", "must be in [0, 1] (0 switches nuisances off, 1 is the full range)")
    if not isinstance(cfg.shortcut, (bool, np.bool_)):
        raise bad("shortcut", "must be True or False")
    if not isinstance(cfg.shortcut_strength, (int, float)) or isinstance(cfg.shortcut_strength, bool) \
            or not 0.5 <= cfg.shortcut_strength <= 1:
        raise bad("shortcut_strength", "must be in [0.5, 1] (P(marker | label=1))")
    if not isinstance(cfg.masks, (bool, np.bool_)):
        raise bad("masks", "must be True or False")
    if not isinstance(cfg.name, str) or not cfg.name.strip():
        raise bad("name", "must be a non-empty string")
    return cfg


# --------------------------------------------------------------------------------------------- sampling

def _uniform_moments(name: str) -> tuple[float, float]:
    lo, hi = RANGES[name]
    return (lo + hi) / 2, (hi - lo) / math.sqrt(12)


def sample_factors(cfg: PhantomConfig, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Draw n rows of factors, target and label (and marker when cfg.shortcut) from one generator."""
    out: dict[str, np.ndarray] = {}
    for name in FACTORS:
        lo, hi = RANGES[name]
        u = rng.uniform(0.0, 1.0, n)
        if name in NUISANCE:  # shrink towards the centre (noise towards 0): nuisance=0 switches them off
            c = 0.0 if name == "noise" else (lo + hi) / 2
            lo, hi = c + cfg.nuisance * (lo - c), c + cfg.nuisance * (hi - c)
        out[name] = lo + (hi - lo) * u
    z = {k: (out[k] - _uniform_moments(k)[0]) / _uniform_moments(k)[1] for k in DRIVING}
    target = cfg.w_heart * z["heart_size"] + cfg.w_vascular * z["vascular_fullness"] \
        + cfg.target_noise * rng.standard_normal(n)
    label = (target > 0).astype(np.int64)
    table = pd.DataFrame({"target": target, "label": label, **out})
    if cfg.shortcut:
        p = np.where(label == 1, cfg.shortcut_strength, 1.0 - cfg.shortcut_strength)
        table["marker"] = (rng.uniform(0.0, 1.0, n) < p).astype(np.int64)
    return table


# --------------------------------------------------------------------------------------------- rendering

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _col(table: pd.DataFrame, name: str, n: int) -> np.ndarray:
    return table[name].to_numpy(np.float32).reshape(n, 1, 1)


def _trunk_half_width(v: np.ndarray) -> np.ndarray:
    """Thorax half-width at body height v: 1 at mid-chest, slight barrel, rounded shoulders into the neck."""
    base = 1.0 - 0.05 * (v - 0.15) ** 2
    top = np.clip((-0.90 - v) / 0.45, 0.0, 1.0)  # 0 below the shoulders, 1 at the shoulder tops (v=-1.35)
    return 0.40 + (base - 0.40) * np.sqrt(np.clip(1.0 - top ** 2, 0.0, 1.0))


def _vessels(u: np.ndarray, v: np.ndarray, full: np.ndarray, phase: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Vessel tree intensity (0..~1) for both hila: an angular comb of 6 trunks that splits twice with distance.

    Closed form: with f the signed position inside a comb cell, each split replaces |f| by ||f| - a(r)| where
    a(r) ramps from 0 to a quarter/eighth cell; the perpendicular distance to the nearest branch is r*|f|*cell.
    """
    total = np.zeros_like(u)
    cell = np.float32(2 * np.pi / 6)
    width = 0.008 + 0.028 * full  # calibre in body units
    contrast = 0.15 + 0.85 * full
    for side, (hu, hv) in zip((-1.0, 1.0), _HILA):
        du, dv = (u - hu) * side, v - hv
        r = np.sqrt(du * du + dv * dv) + 1e-6
        phi = np.arctan2(dv, du) + 0.18 * np.sin(7.0 * r + phase * side) + phase
        f = phi / cell
        f = np.abs(f - np.round(f))
        f = np.abs(f - 0.25 * _smoothstep((r - 0.16) / 0.12))
        f = np.abs(f - 0.125 * _smoothstep((r - 0.38) / 0.12))
        d = r * f * cell
        w0 = width * (1.0 - 0.55 * np.clip(r / 0.8, 0, 1))
        w = np.sqrt(w0 * w0 + (0.5 * px) ** 2)  # anti-aliased: below a pixel a vessel gets wider and dimmer
        total += (contrast * w0 / w) * np.exp(-0.5 * (d / w) ** 2) * np.exp(-r / 0.75) * (r > 0.03)
    return total


def _body_coords(table: pd.DataFrame, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body-frame coordinates (u, v) of every pixel (N,H,W) and one pixel's length in body units (N,1,1)."""
    n = len(table)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = g[None, None, :], g[None, :, None]
    tx, ty = 2 * _col(table, "shift_x", n), 2 * _col(table, "shift_y", n)
    th = np.deg2rad(_col(table, "rotation", n))
    s = _col(table, "body_scale", n)
    c, sn = np.cos(th), np.sin(th)
    dx, dy = x - tx, y - ty
    u = (c * dx - sn * dy) / s  # p = R^T (x - t) / s with R = [[c, s], [-s, c]] (counter-clockwise on screen)
    v = (sn * dx + c * dy) / s
    return u, v, (2.0 / size) / s


def _lung_map(u: np.ndarray, v: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """Two lungs: ellipses narrowing towards the apex, cut below by domed hemidiaphragms."""
    lung = np.zeros_like(u)
    a0, b = _LUNG_AX
    for cu, cv in _LUNG_C:
        t = np.clip((cv - v) / b, 0.0, 1.0)
        a = a0 * (1.0 - 0.35 * t * t)
        e = 1.0 - np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2)
        k = np.clip(((u - cu) / a0) ** 2, 0.0, 1.0)
        dome = _DOME_TOP + (_DOME_SIDE - _DOME_TOP) * k
        lung = np.maximum(lung, _sigmoid(e * a0 / edge) * _sigmoid((dome - v) / edge))
    return lung


def _layers(table: pd.DataFrame, size: int, phase: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative attenuation (N,H,W) plus soft lung and heart maps (for masks)."""
    n = len(table)
    u, v, px = _body_coords(table, size)
    edge = 0.7 * px

    half = _trunk_half_width(v)
    body = _sigmoid((half - np.abs(u)) / edge)
    tissue = 0.85 + 0.15 * np.sqrt(np.clip(1.0 - (u / half) ** 2, 0.0, 1.0))  # thinner towards the flanks
    lung = _lung_map(u, v, edge)
    q = v + 0.30 * np.abs(u) - 0.45 * u * u  # posterior ribs: rising from the spine, curving down laterally
    fade = np.exp(-2 * (np.pi * 0.5 * px / _RIB_PERIOD) ** 2)  # anti-aliasing: fine ribs fade to their mean
    ribs = _RIB_MEAN + fade * ((0.5 + 0.5 * np.cos(2 * np.pi * q / _RIB_PERIOD)) ** 8 - _RIB_MEAN)
    qc = v + 0.80 - 0.30 * (np.abs(u) - 0.15) ** 2  # clavicles: across the apices
    cw = np.sqrt(0.035 ** 2 + (0.5 * px) ** 2)
    clav = (0.035 / cw) * np.exp(-0.5 * (qc / cw) ** 2) * _sigmoid((np.abs(u) - 0.12) / edge) \
        * _sigmoid((0.75 - np.abs(u)) / edge)
    spine = _sigmoid((0.075 - np.abs(u)) / edge)
    vessels = _vessels(u, v, _col(table, "vascular_fullness", n), phase, px)

    a = _col(table, "heart_size", n)
    b = _HEART_ASPECT * a
    hu, hv = _HEART_RIGHT + a, _HEART_BASE - 0.25 * b
    e = 1.0 - np.sqrt(((u - hu) / a) ** 2 + ((v - hv) / b) ** 2)
    heart = _sigmoid(e * b / edge)

    inside = tissue + _SPINE * spine + lung * (_LUNG - tissue + _RIB * ribs + _VESSEL * vessels)
    above = _sigmoid((_DOME_SIDE - 0.1 - v) / (3 * edge))  # below the diaphragm the heart merges with the liver
    inside = inside * (1.0 - heart) + (tissue + (_HEART - 1.0) * above) * heart + _CLAVICLE * clav
    rel = _AIR + body * (inside - _AIR)
    return rel.astype(np.float32), (lung * body * (heart < 0.5)).astype(np.float32), (heart * body).astype(np.float32)


def _marker_box(size: int) -> tuple[slice, slice]:
    x0, y0, side = _MARKER
    a, b = int(round(x0 * size)), int(round(y0 * size))
    k = max(2, int(round(side * size)))
    return slice(b, b + k), slice(a, a + k)


_PIXELS_PER_CHUNK = 1 << 20  # bounds the float32 temporaries of one rendering pass (~4 MB each)


def render(table: pd.DataFrame, size: int, seed: int | np.random.SeedSequence = 0,
           masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Render phantoms for the factor values in ``table`` (columns FACTORS, optional 0/1 ``marker``).

    Returns float32 images (N, 1, size, size) in [0, 1] and, with ``masks``, int64 label maps (N, size, size):
    0 background/body, 1 lungs, 2 heart. ``seed`` drives only the pixel noise and the vessel-tree jitter, so
    the same table and seed give the same pixels (sweeps can re-render one factor at a time).
    """
    missing = [c for c in FACTORS if c not in table.columns]
    if missing:
        raise ValueError(f"render: table lacks factor column(s) {missing}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 512:
        raise ValueError(f"render: size must be an integer in 16..512, got {size!r}")
    vals = table[list(FACTORS)].to_numpy(np.float64)
    if not np.all(np.isfinite(vals)):
        raise ValueError("render: factor values must be finite")
    size, n = int(size), len(table)
    table = table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32).reshape(n, 1, 1)
    img = np.empty((n, size, size), np.float32)
    label_map = np.empty((n, size, size), np.int64) if masks else None
    marker = table["marker"].to_numpy().astype(bool) if "marker" in table.columns else np.zeros(n, bool)
    ys, xs = _marker_box(size)
    step = max(1, _PIXELS_PER_CHUNK // (size * size))
    for s0 in range(0, n, step):  # chunks bound the temporaries; the rng is drawn in chunk order
        part, sl = table.iloc[s0:s0 + step], slice(s0, s0 + step)
        rel, lung, heart = _layers(part, size, phase[sl])
        out = img[sl]
        np.multiply(_col(part, "exposure", len(part)), rel, out=out)
        out[marker[sl], ys, xs] = _MARKER_LEVEL
        out += _col(part, "noise", len(part)) * rng.standard_normal(out.shape, dtype=np.float32)
        np.clip(out, 0.0, 1.0, out=out)
        if label_map is not None:
            label_map[sl] = np.where(heart > 0.5, 2, np.where(lung > 0.5, 1, 0))
    return img[:, None], label_map


def _block_plan(cfg: PhantomConfig) -> list[tuple[pd.DataFrame, np.random.SeedSequence]]:
    """Factor tables of every block (cheap) and the pixel seed of each; block b is seeded by (cfg.seed, b)."""
    plan = []
    for b, start in enumerate(range(0, cfg.n, BLOCK)):
        factor_ss, pixel_ss = np.random.SeedSequence([int(cfg.seed), b]).spawn(2)
        plan.append((sample_factors(cfg, min(BLOCK, cfg.n - start), np.random.default_rng(factor_ss)), pixel_ss))
    return plan


def _table(cfg: PhantomConfig, plan: list[tuple[pd.DataFrame, np.random.SeedSequence]]) -> pd.DataFrame:
    table = pd.concat([t for t, _ in plan], ignore_index=True)
    table["split"] = assign_splits(cfg.n, int(cfg.seed))
    return table


def generate(cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray | None, pd.DataFrame]:
    """All phantoms in memory: images float32 (N,1,H,W), masks int64 (N,H,W) or None, and the factor table
    (target, label, every factor, marker when cfg.shortcut, split)."""
    validate_config(cfg)
    plan = _block_plan(cfg)
    out = [render(t, cfg.size, ss, masks=cfg.masks) for t, ss in plan]
    imgs = np.concatenate([im for im, _ in out])
    masks = np.concatenate([mk for _, mk in out]) if cfg.masks else None  # type: ignore[misc]
    return imgs, masks, _table(cfg, plan)


def _stream(cfg: PhantomConfig, plan: list) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(image (1,H,W), mask or None) row by row; only one block of pixels is alive at a time."""
    for t, ss in plan:
        imgs, masks = render(t, cfg.size, ss, masks=cfg.masks)
        for i in range(len(imgs)):  # copies: no row handed out keeps its whole block alive
            yield imgs[i].copy(), (masks[i].copy() if masks is not None else None)
        del imgs, masks  # free this block before the next one is rendered


def write_phantom(root: str | Path, cfg: PhantomConfig, overwrite: bool = False, image_format: str = "png",
                  bits: int = 8) -> ImageDataset:
    """Write a phantom dataset folder (streamed block by block) and return it opened: ``bits``-bit PNGs (8, the
    default, or 16), or with ``image_format="dicom"`` 16-bit DICOM files holding the same stored values as the
    16-bit PNGs (the two load to identical arrays).

    The manifest holds target, label, every factor (marker too with ``shortcut``) and split; dataset.yaml names
    the target column (``target`` or ``label``) and the factor groups.
    """
    if bits not in (8, 16):
        raise ValueError(f"write_phantom: bits must be 8 or 16, got {bits!r}")
    validate_config(cfg)
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:  # fail before rendering anything
        raise DatasetError(f"{root} already exists and is not empty; pass overwrite=True to replace it")
    plan = _block_plan(cfg)
    table = _table(cfg, plan)
    a, b = itertools.tee(_stream(cfg, plan))  # tee buffers at most the one row between images and masks
    meta = DatasetMeta(
        name=cfg.name, target=cfg.target_column, task=cfg.task,  # type: ignore[arg-type]
        class_names=list(CLASS_NAMES) if cfg.task == "classification" else None,
        factors=cfg.factor_groups,
        description=(f"Chest-radiograph phantom (models.phantom), {cfg.n} images {cfg.size}x{cfg.size}, seed "
                     f"{cfg.seed}; target = {cfg.w_heart}*z(heart_size) + {cfg.w_vascular}*z(vascular_fullness) "
                     f"+ {cfg.target_noise}*N(0,1); label = target > 0; nuisance scale {cfg.nuisance}"
                     + (f"; shortcut marker with strength {cfg.shortcut_strength}" if cfg.shortcut else "")),
    )
    return write_dataset(root, meta, (im for im, _ in a), table,
                         masks=(mk for _, mk in b) if cfg.masks else None, overwrite=overwrite, bits=bits,
                         image_format=image_format)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- ruler

_CANON = 48                     # body-frame resampling grid (K x K)
_CANON_U = (-1.10, 1.10)
_CANON_V = (-1.00, 0.90)
_ABDOMEN_V, _ABDOMEN_U = (0.62, 0.88), (0.14, 0.78)   # flat soft tissue: exposure and noise are read here
_CAL_SEED, _CAL_N, _CAL_SIZE = 910_731, 768, 64
_RIGHT_REGION_U = -0.30         # body-frame u left of which the heart never reaches (vertical landmark)


def _as_batch(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        if x.shape[1] == 3:
            x = x.mean(axis=1, keepdims=True)
        if x.shape[1] != 1:
            raise ValueError(f"ruler: images must be (N,1,H,W), (N,3,H,W) or (N,H,W); got shape {x.shape}")
        x = x[:, 0]
    elif x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] < 16 or x.shape[2] < 16:
        raise ValueError(f"ruler: images must be (N,1,H,W) or (N,H,W) with H, W >= 16; got shape {np.shape(images)}")
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"ruler: phantom images are square; got {x.shape[1]}x{x.shape[2]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("ruler: images contain NaN or inf")
    return x


def _subpixel_edges(sm: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: left/right crossing of ``thr`` (normalised x) and whether the row is usable (N,H)."""
    n, h, w = sm.shape
    above = sm > thr[:, None, None]
    above = above & (np.roll(above, 1, axis=2) | np.roll(above, -1, axis=2))  # ignore isolated noise pixels
    has = above.any(axis=2)
    jl = np.argmax(above, axis=2)
    jr = w - 1 - np.argmax(above[:, :, ::-1], axis=2)
    ii, rr = np.meshgrid(np.arange(n), np.arange(h), indexing="ij")

    def cross(j_in: np.ndarray, j_out: np.ndarray) -> np.ndarray:
        a, b = sm[ii, rr, j_out], sm[ii, rr, j_in]
        frac = np.clip((thr[:, None] - a) / np.maximum(b - a, 1e-6), 0.0, 1.0)
        return j_out + frac * (j_in - j_out)

    left = cross(jl, np.maximum(jl - 1, 0))
    right = cross(jr, np.minimum(jr + 1, w - 1))
    ok = has & (jl > 0) & (jr < w - 1)
    to_norm = lambda j: (j + 0.5) / w * 2 - 1  # noqa: E731
    return to_norm(left), to_norm(right), ok


def _weighted_line(y: np.ndarray, x: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image least-squares x = a + b*y with weights (N,H); returns (a, b)."""
    sw = wt.sum(1) + 1e-9
    my, mx = (wt * y).sum(1) / sw, (wt * x).sum(1) / sw
    vy = (wt * (y - my[:, None]) ** 2).sum(1) + 1e-9
    b = (wt * (y - my[:, None]) * (x - mx[:, None])).sum(1) / vy
    return mx - b * my, b


def _bilinear(img: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Sample (N,H,W) at pixel coordinates px, py (N,...) with edge clamping."""
    n, h, w = img.shape
    px = np.clip(px, 0, w - 1.001)
    py = np.clip(py, 0, h - 1.001)
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - x0, py - y0
    flat = img.reshape(n, -1)
    base = (np.arange(n) * h * w).reshape((n,) + (1,) * (px.ndim - 1))
    g = lambda yy, xx: flat.reshape(-1)[base + yy * w + xx]  # noqa: E731
    return ((1 - fy) * ((1 - fx) * g(y0, x0) + fx * g(y0, x0 + 1))
            + fy * ((1 - fx) * g(y0 + 1, x0) + fx * g(y0 + 1, x0 + 1)))


def _to_image(u: np.ndarray, v: np.ndarray, geo: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Body coordinates -> normalised image coordinates for each image's estimated geometry."""
    shape = (-1, 1, 1)  # geometry per image against a (K, K) or (1, K, K) grid
    s, c, sn = (geo[k].reshape(shape) for k in ("s", "cos", "sin"))
    tx, ty = geo["tx"].reshape(shape), geo["ty"].reshape(shape)
    return tx + s * (c * u + sn * v), ty + s * (-sn * u + c * v)


def _to_body(x: np.ndarray, y: np.ndarray, geo: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    shape = (-1,) + (1,) * (x.ndim - 1)
    s, c, sn = (geo[k].reshape(shape) for k in ("s", "cos", "sin"))
    dx, dy = x - geo["tx"].reshape(shape), y - geo["ty"].reshape(shape)
    return (c * dx - sn * dy) / s, (sn * dx + c * dy) / s


@functools.lru_cache(maxsize=1)
def _canonical_rois() -> dict[str, np.ndarray]:
    """Fixed body-frame sampling grid and soft regions of interest (K x K weights)."""
    k = _CANON
    u = np.linspace(*_CANON_U, k, dtype=np.float32)[None, :].repeat(k, 0)
    v = np.linspace(*_CANON_V, k, dtype=np.float32)[:, None].repeat(k, 1)
    edge = np.float32(0.03)
    # eroded lung: stay ~0.07 body units away from every lung border (registration and blur tolerance)
    eroded = np.ones_like(u)
    for du, dv in ((0.07, 0), (-0.07, 0), (0, 0.07), (0, -0.07)):
        eroded = np.minimum(eroded, _lung_map(u[None] + du, v[None] + dv, edge)[0])
    hila = np.ones_like(u)
    for hu, hv in _HILA:
        hila *= _sigmoid((np.hypot(u - hu, v - hv) - 0.18) / edge)
    left_low = _sigmoid((u - 0.14) / edge) * _sigmoid((v + 0.40) / edge)
    heart_free = np.where(u < 0, _sigmoid((-0.34 - u) / edge), _sigmoid((-0.36 - v) / edge))
    abdomen = ((v > _ABDOMEN_V[0]) & (v < _ABDOMEN_V[1]) & (np.abs(u) > _ABDOMEN_U[0]) & (np.abs(u) < _ABDOMEN_U[1]))
    return {"u": u, "v": v, "heart_roi": eroded * hila * left_low, "vessel_roi": eroded * heart_free,
            "abdomen": abdomen}


def _pixel_grid(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1


def _outline(sm: np.ndarray, lev0: np.ndarray) -> dict[str, np.ndarray]:
    """Body silhouette row by row: midline (a + b*y), rotation, body scale, and the rows it used."""
    n, h, w = sm.shape
    left, right, ok = _subpixel_edges(sm, 0.4 * lev0)
    mrows, _ = _marker_box(w)
    ok[:, max(0, mrows.start - 2):mrows.stop + 2] = False  # rows a corner marker may cross carry no outline
    width = np.where(ok, right - left, np.nan)
    med = np.nanmedian(width, axis=1)
    med = np.where(np.isfinite(med), med, 1.0)
    rows = ok & (np.abs(width - med[:, None]) < 0.12 * med[:, None])
    y = np.broadcast_to(_pixel_grid(h)[None], (n, h))
    a, b = _weighted_line(y, np.where(rows, (left + right) / 2, 0.0), rows.astype(np.float32))
    theta = np.arctan(b)
    s = np.nanmedian(np.where(rows, width, np.nan), axis=1) * np.cos(theta) / 2
    s = np.where(np.isfinite(s), s, 0.67)
    xs = _pixel_grid(w)[None, None, :]
    margin = 0.06 * (right - left)[:, :, None]
    inside = ok[:, :, None] & (xs > left[:, :, None] + margin) & (xs < right[:, :, None] - margin)
    return {"a": a, "b": b, "theta": theta, "s": s, "inside": inside}


def _lung_centroid(rel: np.ndarray, inside: np.ndarray, region: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Image-frame centroid (x, y) of soft "lung" pixels (relative grey well below soft tissue) in a region."""
    n, h, w = rel.shape
    dark = np.clip((0.62 - rel) / 0.2 + 0.5, 0.0, 1.0) * inside
    if region is not None:
        dark = dark * region
    m = dark.sum((1, 2)) + 1e-9
    return ((dark * _pixel_grid(w)[None, None, :]).sum((1, 2)) / m,
            (dark * _pixel_grid(h)[None, :, None]).sum((1, 2)) / m)


def _geometry(sm: np.ndarray, lev0: np.ndarray) -> dict[str, np.ndarray]:
    """Estimate shift, rotation and scale. The outline gives rotation, scale and the midline; the height comes
    from the centroid of the right lung (image left), which the heart never covers, refined twice."""
    n, h, w = sm.shape
    o = _outline(sm, lev0)
    c, sn, s = np.cos(o["theta"]), np.sin(o["theta"]), o["s"]
    rel = sm / lev0[:, None, None]
    ref = _reference()
    _, yc = _lung_centroid(rel, o["inside"], None)
    ty = yc - s * ref["v_all"] * c
    geo = {"s": s.astype(np.float32), "cos": c.astype(np.float32), "sin": sn.astype(np.float32)}
    gx, gy = _pixel_grid(w)[None, None, :], _pixel_grid(h)[None, :, None]
    for _ in range(2):
        geo["ty"], geo["tx"] = ty.astype(np.float32), (o["a"] + o["b"] * ty).astype(np.float32)
        pu, _pv = _to_body(gx + 0 * gy, gy + 0 * gx, geo)
        _, yc = _lung_centroid(rel, o["inside"], pu < _RIGHT_REGION_U)
        ty = yc - s * (-sn * ref["u_right"] + c * ref["v_right"])
    geo["ty"], geo["tx"] = ty.astype(np.float32), (o["a"] + o["b"] * ty).astype(np.float32)
    geo["theta"] = o["theta"]
    return geo


@functools.lru_cache(maxsize=1)
def _reference() -> dict[str, float]:
    """Body-frame lung centroids of an average, upright, centred, noise-free phantom (true geometry known)."""
    t = pd.DataFrame([{k: _uniform_moments(k)[0] for k in FACTORS}])
    t["shift_x"] = t["shift_y"] = t["rotation"] = t["noise"] = 0.0
    s0 = float(t["body_scale"].iloc[0])
    img, _ = render(t, 128, seed=0)
    sm = _smooth(img[:, 0])
    lev0 = _level(sm)
    o = _outline(sm, lev0)
    rel = sm / lev0[:, None, None]
    _, yc = _lung_centroid(rel, o["inside"], None)
    u_grid = np.broadcast_to(_pixel_grid(128)[None, None, :] / s0, rel.shape)
    xr, yr = _lung_centroid(rel, o["inside"], u_grid < _RIGHT_REGION_U)
    return {"v_all": float(yc[0] / s0), "u_right": float(xr[0] / s0), "v_right": float(yr[0] / s0)}


def _smooth(x: np.ndarray) -> np.ndarray:
    sigma = max(0.6, x.shape[-1] / 64)
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest")


def _level(sm: np.ndarray) -> np.ndarray:
    """Rough soft-tissue grey (75th percentile): only used to set thresholds relative to the exposure."""
    return np.percentile(sm.reshape(len(sm), -1), 75, axis=1).astype(np.float32) + 1e-3


def _raw_measures(x: np.ndarray) -> dict[str, np.ndarray]:
    """Uncalibrated geometric/photometric measures for a batch (N,H,W) in [0, 1]."""
    n, h, w = x.shape
    sm = _smooth(x)
    geo = _geometry(sm, _level(sm))

    # body-frame resampling: exposure from the abdomen, heart from the bright share of the lower left lung,
    # vessels from the mean grey of lung zones the heart never reaches
    roi = _canonical_rois()
    cx, cy = _to_image(roi["u"][None], roi["v"][None], geo)
    canon = _bilinear(sm, (cx + 1) / 2 * w - 0.5, (cy + 1) / 2 * h - 0.5)
    exposure = np.median(canon[:, roi["abdomen"]], axis=1)
    rel = canon / (exposure[:, None, None] + 1e-3)
    bright = np.clip((rel - 0.68) / 0.2 + 0.5, 0.0, 1.0)
    heart = (bright * roi["heart_roi"]).sum((1, 2)) / roi["heart_roi"].sum()
    vessel = (rel * roi["vessel_roi"]).sum((1, 2)) / roi["vessel_roi"].sum()

    # pixel noise: robust SD of a Laplacian residual over the abdomen, on the unsmoothed pixels
    lap = x[:, 1:-1, 1:-1] - 0.25 * (x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:])
    gx, gy = _pixel_grid(w)[None, None, 1:-1], _pixel_grid(h)[None, 1:-1, None]
    pu, pv = _to_body(gx + 0 * gy, gy + 0 * gx, geo)
    am = (pv > _ABDOMEN_V[0]) & (pv < _ABDOMEN_V[1]) & (np.abs(pu) > _ABDOMEN_U[0]) & (np.abs(pu) < _ABDOMEN_U[1])
    noise = 1.4826 * np.nanmedian(np.where(am, np.abs(lap), np.nan).reshape(n, -1), axis=1) / math.sqrt(1.25)
    noise = np.where(np.isfinite(noise), noise, 0.0)

    # marker: the brightest smoothed grey in the corner square (survives blur and small offsets), on a scale
    # where 0 = soft tissue (the brightest anatomy near the corner) and 1 = the burned-in marker level
    ys, xsl = _marker_box(w)
    peak = sm[:, ys, xsl].max(axis=(1, 2))
    marker = (peak - exposure) / np.maximum(_MARKER_LEVEL - exposure, 1e-3)
    return {"heart_size": heart, "vascular_fullness": vessel, "shift_x": geo["tx"] / 2, "shift_y": geo["ty"] / 2,
            "rotation": np.rad2deg(geo["theta"]), "exposure": exposure, "noise": noise, "body_scale": geo["s"],
            "marker": marker}


def _monotone_branch(grid: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The increasing stretch of a fitted curve around the middle of its grid (a quadratic may turn over
    outside the sampled range); raises when the measure does not increase with its factor at all."""
    inc = np.diff(vals) > 0
    mid = len(inc) // 2
    if not inc[mid]:
        raise RuntimeError("phantom ruler calibration: a raw measure does not increase with its factor")
    lo = mid - int(np.argmin(inc[:mid][::-1])) if not inc[:mid].all() else 0
    hi = mid + int(np.argmin(inc[mid:])) if not inc[mid:].all() else len(inc)
    return grid[lo:hi + 1], vals[lo:hi + 1]


@functools.lru_cache(maxsize=1)
def _calibration() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per factor a monotone lookup (raw grid, true grid): raw = polynomial(true) fitted on reference phantoms
    (fixed seed), inverted on a dense grid so the calibrated ruler is unbiased along each factor's range."""
    cfg = PhantomConfig(n=_CAL_N, size=_CAL_SIZE, seed=_CAL_SEED)
    imgs, _, table = generate(cfg)
    raw = _raw_measures(imgs[:, 0])
    out = {}
    for name in FACTORS:
        lo, hi = RANGES[name]
        t = table[name].to_numpy(np.float64)
        deg = 2 if name == "heart_size" else 1
        coef = np.polyfit(t, raw[name].astype(np.float64), deg)
        span = hi - lo
        grid = np.linspace(lo - 0.5 * span, hi + 0.5 * span, 2001)
        vals = np.polyval(coef, grid)
        grid, vals = _monotone_branch(grid, vals)
        out[name] = (vals, grid)
    return out


def ruler(images: np.ndarray, marker_score: bool = False) -> pd.DataFrame:
    """Measure every factor from phantom-like images alone.

    ``images``: (N,1,H,W) or (N,H,W) floats in [0, 1] (square, H >= 16; (N,3,H,W) is averaged to grey), real
    or generated. Returns one row per image with columns RULER_COLUMNS (FACTORS + ``marker`` 0/1) in the
    manifest's units; ``marker_score=True`` adds the continuous marker score (0 soft tissue .. 1 marker grey;
    the 0/1 marker is score > 0.5), useful when a generator fades a marker in gradually.
    """
    x = _as_batch(images)
    cal = _calibration()
    cols: dict[str, list[np.ndarray]] = {name: [] for name in (*FACTORS, "marker_score")}
    for start in range(0, len(x), 512):
        with warnings.catch_warnings():  # images without a body (blank, off-domain) give all-NaN rows: no warning
            warnings.simplefilter("ignore", RuntimeWarning)
            raw = _raw_measures(x[start:start + 512])
        for name in FACTORS:
            vals, grid = cal[name]
            cols[name].append(np.interp(raw[name], vals, grid))
        cols["marker_score"].append(raw["marker"])
    res = pd.DataFrame({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})
    res.insert(len(FACTORS), "marker", (res["marker_score"] > 0.5).astype(np.int64))
    return res if marker_score else res.drop(columns="marker_score")


def factor_spread(table: pd.DataFrame) -> dict[str, float]:
    """SD of each factor column present in ``table`` (real data), for expressing sweep effects in SD units."""
    cols = [c for c in RULER_COLUMNS if c in table.columns]
    if not cols:
        raise ValueError(f"factor_spread: table has none of the factor columns {list(RULER_COLUMNS)}")
    return {c: float(pd.to_numeric(table[c], errors="coerce").std(ddof=1)) for c in cols}
