"""Drift across releases with real Evidently reports: a planted data shift is found, identical or same-distribution
data are not flagged, and two CNN versions (different seeds, same data) are diffed with their components matched."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flows.drift import STAT_COLUMNS, compare_versions, data_drift, feature_drift, image_statistics
from models.cnn import TrainConfig, train_cnn
from models.data import DatasetMeta, ImageDataset, write_dataset
from models.diff import explanation_diff
from models.explain import compute_features
from models.phantom import PhantomConfig, write_phantom
from models.pls import fit_pls


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Dataset versions: a, an identical copy of a, b (same distribution, other seed), and b with a planted
    exposure shift (brighter, lower contrast); plus one small CNN whose embeddings all of them share."""
    root = tmp_path_factory.mktemp("drift")
    a = write_phantom(root / "a", PhantomConfig(n=160, size=32, seed=1))
    b = write_phantom(root / "b", PhantomConfig(n=160, size=32, seed=2))
    copy = ImageDataset(shutil.copytree(a.root, root / "a_copy"))
    imgs = b.load(np.arange(len(b)))
    shifted = write_dataset(root / "shifted", b.meta, (np.clip(0.75 * im + 0.2, 0, 1) for im in imgs),
                            b.manifest.drop(columns=["path"]))
    torch.manual_seed(0)
    model, _ = train_cnn(a, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
    feats = {k: compute_features(model, ds) for k, ds in dict(a=a, copy=copy, b=b, shifted=shifted).items()}
    stats = {k: image_statistics(ds.iter_batches(64)) for k, ds in dict(a=a, copy=copy, b=b, shifted=shifted).items()}
    return dict(stats=stats, feats=feats, root=root)


def test_image_statistics_columns_and_values():
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1, 0, :, 4:] = 1.0                                              # half black, half white
    s = image_statistics([x])
    assert list(s.columns) == STAT_COLUMNS and len(s) == 2
    assert s.loc[0, "intensity_sd"] == 0 and s.loc[0, "intensity_skew"] == 0      # constant image: defined
    assert s.loc[1, "intensity_mean"] == pytest.approx(0.5) and s.loc[1, "intensity_p99"] == pytest.approx(1.0)
    assert s.loc[1, "edge_energy"] > 0 and s.loc[0, "edge_energy"] == 0


def test_planted_shift_is_detected(versions, tmp_path):
    s, f = versions["stats"], versions["feats"]
    out = tmp_path / "drift" / "data_drift.html"
    res = data_drift(s["a"], s["shifted"], f["a"], f["shifted"], out_html=out, reference_label="a",
                     current_label="shifted")
    assert res["drifted"] and res["statistics_drifted"]
    assert res["share_drifted"] >= 0.5 and res["columns"]["intensity_mean"]["drifted"]
    assert res["embedding_drifted"] and res["embedding_score"] > 0.8      # a classifier tells the sets apart
    html = out.read_text()
    assert len(html) > 100_000 and "<script" in html                      # Evidently's self-contained page
    assert res["report"] == "drift/data_drift.html" and "DRIFT" in res["headline"]


def test_identical_and_same_distribution_versions_are_not_flagged(versions):
    s, f = versions["stats"], versions["feats"]
    same = data_drift(s["a"], s["copy"], f["a"], f["copy"])
    assert not same["drifted"] and same["n_drifted_statistics"] == 0 and not same["embedding_drifted"]
    assert abs(same["embedding_score"] - 0.5) < 0.15
    fresh = data_drift(s["a"], s["b"], f["a"], f["b"])                  # new draw of the same phantom
    assert not fresh["drifted"] and fresh["share_drifted"] < 0.5 and not fresh["embedding_drifted"]


def test_feature_drift_flags_reshaped_and_replaced_axes(tmp_path):
    z = np.random.default_rng(0).standard_normal((300, 3))
    squashed = np.tanh(2 * z[:, 0])                                      # same order of images, other spread
    cur = np.column_stack([(squashed - squashed.mean()) / squashed.std(), z[:, 1]])
    d = explanation_diff(z[:, :2], cur, [70, 20], [70, 20], previous="v1", current="v2")
    assert d["pairs"][0]["r"] > 0.85                                      # the diff: still the same axis
    res = feature_drift(d, z[:, :2], cur, [70, 20], out_html=tmp_path / "f.html")
    assert res["drifted"] and res["columns"]["c1"]["drifted"] and not res["columns"]["c2"]["drifted"]
    assert res["n_axes"] == 2 and res["score"] == 0.5 and (tmp_path / "f.html").is_file()
    new = np.column_stack([z[:, 2], z[:, 1]])                             # top axis replaced by a new one
    d2 = explanation_diff(z[:, :2], new, [70, 20], [70, 20], previous="v1", current="v2")
    res2 = feature_drift(d2, z[:, :2], new, [70, 20])                   # only c2 is left to compare
    assert res2["drifted"] and "no counterpart" in res2["headline"] and res2["n_axes"] == 1
    assert not res2["columns"]["c2"]["drifted"]
    res3 = feature_drift(d2, z[:, :2], new, [70, 2])                     # ... unless it explains < 5 %
    assert res3["drifted"] and res3["n_axes"] == 0


def _discs(root, n=240, seed=0):
    rng = np.random.default_rng(seed)
    r, sh = rng.uniform(2, 6, n), rng.uniform(-2, 2, n)
    yy, xx = np.mgrid[:16, :16].astype(np.float32)
    d = np.sqrt((xx[None] - 8 - sh[:, None, None]) ** 2 + (yy[None] - 8) ** 2)
    imgs = (0.1 + 0.8 * rng.uniform(0.7, 1.0, (n, 1, 1)) / (1 + np.exp((d - r[:, None, None]) * 2.0)))[:, None]
    return write_dataset(root, DatasetMeta(name="discs", target="radius", task="regression"),
                         imgs.astype(np.float32), pd.DataFrame({"radius": r}))


