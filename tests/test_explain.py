"""The `explain` command end to end on a tiny phantom: artifacts folder complete, metrics schema stable,
re-run reuses features and the finished GAN; the CLI reports bad input clearly."""
import json

import pytest
from PIL import Image

from models.cli import main
from models.cnn import TrainConfig, save_cnn, train_cnn
from models.explain import ExplainConfig, explain
from models.phantom import PhantomConfig, write_phantom

TINY = ExplainConfig(steps=20, ckpt_every=10, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32,
                     fid_extractor="randconv", frames=4, seeds=(0, 1), n_components=2)


@pytest.fixture(scope="module")
def phantom_cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ds = write_phantom(root / "data", PhantomConfig(n=160, size=32, seed=3))
    model, spec = train_cnn(ds, TrainConfig(epochs=2, width=8), progress=False, log=lambda s: None)
    save_cnn(model, spec, root / "cnn")
    return root, ds, model, spec


def test_explain_artifacts(phantom_cnn):
    root, ds, model, spec = phantom_cnn
    out = root / "explanation"
    m = explain(ds, model, out, TINY, task=spec.task, input_shape=tuple(spec.input_shape), cnn_name="tiny")
    for f in ["config.json", "features.npy", "pls/pls.npz", "pls_variance.png", "scores.csv", "gan/last.pt",
              "gan/best/generator.pt", "fid_trace.png", "fid_trace.json", "metrics.json", "summary.txt",
              "sequences/component_1.gif", "sequences/component_2_eigen.png", "sequences/component_1_deviation.png",
              "sequences/component_1_strip.png"]:
        assert (out / f).exists(), f
    with Image.open(out / "sequences/component_1.gif") as gif:
        assert gif.n_frames >= 4
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema"] == "figan.metrics/1" and saved == json.loads(json.dumps(m))
    assert [r["step"] for r in saved["fid"]["trace"]] == [10, 20]
    assert "randconv" in saved["fid"]["extractor"].lower() and saved["fid"]["floor"] >= 0
    c1 = saved["components"][0]
    assert {"faithfulness", "conditioning", "ground_truth"} <= set(c1)
    assert {"heart_size", "vascular_fullness", "shift_x", "noise"} <= set(c1["ground_truth"])
    assert set(saved["gates"]) >= {"faithfulness", "conditioning", "fid", "diversity", "ground_truth", "all_pass"}
    # second run: features reused, GAN already finished → identical generator
    before = (out / "gan/best/generator.pt").read_bytes()
    explain(ds, model, out, TINY, task=spec.task, input_shape=tuple(spec.input_shape), cnn_name="tiny")
    assert (out / "gan/best/generator.pt").read_bytes() == before


def test_cli_explain_and_errors(phantom_cnn, tmp_path, capsys):
    root, ds, model, spec = phantom_cnn
    assert main(["components", "--data", str(root / "data"), "--cnn", str(root / "cnn"), "--out", str(tmp_path / "c"),
                 "--n-components", "2"]) == 0
    assert (tmp_path / "c/pls_variance.png").exists() and "pct_target_variance" in capsys.readouterr().out
    rc = main(["explain", "--data", str(tmp_path / "nope"), "--cnn", str(root / "cnn"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["components", "--data", str(root / "data"), "--cnn", str(root / "cnn"), "--out", str(tmp_path / "y"),
               "--layer", "features.99"])
    assert rc == 2 and "features.99" in capsys.readouterr().err
