"""One FIGAN explanation, offline: dataset + CNN → features → PLS → generator → sequences → checks → artifacts.

Each stage is a function that takes data and returns data (the Prefect flow of the pipeline calls them one by one
as tasks); `explain()` composes them and does the folder I/O. The artifacts folder is self-contained; its layout
(every file and who writes it) is drawn in :mod:`models.layout`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, asdict, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import layout
from . import attribution as A
from . import checks as C
from .cgan import CGAN, CGANConfig, generate_with, images_to_u8, load_generator
from .features import model_output
from .files import load_npy, load_torch, save_npy, write_atomic
from .patient_generator import PatientGenerator, PatientGeneratorConfig, register, save_patient_generator
from .reader import train_reader
from .real_cases import write_real_cases
from .data import ImageDataset
from .features import extract_features
from .fid import FIDScorer, plot_fid_trace, real_floor
from .pls import PLSState, fit_pls, plot_variance, save_pls
from .sequences import render_sweep, sweep_values, write_component


GENERATORS = ("patient", "cgan")


@dataclass
class ExplainConfig:
    # generator: "patient" (registered shape–appearance model of real patients, models.patient_generator) or
    # "cgan" (the pixel cGAN of models.cgan; its knobs are the GAN block below)
    generator: str = "patient"
    register_iters: int = 120            # patient generator: Adam steps per registration round
    # features + PLS
    layer: str | None = None
    layers: str | tuple[str, ...] | None = None   # candidate layers chosen among by FID ("auto" or names)
    n_components: int | None = None
    max_components: int = 8
    # GAN
    resolution: int | None = None       # default: the dataset's size rounded up to a power of two
    steps: int = 1500
    batch_size: int = 64
    ngf: int = 32
    ndf: int = 32
    z_dim: int = 64
    lr: float = 2e-4
    cond_weight: float = 1.0
    regressor_steps: int = 300
    diffaugment: str = "translation"
    ckpt_every: int = 250
    use_masks: bool = True               # train with the auxiliary segmentation when the dataset has masks
    max_images: int | None = None        # train the GAN on a seeded subsample (sample-size ablation)
    # FID
    fid_extractor: str = "inception_v3_pool3"
    fid_input_size: int | None = None    # None = the extractor's native size (299 for Inception)
    fid_samples: int = 2000              # FID n = min(fid_samples, N // 2) with the floor at the same n
    # sequences: by default each component sweeps the 2.5–97.5 % quantiles of its real scores; sweep_lo/sweep_hi
    # (SD units) override that for every component
    sweep_lo: float | None = None
    sweep_hi: float | None = None
    sweep_quantiles: tuple[float, float] = (0.025, 0.975)
    frames: int = 9
    seeds: tuple[int, ...] = (0, 1, 2)   # the seeds shown in the published sequences
    check_seeds: int = 32                # seeds per component for the checks (the shown ones included)
    attribution_images: int = 16         # real images per end of each component for attribution maps (0: none)
    # independent reader (models.reader)
    reader_epochs: int = 6
    reader_size: int = 32
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        """Bad settings fail here, with the field named, before any expensive work."""
        if self.layers is not None and self.layers != "auto" and not (
                isinstance(self.layers, (tuple, list)) and self.layers and all(isinstance(n, str) for n in self.layers)):
            raise ValueError(f"layers must be 'auto' or a non-empty list of layer names, got {self.layers!r}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {list(GENERATORS)}, got {self.generator!r}")
        if (self.sweep_lo is None) != (self.sweep_hi is None):
            raise ValueError("sweep_lo and sweep_hi go together (or leave both unset for the quantile range)")
        if self.sweep_lo is not None and not self.sweep_lo < self.sweep_hi:
            raise ValueError(f"sweep_lo must be < sweep_hi, got {self.sweep_lo} and {self.sweep_hi}")
        lo, hi = self.sweep_quantiles
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"sweep_quantiles must satisfy 0 <= lo < hi <= 1, got {self.sweep_quantiles}")
        if self.check_seeds < len(self.seeds):
            raise ValueError(f"check_seeds ({self.check_seeds}) must be >= the number of shown seeds "
                             f"({len(self.seeds)})")

    def config_hash(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "device"}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> "ExplainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown explain config key(s): {sorted(unknown)}")
        d = dict(d)
        for key in ("seeds", "sweep_quantiles"):
            if key in d:
                d[key] = tuple(d[key])
        if isinstance(d.get("layers"), list):
            d["layers"] = tuple(d["layers"])
        return cls(**d)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _log(msg: str) -> None:
    print(f"[figan] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- stages

def cnn_input(input_shape: tuple[int, int, int] | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Transform bringing images of any size/channel count to the CNN's input shape (C, H, W)."""
    if input_shape is None:
        return None
    c, h, w = input_shape

    def t(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1)
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return x
    return t


