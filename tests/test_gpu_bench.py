"""The GPU benchmark's code path (benchmarks/gpu_trainer.py --smoke) runs on CPU and reports every part."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_trainer.py"), "--smoke", "--out", str(tmp_path),
                        "--work", str(tmp_path / "work"), "--device", "cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| variant | res | batch | img/s" in p.stdout and "Time to the fidelity gates" in p.stdout
    d = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert d["mode"] == "smoke" and not d["errors"], d["errors"]
    assert set(d["flops"]) == {"16", "32"} and all(f["flop_per_img_step"] > 0 for f in d["flops"].values())
    rows = {(r["variant"], r["resolution"]): r for r in d["throughput"]}
    assert set(rows) == {(v, r) for v in ("fp32", "bf16_cl") for r in (16, 32)}
    assert all(r["img_s"] > 0 and r["tflops"] >= 0 for r in rows.values())
    e = d["time_to_gates"]
    assert e["training"]["images_shown"] > 0 and e["training"]["stopped_by_time_limit"]
    assert e["training"]["fid_trace"] and "faithfulness" in e["gates"] and "all_pass" in e
    assert "EXTRAPOLATED" in e["extrapolated_15M"]["note"]
    assert (tmp_path / "e2e_metrics.json").exists()
