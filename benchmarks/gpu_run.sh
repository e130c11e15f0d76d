#!/usr/bin/env bash
# Issue 9 GPU benchmark, the one command to run on the GPU machine (repo root as working directory; python3 there is
# the one with torch). Total <= 8 min; results in $OUT/gpu_bench.json, the log in $OUT/log.txt.
set -o pipefail
OUT="${OUT:-runs/gpu_bench}"
mkdir -p "$OUT"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_trainer.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