def compute_features(model, ds: ImageDataset, layer: str | None = None, device="cpu", batch_size: int = 256) -> np.ndarray:
    return extract_features(model, ds.iter_batches(batch_size), layer=layer, batch_size=batch_size,
                            device=device, progress="features")


def fit_components(features: np.ndarray, ds: ImageDataset, cfg: ExplainConfig) -> tuple[PLSState, np.ndarray]:
    return fit_pls(features, ds.targets(), ds.meta.task, n_components=cfg.n_components,
                   max_components=cfg.max_components,
                   class_names=ds.class_names if ds.meta.task == "classification" else None)


def gan_resolution(ds: ImageDataset, cfg: ExplainConfig) -> int:
    if cfg.resolution:
        return cfg.resolution
    h = max(ds.image_shape[1:])
    return max(16, 2 ** math.ceil(math.log2(h)))


def training_indices(ds: ImageDataset, cfg: ExplainConfig) -> np.ndarray:
    """Rows of the dataset the generator is built from: all, or a seeded subsample of ``max_images``."""
    idx = np.arange(len(ds))
    if cfg.max_images and cfg.max_images < len(idx):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, cfg.max_images, replace=False))
    return idx


def gan_training_data(ds: ImageDataset, scores: np.ndarray, cfg: ExplainConfig) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """uint8 (N, C+M, R, R) images (+ one-hot mask channels) and float conditions (N, k)."""
    res = gan_resolution(ds, cfg)
    src = ds if tuple(ds.image_shape[1:]) == (res, res) else ImageDataset(ds.root, size=(res, res))
    idx = training_indices(ds, cfg)
    masks = cfg.use_masks and src.has_masks
    n_mask = 0
    if masks:
        imgs, m = src.load(idx, masks=True)
        n_mask = int(max(1, m.max()))
        data = images_to_u8(imgs, m, n_mask)
    else:
        data = images_to_u8(src.load(idx))
    return data, torch.as_tensor(scores[idx], dtype=torch.float32), src.image_shape[0], n_mask


def make_fid_fn(scorer: FIDScorer, cond: torch.Tensor, n: int, z_dim: int, image_channels: int, seed: int):
    g = torch.Generator().manual_seed(seed + 7)
    rows = torch.randint(0, len(cond), (n,), generator=g)
    c_fixed, z_fixed = cond[rows].cpu(), torch.randn(n, z_dim, generator=g)

    def fid_fn(gan: CGAN) -> float:
        return scorer.score(gan.generate(z_fixed, c_fixed)[:, :image_channels])
    return fid_fn


def train_generator(data: torch.Tensor, cond: torch.Tensor, image_channels: int, mask_channels: int,
                    cfg: ExplainConfig, out_dir: Path, scorer: FIDScorer | None, device: str,
                    stop_after: int | None = None, progress: bool = True,
                    on_checkpoint: Callable[[int], None] | None = None):
    gcfg = CGANConfig(resolution=data.shape[-1], image_channels=image_channels, mask_channels=mask_channels,
                      k=cond.shape[1], z_dim=cfg.z_dim, ngf=cfg.ngf, ndf=cfg.ndf, batch_size=cfg.batch_size,
                      steps=cfg.steps, lr_g=cfg.lr, lr_d=cfg.lr, cond_weight=cfg.cond_weight, regressor_steps=cfg.regressor_steps,
                      diffaugment=cfg.diffaugment, ckpt_every=cfg.ckpt_every, seed=cfg.seed)
    gan = CGAN(gcfg, device)
    fid_fn = None
    if scorer is not None:
        fid_fn = make_fid_fn(scorer, cond, min(cfg.fid_samples, len(cond)), cfg.z_dim, image_channels, cfg.seed)
    return gan.train(data, cond, out_dir, fid_fn=fid_fn, stop_after=stop_after, progress=progress,
                     on_checkpoint=on_checkpoint)


