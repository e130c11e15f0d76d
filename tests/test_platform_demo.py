"""The README's main command, on tiny sizes: the embedded platform (MLflow, Prefect server, worker), a DVC-versioned
phantom, two CNN versions registered and explained by the worker with no other call; a second run does nothing new.
Plus dvc.yaml."""
import os
import subprocess
import sys
from pathlib import Path

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_platform_demo_quick(tmp_path, capsys, platform_env):
    """On its own free ports (platform_env): a platform left running by `make demo` holds the default ones."""
    assert main(["demo", "--quick", "--workdir", str(tmp_path), "--stop-server"]) == 0
    out = capsys.readouterr().out
    assert "versioned with DVC: md5" in out
    # the worker explained both registrations: the demo only registered and watched
    assert "phantom-cnn v1 status: running" in out and "phantom-cnn v2 status: running" in out
    assert out.count("phantom-cnn v1: done") == 1 and out.count("phantom-cnn v2: done") == 1
    assert "→ 200" in out and "(GIF89a)" in out            # served by the explanation service
    table = out[out.index("model "):]
    assert table.count(" done ") == 2
    run_ids = sorted(line.split("(run ")[1].split(")")[0] for line in out.splitlines() if ": done (run " in line)
    # everything is reused the second time: same versions, same explanations, nothing runs again
    assert main(["demo", "--quick", "--workdir", str(tmp_path), "--stop-server"]) == 0
    out2 = capsys.readouterr().out
    assert "already registered" in out2 and "running" not in out2.split("platform in")[1].split("model ")[0]
    assert sorted(line.split("(run ")[1].split(")")[0] for line in out2.splitlines() if ": done (run " in line) \
        == run_ids


def test_dvc_pipeline_declares_the_demo_stages(tmp_path):
    env = {**os.environ, "DVC_SITE_CACHE_DIR": str(tmp_path)}
    dvc = Path(sys.executable).with_name("dvc")
    res = subprocess.run([str(dvc), "dag", "--md"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for stage in ("phantom", "fashion", "cnn_phantom", "cnn_fashion"):
        assert stage in res.stdout
    assert "phantom" in res.stdout and "cnn_phantom" in res.stdout
