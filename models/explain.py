"""One FIGAN explanation, offline: dataset + CNN → features → PLS → cGAN → sequences → checks → artifacts folder.

Each stage is a function that takes data and returns data (the Prefect flow of the pipeline calls them one by one
as tasks); `explain()` composes them and does the folder I/O. The artifacts folder is self-contained::

    config.json            the ExplainConfig and its hash, the CNN and dataset it explained
    features.npy           N x F learned features (input of the CNN's final Linear unless a layer is named)
    pls/                   the fitted PLS state (pls.npz + pls.json), enough to map images to scores
    pls_variance.png/.csv  % of target variance per component
    scores.csv             each image's standardised component scores (the GAN's conditions)
    gan/last.pt            full training state (exact resume); gan/best/ the EMA generator with the lowest FID
    fid_trace.json/.png    FID at every checkpoint, with the extractor's name and the real-vs-real floor
    sequences/             per component: GIF, strip, eigen and deviation PNGs, npz
    metrics.json           every check (schema figan.metrics/1); summary.txt the same in words
"""
from __future__ import annotations

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

from . import checks as C
from .cgan import CGAN, CGANConfig, generate_with, images_to_u8, load_generator
from .data import ImageDataset
from .features import extract_features
from .fid import FIDScorer, diversity_ratio, plot_fid_trace, real_floor
from .pls import PLSState, fit_pls, plot_variance, save_pls
from .sequences import render_sweep, sweep_values, write_component


@dataclass
class ExplainConfig:
    # features + PLS
    layer: str | None = None
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
    fid_samples: int = 500
    # sequences
    sweep_lo: float = -2.0
    sweep_hi: float = 2.0
    frames: int = 9
    seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    device: str = "auto"

    def config_hash(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "device"}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> "ExplainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown explain config key(s): {sorted(unknown)}")
        d = dict(d)
        if "seeds" in d:
            d["seeds"] = tuple(d["seeds"])
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


def gan_training_data(ds: ImageDataset, scores: np.ndarray, cfg: ExplainConfig) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """uint8 (N, C+M, R, R) images (+ one-hot mask channels) and float conditions (N, k)."""
    res = gan_resolution(ds, cfg)
    src = ds if tuple(ds.image_shape[1:]) == (res, res) else ImageDataset(ds.root, size=(res, res))
    idx = np.arange(len(src))
    if cfg.max_images and cfg.max_images < len(idx):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, cfg.max_images, replace=False))
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
                    stop_after: int | None = None, progress: bool = True):
    gcfg = CGANConfig(resolution=data.shape[-1], image_channels=image_channels, mask_channels=mask_channels,
                      k=cond.shape[1], z_dim=cfg.z_dim, ngf=cfg.ngf, ndf=cfg.ndf, batch_size=cfg.batch_size,
                      steps=cfg.steps, lr_g=cfg.lr, lr_d=cfg.lr, cond_weight=cfg.cond_weight, regressor_steps=cfg.regressor_steps,
                      diffaugment=cfg.diffaugment, ckpt_every=cfg.ckpt_every, seed=cfg.seed)
    gan = CGAN(gcfg, device)
    fid_fn = None
    if scorer is not None:
        fid_fn = make_fid_fn(scorer, cond, min(cfg.fid_samples, len(cond)), cfg.z_dim, image_channels, cfg.seed)
    return gan.train(data, cond, out_dir, fid_fn=fid_fn, stop_after=stop_after, progress=progress)


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
    sweeps: list = field(default_factory=list)
    generate: Callable | None = None
    gen_cfg: CGANConfig | None = None
    gen_step: int | None = None
    metrics: dict | None = None

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
    (out / "config.json").write_text(json.dumps({"config": asdict(cfg), "config_hash": cfg.config_hash(),
                                                 "dataset": ds.name, "cnn": cnn_name}, indent=2, default=list))
    return run


def stage_features(run: ExplainRun, cache: Path | None = None) -> np.ndarray:
    """Features of every image, reused from the folder (or from ``cache``, e.g. keyed by CNN version + data md5)."""
    t = time.time()
    fpath = run.out / "features.npy"
    for src in (fpath, cache):
        if src is not None and Path(src).exists():
            run.features = np.load(src)
            _log(f"features: reused {src} {run.features.shape}")
            break
    else:
        _log(f"features: {len(run.ds)} images through {run.cnn_name} ({run.cfg.layer or 'input of the final Linear'})")
        run.features = compute_features(run.model, run.ds, run.cfg.layer, run.device)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, run.features)
    if not fpath.exists():
        np.save(fpath, run.features)
    run.timings["features"] = time.time() - t
    return run.features


