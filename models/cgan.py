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
  Before the EMA generator is scored or saved its BatchNorm statistics are re-estimated from its own activations
  (:meth:`CGAN.inference_generator`); the live G's buffers belong to other weights.
* **DiffAugment** (Zhao et al. 2020), translation by default, applied to real and fake alike: a few thousand
  medical images are "small data" for a GAN, and differentiable augmentation keeps D from memorising them.
  Colour/cutout are opt-in: cutout hides anatomy the conditioning depends on.
* **Upsample + 3x3 conv** instead of transposed convolutions: no checkerboard artefacts in deviation images.
* **Auxiliary segmentation**: when the dataset has masks, G emits extra channels (one per mask label, in
  [-1, 1] like the image) that D sees as extra input channels, so image and mask are generated jointly.

Training state lives in one checkpoint (G, D, EMA, both optimisers, the data/noise RNG state, step, FID trace).
All randomness of a step (batch indices, z, augmentation) comes from one `torch.Generator`, so a run resumed
from a checkpoint is bit-identical to an uninterrupted one on CPU.

**On CUDA** (chosen automatically from the device) the same step runs at the hardware's pace: the dataset sits on
the GPU (no loader), bf16 autocast, channels_last, fused Adam, a multi-tensor EMA, cuDNN autotuning, no host sync
inside the step (losses stay on the device and are read every ``log_every`` steps), G's upsample+conv blocks as
sub-pixel convolutions (same function and multiply-adds; see ``UpBlock``), and ``torch.compile`` of G, R, D and
the D step's pair of D calls *separately* (compiling the whole step, with its two backward passes, does not work).
Compilation happens in a warm-up on a copy of the training state before the first step; if it fails, training goes
on eagerly with a warning. ``FIGAN_COMPILE=0`` switches compilation off. CUDA graphs were not used: at the batch
sizes that fill an H100 (512 at 128²) a step is tens of milliseconds and the profile shows no launch gaps.
D is frozen during G's backward (its weight gradients were discarded anyway), and G's forward in the D step runs
without a graph; neither changes a value. CPU results are bit-identical to the earlier eager-only trainer.

**Several processes** (``torchrun`` + DistributedDataParallel, see ``models/cgan_ddp.py``): when a process group
is initialised, ``cfg.batch_size`` is the *global* batch. Every rank draws the global batch's random numbers from
the same seeded generator and keeps its own rows, G's batch-norm statistics are taken over all ranks, and DDP
averages the gradients, so a run on W processes computes what one process computes with the same global batch
(up to floating-point summation order). Rank 0 scores FID and writes the checkpoints.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, asdict, field
from pathlib import Path
import warnings
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from tqdm.auto import tqdm

from .layout import GENERATOR_META, GENERATOR_WEIGHTS, KEPT_GENERATOR, TRAINING_STATE
from .files import write_atomic, write_text_atomic
from .sizes import (MAX_MODEL_BYTES, SizeError, check_file_fits, check_model_bytes, check_sizes,
                    module_bytes_on_meta, read_json)


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


# Nearest 2x upsampling followed by a 3x3 convolution (padding 1) equals, for each of the four output phases
# (py, px), a 3x3 convolution of the *low-resolution* input whose taps are sums of the original ones:
# output row 2i+py reads low-res rows i-1, i, i (py=0) or i, i, i+1 (py=1) for the kernel rows 0, 1, 2.
# _SUBPIXEL_TAPS[p][a'][a] = 1 when kernel row a lands on low-res offset a'-1 in phase p (columns alike).
_SUBPIXEL_TAPS = ((((1, 0, 0), (0, 1, 1), (0, 0, 0))), (((0, 0, 0), (1, 1, 0), (0, 0, 1))))


def subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) weights of upsample+conv → (4 Cout, Cin, 3, 3) weights of the low-res conv, phase-major."""
    t = torch.tensor(_SUBPIXEL_TAPS, dtype=w.dtype, device=w.device)
    return torch.einsum("pxa,qyb,ocab->pqocxy", t, t, w).reshape(4 * w.shape[0], w.shape[1], 3, 3)


def pixel_shuffle_phases(x: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) with channel (py*2 + px)*C + c → (B, C, 2h, 2w), in x's memory format (one copy)."""
    b, c4, h, w = x.shape
    c = c4 // 4
    if x.is_contiguous(memory_format=torch.channels_last):
        out = torch.empty((b, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        out.permute(0, 2, 3, 1).view(b, h, 2, w, 2, c).copy_(
            x.permute(0, 2, 3, 1).view(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5))
        return out
    return x.view(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c, 2 * h, 2 * w)


class UpBlock(nn.Module):
    """Nearest 2x upsampling, 3x3 conv, conditional BN, ReLU.

    ``subpixel`` (set on CUDA by CGAN): the same function computed as one 3x3 conv of the low-resolution input with
    4x the output channels, then a pixel shuffle: the same multiply-adds, but the 4x larger upsampled tensor is
    never written (nor its gradient scattered back), and the GEMM is 4x wider, which is what the tensor cores need
    at the high-resolution, few-channel end of G. Equal up to float rounding; the CPU path keeps the plain form."""

    subpixel = False

    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.norm = CondBatchNorm(cout, cond_dim)

    def forward(self, x, e):
        if self.subpixel:
            wt = subpixel_weight(self.conv.weight)
            if self.conv.weight.is_contiguous(memory_format=torch.channels_last):
                # the module was put in channels_last: keep the conv there (G's first block gets an NCHW view
                # of the fc output; without this G would run NCHW and cuDNN would transpose around every conv)
                x, wt = x.contiguous(memory_format=torch.channels_last), wt.contiguous(memory_format=torch.channels_last)
            x = pixel_shuffle_phases(F.conv2d(x, wt, padding=1))
        else:
            x = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return F.relu(self.norm(x, e))


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


class _DPair(nn.Module):
    """D on the augmented real and fake batch in one forward (in that order), so DDP sees one forward per backward."""

    def __init__(self, D: nn.Module):
        super().__init__()
        self.D = D

    def forward(self, real, fake, c):
        return self.D(real, c), self.D(fake, c)


class _SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-time statistics are those of the global batch over all processes.

    Unlike ``nn.SyncBatchNorm`` it runs on any backend (gloo on CPU too, which the tests use). Two differentiable
    all-reduces (sum, then the centred sum of squares) per layer; every rank holds an equal share of the batch.
    The buffers are BatchNorm2d's, so state dicts stay interchangeable with the single-process model."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        with warnings.catch_warnings():             # "deprecated": its successor has no autograd
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce
        xf = x.float()
        n = xf.numel() // xf.shape[1] * dist.get_world_size()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            mean = all_reduce(xf.sum((0, 2, 3))) / n
            d = xf - mean[None, :, None, None]
            var = all_reduce((d * d).sum((0, 2, 3))) / n
        y = d * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * (n / max(n - 1, 1)), self.momentum)
            self.num_batches_tracked += 1
        return y.to(x.dtype)


def _sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` by a _SyncBatchNorm2d with the same state (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, _SyncBatchNorm2d):
            new = _SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(child.running_mean.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            _sync_batchnorm(child)
    return module


def lr_for_batch(lr: float, batch_size: int, base_batch: int = 64, max_mult: float = 2.0) -> float:
    """Learning rate for a larger batch: square-root scaling from ``base_batch``, at most ``max_mult`` x.

    Adam normalises the step size, so linear scaling overshoots; sqrt scaling keeps the noise scale of the update
    roughly constant, and the cap keeps hinge/spectral-norm GANs in their stable range (BigGAN trains D at 4e-4
    with batches of 2048)."""
    return lr * min(max_mult, math.sqrt(max(batch_size, 1) / base_batch))


# --------------------------------------------------------------------------------------------- DiffAugment
# ``shard = (lo, hi, total)``: x holds rows lo..hi of a batch of ``total`` (one rank's share under DDP); the random
# numbers are drawn for the whole batch and sliced, so every rank's generator stays in step with one process's.

def _draw(fn, shape, g, x, shard):
    t = fn(shape if shard is None else (shard[2],) + tuple(shape[1:]), g)
    return (t if shard is None else t[shard[0]:shard[1]]).to(x.device)


def _translation(x, g, ratio=0.125, shard=None):
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = _draw(lambda s, g: torch.randint(-sh, sh + 1, s, generator=g, device=g.device), (n, 1, 1), g, x, shard)
    ty = _draw(lambda s, g: torch.randint(-sw, sw + 1, s, generator=g, device=g.device), (n, 1, 1), g, x, shard)
    gx, gy = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx[None] + tx + 1, 0, h + 1)
    gy = torch.clamp(gy[None] + ty + 1, 0, w + 1)
    xp = F.pad(x, [1, 1, 1, 1])
    flat = xp.permute(0, 2, 3, 1).reshape(n, (h + 2) * (w + 2), -1)
    idx = (gx * (w + 2) + gy).reshape(n, -1, 1).expand(-1, -1, x.shape[1])
    return flat.gather(1, idx).reshape(n, h, w, -1).permute(0, 3, 1, 2)


def _color(x, g, shard=None):
    n = x.shape[0]
    rand = lambda s, g: torch.rand(s, generator=g, device=g.device)
    b = (_draw(rand, (n, 1, 1, 1), g, x, shard) - 0.5) * 0.5
    s = _draw(rand, (n, 1, 1, 1), g, x, shard) + 0.5
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * s + m + b


def _cutout(x, g, ratio=0.25, shard=None):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = _draw(lambda s, g: torch.randint(0, h + 1 - ch, s, generator=g, device=g.device), (n, 1, 1), g, x, shard)
    oy = _draw(lambda s, g: torch.randint(0, w + 1 - cw, s, generator=g, device=g.device), (n, 1, 1), g, x, shard)
    gx, gy = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    inside = (gx[None] >= ox) & (gx[None] < ox + ch) & (gy[None] >= oy) & (gy[None] < oy + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_AUGMENTS = {"translation": _translation, "color": _color, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: str, g: torch.Generator,
                 shard: tuple[int, int, int] | None = None) -> torch.Tensor:
    for name in filter(None, policy.split(",")):
        x = _AUGMENTS[name](x, g, shard=shard)
    return x


# --------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    step: int
    start_step: int = 0             # > 0 when this call resumed from a checkpoint
    fid_trace: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_fid: float | None = None
    img_per_s: float = 0.0          # training loop only (after the regressor fit and the compile warm-up)
    seconds: float = 0.0
    regressor_r2: list[float] | None = None
    losses: list[dict] = field(default_factory=list)
    compile_seconds: float = 0.0    # torch.compile warm-up (0 when not compiled)
    timed_out: bool = False         # stopped by time_limit_s before cfg.steps


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CGAN:
    """G, D, EMA-G and their optimisers, with save/load of the full training state.

    ``precision``: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16". ``channels_last`` and
    ``compile`` default to on for CUDA (compile: single process only, and not when FIGAN_COMPILE=0); ``compile``
    may also name a torch.compile backend. ``subpixel`` (default: on for CUDA) computes G's upsample+conv blocks
    as sub-pixel convolutions (``UpBlock``). ``ddp``: None = use DistributedDataParallel when a process group with
    more than one rank is initialised."""

    def __init__(self, cfg: CGANConfig, device: str | torch.device = "cpu", *, precision: str = "auto",
                 channels_last: bool | None = None, compile: bool | str | None = None, ddp: bool | None = None,
                 subpixel: bool | None = None):
        self.cfg = cfg.validate()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.amp = precision == "bf16" or (precision == "auto" and self.cuda)
        self.channels_last = self.cuda if channels_last is None else bool(channels_last)
        self.rank, self.world = _dist_world()
        if ddp is False:
            self.rank, self.world = 0, 1
        elif ddp and self.world == 1:
            raise ValueError("ddp=True needs an initialised torch.distributed process group with > 1 rank")
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes {self.world}")
        local = cfg.batch_size // self.world
        self._rows = slice(self.rank * local, (self.rank + 1) * local) if self.world > 1 else None
        self._shard = (self.rank * local, (self.rank + 1) * local, cfg.batch_size) if self.world > 1 else None
        torch.manual_seed(cfg.seed)
        self.G = Generator(cfg).to(self.device)
        self.D = Discriminator(cfg).to(self.device)
        if self.world > 1:
            _sync_batchnorm(self.G)
        for b in self.G.blocks:                         # G's upsampling as a sub-pixel conv (same function)
            b.subpixel = self.cuda if subpixel is None else bool(subpixel)
        if self.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.R = ScoreRegressor(cfg).to(self.device)
        self.regressor_r2: list[float] | None = None      # held-out R² per component; None = not trained yet
        fused = {"fused": True} if self.cuda else {}
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=cfg.betas, **fused)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=cfg.betas, **fused)
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.fid_trace: list[dict] = []
        self.losses: list[dict] = []
        self._ema_pairs = (list(self.G_ema.parameters()), list(self.G.parameters()))
        if compile is None:
            compile = self.cuda and self.world == 1 and os.environ.get("FIGAN_COMPILE", "1") != "0"
        elif compile and self.world > 1:
            warnings.warn("torch.compile is not used under DDP (single process only); training eagerly")
            compile = False
        self.compile_backend = (compile if isinstance(compile, str) else "inductor") if compile else None
        self.compile_seconds = 0.0
        self.compile_error: str | None = None
        self._compiled_ready = False
        self._build_callables()

    def _build_callables(self) -> None:
        """What the step calls: the modules themselves, compiled twins (same parameters), or DDP wrappers."""
        G, D, R, pair = self.G, self.D, self.R, _DPair(self.D)
        if self.compile_backend:
            # the D step's two D calls are compiled as ONE graph: compiled separately, the second call's in-place
            # power-iteration update of spectral norm's u/v bumps a buffer the first call saved for backward
            # ("modified by an inplace operation", seen with inductor)
            G, D, R, pair = (torch.compile(m, backend=self.compile_backend, dynamic=False) for m in (G, D, R, pair))
        self._G, self._D, self._R = G, D, R
        self._G_train, self._D_pair = G, pair
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.cuda else None
            with warnings.catch_warnings():         # broadcast_buffers: "deprecated" from torch 2.13, still right
                warnings.simplefilter("ignore", FutureWarning)
                self._G_train = DDP(self.G, device_ids=ids, broadcast_buffers=False)
                self._D_pair = DDP(_DPair(self.D), device_ids=ids, broadcast_buffers=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        self.rng.set_state(s["rng"].cpu())                 # generator states are CPU byte tensors even for CUDA
        torch.set_rng_state(s["torch_rng"].cpu())
        self.step, self.fid_trace, self.losses = s["step"], list(s["fid_trace"]), list(s["losses"])

    def save_checkpoint(self, path: str | Path) -> Path:
        # atomic: a kill mid-write never corrupts the last good checkpoint
        return write_atomic(path, lambda f: torch.save(self.state_dict(), f))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="cpu", **kw) -> "CGAN":
        s = torch.load(path, map_location=device, weights_only=False)
        gan = cls(CGANConfig.from_dict(s["config"]), device, **kw)
        gan.load_state_dict(s)
        return gan

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, z: torch.Tensor, c: torch.Tensor, ema: bool = True) -> torch.Tensor:
        """Images (and mask channels) in [0, 1], (N, C, H, W), float32 on CPU; ``ema``: the EMA generator as of the
        last checkpoint when one was made at this step (its own BatchNorm statistics), else G_ema."""
        evaluated = getattr(self, "_G_eval", None)
        G = (evaluated[1] if evaluated and evaluated[0] == self.step else self.G_ema) if ema else self.G
        return generate_with(G, z, c, self.device)

    # -- one step ---------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor drawn for the global batch (all of it in a single process)."""
        return t if self._rows is None else t[self._rows]

    def _train_step(self, data_u8: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One D step and one G step; returns the detached losses (on the device: no host sync)."""
        cfg, g, shard = self.cfg, self.rng, self._shard
        idx = self._mine(torch.randint(0, len(data_u8), (cfg.batch_size,), generator=g, device=g.device)).to(data_u8.device)
        real = data_u8[idx].to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        c = cond[idx].to(self.device)
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = self._mine(torch.randn(cfg.batch_size, cfg.z_dim, generator=g, device=g.device)).to(self.device)
        # D step: hinge loss (G's forward needs no graph here)
        with torch.no_grad(), self._autocast():
            fake = self._G(z, c)
        with self._autocast():
            d_real, d_fake = self._D_pair(diff_augment(real, cfg.diffaugment, g, shard),
                                          diff_augment(fake, cfg.diffaugment, g, shard), c)
            loss_d = F.relu(1 - d_real.float()).mean() + F.relu(1 + d_fake.float()).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        # G step: fool D, and carry the requested scores as the frozen regressor R reads them. D is frozen for
        # this backward: its weight gradients would be thrown away (and DDP must not see them)
        z = self._mine(torch.randn(cfg.batch_size, cfg.z_dim, generator=g, device=g.device)).to(self.device)
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                fake = self._G_train(z, c)
                fake_aug = diff_augment(fake, cfg.diffaugment, g, shard)
                d_fake = self._D(fake_aug, c)
                # R reads the augmented image (as it was trained on): a pattern that only fools R at one exact
                # position does not survive, so G has to change the anatomy itself
                loss_cond = F.mse_loss(self._R(fake_aug[:, :cfg.image_channels]).float(), c)
                loss_g = -d_fake.float().mean() + cfg.cond_weight * loss_cond
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        finally:
            self.D.requires_grad_(True)
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
        if self.cuda:                  # one multi-tensor kernel instead of one launch per parameter
            torch._foreach_lerp_(self._ema_pairs[0], self._ema_pairs[1], 1.0 - decay)
        else:
            for pe, p in zip(*self._ema_pairs):
                pe.lerp_(p, 1.0 - decay)
        for be, b in zip(self.G_ema.buffers(), self.G.buffers()):
            be.copy_(b)

    def compile_warmup(self, data_u8: torch.Tensor, cond: torch.Tensor, steps: int = 2) -> float:
        """Compile G, D and R by running ``steps`` real steps on a copy of the state, then restore the state.

        Returns the seconds spent. If compilation fails, falls back to eager modules (warning; ``compile_error``
        says why), so a real run never dies of a compiler problem. No-op when not compiling."""
        if not self.compile_backend or self._compiled_ready:
            return 0.0
        snap = copy.deepcopy(self.state_dict())
        t = time.time()
        try:
            for _ in range(steps):
                self._train_step(data_u8, cond)
            if self.cuda:
                torch.cuda.synchronize(self.device)
        except Exception as e:                  # noqa: BLE001 - any compiler failure: train eagerly instead
            self.compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            warnings.warn(f"torch.compile ({self.compile_backend}) failed, training eagerly: {self.compile_error}")
            self.compile_backend = None
            self._build_callables()
            self.D.requires_grad_(True)
        self.load_state_dict(snap)
        self.compile_seconds = time.time() - t
        self._compiled_ready = True
        return self.compile_seconds

    # -- score regressor ----------------------------------------------------------------------------
    def fit_regressor(self, data_u8: torch.Tensor, cond: torch.Tensor, progress: bool = False) -> list[float]:
        """Fit R on real images → c (90 % of the rows; R² per component on the other 10 %), then freeze it.

        Under DDP every rank fits the same R on the whole data set (same generator state, no communication)."""
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
                pred = torch.cat([self.R(to_x(hold[i:i + 256])) for i in range(0, n_hold, 256)]).float().cpu()
            y = cond[hold.to(cond.device)].cpu()
            r2 = 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
            self.regressor_r2 = [round(float(v), 4) for v in r2]
        else:
            self.regressor_r2 = [float("nan")] * cfg.k
        return self.regressor_r2

    # -- collectives (DDP) ----------------------------------------------------------------------------
    def _all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # -- loop -------------------------------------------------------------------------------------
    def train(self, data_u8: torch.Tensor, cond: torch.Tensor, out_dir: str | Path | None = None,
              fid_fn: Callable[["CGAN"], float] | None = None, progress: bool = True,
              log_every: int = 25, stop_after: int | None = None, time_limit_s: float | None = None,
              on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
        """Train until cfg.steps, checkpointing every cfg.ckpt_every steps into out_dir (last.pt, best.pt).

        ``data_u8``: uint8 (N, C, H, W) images (+ mask channels scaled to 0/255); ``cond``: float (N, k).
        ``fid_fn(gan)`` is called at every checkpoint; the best (lowest) FID's EMA generator is kept as best.pt.
        If ``out_dir/last.pt`` exists, training resumes from it exactly. ``stop_after`` ends the call after that
        many steps (used to simulate a kill in tests). ``time_limit_s`` ends it (with a checkpoint) once the
        training loop has run that long (under DDP it is checked every ``log_every`` steps, by all ranks at once).
        ``on_checkpoint(step)`` is called after every checkpoint is written (e.g. to report progress).
        Under DDP every rank calls this with the same full data; rank 0 alone calls ``fid_fn`` and writes files.
        """
        self._bn_cond = cond
        cfg = self.cfg
        if data_u8.dtype != torch.uint8 or data_u8.ndim != 4 or data_u8.shape[1:] != (cfg.channels, cfg.resolution, cfg.resolution):
            raise ValueError(f"data must be uint8 (N, {cfg.channels}, {cfg.resolution}, {cfg.resolution}), "
                             f"got {tuple(data_u8.shape)} {data_u8.dtype}")
        if cond.ndim != 2 or cond.shape[1] != cfg.k or len(cond) != len(data_u8):
            raise ValueError(f"conditions must be ({len(data_u8)}, k={cfg.k}), got {tuple(cond.shape)}")
        if not torch.isfinite(cond).all():
            raise ValueError("conditions contain NaN/inf")
        out = Path(out_dir) if out_dir is not None else None
        if out is not None and (out / TRAINING_STATE).exists():
            try:                        # our own checkpoint (optimiser state, RNG): not weights-only
                state = torch.load(out / TRAINING_STATE, map_location=self.device, weights_only=False)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
                warnings.warn(f"{out / TRAINING_STATE} is not a whole checkpoint ({str(e)[:200]}); training from "
                              f"the start")
                state = None
            if state is not None:
                self.load_state_dict(state)
        if self.cuda:
            data_u8 = data_u8.to(self.device)      # GPU-resident dataset: no loader to keep up with
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
        cond = cond.float().to(self.device)
        progress = progress and self.is_main
        if self.regressor_r2 is None:
            self.fit_regressor(data_u8, cond, progress)
        if self.step < cfg.steps:
            self.compile_warmup(data_u8, cond)
        t0, start = time.time(), self.step
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train cGAN", disable=not progress, leave=False)
        pending, timed_out = [], False
        while self.step < end:
            pending.append((self.step + 1, *self._train_step(data_u8, cond)))
            bar.update(1)
            if time_limit_s is not None:
                over = time.time() - t0 >= time_limit_s
                timed_out = over if self.world == 1 else (self.step % log_every == 0 and self._any_rank(over))
                if timed_out:
                    end = self.step
            if self.step % log_every == 0 or self.step == end:
                keep = [p for p in pending if p[0] % log_every == 0 or p[0] == end]
                if keep:                             # one host sync per log_every steps
                    vals = self._all_mean(torch.stack([torch.stack([a, b_, c_]).float() for _, a, b_, c_ in keep])).tolist()
                    for (s, *_), (a, b_, c_) in zip(keep, vals):
                        self.losses.append({"step": s, "loss_d": a, "loss_g": b_, "cond_g": c_})
                pending.clear()
                last = self.losses[-1]
                rate = (self.step - start) * cfg.batch_size / max(time.time() - t0, 1e-9)
                bar.set_postfix(d=f"{last['loss_d']:.3f}", g=f"{last['loss_g']:.3f}", cond=f"{last['cond_g']:.3f}",
                                img_s=f"{rate:.0f}")
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or timed_out:
                if self.is_main:
                    self._checkpoint(out, fid_fn)
                    if on_checkpoint is not None:
                        on_checkpoint(self.step)
        bar.close()
        if self.world > 1:
            self._any_rank(False)                    # barrier: rank 0's checkpoint is on disk for everyone
        if self.cuda:
            torch.cuda.synchronize(self.device)
        secs = time.time() - t0
        best = min(self.fid_trace, key=lambda r: r["fid"]) if self.fid_trace else None
        return TrainResult(step=self.step, start_step=start, fid_trace=list(self.fid_trace), best_step=best and best["step"],
                           best_fid=best and best["fid"], seconds=secs, losses=list(self.losses),
                           regressor_r2=self.regressor_r2,
                           img_per_s=(self.step - start) * cfg.batch_size / max(secs, 1e-9),
                           compile_seconds=self.compile_seconds, timed_out=timed_out)

    @torch.no_grad()
    def inference_generator(self, cond: torch.Tensor | None, batches: int = 8) -> nn.Module:
        """The EMA generator as it is scored, saved and served: a plain copy whose BatchNorm statistics are its own.

        Every step copies the live G's running statistics into G_ema (they belong to other weights). A fresh
        Generator gets G_ema's weights and re-estimates its statistics by averaging over ``batches`` batches of
        (z, c ~ the real conditions) drawn from a generator seeded by the step. The training state is untouched,
        so exact resume and DDP (rank 0 alone calls this) give the same result as one uninterrupted process."""
        G = Generator(self.cfg).to(self.device)
        G.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in self.G_ema.state_dict().items()})
        bns = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bns and cond is not None and len(cond):
            g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + int(self.step))
            for m in bns:
                m.reset_running_stats()
            G.train()
            for i in range(batches):
                for m in bns:
                    m.momentum = 1.0 / (i + 1)          # running stats = the mean over the batches so far
                rows = torch.randint(0, len(cond), (self.cfg.batch_size,), generator=g)
                z = torch.randn(len(rows), self.cfg.z_dim, generator=g)
                G(z.to(self.device), cond[rows.to(cond.device)].to(self.device).float())
            for m in bns:
                m.momentum = 0.1
        return G.eval().requires_grad_(False)

    def _checkpoint(self, out: Path | None, fid_fn) -> None:
        self._G_eval = (self.step, self.inference_generator(getattr(self, "_bn_cond", None)))
        if fid_fn is not None and not any(r["step"] == self.step for r in self.fid_trace):
            fid = float(fid_fn(self))
            self.fid_trace.append({"step": self.step, "fid": fid})
            if out is not None and fid <= min(r["fid"] for r in self.fid_trace):
                save_generator(self, out / KEPT_GENERATOR)
        if out is not None:
            if fid_fn is None:
                save_generator(self, out / KEPT_GENERATOR)      # without FID, the latest EMA generator is the one kept
            self.save_checkpoint(out / TRAINING_STATE)


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
    evaluated = getattr(gan, "_G_eval", None)
    G = evaluated[1] if evaluated and evaluated[0] == gan.step else gan.inference_generator(getattr(gan, "_bn_cond", None))
    write_atomic(out / GENERATOR_WEIGHTS, lambda f: torch.save(G.state_dict(), f))
    write_text_atomic(out / GENERATOR_META, json.dumps({"config": gan.cfg.to_dict(), "step": gan.step}, indent=2))
    return out


def read_generator_meta(out_dir: str | Path) -> tuple[dict, CGANConfig]:
    """``generator.json`` of a kept generator and its config, every size field within :mod:`models.sizes`' bounds
    (checked before anything is built; :class:`~models.sizes.SizeError` names the field otherwise)."""
    meta = read_json(Path(out_dir) / GENERATOR_META)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise SizeError("generator.json: not an object with a 'config' object")
    check_sizes(meta["config"], "generator.json config")
    if meta.get("kind") == "patient":
        from .patient_generator import check_patient_meta
        check_patient_meta(meta.get("patient"))
    return meta, CGANConfig.from_dict(meta["config"])


def load_generator(out_dir: str | Path, device="cpu", max_bytes: int = MAX_MODEL_BYTES
                   ) -> tuple[nn.Module, CGANConfig, int]:
    """The kept generator of an explanation (a cGAN's EMA generator or the patient generator) + its config. Sizes
    are checked first (:func:`read_generator_meta`), then the bytes the generator would hold (counted without
    allocating, at most ``max_bytes``) and that ``generator.pt`` is no larger than those."""
    d = Path(out_dir)
    meta, cfg = read_generator_meta(d)
    if meta.get("kind") == "patient":       # the patient generator keeps the same G(z, c) → [-1, 1] contract
        from .patient_generator import load_patient_generator
        return load_patient_generator(d, device, max_bytes), cfg, int(meta["step"])
    nbytes = module_bytes_on_meta(lambda: Generator(cfg))
    check_model_bytes(nbytes, "generator.json", max_bytes)
    check_file_fits(d / GENERATOR_WEIGHTS, nbytes)
    G = Generator(cfg)
    G.load_state_dict(torch.load(d / GENERATOR_WEIGHTS, map_location="cpu", weights_only=True))
    return G.to(device).eval(), cfg, int(meta["step"])


def images_to_u8(images: np.ndarray, masks: np.ndarray | None = None, n_mask_labels: int = 0) -> torch.Tensor:
    """float [0,1] (N,C,H,W) images (+ int masks (N,H,W) → one-hot channels for labels 1..M) → uint8 tensor."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    if masks is None or n_mask_labels == 0:
        return x
    m = torch.from_numpy(np.asarray(masks)).long()
    onehot = torch.stack([(m == lab) for lab in range(1, n_mask_labels + 1)], 1).to(torch.uint8) * 255
    return torch.cat([x, onehot], 1)
