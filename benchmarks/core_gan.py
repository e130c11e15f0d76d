"""Benchmark (issue: FIGAN core, second half): cGAN sequences and their fidelity gates on a 64² phantom, CPU.

Runs the offline `explain` on (1) the regression phantom and (2) the shortcut phantom (label classifier, marker
planted with the label), then prints the gates: top component moves a driving factor (|ρ| >= 0.9, >= 2 SD) while
nuisances move <= 0.15 SD; faithfulness and conditioning >= 0.9 for components >= 10 % of target variance;
FID <= 2x the real-vs-real floor (extractor named); diversity across noise seeds; training img/s; and for the
shortcut run, which component's sweep makes the marker appear.

    .venv/bin/python benchmarks/core_gan.py [--steps 1500] [--n 3000] [--only regression|shortcut]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.cnn import TrainConfig, load_cnn, save_cnn, train_cnn
from models.data import ImageDataset
from models.explain import ExplainConfig, explain
from models.phantom import PhantomConfig, write_phantom


def prepare(root: Path, pcfg: PhantomConfig, epochs: int):
    data, cnn = root / "data", root / "cnn"
    ds = ImageDataset(data) if (data / "manifest.csv").exists() else write_phantom(data, pcfg)
    if (cnn / "cnn.json").exists():
        model, spec = load_cnn(cnn)
    else:
        model, spec = train_cnn(ds, TrainConfig(epochs=epochs))
        save_cnn(model, spec, cnn)
    return ds, model, spec


def report(name: str, m: dict, spec) -> None:
    print(f"\n## {name}: CNN held-out {({k: v for k, v in spec.metrics.items() if k.startswith('test_')})}")
    print(f"training: {m['training']['steps']} steps x {m['training']['batch_size']} at "
          f"{m['training']['resolution']}², {m['training']['img_per_s']} img/s (CPU); total {m['timings_s']['total']:.0f} s "
          f"(features {m['timings_s']['features']:.0f}, GAN+FID {m['timings_s']['gan']:.0f}, "
          f"sequences {m['timings_s']['sequences']:.0f}, checks {m['timings_s']['checks']:.0f})")
    f = m["fid"]
    print(f"FID best {f['best']:.2f} @ step {f['best_step']}, real-vs-real floor {f['floor']:.2f} "
          f"(ratio {f['best'] / f['floor']:.2f}); extractor: {f['extractor']}; n={f['n_samples']}")
    print(f"diversity (seed spread / real spread): {m['diversity']['ratio']:.3f}")
    print("| comp | % target var | faithfulness ρ (mean/min) | conditioning r (sweep/random) | largest factor effects (SD, ρ) |")
    print("|---|---|---|---|---|")
    for c in m["components"]:
        gt = c.get("ground_truth", {})
        top = sorted(gt.items(), key=lambda kv: -abs(kv[1]["effect_sd"]))[:4]
        eff = "; ".join(f"{k} {v['effect_sd']:+.2f} (ρ {v['rho']:+.2f}, exp {v.get('expected_effect_sd', float('nan')):+.2f})"
                        for k, v in top)
        print(f"| {c['component']} | {c['pct_target_variance']:.1f} | {c['faithfulness']['rho_mean']:.3f} / "
              f"{c['faithfulness']['rho_min']:.3f} | {c['conditioning']['r_pooled']:.3f} / "
              f"{c['conditioning'].get('r_random', float('nan')):.3f} | {eff} |")
    print("gates: " + ", ".join(f"{k} {'PASS' if v['pass'] else 'FAIL'}" for k, v in m["gates"].items()
                                if isinstance(v, dict)))
    gt = m["gates"].get("ground_truth")
    if gt:
        print(f"ground truth (top component): {gt['driving_factor']} ρ {gt['driving_rho']:+.3f}, "
              f"{gt['driving_effect_sd']:+.2f} SD; worst nuisance {gt['worst_nuisance']} {gt['worst_nuisance_effect_sd']:+.3f} SD")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--fid-input-size", type=int, default=128)
    ap.add_argument("--only", choices=["regression", "shortcut"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_gan"))
    a = ap.parse_args()
    cfg = ExplainConfig(steps=a.steps, fid_samples=500, fid_input_size=a.fid_input_size)
    runs = {"regression": PhantomConfig(n=a.n, size=a.size, seed=0),
            "shortcut": PhantomConfig(n=a.n, size=a.size, seed=1, task="classification", shortcut=True, name="phantom-shortcut")}
    for name, pcfg in runs.items():
        if a.only and name != a.only:
            continue
        root = a.out / name
        ds, model, spec = prepare(root, pcfg, a.epochs)
        m = explain(ds, model, root / "explanation", cfg, task=spec.task, input_shape=tuple(spec.input_shape),
                    cnn_name=f"{spec.arch} ({name})")
        report(name, m, spec)
        if name == "shortcut":
            for c in m["components"]:
                mk = c["ground_truth"]["marker"]
                print(f"shortcut: component {c['component']} marker effect {mk['effect_sd']:+.2f} SD (ρ {mk['rho']:+.2f})")


if __name__ == "__main__":
    main()