def stage_pls(run: ExplainRun) -> PLSState:
    t = time.time()
    state, scores = fit_components(run.features, run.ds, run.cfg)
    save_pls(state, run.out / "pls", overwrite=True)
    state.variance_table().to_csv(run.out / "pls_variance.csv", index=False)
    plot_variance(state, run.out / "pls_variance.png", title=f"{run.cnn_name}: target variance per PLS component")
    pd.DataFrame(scores, columns=[f"c{j + 1}" for j in range(scores.shape[1])]).assign(
        path=run.ds.manifest["path"].values).to_csv(run.out / "scores.csv", index=False)
    run.state, run.scores = state, scores
    run.pct = (100 * state.explained_target_variance).tolist()
    _log("PLS: " + ", ".join(f"c{j + 1} {p:.1f} %" for j, p in enumerate(run.pct)))
    run.timings["pls"] = time.time() - t
    return state


def stage_train(run: ExplainRun, stop_after: int | None = None, progress: bool = True):
    """Train the cGAN (resuming from gan/last.pt when present) with FID at every checkpoint."""
    t = time.time()
    cfg = run.cfg
    run.data, run.cond, run.image_channels, run.mask_channels = gan_training_data(run.ds, run.scores, cfg)
    run.real_a, real_b = _real_fid_sets(run.data, run.image_channels, cfg.fid_samples, cfg.seed)
    run.scorer = FIDScorer(run.real_a, extractor=cfg.fid_extractor, device=run.device, input_size=cfg.fid_input_size)
    run.floor = real_floor(torch.cat([run.real_a, real_b]), extractor=run.scorer.extractor, seed=cfg.seed,
                           device=run.device) if len(real_b) else None
    _log(f"cGAN: {len(run.data)} images {tuple(run.data.shape[1:])}, k={run.cond.shape[1]}, {cfg.steps} steps; "
         f"FID extractor {run.scorer.label}; real-vs-real floor {run.floor if run.floor is None else round(run.floor, 2)}")
    run.result = train_generator(run.data, run.cond, run.image_channels, run.mask_channels, cfg, run.out / "gan",
                                 run.scorer, run.device, stop_after, progress)
    run.timings["gan"] = time.time() - t
    if run.result.step >= cfg.steps:
        (run.out / "fid_trace.json").write_text(json.dumps(
            {"extractor": run.scorer.label, "floor": run.floor, "best_step": run.result.best_step,
             "trace": run.result.fid_trace}, indent=2))
        plot_fid_trace(run.result.fid_trace, run.out / "fid_trace.png", floor=run.floor, label=run.scorer.label,
                       best_step=run.result.best_step)
    return run.result


def stage_sequences(run: ExplainRun) -> list:
    """A sweep per component from the best (lowest-FID) EMA generator, written as GIF/strip/eigen/deviation."""
    t = time.time()
    G, run.gen_cfg, run.gen_step = load_generator(run.out / "gan" / "best", run.device)
    device = run.device
    run.generate = lambda z, c: generate_with(G, z, c, device)
    values = sweep_values(run.cfg.sweep_lo, run.cfg.sweep_hi, run.cfg.frames)
    run.sweeps = []
    for j in range(run.state.n_components):
        sw = render_sweep(run.generate, run.gen_cfg.z_dim, run.gen_cfg.k, j, values, seeds=run.cfg.seeds,
                          device=device)
        write_component(run.out / "sequences", sw, run.pct[j])
        run.sweeps.append(sw)
    run.timings["sequences"] = time.time() - t
    return run.sweeps


