"""Benchmark (issue: FIGAN core, first half): do the CNN's PLS components find the phantom's driving factors?

On a 2 000-image 64² phantom: train the regression CNN (and the label classifier), extract the features, fit
PLS, and print CNN R²/accuracy, % target variance per component, and the correlation of each component's scores
with every phantom factor (driving factors should load on the top components; nuisances should not).

    .venv/bin/python benchmarks/core_pls.py [--n 2000] [--size 64] [--out runs/bench_pls]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from models.cnn import TrainConfig, train_cnn
from models.data import ImageDataset
from models.features import extract_features
from models.phantom import DRIVING, NUISANCE, PhantomConfig, write_phantom
from models.pls import fit_pls, plot_variance


def run(task: str, n: int, size: int, out: Path, epochs: int) -> None:
    root = out / f"phantom_{task}_{n}_{size}"
    ds = ImageDataset(root) if (root / "manifest.csv").exists() else \
        write_phantom(root, PhantomConfig(n=n, size=size, seed=0, task=task))
    t = time.time()
    model, spec = train_cnn(ds, TrainConfig(epochs=epochs), progress=False)
    t_cnn = time.time() - t
    t = time.time()
    feats = extract_features(model, ds.iter_batches(256))
    t_feat = time.time() - t
    state, scores = fit_pls(feats, ds.targets(), task, class_names=ds.class_names if task == "classification" else None)
    plot_variance(state, out / f"pls_variance_{task}.png", title=f"phantom {task}: target variance per component")
    factors = ds.factors()
    metric = {k: v for k, v in spec.metrics.items() if k.startswith("test_")}
    print(f"\n## phantom {task}: n={n}, {size}², CNN {spec.arch} held-out {metric} "
          f"(train {t_cnn:.0f} s, features {t_feat:.1f} s, {len(ds) / t_feat:.0f} img/s)")
    print("% target variance per component: " +
          ", ".join(f"c{j + 1} {100 * v:.1f}" for j, v in enumerate(state.explained_target_variance)))
    rows = []
    for name in [*DRIVING, *NUISANCE]:
        f = factors[name].to_numpy(float)
        rows.append({"factor": name, "kind": "driving" if name in DRIVING else "nuisance",
                     **{f"c{j + 1}": round(float(np.corrcoef(f, scores[:, j])[0, 1]), 3) for j in range(scores.shape[1])}})
    table = pd.DataFrame(rows)
    print("Pearson r of each component's scores with each phantom factor:")
    print(table.to_markdown(index=False))
    table.to_csv(out / f"factor_correlations_{task}.csv", index=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_pls"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for task in ("regression", "classification"):
        run(task, a.n, a.size, a.out, a.epochs)


if __name__ == "__main__":
    main()
