"""The quick-start demo of the FIGAN core: phantom data → CNN → explanation, offline, on the CPU.

(The platform demo — DVC, MLflow registration, Prefect flow, service — grows on top of this as those parts land.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import layout
from .cnn import TrainConfig, load_cnn, save_cnn, train_cnn
from .data import ImageDataset
from .explain import ExplainConfig, explain
from .phantom import PhantomConfig, write_phantom

# Sizes that finish in about ten minutes on 2 CPU cores and pass the fidelity gates; --quick is a smoke test.
DEMO = dict(phantom=PhantomConfig(n=3000, size=64, seed=0), cnn=TrainConfig(epochs=6, width=12),
            explain=ExplainConfig(fid_samples=1500, fid_input_size=128))
QUICK = dict(phantom=PhantomConfig(n=240, size=32, seed=0), cnn=TrainConfig(epochs=2, width=8),
             explain=ExplainConfig(steps=20, ckpt_every=10, ngf=8, ndf=8, batch_size=16, fid_samples=32,
                                   fid_extractor="randconv", frames=4, seeds=(0, 1), check_seeds=8, reader_epochs=2,
                                   register_iters=30))


def run_demo(workdir: Path, quick: bool = False) -> int:
    cfg = QUICK if quick else DEMO
    t0 = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, cnn_dir, out_dir = workdir / "data" / "phantom", workdir / "cnn", workdir / "explanation"
    if (data_dir / "manifest.csv").exists():
        ds = ImageDataset(data_dir)
        print(f"[demo] dataset: reusing {data_dir}")
    else:
        print(f"[demo] dataset: writing {cfg['phantom'].n} phantoms at {cfg['phantom'].size}² → {data_dir}")
        ds = write_phantom(data_dir, cfg["phantom"])
    if (cnn_dir / "cnn.json").exists():
        model, spec = load_cnn(cnn_dir)
        print(f"[demo] CNN: reusing {cnn_dir}")
    else:
        print("[demo] CNN: training a regression CNN on the phantom target")
        model, spec = train_cnn(ds, cfg["cnn"])
        save_cnn(model, spec, cnn_dir)
    print(f"[demo] CNN held-out: {json.dumps({k: v for k, v in spec.metrics.items() if k.startswith('test')})}")
    explain(ds, model, out_dir, cfg["explain"], task=spec.task, input_shape=tuple(spec.input_shape),
            cnn_name=f"{spec.arch} (demo)")
    print((out_dir / layout.SUMMARY).read_text())
    print(f"[demo] finished in {time.time() - t0:.0f} s. Look at: {out_dir / layout.SEQUENCES}/*.gif, "
          f"{out_dir / layout.METRICS}, {out_dir / layout.FID_TRACE_PNG}")
    return 0