def stage_checks(run: ExplainRun) -> dict:
    """Every fidelity check → metrics.json (schema figan.metrics/1) + summary.txt."""
    t = time.time()
    cfg, state, device, to_cnn = run.cfg, run.state, run.device, run.to_cnn
    spread, expected = {}, None
    if run.ruler is not None:
        real_meas = run.ruler(run.data[:, :run.image_channels].float().numpy() / 255.0)
        spread = {k: float(v) for k, v in real_meas.std().items()}
        expected = C.expected_effects(run.cond.numpy(), real_meas, spread)
    components = []
    for j, sw in enumerate(run.sweeps):
        comp = {"component": j + 1, "pct_target_variance": round(run.pct[j], 3),
                "faithfulness": C.faithfulness(run.model, sw, run.task, state, transform=to_cnn, device=device),
                "conditioning": C.conditioning_sweep(run.model, sw, state, layer=cfg.layer, transform=to_cnn,
                                                     device=device)}
        if run.ruler is not None:
            comp["ground_truth"] = C.ground_truth(sw, run.ruler, spread, expected[j])
        components.append(comp)
    cond_random = C.conditioning_random(run.generate, run.gen_cfg.z_dim, run.scores, run.model, state,
                                        run.image_channels, layer=cfg.layer, transform=to_cnn, device=device,
                                        seed=cfg.seed)
    for comp, r in zip(components, cond_random["r_per_component"]):
        comp["conditioning"]["r_random"] = r
    g = torch.Generator().manual_seed(cfg.seed + 11)
    n_cond, n_seeds = 16, 4
    c_div = run.cond[torch.randint(0, len(run.cond), (n_cond,), generator=g)].repeat_interleave(n_seeds, 0)
    fakes = run.generate(torch.randn(n_cond * n_seeds, run.gen_cfg.z_dim, generator=g), c_div)[:, :run.image_channels]
    div = diversity_ratio(fakes.reshape(n_cond, n_seeds, *fakes.shape[1:]), run.real_a,
                          extractor=run.scorer.extractor, device=device)
    run.timings["checks"] = time.time() - t
    run.timings["total"] = sum(v for k, v in run.timings.items() if k != "total")
    result = run.result
    metrics = {
        "schema": C.SCHEMA,
        "dataset": {"name": run.ds.name, "n_images": len(run.ds), "task": run.task, "target": run.ds.meta.target},
        "cnn": {"name": run.cnn_name, "layer": cfg.layer or "input of final Linear",
                "n_features": int(run.features.shape[1])},
        "config_hash": cfg.config_hash(),
        "pls": {"n_components": state.n_components, "pct_target_variance": [round(p, 3) for p in run.pct],
                "cumulative_pct": round(float(sum(run.pct)), 3)},
        "fid": {"extractor": run.scorer.label, "best": result.best_fid, "best_step": result.best_step,
                "floor": run.floor, "n_samples": len(run.real_a), "trace": result.fid_trace},
        "diversity": {"ratio": round(float(div), 4), "n_conditions": n_cond, "n_seeds": n_seeds,
                      "extractor": run.scorer.label},
        "training": {"steps": result.step, "resumed_from_step": result.start_step, "batch_size": cfg.batch_size,
                     "img_per_s": round(result.img_per_s, 1), "resolution": run.gen_cfg.resolution,
                     "mask_channels": run.gen_cfg.mask_channels, "generator_step": run.gen_step, "device": device,
                     "score_regressor_r2": result.regressor_r2},
        "components": components,
        "timings_s": {k: round(v, 2) for k, v in run.timings.items()},
    }
    factors = run.ds.meta.factors or {}
    metrics["gates"] = C.evaluate_gates(metrics, C.Thresholds(), factors.get("driving", ()), factors.get("nuisance", ()))
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run.out / "summary.txt").write_text(C.summary_text(metrics))
    run.metrics = metrics
    return metrics


def explain(ds: ImageDataset, model: torch.nn.Module, out_dir: str | Path, cfg: ExplainConfig = ExplainConfig(),
            task: str | None = None, input_shape: tuple[int, int, int] | None = None,
            ruler: Callable[[np.ndarray], pd.DataFrame] | None = None, cnn_name: str = "cnn",
            stop_after: int | None = None) -> dict:
    """Run the whole explanation into out_dir and return metrics.json's content.

    Re-running into the same folder reuses the cached features and resumes GAN training from its checkpoint.
    ``ruler``: measures ground-truth factors on images (phantoms); defaults to the phantom ruler when the
    dataset declares factors. ``stop_after`` ends GAN training after that many steps (returns
    ``{"status": "interrupted"}``), as a kill would.
    """
    run = prepare(ds, model, out_dir, cfg, task, input_shape, ruler, cnn_name)
    stage_features(run)
    stage_pls(run)
    result = stage_train(run, stop_after)
    if result.step < cfg.steps:
        return {"status": "interrupted", "step": result.step}
    stage_sequences(run)
    metrics = stage_checks(run)
    _log(f"done in {run.timings['total']:.0f} s → {run.out}")
    return metrics
