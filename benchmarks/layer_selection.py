"""Benchmark (issue 20): FIGAN's feature-layer selection by FID on the 64² phantom regression CNN.

Candidates ``auto`` (the final Linear's input and the last two convolutions), each fitted and scored exactly as the
explanation fits and scores its generator (same FID protocol and n). Reports every candidate's % target variance
and FID, the choice, and the wall-clock cost of the selection relative to the single-layer explanation's
(2 CPU cores). Uses the CNN and data of ``benchmarks/explain_gates.py`` (run it first). Writes
``benchmarks/results/layer_selection.json``.

    .venv/bin/python benchmarks/layer_selection.py [--data runs/bench_gates/regression]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from models.cnn import load_cnn
from models.data import ImageDataset
from models.explain import ExplainConfig, explain
from models.layer_selection import candidate_layers, select_layer

from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = Path(__file__).parent / "results" / "layer_selection.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("runs/bench_gates/regression"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_layers"))
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, spec = load_cnn(a.data / "cnn")
    ds = ImageDataset(a.data / "data")
    cfg = ExplainConfig(fid_samples=1000, fid_input_size=128)
    shutil.rmtree(a.out, ignore_errors=True)
    t = time.perf_counter()
    single = explain(ds, model, a.out / "single", cfg, task=spec.task, input_shape=tuple(spec.input_shape))
    single_s = time.perf_counter() - t
    candidates = candidate_layers(model, "auto")
    t = time.perf_counter()
    selection = select_layer(ds, model, candidates, a.out / "selection", cfg, spec.task, tuple(spec.input_shape))
    selection_s = time.perf_counter() - t
    figures = {"single_layer_explanation_s": round(single_s, 1), "selection_s": round(selection_s, 1),
               "selection_cost_relative": round(selection_s / single_s, 3),
               "single_layer_fid": single["fid"]["best"], "single_layer_floor": single["fid"]["floor"]}
    out = {**provenance(),
           "config": {"data": str(a.data), "candidates": [c or "final" for c in candidates],
                      "fid_samples": cfg.fid_samples, "fid_input_size": cfg.fid_input_size},
           "targets": {"report": "the chosen layer, every candidate's FID, the selection's cost relative to one "
                                 "single-layer explanation"},
           "figures": figures, "selection": selection}
    print(json.dumps(selection, indent=1))
    write_results(RESULTS, out)


if __name__ == "__main__":
    main()
