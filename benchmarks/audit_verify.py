"""Benchmark (issue 17): how long `figan verify` takes on one published explanation, and whether one edited byte
in any of its files is caught.

Publishes the 64² explanation of ``tests/service_platform.py`` (the one ``benchmarks/service_load.py`` serves; a
real MLflow server on loopback, signed with the platform's key), then

* runs ``figan verify <model> 1`` as a person does (a new process, imports included) ``--repeat`` times, and the
  check alone in-process (download every artifact, sha256 each, HMAC, tags);
* for every published file, the manifest included: flips one byte at a random place in the artifact store, verifies,
  restores it. A data file counts as detected when verify fails naming exactly that file as changed; the manifest
  when verify fails on its digest and signature.

Writes ``benchmarks/results/audit_verify.json``.

    .venv/bin/python benchmarks/audit_verify.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = Path(__file__).parent / "results" / "audit_verify.json"


def cli_verify(platform, model: str, version: str) -> tuple[float, float, str]:
    """`figan verify` in a new process: (wall seconds, the seconds it printed, its output)."""
    env = {**os.environ, "FIGAN_HOME": str(platform.home), "FIGAN_TRACKING_URI": platform.server.uri,
           "PYTHONPATH": str(REPO), "NO_PROXY": "127.0.0.1,localhost", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "verify", model, version], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"figan verify failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return wall, float(re.search(r"VERIFIED in ([0-9.]+) s", out.stdout).group(1)), out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    from flows.audit import verify_version
    from models.layout import MANIFEST
    from models.explain import ExplainConfig
    from service_platform import MODEL, Platform

    cfg = ExplainConfig(steps=10, ckpt_every=10, batch_size=16, fid_samples=32, fid_extractor="randconv",
                        n_components=2, regressor_steps=10)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="figan-bench-audit-") as tmp:
        platform = Platform.start(Path(tmp), cfg=cfg, size=64, serve=())
        try:
            client, key = platform.client, platform.signing_key
            run_id = client.get_model_version(MODEL, "1").tags["figan.run_id"]
            cli = [cli_verify(platform, MODEL, "1") for _ in range(a.repeat)]
            print(cli[-1][2])
            t = time.perf_counter()
            _, clean = verify_version(client, key, MODEL, "1")
            assert clean.ok, clean.problems
            in_process = [time.perf_counter() - t]
            files = sorted(clean.manifest["files"]) + [MANIFEST]
            sizes = {rel: platform.stored_artifact(run_id, rel).stat().st_size for rel in files}
            detected, missed = 0, []
            for rel in files:
                path = platform.stored_artifact(run_id, rel)
                original = path.read_bytes()
                edited = bytearray(original)
                edited[int(rng.integers(len(edited)))] ^= 1 << int(rng.integers(8))
                path.write_bytes(bytes(edited))
                try:
                    t = time.perf_counter()
                    _, result = verify_version(client, key, MODEL, "1")
                    in_process.append(time.perf_counter() - t)
                finally:
                    path.write_bytes(original)
                caught = (not result.ok and result.signature != "valid" if rel == MANIFEST
                          else not result.ok and result.changed == [rel] and result.signature == "valid")
                detected += caught
                if not caught:
                    missed.append({"file": rel, "problems": result.problems})
            assert verify_version(client, key, MODEL, "1")[1].ok                   # everything restored
        finally:
            platform.stop()
    figures = {"files": len(files), "bytes": sum(sizes.values()),
               "cli_wall_s_median": round(statistics.median(w for w, _, _ in cli), 2),
               "cli_reported_s_median": round(statistics.median(r for _, r, _ in cli), 2),
               "in_process_verify_s_median": round(statistics.median(in_process), 3),
               "one_byte_edits": len(files), "one_byte_edits_detected": detected}
    doc = {**provenance(),
           "config": {"explanation": "tests/service_platform.py 64² discs, cgan 10 steps (service_load's)",
                      "repeat": a.repeat, "load_average": [round(v, 2) for v in os.getloadavg()]},
           "targets": {"report": "figan verify time for one explanation; every one-byte edit detected and named"},
           "figures": figures, "missed": missed}
    write_results(RESULTS, doc)


if __name__ == "__main__":
    main()