# --------------------------------------------------------------------------------------------- the whole thing

def _real_fid_sets(data: torch.Tensor, image_channels: int, n: int, seed: int):
    """Two disjoint real sets of (up to) n images: the FID reference and the second half of the floor."""
    perm = np.random.default_rng(seed + 3).permutation(len(data))
    n = min(n, len(data) // 2)
    to_f = lambda ix: data[ix, :image_channels].float() / 255.0
    return to_f(perm[:n]), to_f(perm[n:2 * n])


@dataclass
class ExplainRun:
    """One explanation in progress: its inputs, its artifacts folder, and what each stage produced so far.

    The stages below fill it in order; the Prefect flow runs each stage as a task on the same object, and
    `explain()` simply runs them all."""
    ds: ImageDataset
    model: torch.nn.Module
    out: Path
    cfg: ExplainConfig
    task: str
    input_shape: tuple[int, int, int]
    ruler: Callable[[np.ndarray], pd.DataFrame] | None
    cnn_name: str
    device: str
    timings: dict = field(default_factory=dict)
    features: np.ndarray | None = None
    state: PLSState | None = None
    scores: np.ndarray | None = None
    pct: list[float] | None = None
    data: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    image_channels: int = 1
    mask_channels: int = 0
    scorer: FIDScorer | None = None
    real_a: torch.Tensor | None = None
    floor: float | None = None
    result: object | None = None
    real_b: torch.Tensor | None = None
    data_index: np.ndarray | None = None          # dataset rows of run.data
    sweeps: list = field(default_factory=list)
    check_sweeps: list = field(default_factory=list)
    sweep_label: str = ""
    generate: Callable | None = None
    gen_cfg: CGANConfig | None = None
    gen_step: int | None = None
    metrics: dict | None = None
    layer_selection: dict | None = None           # candidates and the FID choice (models.layer_selection)

    @property
    def to_cnn(self):
        return cnn_input(self.input_shape)


def prepare(ds: ImageDataset, model: torch.nn.Module, out_dir: str | Path, cfg: ExplainConfig = ExplainConfig(),
            task: str | None = None, input_shape: tuple[int, int, int] | None = None,
            ruler: Callable[[np.ndarray], pd.DataFrame] | None = None, cnn_name: str = "cnn") -> ExplainRun:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ruler is None and ds.meta.factors:
        from .phantom import ruler as phantom_ruler
        ruler = phantom_ruler
    run = ExplainRun(ds=ds, model=model.eval(), out=out, cfg=cfg, task=task or ds.meta.task,
                     input_shape=tuple(input_shape or ds.image_shape), ruler=ruler, cnn_name=cnn_name,
                     device=resolve_device(cfg.device))
    (out / layout.CONFIG).write_text(json.dumps({"config": asdict(cfg), "config_hash": cfg.config_hash(),
                                                 "dataset": ds.name, "cnn": cnn_name}, indent=2, default=list))
    return run


def stage_features(run: ExplainRun, cache: Path | None = None) -> np.ndarray:
    """Features of every image, reused from the folder (or from ``cache``, e.g. keyed by CNN version + data md5)
    when the file is whole and has one row per image (:func:`models.files.load_npy`), else computed and written
    atomically to both."""
    t = time.time()
    fpath = run.out / layout.FEATURES
    found = {src: load_npy(src, rows=len(run.ds)) for src in (fpath, cache) if src is not None}
    src, run.features = next(((src, f) for src, f in found.items() if f is not None), (None, None))
    if run.features is not None:
        _log(f"features: reused {src} {run.features.shape}")
    else:
        _log(f"features: {len(run.ds)} images through {run.cnn_name} ({run.cfg.layer or 'input of the final Linear'})")
        run.features = compute_features(run.model, run.ds, run.cfg.layer, run.device)
    for dst, had in found.items():
        if had is None:
            save_npy(dst, run.features)
    run.timings["features"] = time.time() - t
    return run.features


def stage_pls(run: ExplainRun) -> PLSState:
    t = time.time()
    state, scores = fit_components(run.features, run.ds, run.cfg)
    save_pls(state, run.out / layout.PLS_DIR, overwrite=True)
    state.variance_table().to_csv(run.out / layout.PLS_VARIANCE_CSV, index=False)
    plot_variance(state, run.out / layout.PLS_VARIANCE_PNG,
                  title=f"{run.cnn_name}: target variance per PLS component")
    pd.DataFrame(scores, columns=[f"c{j + 1}" for j in range(scores.shape[1])]).assign(
        path=run.ds.manifest["path"].values).to_csv(run.out / layout.SCORES, index=False)
    run.state, run.scores = state, scores
    run.pct = (100 * state.explained_target_variance).tolist()
    _log("PLS: " + ", ".join(f"c{j + 1} {p:.1f} %" for j, p in enumerate(run.pct)))
    run.timings["pls"] = time.time() - t
    return state


@dataclass
class PatientFit:
    """What fitting the patient generator reports (the cGAN's TrainResult has the same fields it is read by):
    one closed-form fit, so it is complete (step = the configured steps) and has no FID trace."""
    step: int
    seconds: float
    n_pool: int
    start_step: int = 0


def _fid_sets(run: ExplainRun, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint image indices: the FID reference (n images) and the rest (the patient pool, the floor's half)."""
    perm = np.random.default_rng(run.cfg.seed + 3).permutation(len(run.data))
    n = min(n, len(run.data) // 2)
    return perm[:n], perm[n:]


def stage_images(run: ExplainRun) -> tuple[np.ndarray, np.ndarray]:
    """Images at the generator's resolution, the FID reference (held out from the generator's patients) and its
    scorer; returns the indices of the reference and of the rest."""
    cfg = run.cfg
    run.data, run.cond, run.image_channels, run.mask_channels = gan_training_data(run.ds, run.scores, cfg)
    run.data_index = training_indices(run.ds, cfg)
    ref, rest = _fid_sets(run, cfg.fid_samples)
    to_f = lambda ix: run.data[np.sort(ix), :run.image_channels].float() / 255.0
    run.real_a, run.real_b = to_f(ref), to_f(rest[:len(ref)])
    run.scorer = FIDScorer(run.real_a, extractor=cfg.fid_extractor, device=run.device, input_size=cfg.fid_input_size)
    return ref, rest


def stage_train(run: ExplainRun, stop_after: int | None = None, progress: bool = True,
                pose_cache: Path | None = None, on_checkpoint: Callable[[int], None] | None = None):
    """Fit the generator: the patient generator (registration + conditional means, cached in gan/pose.pt) or the
    cGAN (resuming from gan/last.pt when present, with FID at every checkpoint). ``pose_cache``: a file shared by
    explanations of the same images (e.g. keyed by dataset md5 and resolution): the registration depends on the
    images alone. ``on_checkpoint(step)``: called after each cGAN checkpoint (progress for whoever watches)."""
    t = time.time()
    cfg = run.cfg
    ref, rest = stage_images(run)
    real_b = run.real_b
    if cfg.generator == "patient":
        images = run.data[:, :run.image_channels].float() / 255.0
        pcfg = PatientGeneratorConfig(register_iters=cfg.register_iters)
        pose_file = run.out / layout.POSE      # registration is the slow part: kept for a re-run
        _log(f"patient generator: {len(images)} images {tuple(images.shape[1:])}, k={run.cond.shape[1]}, "
             f"pool {len(rest)} patients (the FID reference's {len(ref)} held out)")
        whole = lambda obj: isinstance(obj, torch.Tensor) and len(obj) == len(images)    # noqa: E731
        found = {f: load_torch(f, whole) for f in (pose_file, pose_cache) if f is not None}
        pose = next((p for p in found.values() if p is not None), None)
        if pose is None:
            pose = register(images, pcfg, progress)
        for f, had in found.items():
            if had is None:
                write_atomic(f, lambda fh: torch.save(pose, fh))
        G = PatientGenerator.fit(images, run.cond, np.sort(rest), pcfg, pose=pose, progress=progress)
        gcfg = CGANConfig(resolution=images.shape[-1], image_channels=run.image_channels, mask_channels=0,
                          k=run.cond.shape[1], z_dim=1, steps=cfg.steps, seed=cfg.seed)
        save_patient_generator(G, run.out / layout.GENERATOR_DIR, gcfg.to_dict())
        run.result = PatientFit(step=cfg.steps, seconds=time.time() - t, n_pool=len(rest))
    else:
        run.floor = real_floor(torch.cat([run.real_a, real_b]), extractor=run.scorer.extractor, seed=cfg.seed,
                               device=run.device) if len(real_b) else None
        _log(f"cGAN: {len(run.data)} images {tuple(run.data.shape[1:])}, k={run.cond.shape[1]}, {cfg.steps} steps; "
             f"FID extractor {run.scorer.label}; real-vs-real floor {run.floor if run.floor is None else round(run.floor, 2)}")
        run.result = train_generator(run.data, run.cond, run.image_channels, run.mask_channels, cfg,
                                     run.out / layout.GAN_DIR, run.scorer, run.device, stop_after, progress,
                                     on_checkpoint)
        if run.result.step >= cfg.steps:
            (run.out / layout.FID_TRACE_JSON).write_text(json.dumps(
                {"extractor": run.scorer.label, "floor": run.floor, "best_step": run.result.best_step,
                 "trace": run.result.fid_trace}, indent=2))
            plot_fid_trace(run.result.fid_trace, run.out / layout.FID_TRACE_PNG, floor=run.floor,
                           label=run.scorer.label, best_step=run.result.best_step)
    run.timings["generator"] = time.time() - t
    return run.result


def sweep_ranges(run: ExplainRun) -> tuple[np.ndarray, np.ndarray, str]:
    """Per component (lo, hi) in SD units, and a label saying what range that is."""
    cfg, k = run.cfg, run.scores.shape[1]
    if cfg.sweep_lo is not None:
        return np.full(k, float(cfg.sweep_lo)), np.full(k, float(cfg.sweep_hi)), \
            f"{cfg.sweep_lo:+g} to {cfg.sweep_hi:+g} SD of each component's real scores"
    qlo, qhi = cfg.sweep_quantiles
    lo, hi = np.quantile(run.scores, qlo, axis=0), np.quantile(run.scores, qhi, axis=0)
    return lo, hi, f"the {100 * qlo:g}-{100 * qhi:g} % quantiles of each component's real scores"


def use_kept_generator(run: ExplainRun) -> torch.nn.Module:
    """Load the generator kept in gan/best and make it the run's ``generate(z, c) → [0, 1]``."""
    G, run.gen_cfg, run.gen_step = load_generator(run.out / layout.GENERATOR_DIR, run.device)
    run.generate = lambda z, c: generate_with(G, z, c, run.device)
    return G


def stage_sequences(run: ExplainRun, generator: tuple[Callable, CGANConfig] | None = None) -> list:
    """A sweep per component from the kept generator (or ``generator`` = (generate(z, c) → [0, 1], its config)), with ``check_seeds`` seeds (the checks use them all); the
    published GIF/strip/eigen/deviation show the first ``seeds``. The patient generator holds every other
    component at the patient's own score (NaN base), the cGAN at 0; with the patient generator, real held-out
    images are also swept around themselves (:mod:`models.real_cases`)."""
    t = time.time()
    device = run.device
    if generator is None:
        G = use_kept_generator(run)
    else:
        run.generate, run.gen_cfg = generator
    cfg = run.cfg
    lo, hi, run.sweep_label = sweep_ranges(run)
    shown = tuple(cfg.seeds)
    seeds = shown + tuple(s for s in range(1000, 1000 + cfg.check_seeds) if s not in shown)[:cfg.check_seeds - len(shown)]
    base = np.full(run.gen_cfg.k, np.nan) if cfg.generator == "patient" else None
    run.sweeps, run.check_sweeps = [], []
    for j in range(run.state.n_components):
        values = sweep_values(float(lo[j]), float(hi[j]), cfg.frames)
        sw = render_sweep(run.generate, run.gen_cfg.z_dim, run.gen_cfg.k, j, values, seeds=seeds, base=base,
                          device=device, image_channels=run.image_channels + run.gen_cfg.mask_channels
                          if run.gen_cfg.mask_channels else None)
        if run.gen_cfg.mask_channels:
            sw.image_channels = run.image_channels
        shown_sw = dataclasses.replace(sw, seeds=shown, frames=sw.frames[:len(shown)])
        write_component(run.out / layout.SEQUENCES, shown_sw, run.pct[j], range_label=run.sweep_label)
        run.sweeps.append(shown_sw)
        run.check_sweeps.append(sw)
    if generator is None and isinstance(G, PatientGenerator) and run.data is not None:
        ref = np.sort(_fid_sets(run, cfg.fid_samples)[0])              # never a seed of the published sweeps
        manifest = run.ds.manifest
        paths = list(manifest["path"].to_numpy()[run.data_index]) if "path" in manifest.columns else None
        write_real_cases(G, run.data[:, :run.image_channels].float() / 255.0, run.cond.numpy(), ref, lo, hi,
                         cfg.frames, run.out / layout.SEQUENCES, run.image_channels, paths)
    run.timings["sequences"] = time.time() - t
    return run.sweeps


def stage_attribution(run: ExplainRun) -> list[Path]:
    """Vanilla-gradient and Grad-CAM maps beside every published sweep (:mod:`models.attribution`): the
    ``attribution_images`` real images at each end of the component's scores, and the sweep's first seed."""
    n = run.cfg.attribution_images
    if not n or not run.sweeps:
        return []
    t = time.time()
    to_cnn = run.to_cnn or (lambda x: x)
    out = []
    for j, sw in enumerate(run.sweeps):
        lo, hi = A.end_indices(run.scores[:, j], n)
        rows = np.concatenate([lo, hi])
        images = to_cnn(torch.from_numpy(run.ds.load(rows)))
        frames = to_cnn(torch.from_numpy(np.ascontiguousarray(sw.images[0])))    # the first seed, CNN input
        maps = A.component_maps(run.model, images, np.r_[run.scores[lo, j], run.scores[hi, j]], frames, n)
        out.append(A.save_attribution_png(maps, frames.numpy(), sw.values, j,
                                          layout.component_file(run.out, j + 1, "attribution")))
    run.timings["attribution"] = time.time() - t
    return out


def sweep_frame_samples(run: ExplainRun, n: int, seed: int) -> torch.Tensor:
    """n frames of single-component sweeps, as users see them: a random seed, a random component at a uniform
    position inside its sweep range, the others as in the published sweeps."""
    g = torch.Generator().manual_seed(seed)
    k = run.gen_cfg.k
    lo, hi, _ = sweep_ranges(run)
    j = torch.randint(0, k, (n,), generator=g)
    u = torch.rand(n, generator=g).double()
    if run.cfg.generator == "patient":
        c = torch.full((n, k), float("nan"))
    else:
        c = torch.zeros(n, k)
    c[torch.arange(n), j] = (torch.as_tensor(lo)[j] + u * torch.as_tensor(hi - lo)[j]).float()
    z = torch.randn(n, run.gen_cfg.z_dim, generator=g)
    return torch.cat([run.generate(z[i:i + 256], c[i:i + 256])[:, :run.image_channels] for i in range(0, n, 256)])


def _heldout_variance(run: ExplainRun) -> dict:
    """PLS fit on one part of the images, judged on the rest: % of target variance and % of the CNN's own output
    variance (its outputs in target space) the k components capture, cumulatively."""
    ds, cfg = run.ds, run.cfg
    if "split" in ds.manifest.columns and len(ds.indices("train")) and len(ds.indices("test")):
        fit_idx = ds.indices("train")
        held = np.setdiff1d(np.arange(len(ds)), fit_idx)
    else:
        perm = np.random.default_rng(cfg.seed + 5).permutation(len(ds))
        fit_idx, held = np.sort(perm[:int(0.7 * len(ds))]), np.sort(perm[int(0.7 * len(ds)):])
    k = run.state.n_components
    try:
        state, _ = fit_pls(run.features[fit_idx], ds.targets(fit_idx), ds.meta.task, n_components=k,
                           class_names=ds.class_names if ds.meta.task == "classification" else None)
    except ValueError as e:         # e.g. a class missing from the fit part
        return {"error": str(e)}
    outputs = C.outputs_in_target_space(
        model_output(run.model, ds.iter_batches(256), device=run.device, transform=run.to_cnn), run.task, run.state)
    y = ds.targets()
    targets = np.eye(len(ds.class_names))[y] if ds.meta.task == "classification" \
        else np.asarray(y, np.float64).reshape(len(ds), -1)
    s_fit, s_held = state.transform(run.features[fit_idx]), state.transform(run.features[held])

    def r2(y: np.ndarray, j: int) -> float:
        X = np.column_stack([np.ones(len(fit_idx)), s_fit[:, :j]])
        beta = np.linalg.lstsq(X, y[fit_idx], rcond=None)[0]
        pred = np.column_stack([np.ones(len(held)), s_held[:, :j]]) @ beta
        yh = y[held]
        return float(100 * (1 - ((yh - pred) ** 2).sum() / max(((yh - yh.mean(0)) ** 2).sum(), 1e-12)))
    return {"n_fit": int(len(fit_idx)), "n_heldout": int(len(held)),
            "cumulative_pct_target_variance": [round(r2(targets, j), 3) for j in range(1, k + 1)],
            "cumulative_pct_cnn_output_variance": [round(r2(outputs, j), 3) for j in range(1, k + 1)]}


def stage_checks(run: ExplainRun) -> dict:
    """Every fidelity check → metrics.json (schema figan.metrics/2, with the verdict) + summary.txt."""
    t = time.time()
    cfg, state, device, to_cnn = run.cfg, run.state, run.device, run.to_cnn
    images = run.data[:, :run.image_channels].float() / 255.0
    factors = run.ds.meta.factors or {}
    spread, conditional_spread, expected, expected_ci = {}, {}, None, None
    if run.ruler is not None:
        real_meas = run.ruler(images.numpy())
        spread = {k: float(v) for k, v in real_meas.std().items()}
        conditional_spread = C.conditional_spread(run.cond.numpy(), real_meas)
        expected, expected_ci = C.expected_effects(run.cond.numpy(), real_meas, spread, seed=cfg.seed)
    _log("checks: independent reader")
    target_task = run.ds.meta.task            # what PLS and the reader are fit on (the CNN's task is run.task)
    reader, reader_info = train_reader(images, run.ds.targets(run.data_index), target_task,
                                       n_classes=len(run.ds.class_names) if target_task == "classification" else None,
                                       epochs=cfg.reader_epochs, size=cfg.reader_size, seed=cfg.seed + 101)
    components = []
    for j, sw in enumerate(run.check_sweeps):
        _log(f"checks: component {j + 1}/{len(run.check_sweeps)} ({len(sw.seeds)} seeds x {len(sw.values)} frames)")
        comp = {"component": j + 1, "pct_target_variance": round(run.pct[j], 3),
                "sweep": {"lo": round(float(sw.values[0]), 4), "hi": round(float(sw.values[-1]), 4),
                          "n_seeds": len(sw.seeds)},
                "faithfulness": C.faithfulness(run.model, sw, run.task, state, transform=to_cnn, device=device),
                "reader": C.faithfulness(reader, sw, target_task, state),
                "conditioning": C.conditioning_sweep(run.model, sw, state, layer=cfg.layer, transform=to_cnn,
                                                     device=device)}
        if run.ruler is not None:
            comp["ground_truth"] = C.ground_truth(sw, run.ruler, spread, expected[j], expected_ci[j], seed=cfg.seed)
        components.append(comp)
    _log(f"checks: sweeps done ({time.time() - t:.0f} s); conditioning over random c, diversity")
    cond_random = C.conditioning_random(run.generate, run.gen_cfg.z_dim, run.scores, run.model, state,
                                        run.image_channels, layer=cfg.layer, transform=to_cnn, device=device,
                                        seed=cfg.seed)
    for comp, r in zip(components, cond_random["r_per_component"]):
        comp["conditioning"]["r_random"] = r
    div = C.diversity(run.generate, run.gen_cfg.z_dim, run.scores, images.numpy(), run.image_channels,
                      ruler=run.ruler, spread=conditional_spread, marginal_spread=spread,
                      factors=list(factors.get("nuisance", ())), seed=cfg.seed + 11)
    n_fid = len(run.real_a)
    _log(f"checks: FID on {n_fid} sweep frames vs {n_fid} real images, floor at the same n ({run.scorer.label})")
    fid = {"extractor": run.scorer.label, "n_samples": n_fid,
           "protocol": "frames of single-component sweeps (random seed, component and position in its range) vs a "
                       "held-out real reference; floor: other real images vs the same reference",
           "best": round(run.scorer.score(sweep_frame_samples(run, n_fid, cfg.seed + 13)), 3),
           "floor": round(run.scorer.score(run.real_b), 3) if len(run.real_b) else None}
    if cfg.generator == "cgan":
        fid.update(cgan_best=run.result.best_fid, best_step=run.result.best_step, trace=run.result.fid_trace,
                   cgan_floor=run.floor)
    heldout = _heldout_variance(run)
    run.timings["checks"] = time.time() - t
    run.timings["total"] = sum(v for k, v in run.timings.items() if k != "total")
    result = run.result
    lo, hi, label = sweep_ranges(run)
    metrics = {
        "schema": C.SCHEMA,
        "dataset": {"name": run.ds.name, "n_images": len(run.ds), "task": run.task, "target": run.ds.meta.target},
        "cnn": {"name": run.cnn_name, "layer": cfg.layer or "input of final Linear",
                "n_features": int(run.features.shape[1])},
        "config_hash": cfg.config_hash(),
        "pls": {"n_components": state.n_components, "pct_target_variance": [round(p, 3) for p in run.pct],
                "cumulative_pct": round(float(sum(run.pct)), 3), "heldout": heldout},
        "sweep": {"range": label, "lo": [round(float(v), 4) for v in lo], "hi": [round(float(v), 4) for v in hi],
                  "frames": cfg.frames, "shown_seeds": list(cfg.seeds), "check_seeds": cfg.check_seeds},
        "fid": fid,
        "diversity": div,
        "reader": reader_info,
        "training": {"generator": cfg.generator, "steps": result.step, "resumed_from_step": result.start_step,
                     "resolution": run.gen_cfg.resolution, "mask_channels": run.gen_cfg.mask_channels,
                     "generator_step": run.gen_step, "device": device,
                     **({"patient_pool": result.n_pool, "fit_seconds": round(result.seconds, 1)}
                        if cfg.generator == "patient" else
                        {"batch_size": cfg.batch_size, "img_per_s": round(result.img_per_s, 1),
                         "score_regressor_r2": result.regressor_r2})},
        "components": components,
        **({"layer_selection": run.layer_selection} if run.layer_selection else {}),
        "figures": {kind: [j + 1 for j in range(state.n_components)
                           if layout.component_file(run.out, j + 1, kind).is_file()]
                    for kind in ("attribution", "real_cases")},    # optional per-component figures published
        "timings_s": {k: round(v, 2) for k, v in run.timings.items()},
    }
    metrics["gates"] = C.evaluate_gates(metrics, C.Thresholds(), factors.get("driving", ()),
                                        factors.get("nuisance", ()), factors.get("shortcut", ()))
    metrics["verdict"] = C.verdict(metrics["gates"])
    (run.out / layout.METRICS).write_text(json.dumps(metrics, indent=2))
    (run.out / layout.SUMMARY).write_text(C.summary_text(metrics))
    run.metrics = metrics
    return metrics


def explain(ds: ImageDataset, model: torch.nn.Module, out_dir: str | Path, cfg: ExplainConfig = ExplainConfig(),
            task: str | None = None, input_shape: tuple[int, int, int] | None = None,
            ruler: Callable[[np.ndarray], pd.DataFrame] | None = None, cnn_name: str = "cnn",
            stop_after: int | None = None) -> dict:
    """Run the whole explanation into out_dir and return metrics.json's content.

    ``cfg.layers``: candidate feature layers (``"auto"`` or names, see :mod:`models.layer_selection`); the one whose
    generator reaches the lowest FID is explained (``cfg.layer`` otherwise).

    Re-running into the same folder reuses the cached features and resumes GAN training from its checkpoint.
    ``ruler``: measures ground-truth factors on images (phantoms); defaults to the phantom ruler when the
    dataset declares factors. ``stop_after`` ends GAN training after that many steps (returns
    ``{"status": "interrupted"}``), as a kill would.
    """
    selection, pose_cache = None, None
    if cfg.layers is not None:                   # FIGAN's feature selection: the candidate with the lowest FID
        from .layer_selection import candidate_layers, chosen_layer, select_layer
        layers_dir = Path(out_dir) / layout.LAYERS_DIR
        pose_cache = layers_dir / layout.REGISTRATION        # one registration for candidates and the choice
        selection = select_layer(ds, model, candidate_layers(model, cfg.layers), layers_dir, cfg,
                                 task, input_shape, cnn_name, pose_cache)
        cfg = dataclasses.replace(cfg, layer=chosen_layer(selection))
    run = prepare(ds, model, out_dir, cfg, task, input_shape, ruler, cnn_name)
    run.layer_selection = selection
    stage_features(run)
    stage_pls(run)
    result = stage_train(run, stop_after, pose_cache=pose_cache)
    if result.step < cfg.steps:
        return {"status": "interrupted", "step": result.step}
    stage_sequences(run)
    stage_attribution(run)
    metrics = stage_checks(run)
    _log(f"done in {run.timings['total']:.0f} s → {run.out}")
    return metrics
