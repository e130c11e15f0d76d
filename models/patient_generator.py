"""The FIGAN generator G(z, c) as a patient-conditional shape–appearance model: real patients, edited to a score c.

Why not a pixel GAN: on 2 CPU cores a pixel cGAN trained for minutes draws blurred, collapsed images (FID 4.7×
the real-vs-real floor, seeds 4.6× less diverse than real patients) and lets nuisances ride along with c. This
generator keeps everything a patient has that the scores do not predict, and moves only what they do predict:

1. **Registration.** Every image is aligned to the mean image by a similarity transform (scale, rotation,
   shift) fitted by gradient descent on the squared difference at a small size (``register_size``), in three
   rounds that re-estimate the template. Pose = (log scale, angle, tx, ty), see :mod:`models.warp`. Then the
   poses are refined on the pixels the scores do *not* predict (:func:`refine_pose_on_unexplained`): a heart
   that grows with c would otherwise pull the pose along with it, and the edit would move the whole body when
   only the heart should change.
2. **Linear conditional means given the PLS scores** (least squares on ``[1, c]``, one fit per part):
   the aligned appearance (template-frame patterns ``B_t``), the image-frame residual the template model leaves
   (``B_i``: structures fixed to the image, such as a burned-in marker), the pose (``B_p``) and the noise level
   (``B_s``, robust SD of the high-pass residual). These are E[part | c]: what the data say moves with c.
   The nuisance parts — each pose parameter and the noise level — follow a component only where they change
   *materially* with it: by at least ``material_sd`` of their spread over the component's published range
   (2.5–97.5 % of its scores). Below that the data show a weak correlation that registration and noise
   estimation cannot tell apart from the appearance change, and a sweep that moves the body or the noise with
   it would present a nuisance as what the CNN learned; a component that truly goes with body size keeps it.
3. **Editing a patient** from its own scores c₀ to c: the smooth part S (Gaussian blur) gains the appearance
   change (template pattern placed at the patient's pose, plus the image-frame pattern), the high-pass residual
   is rescaled to the predicted noise level, and the whole image is moved by the pose change with band-limited
   resampling that keeps the noise texture (:func:`models.warp.apply_similarity`). At c = c₀ the edit is the
   identity: the patient itself.
4. **The noise z selects the patient**: ``u = Φ(z₁)`` is uniform for z ~ N(0, 1), and patient ``⌊u·n⌋`` of the
   pool is edited. Seeds therefore differ exactly as real patients differ (diversity by construction), and a
   sweep is a patient-centred counterfactual. A NaN in c means "this component at the patient's own score".

The pool holds real images (uint8, in the module's buffers) that are not in the FID reference set. It ships
with the explanation, like the DVC-pinned data it comes from.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import GENERATOR_META, GENERATOR_WEIGHTS
from .files import write_atomic, write_text_atomic
from .sizes import (MAX_MODEL_BYTES, SizeError, check_file_fits, check_model_bytes, check_sizes,
                    module_bytes_on_meta, read_json)
from .warp import apply_similarity, compose, invert, similarity_matrix, warp_from_template

KIND = "patient"


@dataclass
class PatientGeneratorConfig:
    register_size: int = 32        # images are registered at this size (poses are size-independent)
    register_rounds: int = 3
    register_iters: int = 120      # Adam steps in the first round; later rounds start close and take half
    register_lr: float = 0.02
    blur_sigma: float = 0.8        # px at the working resolution: splits smooth anatomy from noise texture
    max_noise_gain: float = 3.0
    refine_rounds: int = 3         # pose refinements on the pixels the scores do not predict (0: none)
    unexplained_power: float = 4.0  # weight = (unexplained share of a pixel's variance) ** power
    material_sd: float = 0.25      # a pose/noise slope is kept when it moves ≥ this many SD over the sweep range


def _log(msg: str) -> None:
    print(f"[figan] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- image parts

def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate borders (per channel)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def noise_level(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Robust SD (1.4826 · MAD) of each image's high-pass residual x − blur(x): (N,)."""
    n = (x - gaussian_blur(x, sigma)).flatten(1)
    return 1.4826 * (n - n.median(1, keepdim=True).values).abs().median(1).values


