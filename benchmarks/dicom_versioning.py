"""Benchmark (issue 17): versioning throughput of a DICOM dataset against the same dataset as PNG files.

The same 64² phantom (3 000 images by default) is written three times: 8-bit PNG (the demo's format), 16-bit PNG
and 16-bit DICOM (the PNG-16's stored values, ``write_phantom(..., image_format="dicom")``). Each is versioned
into its own fresh data store with a local DVC remote (``flows.data.version_dataset``: open + header audit + hash +
copy + ``dvc add`` + ``dvc push`` + commit + tag), and timed; the audit alone (every image's header: size, transfer
syntax, patient-identifying tags, spacing) and a full pixel read (``ImageDataset.iter_batches``) are timed apart,
as images/s. Wall-clock figures move with the load of shared cores; the CPU time (this process and its git
children) beside them does much less, so the ratios are given on both. Writes
``benchmarks/results/dicom_versioning.json``.

    .venv/bin/python benchmarks/dicom_versioning.py [--n 3000] [--size 64] [--work runs/bench_dicom]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from flows.data import open_store, version_dataset
from models.data import ImageDataset
from models.dataset_audit import audit_dataset
from models.phantom import PhantomConfig, write_phantom

from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = Path(__file__).parent / "results" / "dicom_versioning.json"
FORMATS = {"png8": {"bits": 8}, "png16": {"bits": 16}, "dicom": {"image_format": "dicom"}}


def _cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of this process and its children)."""
    t, c = time.perf_counter(), _cpu()
    out = fn()
    return out, time.perf_counter() - t, _cpu() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_dicom"))
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    shutil.rmtree(a.work, ignore_errors=True)
    os.environ["DVC_SITE_CACHE_DIR"] = str((a.work / "dvc-site").resolve())
    cfg = PhantomConfig(n=a.n, size=a.size, seed=17)
    figures: dict[str, float | int] = {}
    loaded = {}
    for fmt, kwargs in FORMATS.items():
        ds, write_s, _ = _timed(lambda: write_phantom(a.work / fmt / "data", cfg, **kwargs))
        files = list((ds.root / "images").iterdir())
        store = open_store(a.work / fmt / "store")
        _, audit_s, audit_cpu = _timed(lambda: audit_dataset(ImageDataset(ds.root)))
        version, version_s, version_cpu = _timed(lambda: version_dataset(store, ds.root))
        pixels, read_s, _ = _timed(lambda: np.concatenate([b for _, b in ImageDataset(ds.root).iter_batches(256)]))
        loaded[fmt] = pixels
        assert version.n_images == a.n
        figures |= {f"{fmt}_version_images_per_s": round(a.n / version_s, 1),
                    f"{fmt}_version_s": round(version_s, 2),
                    f"{fmt}_version_cpu_ms_per_image": round(1e3 * version_cpu / a.n, 3),
                    f"{fmt}_audit_images_per_s": round(a.n / audit_s, 1),
                    f"{fmt}_audit_cpu_ms_per_image": round(1e3 * audit_cpu / a.n, 3),
                    f"{fmt}_read_images_per_s": round(a.n / read_s, 1),
                    f"{fmt}_write_images_per_s": round(a.n / write_s, 1),
                    f"{fmt}_bytes_per_image": int(sum(f.stat().st_size for f in files) / len(files))}
    for other in ("png16", "png8"):
        figures[f"dicom_vs_{other}_version_throughput"] = round(figures["dicom_version_images_per_s"]
                                                                / figures[f"{other}_version_images_per_s"], 3)
        figures[f"dicom_vs_{other}_version_cpu"] = round(figures["dicom_version_cpu_ms_per_image"]
                                                         / figures[f"{other}_version_cpu_ms_per_image"], 3)
    figures["dicom_audit_share_of_version_cpu"] = round(figures["dicom_audit_cpu_ms_per_image"]
                                                        / figures["dicom_version_cpu_ms_per_image"], 3)
    figures["dicom_equals_png16_max_abs"] = float(np.abs(loaded["dicom"] - loaded["png16"]).max())
    out = {**provenance(),
           "config": {"n_images": a.n, "size": a.size, "formats": list(FORMATS), "remote": "local folder",
                      "dicom": "16-bit MONOCHROME2, Explicit VR Little Endian, no window (stored range)"},
           "targets": {"dicom_vs_png16_version_throughput": ">= 0.5 (versioning DICOM at most 2x slower than the "
                                                            "same images as 16-bit PNG)",
                       "dicom_equals_png16_max_abs": "<= 1/65535 (the same pixels)",
                       "dicom_audit_share_of_version_cpu": "report (the header audit: PHI, size, syntax checks)"},
           "figures": figures}
    write_results(RESULTS, out)


if __name__ == "__main__":
    main()
