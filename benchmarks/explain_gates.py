"""Benchmark (issue 13): is the explanation true? Every gate on three explanations, 2 CPU cores.

Cases (each: data → CNN → the offline `explain` with the default patient generator):

* ``regression`` — 64² chest phantom, 3 000 images, SmallCNN regressing the target;
* ``shortcut``  — 64² chest phantom with a burned-in marker planted with the label, a SmallCNN binary
  classifier with **one logit** (BCE-with-logits); the marker must surface along a component;
* ``fashion``   — Fashion-MNIST shirt vs T-shirt (Debian ``dataset-fashion-mnist``, 28² → 32²), no ruler.

Prints each case's gates and figures and writes them all to ``benchmarks/results/explain_gates.json`` (machine,
date, config, and per case: resolution, timings, every figure with its target, gates {name: PASS|FAIL}).

    .venv/bin/python benchmarks/explain_gates.py [--only regression,shortcut,fashion] [--generator patient]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from models.cnn import TrainConfig, load_cnn, save_cnn, train_cnn
from models.data import ImageDataset
from models.explain import ExplainConfig, explain
from models.phantom import PhantomConfig, write_phantom

RESULTS = Path(__file__).parent / "results" / "explain_gates.json"
TARGETS = {"faithfulness_rho": ">= 0.9 per component >= 10 % variance", "reader_rho": ">= 0.9 (same components)",
           "conditioning_r": ">= 0.9", "fid_ratio": "<= 2x real-vs-real floor (same n)",
           "diversity": ">= 0.5x real (pixels and every ruler nuisance)",
           "driving_factor": "|rho| >= 0.9 and >= 2 SD on the top component",
           "nuisance": "effect interval within 0.15 SD of the expected interval, every gated component",
           "shortcut_surfaces": "marker effect >= 1 SD, |rho| >= 0.5 along some component",
           "seconds_per_explanation": "<= 600"}


def _data(name: str, root: Path, n: int) -> ImageDataset:
    path = root / "data"
    if (path / "manifest.csv").exists():
        return ImageDataset(path)
    if name == "regression":
        return write_phantom(path, PhantomConfig(n=n, size=64, seed=0))
    if name == "shortcut":
        return write_phantom(path, PhantomConfig(n=n, size=64, seed=1, task="classification", shortcut=True,
                                                 name="phantom-shortcut"))
    from models.fashion import write_fashion_mnist
    return write_fashion_mnist(path, task="shirt_vs_tshirt", n=n, size=32, seed=0)


TRAIN = {"regression": TrainConfig(arch="smallcnn", width=12, epochs=6),
         "shortcut": TrainConfig(arch="smallcnn", width=16, epochs=8, single_logit=True),
         "fashion": TrainConfig(arch="smallcnn", width=16, epochs=6)}


def run_case(name: str, root: Path, n: int, cfg: ExplainConfig) -> dict:
    ds = _data(name, root, n)
    if (root / "cnn" / "cnn.json").exists():
        model, spec = load_cnn(root / "cnn")
    else:
        model, spec = train_cnn(ds, TRAIN[name])
        save_cnn(model, spec, root / "cnn")
    m = explain(ds, model, root / f"explanation-{cfg.generator}", cfg, task=spec.task,
                input_shape=tuple(spec.input_shape), cnn_name=f"{spec.arch} ({name})")
    comps = m["components"]
    return {
        "dataset": ds.name, "n_images": len(ds), "resolution": m["training"]["resolution"],
        "cnn": {"arch": spec.arch, "train": asdict(TRAIN[name]),
                "heldout": {k: v for k, v in spec.metrics.items() if k.startswith("test_")}},
        "seconds": m["timings_s"], "pls": m["pls"], "sweep_range": m["sweep"]["range"],
        "fid": {k: v for k, v in m["fid"].items() if k != "trace"},
        "fid_ratio": round(m["fid"]["best"] / m["fid"]["floor"], 3) if m["fid"].get("floor") else None,
        "diversity": m["diversity"], "reader": m["reader"],
        "components": [{"component": c["component"], "pct_target_variance": c["pct_target_variance"],
                        "faithfulness_rho": c["faithfulness"]["rho_mean"], "reader_rho": c["reader"]["rho_mean"],
                        "conditioning_r": c["conditioning"]["r_pooled"],
                        "conditioning_r_random": c["conditioning"].get("r_random"),
                        "ground_truth": c.get("ground_truth")} for c in comps],
        "gates": {k: ("PASS" if v["pass"] else "FAIL") for k, v in m["gates"].items() if isinstance(v, dict)},
        "gate_details": {k: v for k, v in m["gates"].items() if isinstance(v, dict)},
        "verdict": m["verdict"],
    }


def print_case(name: str, r: dict) -> None:
    print(f"\n## {name}: {r['dataset']} {r['n_images']} images at {r['resolution']}², CNN {r['cnn']['arch']} "
          f"held-out {r['cnn']['heldout']}; {r['seconds']['total']:.0f} s ({r['seconds']})")
    print(f"PLS % target variance {r['pls']['pct_target_variance']}; held-out cumulative: target "
          f"{r['pls']['heldout'].get('cumulative_pct_target_variance')}, CNN output "
          f"{r['pls']['heldout'].get('cumulative_pct_cnn_output_variance')}")
    f = r["fid"]
    print(f"FID {f['best']:.1f} vs floor {f['floor']:.1f} (ratio {r['fid_ratio']}, n={f['n_samples']}, {f['extractor']})")
    print(f"diversity {r['diversity']}; reader {r['reader']}")
    print("| comp | %var | faithful ρ | reader ρ | cond r (sweep/random) | largest effects: SD [95 % CI] (expected) |")
    print("|---|---|---|---|---|---|")
    for c in r["components"]:
        gt = c["ground_truth"] or {}
        top = sorted(gt.items(), key=lambda kv: -abs(kv[1]["effect_sd"]))[:4]
        eff = "; ".join(f"{k} {v['effect_sd']:+.2f} [{v['ci95'][0]:+.2f},{v['ci95'][1]:+.2f}] "
                        f"({v.get('expected_effect_sd', float('nan')):+.2f})" for k, v in top)
        print(f"| {c['component']} | {c['pct_target_variance']:.1f} | {c['faithfulness_rho']:.3f} | "
              f"{c['reader_rho']:.3f} | {c['conditioning_r']:.3f} / {c['conditioning_r_random']} | {eff} |")
    print("gates: " + ", ".join(f"{k} {v}" for k, v in r["gates"].items()) + f" → {r['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="regression,shortcut,fashion")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--generator", default="patient", choices=["patient", "cgan"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_gates"))
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = ExplainConfig(generator=a.generator, fid_samples=2000, fid_input_size=128)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": {}}
    results.update(machine={"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
                   date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   config=asdict(cfg), targets=TARGETS)
    for name in a.only.split(","):
        r = run_case(name, a.out / name, a.n, cfg)
        print_case(name, r)
        results["cases"][f"{name}/{a.generator}"] = r
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
