"""One cGAN on several GPUs: the core trainer (``models.cgan.CGAN``) under torchrun + DistributedDataParallel.

Nothing here changes what is learned: ``CGAN`` notices the initialised process group, treats ``batch_size`` as the
global batch, gives every rank its rows of each randomly drawn global batch, takes G's batch-norm statistics over
all ranks and lets DDP average the gradients, so W processes compute what one process computes with the same
global batch (up to floating-point summation order; ``tests/test_cgan_ddp.py`` checks it with 2 CPU processes).
Rank 0 scores FID and writes ``last.pt`` / ``best/``; a resumed run continues from ``last.pt`` on every rank.

    torchrun --standalone --nproc-per-node=8 -m models.cgan_ddp --data data/phantom \\
        --scores runs/explain/scores.csv --out runs/gan_ddp --resolution 128 --batch-size 4096 --steps 20000 \\
        [--config gan.yaml] [--fid-extractor randconv|inception_v3_pool3] [--fid-samples 2000]

``--scores`` is the ``scores.csv`` an explanation writes (columns ``c1..ck`` and ``path``); ``--config`` is a YAML
or JSON file of ``CGANConfig`` fields, and the flags override it. On CPU (no CUDA) the processes use gloo.
``spawn_train`` runs the same code in W local processes without torchrun (tests, CPU experiments).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .layout import TRAINING_STATE
from .cgan import CGAN, CGANConfig, TrainResult, images_to_u8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, data: torch.Tensor, cond: torch.Tensor, out_dir: str,
            train_kw: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        CGAN(CGANConfig.from_dict(cfg)).train(data, cond, out_dir, progress=False, **train_kw)
    finally:
        dist.destroy_process_group()


def spawn_train(world: int, cfg: CGANConfig, data: torch.Tensor, cond: torch.Tensor, out_dir: str | Path,
                **train_kw) -> dict:
    """Train with ``world`` local CPU processes (gloo); returns rank 0's final training state (``last.pt``)."""
    mp.spawn(_worker, args=(world, _free_port(), cfg.to_dict(), data, cond, str(out_dir), train_kw),
             nprocs=world, join=True)
    return torch.load(Path(out_dir) / TRAINING_STATE, map_location="cpu", weights_only=False)


def load_training_data(data_dir: str | Path, scores_csv: str | Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images at resolution² (dataset rows in the order of scores.csv) and their (N, k) scores."""
    import pandas as pd
    from .data import ImageDataset

    ds = ImageDataset(data_dir, size=(resolution, resolution))
    scores = pd.read_csv(scores_csv)
    cols = [c for c in scores.columns if c.startswith("c") and c[1:].isdigit()]
    if not cols:
        raise ValueError(f"{scores_csv}: no score columns c1..ck")
    pos = {p: i for i, p in enumerate(ds.manifest["path"])}
    missing = [p for p in scores["path"] if p not in pos]
    if missing:
        raise ValueError(f"{scores_csv}: {len(missing)} paths not in {data_dir} (first: {missing[0]})")
    idx = np.array([pos[p] for p in scores["path"]])
    return images_to_u8(ds.load(idx)), torch.tensor(scores[cols].to_numpy(), dtype=torch.float32)


def _fid_fn(data: torch.Tensor, cond: torch.Tensor, cfg: CGANConfig, extractor: str, n: int, device):
    from .fid import FIDScorer

    g = torch.Generator().manual_seed(cfg.seed + 7)
    real = data[torch.randperm(len(data), generator=g)[:n], :cfg.image_channels].float() / 255.0
    scorer = FIDScorer(real, extractor=extractor, device=device, input_size=min(128, max(75, cfg.resolution))
                       if extractor == "inception_v3_pool3" else None)
    # rank 0 alone scores FID (FIDScorer never syncs across processes)
    rows = torch.randint(0, len(cond), (n,), generator=g)
    c, z = cond[rows], torch.randn(n, cfg.z_dim, generator=g)
    return lambda gan: scorer.score(gan.generate(z, c)[:, :cfg.image_channels])


def main(argv: list[str] | None = None) -> TrainResult:
    ap = argparse.ArgumentParser(prog="torchrun ... -m models.cgan_ddp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (images/, manifest.csv, dataset.yaml)")
    ap.add_argument("--scores", required=True, help="scores.csv of an explanation (columns path, c1..ck)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", help="YAML/JSON file of CGANConfig fields")
    for name in ("resolution", "batch_size", "steps", "ngf", "ndf", "z_dim", "ckpt_every", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    ap.add_argument("--lr", type=float, help="lr_g = lr_d")
    ap.add_argument("--fid-extractor", choices=["randconv", "inception_v3_pool3"])
    ap.add_argument("--fid-samples", type=int, default=1000)
    a = ap.parse_args(argv)

    d: dict = {}
    if a.config:
        text = Path(a.config).read_text()
        import yaml
        d = (json.loads(text) if a.config.endswith(".json") else yaml.safe_load(text)) or {}
    d.update({k: v for k, v in vars(a).items() if k in CGANConfig.__dataclass_fields__ and v is not None})
    if a.lr is not None:
        d["lr_g"] = d["lr_d"] = a.lr
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        data, cond = load_training_data(a.data, a.scores, d.get("resolution", CGANConfig.resolution))
        cfg = CGANConfig.from_dict({**d, "k": cond.shape[1], "image_channels": data.shape[1], "mask_channels": 0})
        gan = CGAN(cfg, device)
        fid = (_fid_fn(data, cond, cfg, a.fid_extractor, min(a.fid_samples, len(data)), device)
               if a.fid_extractor and gan.is_main else None)
        res = gan.train(data, cond, a.out, fid_fn=fid, progress=gan.is_main)
        if gan.is_main:
            print(json.dumps({"step": res.step, "img_per_s": round(res.img_per_s, 1), "world": gan.world,
                              "best_fid": res.best_fid, "best_step": res.best_step, "out": a.out}), flush=True)
        return res
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
