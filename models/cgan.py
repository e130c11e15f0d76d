"""Conditional GAN on continuous PLS scores: G(z, c) and D(x, c), training with exact resume.

Design choices (and why):

* **Conditioning of G**: c (k standardised PLS scores) is embedded by a small MLP; the embedding is concatenated
  with z at the input *and* modulates every upsampling block through conditional batch-norm (FiLM). Each block
  thus sees c directly, which makes sweeps of one component change the image smoothly and strongly.
* **D = projection discriminator** (Miyato & Koyama 2018) with a linear projection of the continuous c.
* **A frozen score regressor R** carries the conditioning. Before the GAN starts, a small CNN R is fitted on the
  *real* images to predict their c (a few hundred steps, translation-augmented, its held-out R² is recorded);
  G's loss then asks R to read the requested c back from the generated images. Projection alone (and an
  auxiliary head inside the spectrally-normalised D, tried first) gave conditioning correlations of 0.0-0.3
  after 400 steps on the 32² phantom: D learns real-vs-fake long before it learns the subtle image → score
  relation, so G gets no conditioning signal early. R is not the audited CNN, and it only ever saw real images,
  so the faithfulness check (the CNN's output along a sweep) and the conditioning check (CNN → PLS on generated
  images) remain independent tests of the result.
* **Hinge loss + spectral norm in D**: the standard stable pair for projection discriminators.
* **EMA of G's weights** with StyleGAN2-ADA's schedule (half-life 10 k images, ramped up over the first images
  seen): sequences, FID and serving use the EMA generator. A fixed decay of 0.999 lagged so far behind G in a
  1 500-step run that its images were dark blurs (FID 2 700 where G itself was already close to the data).
* **DiffAugment** (Zhao et al. 2020), translation by default, applied to real and fake alike: a few thousand
  medical images are "small data" for a GAN, and differentiable augmentation keeps D from memorising them.
  Colour/cutout are opt-in: cutout hides anatomy the conditioning depends on.
* **Upsample + 3x3 conv** instead of transposed convolutions: no checkerboard artefacts in deviation images.
* **Auxiliary segmentation**: when the dataset has masks, G emits extra channels (one per mask label, in
  [-1, 1] like the image) that D sees as extra input channels, so image and mask are generated jointly.

Training state lives in one checkpoint (G, D, EMA, both optimisers, the data/noise RNG state, step, FID trace).
All randomness of a step (batch indices, z, augmentation) comes from one `torch.Generator`, so a run resumed
from a checkpoint is bit-identical to an uninterrupted one on CPU. On CUDA the same code runs with bf16 autocast
and channels_last.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, asdict, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from tqdm.auto import tqdm


# --------------------------------------------------------------------------------------------- config

@dataclass
class CGANConfig:
    resolution: int = 64
    image_channels: int = 1
    mask_channels: int = 0          # auxiliary segmentation channels (0 = none)
    k: int = 2                      # number of conditioning scores
    z_dim: int = 64
    ngf: int = 32
    ndf: int = 32
    batch_size: int = 64
    steps: int = 1500
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.99)
    cond_weight: float = 1.0        # weight of the score-regression term (R reads c back) in G's loss
    regressor_steps: int = 300      # pre-training steps of the score regressor R on real images
    regressor_width: int = 16
    ema_kimg: float = 10.0          # EMA half-life in thousands of images (StyleGAN2-ADA's schedule)
    ema_rampup: float = 0.05        # early on the half-life is at most this fraction of the images seen
    diffaugment: str = "translation"
    ckpt_every: int = 250
    seed: int = 0

    @property
    def channels(self) -> int:
        return self.image_channels + self.mask_channels

    def validate(self) -> "CGANConfig":
        if self.k < 1:
            raise ValueError(f"k (number of conditioning components) must be >= 1, got {self.k}")
        if self.resolution < 16 or self.resolution > 512 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two in 16..512, got {self.resolution}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {self.image_channels}")
        for name in ("z_dim", "ngf", "ndf", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        bad = set(filter(None, self.diffaugment.split(","))) - set(_AUGMENTS)
        if bad:
            raise ValueError(f"diffaugment: unknown policy {sorted(bad)}; known {sorted(_AUGMENTS)}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CGANConfig":
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------- networks

class CondBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a per-sample scale and shift computed from the condition."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.film = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x, e):
        gamma, beta = self.film(e).chunk(2, dim=1)
        return self.bn(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.norm = CondBatchNorm(cout, cond_dim)

    def forward(self, x, e):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.norm(self.conv(x), e))


def _widths(base: int, n: int, cap_mult: int = 8) -> list[int]:
    """DCGAN-like channel widths from the 4x4 end (base*8) halving per doubling of resolution.

    For G, entry i is the width at resolution 4*2^i; the full-resolution features are base/2 wide, which keeps
    the costliest (largest) layer cheap: G and D cost about what a DCGAN of the same base width costs."""
    return [max(1, int(base * min(cap_mult, 2.0 ** (n - 1 - i)))) for i in range(n + 1)]


class Generator(nn.Module):
    def __init__(self, cfg: CGANConfig):
        super().__init__()
        self.cfg = cfg
        n_up = int(math.log2(cfg.resolution)) - 2
        w = _widths(cfg.ngf, n_up)
        self.embed_dim = 128
        self.embed = nn.Sequential(nn.Linear(cfg.k, self.embed_dim), nn.ReLU(), nn.Linear(self.embed_dim, self.embed_dim))
        self.fc = nn.Linear(cfg.z_dim + self.embed_dim, w[0] * 16)
        self.norm0 = CondBatchNorm(w[0], self.embed_dim)
        self.blocks = nn.ModuleList(UpBlock(w[i], w[i + 1], self.embed_dim) for i in range(n_up))
        self.to_img = nn.Conv2d(w[-1], cfg.channels, 3, 1, 1)
        self.w0 = w[0]

    def forward(self, z, c):
        e = self.embed(c)
        h = self.fc(torch.cat([z, e], 1)).view(len(z), self.w0, 4, 4)
        h = F.relu(self.norm0(h, e))
        for b in self.blocks:
            h = b(h, e)
        return torch.tanh(self.to_img(h))


class Discriminator(nn.Module):
    def __init__(self, cfg: CGANConfig):
        super().__init__()
        n_down = int(math.log2(cfg.resolution)) - 2
        w = [cfg.channels] + [cfg.ndf * min(8, 2 ** i) for i in range(n_down)]   # ndf at res/2 ... ndf*8 at 4x4
        layers = []
        for i in range(n_down):
            layers += [spectral_norm(nn.Conv2d(w[i], w[i + 1], 4, 2, 1)), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers)
        feat = w[-1]
        self.out = spectral_norm(nn.Linear(feat, 1))
        self.proj = spectral_norm(nn.Linear(cfg.k, feat, bias=False))    # projection of the continuous condition

    def forward(self, x, c):
        h = self.trunk(x).sum(dim=(2, 3))
        return self.out(h).squeeze(1) + (self.proj(c) * h).sum(1)


class ScoreRegressor(nn.Module):
    """Small CNN (conv-BN-ReLU, strided) mapping an image (image channels only, in [-1, 1]) to its k scores."""

    def __init__(self, cfg: CGANConfig):
        super().__init__()
        w, ch, layers = cfg.regressor_width, cfg.image_channels, []
        res = cfg.resolution
        while res > 4:
            layers += [nn.Conv2d(ch, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            ch, w, res = w, min(w * 2, 8 * cfg.regressor_width), res // 2
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, cfg.k))

    def forward(self, x):
        return self.net(x)


# --------------------------------------------------------------------------------------------- DiffAugment

def _translation(x, g, ratio=0.125):
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), generator=g, device=g.device).to(x.device)
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), generator=g, device=g.device).to(x.device)
    gx, gy = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx[None] + tx + 1, 0, h + 1)
    gy = torch.clamp(gy[None] + ty + 1, 0, w + 1)
    xp = F.pad(x, [1, 1, 1, 1])
    flat = xp.permute(0, 2, 3, 1).reshape(n, (h + 2) * (w + 2), -1)
    idx = (gx * (w + 2) + gy).reshape(n, -1, 1).expand(-1, -1, x.shape[1])
    return flat.gather(1, idx).reshape(n, h, w, -1).permute(0, 3, 1, 2)


def _color(x, g):
    n = x.shape[0]
    b = (torch.rand(n, 1, 1, 1, generator=g, device=g.device).to(x.device) - 0.5) * 0.5
    s = torch.rand(n, 1, 1, 1, generator=g, device=g.device).to(x.device) + 0.5
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * s + m + b


def _cutout(x, g, ratio=0.25):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + 1 - ch, (n, 1, 1), generator=g, device=g.device).to(x.device)
    oy = torch.randint(0, w + 1 - cw, (n, 1, 1), generator=g, device=g.device).to(x.device)
    gx, gy = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    inside = (gx[None] >= ox) & (gx[None] < ox + ch) & (gy[None] >= oy) & (gy[None] < oy + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_AUGMENTS = {"translation": _translation, "color": _color, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: str, g: torch.Generator) -> torch.Tensor:
    for name in filter(None, policy.split(",")):
        x = _AUGMENTS[name](x, g)
    return x


# --------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    step: int
    start_step: int = 0             # > 0 when this call resumed from a checkpoint
    fid_trace: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_fid: float | None = None
    img_per_s: float = 0.0
    seconds: float = 0.0
    regressor_r2: list[float] | None = None
    losses: list[dict] = field(default_factory=list)


class CGAN:
    """G, D, EMA-G and their optimisers, with save/load of the full training state."""

    def __init__(self, cfg: CGANConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg.validate()
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)
        self.G = Generator(cfg).to(self.device)
        self.D = Discriminator(cfg).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.R = ScoreRegressor(cfg).to(self.device)
        self.regressor_r2: list[float] | None = None      # held-out R² per component; None = not trained yet
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.fid_trace: list[dict] = []
        self.losses: list[dict] = []
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "step": self.step, "G": self.G.state_dict(), "D": self.D.state_dict(),
                "G_ema": self.G_ema.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "R": self.R.state_dict(), "regressor_r2": self.regressor_r2,
                "rng": self.rng.get_state(), "torch_rng": torch.get_rng_state(),
                "fid_trace": self.fid_trace, "losses": self.losses}

    def load_state_dict(self, s: dict) -> None:
        self.G.load_state_dict(s["G"])
        self.D.load_state_dict(s["D"])
        self.G_ema.load_state_dict(s["G_ema"])
        self.R.load_state_dict(s["R"])
        self.regressor_r2 = s["regressor_r2"]
        if self.regressor_r2 is not None:
            self.R.eval().requires_grad_(False)
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_d.load_state_dict(s["opt_d"])
        self.rng.set_state(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        self.step, self.fid_trace, self.losses = s["step"], list(s["fid_trace"]), list(s["losses"])

    def save_checkpoint(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)          # atomic: a kill mid-write never corrupts the last good checkpoint
        return path

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="cpu") -> "CGAN":
        s = torch.load(path, map_location=device, weights_only=False)
        gan = cls(CGANConfig.from_dict(s["config"]), device)
        gan.load_state_dict(s)
        return gan

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, z: torch.Tensor, c: torch.Tensor, ema: bool = True) -> torch.Tensor:
        """Images (and mask channels) in [0, 1], (N, C, H, W), float32 on CPU."""
        return generate_with(self.G_ema if ema else self.G, z, c, self.device)

    # -- one step ---------------------------------------------------------------------------------
    def _train_step(self, data_u8: torch.Tensor, cond: torch.Tensor) -> tuple[float, float, float]:
        cfg, g = self.cfg, self.rng
        idx = torch.randint(0, len(data_u8), (cfg.batch_size,), generator=g, device=g.device).to(data_u8.device)
        real = data_u8[idx].to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        c = cond[idx].to(self.device)
        if self.cuda:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(cfg.batch_size, cfg.z_dim, generator=g, device=g.device).to(self.device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)
        # D step: hinge loss
        with amp:
            fake = self.G(z, c).detach()
            d_real = self.D(diff_augment(real, cfg.diffaugment, g), c)
            d_fake = self.D(diff_augment(fake, cfg.diffaugment, g), c)
            loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        # G step: fool D, and carry the requested scores as the frozen regressor R reads them
        z = torch.randn(cfg.batch_size, cfg.z_dim, generator=g, device=g.device).to(self.device)
        with amp:
            fake = self.G(z, c)
            fake_aug = diff_augment(fake, cfg.diffaugment, g)
            d_fake = self.D(fake_aug, c)
            # R reads the augmented image (as it was trained on): a pattern that only fools R at one exact
            # position does not survive, so G has to change the anatomy itself
            loss_cond = F.mse_loss(self.R(fake_aug[:, :cfg.image_channels]).float(), c)
            loss_g = -d_fake.float().mean() + cfg.cond_weight * loss_cond
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self._update_ema()
        self.step += 1
        return loss_d.detach(), loss_g.detach(), loss_cond.detach()

    @torch.no_grad()
    def _update_ema(self):
        cfg = self.cfg
        half_life = cfg.ema_kimg * 1000
        if cfg.ema_rampup:
            half_life = min(half_life, self.step * cfg.batch_size * cfg.ema_rampup)
        decay = 0.5 ** (cfg.batch_size / max(half_life, 1e-8))
        for pe, p in zip(self.G_ema.parameters(), self.G.parameters()):
            pe.lerp_(p, 1.0 - decay)
        for be, b in zip(self.G_ema.buffers(), self.G.buffers()):
            be.copy_(b)

    # -- score regressor ----------------------------------------------------------------------------
    def fit_regressor(self, data_u8: torch.Tensor, cond: torch.Tensor, progress: bool = False) -> list[float]:
        """Fit R on real images → c (90 % of the rows; R² per component on the other 10 %), then freeze it."""
        cfg, g = self.cfg, self.rng
        n = len(data_u8)
        perm = torch.randperm(n, generator=g, device=g.device).to(data_u8.device)
        n_hold = max(1, n // 10) if n >= 20 else 0
        hold, train = perm[:n_hold], perm[n_hold:]
        to_x = lambda ix: data_u8[ix, :cfg.image_channels].to(self.device).float().div_(127.5).sub_(1.0)
        opt = torch.optim.Adam(self.R.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.regressor_steps))
        self.R.train()
        for _ in tqdm(range(cfg.regressor_steps), desc="fit score regressor", disable=not progress, leave=False):
            b = train[torch.randint(0, len(train), (cfg.batch_size,), generator=g, device=g.device).to(train.device)]
            loss = F.mse_loss(self.R(diff_augment(to_x(b), "translation", g)), cond[b].to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        self.R.eval().requires_grad_(False)
        if n_hold:
            with torch.no_grad():
                pred = torch.cat([self.R(to_x(hold[i:i + 256])) for i in range(0, n_hold, 256)]).cpu()
            y = cond[hold.cpu()].cpu()
            r2 = 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
            self.regressor_r2 = [round(float(v), 4) for v in r2]
        else:
            self.regressor_r2 = [float("nan")] * cfg.k
        return self.regressor_r2

    # -- loop -------------------------------------------------------------------------------------
    def train(self, data_u8: torch.Tensor, cond: torch.Tensor, out_dir: str | Path | None = None,
              fid_fn: Callable[["CGAN"], float] | None = None, progress: bool = True,
              log_every: int = 25, stop_after: int | None = None) -> TrainResult:
        """Train until cfg.steps, checkpointing every cfg.ckpt_every steps into out_dir (last.pt, best.pt).

        ``data_u8``: uint8 (N, C, H, W) images (+ mask channels scaled to 0/255); ``cond``: float (N, k).
        ``fid_fn(gan)`` is called at every checkpoint; the best (lowest) FID's EMA generator is kept as best.pt.
        If ``out_dir/last.pt`` exists, training resumes from it exactly. ``stop_after`` ends the call after that
        many steps (used to simulate a kill in tests).
        """
        cfg = self.cfg
        if data_u8.dtype != torch.uint8 or data_u8.ndim != 4 or data_u8.shape[1:] != (cfg.channels, cfg.resolution, cfg.resolution):
            raise ValueError(f"data must be uint8 (N, {cfg.channels}, {cfg.resolution}, {cfg.resolution}), "
                             f"got {tuple(data_u8.shape)} {data_u8.dtype}")
        if cond.ndim != 2 or cond.shape[1] != cfg.k or len(cond) != len(data_u8):
            raise ValueError(f"conditions must be ({len(data_u8)}, k={cfg.k}), got {tuple(cond.shape)}")
        if not torch.isfinite(cond).all():
            raise ValueError("conditions contain NaN/inf")
        out = Path(out_dir) if out_dir is not None else None
        if out is not None and (out / "last.pt").exists():
            self.load_state_dict(torch.load(out / "last.pt", map_location=self.device, weights_only=False))
        if self.cuda:
            data_u8 = data_u8.to(self.device)      # GPU-resident dataset: no loader to keep up with
        cond = cond.float().to(self.device)
        if self.regressor_r2 is None:
            self.fit_regressor(data_u8, cond, progress)
        t0, start = time.time(), self.step
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train cGAN", disable=not progress, leave=False)
        pending = []
        while self.step < end:
            ld, lg, la = self._train_step(data_u8, cond)
            pending.append((self.step, ld, lg, la))
            bar.update(1)
            if self.step % log_every == 0 or self.step == end:
                for s, a, b_, c_ in pending:         # one host sync per log_every steps
                    if s % log_every == 0 or s == end:
                        self.losses.append({"step": s, "loss_d": float(a), "loss_g": float(b_), "cond_g": float(c_)})
                pending.clear()
                last = self.losses[-1]
                rate = (self.step - start) * cfg.batch_size / max(time.time() - t0, 1e-9)
                bar.set_postfix(d=f"{last['loss_d']:.3f}", g=f"{last['loss_g']:.3f}", cond=f"{last['cond_g']:.3f}",
                                img_s=f"{rate:.0f}")
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self._checkpoint(out, fid_fn)
        bar.close()
        secs = time.time() - t0
        best = min(self.fid_trace, key=lambda r: r["fid"]) if self.fid_trace else None
        return TrainResult(step=self.step, start_step=start, fid_trace=list(self.fid_trace), best_step=best and best["step"],
                           best_fid=best and best["fid"], seconds=secs, losses=list(self.losses),
                           regressor_r2=self.regressor_r2,
                           img_per_s=(self.step - start) * cfg.batch_size / max(secs, 1e-9))

    def _checkpoint(self, out: Path | None, fid_fn) -> None:
        if fid_fn is not None and not any(r["step"] == self.step for r in self.fid_trace):
            fid = float(fid_fn(self))
            self.fid_trace.append({"step": self.step, "fid": fid})
            if out is not None and fid <= min(r["fid"] for r in self.fid_trace):
                save_generator(self, out / "best")
        if out is not None:
            if fid_fn is None:
                save_generator(self, out / "best")      # without FID, the latest EMA generator is the one kept
            self.save_checkpoint(out / "last.pt")


# --------------------------------------------------------------------------------------------- serving format

def generate_with(G: nn.Module, z: torch.Tensor, c: torch.Tensor, device="cpu", batch_size: int = 256) -> torch.Tensor:
    was = G.training
    G.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(z), batch_size):
            y = G(z[s:s + batch_size].to(device).float(), c[s:s + batch_size].to(device).float())
            out.append(((y.float() + 1) / 2).clamp_(0, 1).cpu())
    G.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def save_generator(gan: CGAN, out_dir: str | Path) -> Path:
    """The EMA generator alone (what sequences and the service need): generator.pt + generator.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "generator.pt.tmp"
    torch.save(gan.G_ema.state_dict(), tmp)
    os.replace(tmp, out / "generator.pt")
    (out / "generator.json").write_text(json.dumps({"config": gan.cfg.to_dict(), "step": gan.step}, indent=2))
    return out


def load_generator(out_dir: str | Path, device="cpu") -> tuple[Generator, CGANConfig, int]:
    d = Path(out_dir)
    meta = json.loads((d / "generator.json").read_text())
    cfg = CGANConfig.from_dict(meta["config"])
    G = Generator(cfg)
    G.load_state_dict(torch.load(d / "generator.pt", map_location="cpu", weights_only=True))
    return G.to(device).eval(), cfg, int(meta["step"])


def images_to_u8(images: np.ndarray, masks: np.ndarray | None = None, n_mask_labels: int = 0) -> torch.Tensor:
    """float [0,1] (N,C,H,W) images (+ int masks (N,H,W) → one-hot channels for labels 1..M) → uint8 tensor."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    if masks is None or n_mask_labels == 0:
        return x
    m = torch.from_numpy(np.asarray(masks)).long()
    onehot = torch.stack([(m == lab) for lab in range(1, n_mask_labels + 1)], 1).to(torch.uint8) * 255
    return torch.cat([x, onehot], 1)