def _sample(img: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of img into the template frame of ``pose`` (registration only: smooth is fine)."""
    A = similarity_matrix(pose)[:, :2]
    return F.grid_sample(img, F.affine_grid(A, list(img.shape), align_corners=False), mode="bilinear",
                         padding_mode="border", align_corners=False)


def _registration_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """Channel mean, area-downsampled to size² when larger: what registration compares."""
    small = x.mean(1, keepdim=True)
    return F.interpolate(small, size=(size, size), mode="area") if small.shape[-1] > size else small


def fit_pose(small: torch.Tensor, template: torch.Tensor, iters: int, lr: float,
             pose: torch.Tensor | None = None, centre: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Adam on the (N, 4) poses minimising each image's (pixel-weighted) squared difference to the template in
    its frame."""
    p = (torch.zeros(len(small), 4) if pose is None else pose.clone()).requires_grad_(True)
    w = torch.ones_like(template) if weight is None else weight
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(iters):
        loss = (w * (_sample(small, p) - template) ** 2).mean(dim=(1, 2, 3)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if centre:
            with torch.no_grad():
                p -= p.mean(0, keepdim=True)
    return p.detach()


def registration_residual(small: torch.Tensor, template: torch.Tensor, pose: torch.Tensor,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) mean (pixel-weighted) squared difference between each registered image and the template."""
    w = torch.ones_like(template) if weight is None else weight
    with torch.no_grad():
        return (w * (_sample(small, pose) - template) ** 2).mean(dim=(1, 2, 3))


def register(x: torch.Tensor, cfg: PatientGeneratorConfig, progress: bool = True) -> torch.Tensor:
    """Similarity pose (N, 4) of every image relative to the (re-estimated) mean template; poses are centred.

    All images are fitted at once (one Adam optimiser over the N x 4 poses, the loss a sum of independent
    per-image terms): a batched image registration in a few lines, which no installed library offers."""
    t0 = time.time()
    small = _registration_image(x, cfg.register_size)
    pose = torch.zeros(len(x), 4)
    for r in range(cfg.register_rounds):
        template = _sample(small, pose).mean(0, keepdim=True).detach()
        iters = cfg.register_iters if r == 0 else max(1, cfg.register_iters // 2)
        pose = fit_pose(small, template, iters, cfg.register_lr, pose, centre=True)
        if progress:
            _log(f"registration round {r + 1}/{cfg.register_rounds}: mean squared residual "
                 f"{registration_residual(small, template, pose).mean().item():.5f} ({time.time() - t0:.0f} s)")
    return pose


def _lstsq(X1: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(X1.double(), Y.double()).solution.float()


def unexplained_weight(aligned: torch.Tensor, scores: torch.Tensor, power: float) -> torch.Tensor:
    """Per-pixel weight (1, 1, r, r), mean 1: the share of each template pixel's variance across images that the
    scores' linear model leaves unexplained, raised to ``power``. Near 0 where the scores predict the pixel
    (the parts the CNN's features see change), near 1 where they do not (body outline, background)."""
    X1 = torch.cat([torch.ones(len(scores), 1), scores.float()], 1)
    flat = aligned.flatten(1)
    fitted = X1 @ _lstsq(X1, flat)
    explained = (fitted - fitted.mean(0)).pow(2).mean(0)
    unexplained = (flat - fitted).pow(2).mean(0)
    w = (unexplained / (unexplained + explained).clamp_min(1e-12)) ** power
    return (w / w.mean().clamp_min(1e-12)).view(1, *aligned.shape[1:])


def material_slopes(slopes: torch.Tensor, spread: torch.Tensor, span: torch.Tensor, material_sd: float) -> torch.Tensor:
    """Zero each slope (k, p) whose move over its component's range ``span`` (k,) is below ``material_sd`` of the
    part's ``spread`` (p,): a weak correlation with a nuisance is not shown as part of the component."""
    move = slopes.abs() * span[:, None] / spread.clamp_min(1e-12)[None, :]
    return torch.where(move >= material_sd, slopes, torch.zeros_like(slopes))


def refine_pose_on_unexplained(x: torch.Tensor, scores: torch.Tensor, pose: torch.Tensor,
                               cfg: PatientGeneratorConfig, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine the poses of :func:`register` on the pixels the scores do not predict; returns (pose, weight).

    Why: a plain registration matches every pixel, so when a component grows the heart the fit shifts and
    scales the whole image a little to meet the mean template halfway. That pull becomes part of the pose's
    dependence on c, and an edit along c then moves the body (on the 64² phantom, 5× the vertical shift that
    truly goes with the component). Weighting the loss by :func:`unexplained_weight` leaves the pose to the
    pixels that only pose and patient explain. Each round re-estimates the template and the weight."""
    t0 = time.time()
    small = _registration_image(x, cfg.register_size)
    weight = torch.ones(1, 1, *small.shape[-2:])
    for r in range(cfg.refine_rounds):
        aligned = torch.cat([_sample(small[i:i + 1024], pose[i:i + 1024]) for i in range(0, len(small), 1024)])
        weight = unexplained_weight(aligned, scores, cfg.unexplained_power)
        template = aligned.mean(0, keepdim=True)
        pose = fit_pose(small, template, max(1, cfg.register_iters // 2), cfg.register_lr, pose, centre=True,
                        weight=weight)
        if progress:
            _log(f"pose refinement {r + 1}/{cfg.refine_rounds} on the pixels the scores do not predict "
                 f"(weight {float(weight.min()):.2f}–{float(weight.max()):.2f}; {time.time() - t0:.0f} s)")
    return pose, weight


# --------------------------------------------------------------------------------------------- the generator

class PatientGenerator(nn.Module):
    """G(z, c) → images in [-1, 1] (the cGAN's convention): patient ⌊Φ(z₁)·n⌋ of the pool edited to scores c."""

    def __init__(self, k: int, image_shape: tuple[int, int, int], n_pool: int, blur_sigma: float = 0.8,
                 max_noise_gain: float = 3.0, register_size: int = 32):
        super().__init__()
        c, h, w = image_shape
        self.k, self.image_shape = int(k), (int(c), int(h), int(w))
        self.blur_sigma, self.max_noise_gain = float(blur_sigma), float(max_noise_gain)
        self.register_size = min(int(register_size), int(h))
        register_size = self.register_size
        d = c * h * w
        self.register_buffer("pool_images", torch.zeros(n_pool, c, h, w, dtype=torch.uint8))
        self.register_buffer("pool_scores", torch.zeros(n_pool, k))
        self.register_buffer("pool_pose", torch.zeros(n_pool, 4))
        self.register_buffer("pool_noise", torch.ones(n_pool))
        self.register_buffer("template_patterns", torch.zeros(k, d))    # B_t: aligned appearance per unit score
        self.register_buffer("image_patterns", torch.zeros(k, d))       # B_i: image-frame residual per unit score
        self.register_buffer("pose_slopes", torch.zeros(k, 4))          # B_p
        self.register_buffer("noise_slopes", torch.zeros(k))            # B_s
        # placing a new image (an upload): the registration template and the residual real images stay under
        self.register_buffer("registration_template", torch.zeros(1, 1, register_size, register_size))
        self.register_buffer("registration_weight", torch.ones(1, 1, register_size, register_size))
        self.register_buffer("residual_threshold", torch.tensor(float("inf")))

    # -- fitting
    @classmethod
    def fit(cls, images: torch.Tensor, scores: torch.Tensor, pool: np.ndarray,
            cfg: PatientGeneratorConfig = PatientGeneratorConfig(), pose: torch.Tensor | None = None,
            progress: bool = True) -> "PatientGenerator":
        """Fit on float images (N, C, H, W) in [0, 1] and their scores (N, k); ``pool``: indices of the images
        that may be edited (seeds). ``pose``: precomputed registration (e.g. cached per dataset)."""
        x = images.float()
        c = torch.as_tensor(scores, dtype=torch.float32)
        if len(x) != len(c):
            raise ValueError(f"images ({len(x)}) and scores ({len(c)}) must match row for row")
        n, k = len(x), c.shape[1]
        if pose is None:
            pose = register(x, cfg, progress)
        weight = None
        if cfg.refine_rounds > 0:
            pose, weight = refine_pose_on_unexplained(x, c, pose, cfg, progress)
        X1 = torch.cat([torch.ones(n, 1), c], 1)
        aligned = torch.cat([_sample(x[i:i + 512], pose[i:i + 512]) for i in range(0, n, 512)])
        fit_t = _lstsq(X1, aligned.flatten(1))
        mean_back = torch.cat([warp_from_template((X1[i:i + 256] @ fit_t).view(-1, *x.shape[1:]), pose[i:i + 256])
                               for i in range(0, n, 256)])
        fit_i = _lstsq(X1, (x - mean_back).flatten(1))
        sig = noise_level(x, cfg.blur_sigma)
        G = cls(k, tuple(x.shape[1:]), len(pool), cfg.blur_sigma, cfg.max_noise_gain, cfg.register_size)
        small = _registration_image(x, G.register_size)
        template = _sample(small, pose).mean(0, keepdim=True)
        weight = torch.ones_like(template) if weight is None else weight
        residual = registration_residual(small, template, pose, weight)
        span = torch.quantile(c, 0.975, dim=0) - torch.quantile(c, 0.025, dim=0)              # (k,)
        pixel = 2.0 / x.shape[-1]          # one pixel at the image's edge, in pose units: the least spread counted
        pose_slopes = material_slopes(_lstsq(X1, pose)[1:], pose.std(0).clamp_min(pixel), span, cfg.material_sd)
        noise_slopes = material_slopes(_lstsq(X1, sig[:, None])[1:], sig.std().view(1), span, cfg.material_sd)
        pool_t = torch.as_tensor(np.asarray(pool), dtype=torch.long)
        with torch.no_grad():
            G.pool_images.copy_((x[pool_t] * 255).round().clamp(0, 255).to(torch.uint8))
            G.pool_scores.copy_(c[pool_t])
            G.pool_pose.copy_(pose[pool_t])
            G.pool_noise.copy_(sig[pool_t].clamp_min(1e-6))
            G.template_patterns.copy_(fit_t[1:])
            G.image_patterns.copy_(fit_i[1:])
            G.pose_slopes.copy_(pose_slopes)
            G.noise_slopes.copy_(noise_slopes[:, 0])
            G.registration_template.copy_(template)
            G.registration_weight.copy_(weight)
            G.residual_threshold.fill_(float(torch.quantile(residual, 0.99)))
        return G

    # -- generating
    def patient_index(self, z: torch.Tensor) -> torch.Tensor:
        """u = Φ(z₁) ~ U(0, 1) for z ~ N(0, 1) → a pool index: seeds pick patients uniformly."""
        u = 0.5 * (1 + torch.erf(z[:, 0].double() / math.sqrt(2)))
        return (u * len(self.pool_images)).long().clamp(0, len(self.pool_images) - 1)

    def edit(self, idx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Pool patients ``idx`` edited to scores c (NaN = the patient's own score) → images in [0, 1]."""
        return self._edit(self.pool_images[idx].float() / 255.0, self.pool_scores[idx], self.pool_pose[idx],
                          self.pool_noise[idx], c)

    def place(self, x: torch.Tensor, iters: int = 240, lr: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Register new images (B, C, H, W) in [0, 1] to the template: their pose (B, 4), registration residual
        (B,) and whether it is within what 99 % of the real images reached (B,) bool. An image of another kind
        registers poorly; say so rather than present its edit as an explanation of it."""
        if not torch.isfinite(self.residual_threshold):
            raise ValueError("this patient generator was saved without its registration template; re-run the "
                             "explanation to place new images")
        small = _registration_image(x.float(), self.register_size)
        pose = fit_pose(small, self.registration_template, iters, lr, weight=self.registration_weight)
        residual = registration_residual(small, self.registration_template, pose, self.registration_weight)
        return pose, residual, residual <= self.residual_threshold

    def edit_image(self, x: torch.Tensor, pose: torch.Tensor, c0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Any image x (B, C, H, W) in [0, 1], placed at ``pose`` (see :meth:`place`) with its own scores c0,
        edited to scores c (NaN = its own score): the patient-centred counterfactual of that image."""
        sigma = noise_level(x.float(), self.blur_sigma).clamp_min(1e-6)
        return self._edit(x.float(), c0.float(), pose, sigma, c)

    def sweep_image(self, x: torch.Tensor, own: torch.Tensor, values: torch.Tensor,
                    components: list[int] | None = None) -> tuple[torch.Tensor, dict]:
        """Patient-centred sweeps of one image x (1, C, H, W) in [0, 1] with its own scores ``own`` (k,): placed
        on the template, then edited along each of ``components`` (default all) over its row of ``values``
        (len(components), F), the other components at its own scores. Returns frames (n, F, C, H, W) in [0, 1]
        and the placement (registration residual, the threshold 99 % of real images reach, trusted)."""
        comps = list(range(self.k)) if components is None else list(components)
        n, F = values.shape
        if n != len(comps):
            raise ValueError(f"values has {n} rows for {len(comps)} components")
        with torch.inference_mode(False), torch.enable_grad():
            pose, residual, trusted = self.place(x)
        own = own.float().reshape(1, self.k)
        c = own.repeat(n * F, 1)
        c[torch.arange(n * F), torch.as_tensor(comps).repeat_interleave(F)] = values.reshape(-1).float()
        with torch.no_grad():
            frames = self.edit_image(x.expand(n * F, -1, -1, -1), pose.expand(n * F, -1), own.expand(n * F, -1), c)
        placement = {"registration_residual": round(float(residual[0]), 6),
                     "threshold": round(float(self.residual_threshold), 6), "trusted": bool(trusted[0])}
        return frames.reshape(n, F, *frames.shape[1:]), placement

    def _edit(self, x: torch.Tensor, c0: torch.Tensor, pose0: torch.Tensor, sig0: torch.Tensor,
              c: torch.Tensor) -> torch.Tensor:
        c = torch.where(torch.isnan(c), c0, c.float())
        d = c - c0
        smooth = gaussian_blur(x, self.blur_sigma)
        texture = x - smooth
        shape = x.shape[1:]
        smooth = smooth + warp_from_template((d @ self.template_patterns).view(-1, *shape), pose0) \
            + (d @ self.image_patterns).view(-1, *shape)
        gain = ((sig0 + d @ self.noise_slopes) / sig0).clamp(0, self.max_noise_gain).view(-1, 1, 1, 1)
        move = compose(pose0 + d @ self.pose_slopes, invert(pose0))
        return apply_similarity(smooth + gain * texture, move).clamp(0, 1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.ndim != 2 or c.shape[1] != self.k:
            raise ValueError(f"c must be (N, {self.k}), got {tuple(c.shape)}")
        return self.edit(self.patient_index(z), c.to(self.pool_scores.device)) * 2 - 1


# --------------------------------------------------------------------------------------------- files

def save_patient_generator(G: PatientGenerator, out_dir: str | Path, config: dict) -> Path:
    """generator.pt (buffers) + generator.json ({"kind": "patient", "config": <CGANConfig-compatible dict>})."""
    out = Path(out_dir)
    write_atomic(out / GENERATOR_WEIGHTS, lambda f: torch.save(G.state_dict(), f))
    write_text_atomic(out / GENERATOR_META, json.dumps(
        {"kind": KIND, "config": config, "step": 0,
         "patient": {"k": G.k, "image_shape": list(G.image_shape), "n_pool": len(G.pool_images),
                     "blur_sigma": G.blur_sigma, "max_noise_gain": G.max_noise_gain,
                     "register_size": G.register_size}}, indent=2))
    return out


def check_patient_meta(meta: Any) -> None:
    """The ``patient`` section of generator.json: k, pool size, image shape and registration size within
    :mod:`models.sizes`' bounds (:class:`~models.sizes.SizeError` otherwise)."""
    if not isinstance(meta, dict):
        raise SizeError("generator.json: a patient generator needs a 'patient' object")
    check_sizes(meta, "generator.json patient")
    shape = meta.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3):
        raise SizeError(f"generator.json patient: image_shape must be [C, H, W], got {str(shape)[:80]}")
    check_sizes({"image_channels": shape[0]}, "generator.json patient image_shape")
    for side in shape[1:]:
        check_sizes({"image_side": side}, "generator.json patient image_shape")


def load_patient_generator(out_dir: str | Path, device="cpu", max_bytes: int = MAX_MODEL_BYTES) -> PatientGenerator:
    """The saved patient generator; sizes, the bytes its buffers would take (at most ``max_bytes``) and the size
    of generator.pt are checked before anything is allocated."""
    d = Path(out_dir)
    raw = read_json(d / GENERATOR_META)
    meta = raw.get("patient") if isinstance(raw, dict) else None
    check_patient_meta(meta)

    def build() -> PatientGenerator:
        return PatientGenerator(meta["k"], tuple(meta["image_shape"]), meta["n_pool"], meta["blur_sigma"],
                                meta["max_noise_gain"], meta.get("register_size", 32))

    nbytes = module_bytes_on_meta(build)
    check_model_bytes(nbytes, "generator.json", max_bytes)
    check_file_fits(d / GENERATOR_WEIGHTS, nbytes)
    G = build()
    state = torch.load(d / GENERATOR_WEIGHTS, map_location="cpu", weights_only=True)
    placing = {"registration_template", "residual_threshold", "registration_weight"}   # absent from older files
    G.load_state_dict(state, strict=not (set(G.state_dict()) - set(state)) <= placing)
    return G.to(device).eval()
