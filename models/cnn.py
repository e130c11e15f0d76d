"""Small, standard image CNNs to explain, their training loop, and a save format with no pickled code.

The platform explains *any* `torch.nn.Module`; these architectures exist so the demo and the tests have real,
trained CNNs on the phantom and on Fashion-MNIST. Every model here takes images in [0, 1] (N, C, H, W) and
normalises them itself (a buffer, saved with the weights), so callers never need to know the normalisation.
For regression the network predicts the standardised target; the target's mean/SD live in the spec.

Saved as two files: ``cnn.pt`` (a state dict, loaded with ``weights_only=True``) and ``cnn.json`` (architecture
name + constructor arguments + task facts). Loading needs only this module, never the training code's globals.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ImageDataset


class Normalize(nn.Module):
    def __init__(self, mean: float | list[float] = 0.5, std: float | list[float] = 0.25, channels: int = 1):
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        self.register_buffer("mean", (m if m.numel() == channels else m.expand(channels).clone()).view(1, -1, 1, 1))
        self.register_buffer("std", (s if s.numel() == channels else s.expand(channels).clone()).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """VGG-style: three stages of two 3x3 conv-BN-ReLU + max-pool, global average pool, a 64-unit hidden
    layer and the output layer. The explained features are the 64-d input of the final Linear."""

    def __init__(self, in_channels=1, n_outputs=1, width=32, hidden=64, mean=0.5, std=0.25, dropout=0.1):
        super().__init__()
        w = width
        self.normalize = Normalize(mean, std, in_channels)
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * w, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden, n_outputs)

    def forward(self, x):
        return self.fc(self.head(self.features(self.normalize(x))))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.skip(x))


class TinyResNet(nn.Module):
    """A ResNet-ish alternative architecture (stem + 3 residual stages + GAP + hidden + output layer)."""

    def __init__(self, in_channels=1, n_outputs=1, width=24, hidden=64, mean=0.5, std=0.25, dropout=0.1):
        super().__init__()
        w = width
        self.normalize = Normalize(mean, std, in_channels)
        self.stem = _conv_bn(in_channels, w)
        self.stages = nn.Sequential(_Block(w, w, 1), _Block(w, 2 * w, 2), _Block(2 * w, 4 * w, 2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * w, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden, n_outputs)

    def forward(self, x):
        return self.fc(self.head(self.pool(self.stages(self.stem(self.normalize(x))))))


ARCHITECTURES: dict[str, type[nn.Module]] = {"smallcnn": SmallCNN, "tinyresnet": TinyResNet}


@dataclass
class CNNSpec:
    """Everything needed to rebuild a trained CNN and interpret its output."""
    arch: str
    kwargs: dict
    task: str                       # regression | classification
    input_shape: list[int]          # (C, H, W) the CNN was trained on
    class_names: list[str] | None = None
    target: str | list[str] = "target"
    target_mean: list[float] | None = None   # regression: output * sd + mean = target units
    target_sd: list[float] | None = None
    metrics: dict = field(default_factory=dict)
    dataset: str = ""


def build_cnn(spec: CNNSpec) -> nn.Module:
    if spec.arch not in ARCHITECTURES:
        raise ValueError(f"unknown CNN architecture {spec.arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[spec.arch](**spec.kwargs)


def save_cnn(model: nn.Module, spec: CNNSpec, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "cnn.pt")
    (out / "cnn.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def load_cnn(path: str | Path) -> tuple[nn.Module, CNNSpec]:
    p = Path(path)
    d = p if p.is_dir() else p.parent
    if not (d / "cnn.json").is_file() or not (d / "cnn.pt").is_file():
        raise FileNotFoundError(f"{d} is not a saved CNN (expected cnn.json + cnn.pt)")
    spec = CNNSpec(**json.loads((d / "cnn.json").read_text()))
    model = build_cnn(spec)
    model.load_state_dict(torch.load(d / "cnn.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec


# ----------------------------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    arch: str = "smallcnn"
    width: int = 32
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True      # random flips of a few pixels' shift; keeps geometry-driven targets intact
    single_logit: bool = False  # two-class targets: one logit + BCE-with-logits (the common binary head)


def _split_indices(ds: ImageDataset, seed: int):
    if "split" in ds.manifest.columns:
        tr, va, te = ds.indices("train"), ds.indices("val"), ds.indices("test")
        if len(tr) and len(te):
            return tr, (va if len(va) else te), te
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds))
    n_tr, n_va = int(0.7 * len(ds)), int(0.15 * len(ds))
    return order[:n_tr], order[n_tr:n_tr + n_va], order[n_tr + n_va:]


def _shift(x: torch.Tensor, g: torch.Generator, max_px: int = 2) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-max_px, max_px + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, batch_size: int = 256) -> dict:
    """Held-out metrics: R² for regression (per standardised target, averaged), accuracy for classification."""
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    if task == "classification":
        pred = (out[:, 0] > 0).long() if out.shape[1] == 1 else out.argmax(1)
        acc = (pred == y.long()).float().mean().item()
        return {"accuracy": round(acc, 4), "n": len(y)}
    ss_res = ((out - y) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return {"r2": round((1 - ss_res / ss_tot).mean().item(), 4), "n": len(y)}


def train_cnn(ds: ImageDataset, cfg: TrainConfig = TrainConfig(), progress: bool = True,
              log: Callable[[str], None] = print) -> tuple[nn.Module, CNNSpec]:
    """Train a CNN on the dataset's target; returns the model (eval mode) and its spec with held-out metrics."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    task = ds.meta.task
    tr, va, te = _split_indices(ds, cfg.seed)
    x_all = torch.from_numpy(ds.load(np.concatenate([tr, va, te])))
    x_tr, x_va, x_te = x_all[:len(tr)], x_all[len(tr):len(tr) + len(va)], x_all[len(tr) + len(va):]
    c = x_tr.shape[1]
    mean = x_tr.mean(dim=(0, 2, 3)).tolist()
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    if task == "classification":
        y_all = torch.from_numpy(ds.targets()).long()
        n_out = len(ds.class_names)
        t_mean = t_sd = None
        loss_fn = nn.CrossEntropyLoss()
        if cfg.single_logit:
            if n_out != 2:
                raise ValueError(f"single_logit needs a two-class target, {ds.name} has {n_out} classes")
            n_out, bce = 1, nn.BCEWithLogitsLoss()
            loss_fn = lambda out, y: bce(out[:, 0], y.float())
    else:
        y_np = ds.targets()
        t_mean, t_sd = y_np[tr].mean(0), y_np[tr].std(0) + 1e-12
        y_all = torch.from_numpy((y_np - t_mean) / t_sd).float()
        n_out = y_np.shape[1]
        loss_fn = nn.MSELoss()
    y_tr, y_va, y_te = y_all[tr], y_all[va], y_all[te]
    spec = CNNSpec(arch=cfg.arch, kwargs=dict(in_channels=c, n_outputs=n_out, width=cfg.width, mean=mean, std=std),
                   task=task, input_shape=list(x_tr.shape[1:]), class_names=ds.class_names if task == "classification" else None,
                   target=ds.meta.target, target_mean=None if t_mean is None else list(map(float, t_mean)),
                   target_sd=None if t_sd is None else list(map(float, t_sd)), dataset=ds.name)
    model = build_cnn(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    t0 = time.time()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"train {cfg.arch}", disable=not progress, leave=False)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=g)
        tot = 0.0
        for s in range(0, len(tr), cfg.batch_size):
            b = perm[s:s + cfg.batch_size]
            xb = _shift(x_tr[b], g) if cfg.augment else x_tr[b]
            loss = loss_fn(model(xb), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(b)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = evaluate(model, x_va, y_va, task)
        history.append({"epoch": epoch + 1, "loss": tot / len(tr), **{f"val_{k}": v for k, v in val.items() if k != "n"}})
    bar.close()
    test = evaluate(model, x_te, y_te, task)
    key = "accuracy" if task == "classification" else "r2"
    spec.metrics = {f"test_{key}": test[key], "n_test": test["n"], "n_train": len(tr),
                    f"val_{key}": history[-1][f"val_{key}"], "train_seconds": round(time.time() - t0, 1),
                    "history": history}
    log(f"{cfg.arch} on {ds.name}: held-out {key} = {test[key]:.3f} (n={test['n']}, {time.time() - t0:.0f} s)")
    return model.eval(), spec
