"""The README's main command, on tiny sizes: embedded MLflow server, DVC-versioned phantom, two CNN versions
registered and explained through real Prefect flow runs; a second run does nothing new. Plus dvc.yaml."""
import os
import subprocess
import sys
from pathlib import Path

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_platform_demo_quick(tmp_path, capsys, monkeypatch):
    for var in ("FIGAN_HOME", "FIGAN_EXPLAIN_CONFIG", "FIGAN_TRACKING_URI"):
        monkeypatch.setenv(var, "")                      # restored after the test; the demo sets its own
    assert main(["demo", "--quick", "--workdir", str(tmp_path), "--stop-server"]) == 0
    out = capsys.readouterr().out
    assert "versioned with DVC: md5" in out
    assert out.count("phantom-cnn v1: done") == 1 and out.count("phantom-cnn v2: done") == 1
    assert "new=True" in out
    table = out[out.index("model "):]
    assert table.count(" done ") == 2
    # everything is reused the second time: same versions, no new explanation
    assert main(["demo", "--quick", "--workdir", str(tmp_path), "--stop-server"]) == 0
    out2 = capsys.readouterr().out
    assert "already registered" in out2 and "new=True" not in out2 and out2.count("new=False") == 2


def test_dvc_pipeline_declares_the_demo_stages(tmp_path):
    env = {**os.environ, "DVC_SITE_CACHE_DIR": str(tmp_path)}
    dvc = Path(sys.executable).with_name("dvc")
    res = subprocess.run([str(dvc), "dag", "--md"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for stage in ("phantom", "fashion", "cnn_phantom", "cnn_fashion"):
        assert stage in res.stdout
    assert "phantom" in res.stdout and "cnn_phantom" in res.stdout
