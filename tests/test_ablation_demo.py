"""The ablation grid and the quick-start demo path, on tiny sizes."""
import pandas as pd

from models.cli import main


def test_ablation_grid(tmp_path, capsys):
    data, cnn = tmp_path / "data", tmp_path / "cnn"
    assert main(["data", "phantom", "--out", str(data), "--n", "96", "--size", "32", "--masks"]) == 0
    assert main(["train-cnn", "--data", str(data), "--out", str(cnn), "--epochs", "1", "--width", "8"]) == 0
    rc = main(["ablate", "--data", str(data), "--cnn", str(cnn), "--out", str(tmp_path / "abl"),
               "--sizes", "48,96", "--resolutions", "16", "--masks", "on,off", "--generator", "cgan", "--steps", "4", "--ckpt-every", "4",
               "--ngf", "4", "--ndf", "4", "--batch-size", "8", "--fid-samples", "16", "--fid-extractor", "randconv",
               "--frames", "3", "--seeds", "0", "--n-components", "2", "--check-seeds", "4",
               "--reader-epochs", "1"])
    assert rc == 0
    table = pd.read_csv(tmp_path / "abl/ablation.csv")
    assert len(table) == 4 and set(table["n_images"]) == {48, 96} and set(table["masks"]) == {True, False}
    assert {"fid", "faithfulness_min", "reader_min", "gt_driving_rho", "verdict", "seconds", "fid_extractor"} <= set(table.columns)
    assert (tmp_path / "abl/n48_r16_mask/sequences/component_1.gif").exists()
    assert "n96_r16_nomask" in capsys.readouterr().out


def test_ablation_masks_need_masks(tmp_path, capsys):
    data, cnn = tmp_path / "data", tmp_path / "cnn"
    main(["data", "phantom", "--out", str(data), "--n", "48", "--size", "32"])
    main(["train-cnn", "--data", str(data), "--out", str(cnn), "--epochs", "1", "--width", "4"])
    rc = main(["ablate", "--data", str(data), "--cnn", str(cnn), "--out", str(tmp_path / "a"), "--masks", "on"])
    assert rc == 2 and "needs a dataset with masks" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    assert main(["demo-offline", "--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "finished in" in out and "gate faithfulness" in out
    assert (tmp_path / "explanation/metrics.json").exists()
