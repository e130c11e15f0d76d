"""An independent reader: a small CNN the flow trains on the same target, to read sweeps the generator never saw.

Faithfulness through the audited CNN is partly self-confirming: the generator is conditioned on that CNN's PLS
scores, so a sweep can move the CNN's output through features only that CNN reads. A second, differently built
and differently seeded network trained on the dataset's own target reads the same frames; if the sweep shows
what really predicts the target, this reader's output moves with it too.

The reader works at ``size``² (32 by default: seconds on a CPU), global-average-pools three strided conv
blocks (no batch-norm, so a frame's reading never depends on its batch), and outputs what the target needs:
one value per regression target (standardised) or one logit per class. Its output is read along each
component's target-space direction exactly like the audited CNN's (:func:`models.checks.target_response`).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Reader(nn.Module):
    def __init__(self, in_channels: int, n_outputs: int, width: int = 24, size: int = 32,
                 mean: float = 0.5, std: float = 0.25):
        super().__init__()
        self.size, self.mean, self.std = size, mean, std
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU())
        self.head = nn.Linear(4 * width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        h = self.body((x - self.mean) / self.std)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


def train_reader(images: torch.Tensor, targets: np.ndarray, task: str, n_classes: int | None = None,
                 epochs: int = 6, size: int = 32, seed: int = 1, batch_size: int = 64, lr: float = 3e-3,
                 holdout: float = 0.2) -> tuple[Reader, dict]:
    """Train on float images (N, C, H, W) in [0, 1]; returns the reader (eval mode) and its held-out score
    (R² for regression, accuracy for classification) so a useless reader is visible in the metrics."""
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(images.float(), size=(size, size), mode="area") if images.shape[-1] != size else images.float()
    n = len(x)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(holdout * n))
    val, tr = perm[:n_val], perm[n_val:]
    if task == "classification":
        y = torch.as_tensor(np.asarray(targets).reshape(-1), dtype=torch.long)
        n_out = int(n_classes or int(y.max()) + 1)
        loss_fn = nn.CrossEntropyLoss()
    else:
        t = np.asarray(targets, dtype=np.float64).reshape(n, -1)
        y = torch.as_tensor((t - t.mean(0)) / (t.std(0) + 1e-12), dtype=torch.float32)
        n_out = y.shape[1]
        loss_fn = nn.MSELoss()
    model = Reader(x.shape[1], n_out, size=size, mean=float(x.mean()), std=float(x.std().clamp_min(1e-3)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    model.train()
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            loss = loss_fn(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[val[i:i + 256]]) for i in range(0, len(val), 256)])
    if task == "classification":
        score = {"heldout_accuracy": round(float((out.argmax(1) == y[val]).float().mean()), 4)}
    else:
        yv = y[val]
        r2 = 1 - ((out - yv) ** 2).sum(0) / ((yv - yv.mean(0)) ** 2).sum(0).clamp_min(1e-12)
        score = {"heldout_r2": round(float(r2.mean()), 4)}
    return model, {"architecture": "3 strided conv + GELU, mean/max pool", "size": size, "seed": seed,
                   "epochs": epochs, "n_train": len(tr), "n_heldout": n_val, **score,
                   "seconds": round(time.time() - t0, 1)}