def test_two_cnn_versions_are_diffed_and_matched(tmp_path):
    ds = _discs(tmp_path / "discs")
    fits = []
    for seed in (0, 1):                                                  # v1 and v2: same data, another seed
        model, spec = train_cnn(ds, TrainConfig(epochs=6, width=8, seed=seed), progress=False, log=lambda s: None)
        state, scores = fit_pls(compute_features(model, ds), ds.targets(), "regression", n_components=3)
        fits.append((model, spec, state, scores))
    (m1, spec1, st1, _), (m2, _, st2, sc2) = fits
    out = tmp_path / "art"
    summary = compare_versions(out, ds, m2, sc2, (100 * st2.explained_target_variance).tolist(), m1, st1,
                               spec1.input_shape, labels=("v1", "v2"))
    assert summary["errors"] == []
    d = summary["diff"]
    assert d["n_images"] == len(ds) and len(d["pairs"]) == 3
    top = d["pairs"][0]
    assert top["current"] == 1 and top["previous"] == 1 and top["matched"] and abs(top["r"]) > 0.9
    assert not d["flags"]["new_top_component_unmatched"]
    assert d["principal_angles_deg"][0] < 15
    assert abs(top["delta_pct"]) < 15                                     # the radius axis explains ~as much
    assert (out / "diff" / "diff.json").is_file()
    feat = summary["features"]                                            # retraining noise is not drift
    assert feat["status"] == "done" and feat["n_axes"] >= 1 and feat["axes"][0] == "v2 c1 ~ v1 c1"
    assert not feat["drifted"] and feat["columns"]["c1"]["score"] < 0.3
    assert (out / "drift" / "feature_drift.html").is_file()
    assert summary["data"]["status"] == "skipped"                         # same dataset version
    # a previous PLS state that does not fit the previous CNN: recorded, never raised
    bad = compare_versions(tmp_path / "bad", ds, m2, sc2, [50, 30, 20], m1, st1, [3, 16, 16], labels=("v1", "v2"))
    assert bad["diff"] is None and bad["features"]["status"] == "error" and bad["errors"][0].startswith("diff:")


@pytest.mark.slow
def test_flow_publishes_drift_diff_and_report(tmp_path, monkeypatch):
    """The explain flow end to end (MLflow server, DVC data store, Prefect): v1 on dataset version A, v2 (another
    seed) on version B with a planted exposure shift → v2 carries drift tags, and its run holds report.html,
    the Evidently pages and the diff; v1 (no predecessor) has none."""
    import yaml
    from mlflow import MlflowClient

    from flows.explain import explain_version, version_dataset_flow
    from flows.mlflow_server import start_server
    from flows.registry import get_drift_tags, get_status, register_cnn

    home = tmp_path / "platform"
    home.mkdir()
    (home / "explain.yaml").write_text(yaml.safe_dump(dict(
        steps=20, ckpt_every=10, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32, fid_extractor="randconv",
        frames=4, seeds=[0, 1], n_components=2, regressor_steps=20)))
    monkeypatch.setenv("FIGAN_HOME", str(home))
    monkeypatch.setenv("FIGAN_EXPLAIN_CONFIG", str(home / "explain.yaml"))
    monkeypatch.delenv("FIGAN_TRACKING_URI", raising=False)
    server = start_server(home / "mlflow")
    try:
        client = MlflowClient(server.uri)
        a = write_phantom(tmp_path / "src" / "a", PhantomConfig(n=96, size=32, seed=5))
        imgs = a.load(np.arange(len(a)))
        b = write_dataset(tmp_path / "src" / "b", a.meta, (np.clip(0.75 * im + 0.2, 0, 1) for im in imgs),
                          a.manifest.drop(columns=["path"]))
        md5_a, md5_b = (version_dataset_flow(str(ds.root))["md5"] for ds in (a, b))
        versions = []
        for seed, ds, md5 in ((0, a, md5_a), (1, b, md5_b)):
            torch.manual_seed(seed)
            model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4, seed=seed), progress=False, log=lambda s: None)
            v = register_cnn(model, spec, "drift-cnn", "phantom", md5, tracking_uri=server.uri).version
            assert explain_version("drift-cnn", v)["status"] == "done"
            versions.append(str(v))
        v1, v2 = versions
        assert get_drift_tags(client, "drift-cnn", v1) == {"data": None, "features": None, "diff": None}
        tags = get_drift_tags(client, "drift-cnn", v2)
        assert tags["data"]["drifted"] is True and tags["data"]["previous_version"] == v1
        assert tags["features"]["status"] == "done" and tags["features"]["previous_version"] == v1
        assert tags["diff"]["previous_version"] == v1 and tags["diff"]["n_components"] == 2
        run_id = get_status(client, "drift-cnn", v2)["run_id"]
        listed = {f.path for d in ("", "drift", "diff") for f in client.list_artifacts(run_id, d or None)}
        assert {"report.html", "drift/data_drift.html", "drift/feature_drift.html", "drift/summary.json",
                "diff/diff.json"} <= listed, listed
        page = Path(client.download_artifacts(run_id, "report.html", str(tmp_path / "dl"))).read_text()
        assert f"v{v2} vs v{v1}" in page and "Drift detected in the data" in page and md5_b in page
        v1_listed = {f.path for f in client.list_artifacts(get_status(client, "drift-cnn", v1)["run_id"])}
        assert "report.html" in v1_listed and "drift" not in v1_listed
    finally:
        server.stop()
