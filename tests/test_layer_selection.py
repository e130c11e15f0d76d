"""Feature-layer selection by FID (models/layer_selection.py): candidate parsing and bad names, the lowest FID
wins through the real code path (features, PLS, generator fitted per candidate; only the FID stubbed), and the
choice reaches metrics.json and report.html."""
import json

import pytest

import models.layer_selection as L
from models.cnn import TrainConfig, train_cnn
from models.explain import ExplainConfig, explain
from models.features import FeatureError
from models.phantom import PhantomConfig, write_phantom

TINY = ExplainConfig(fid_samples=24, fid_extractor="randconv", frames=4, seeds=(0,), n_components=2, check_seeds=4,
                     reader_epochs=1, register_iters=20, attribution_images=2)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    ds = write_phantom(tmp_path_factory.mktemp("ls") / "data", PhantomConfig(n=96, size=16, seed=5))
    model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda _: None)
    return ds, model, spec


def test_candidates_parse_and_bad_names_list_the_valid_ones(cnn):
    _, model, _ = cnn
    auto = L.candidate_layers(model, "auto")
    assert auto[0] is None and len(auto) == 3 and all(n.startswith("features.") for n in auto[1:])
    assert L.candidate_layers(model, ["final", "head.0", "final"]) == [None, "head.0"]
    with pytest.raises(FeatureError, match=r"'head.9' is not a layer of the CNN; valid names: .*'head.0'"):
        L.candidate_layers(model, ["final", "head.9"])
    with pytest.raises(FeatureError, match="'auto' or a non-empty list"):
        L.candidate_layers(model, [])
    with pytest.raises(ValueError, match="layers must be 'auto'"):
        ExplainConfig(layers="everything")


@pytest.mark.slow
def test_the_lowest_fid_is_explained_and_reported(cnn, tmp_path, monkeypatch):
    ds, model, spec = cnn
    stub = {"final": 50.0, "head.0": 20.0, "features.7.0": 35.0}       # the FID is the only stubbed part
    monkeypatch.setattr(L, "candidate_fid", lambda run, n, seed: stub[run.cfg.layer or "final"])
    cfg = ExplainConfig(**{**TINY.__dict__, "layers": ("final", "head.0", "features.7.0")})
    metrics = explain(ds, model, tmp_path / "e", cfg, task=spec.task, input_shape=tuple(spec.input_shape))
    sel = metrics["layer_selection"]
    assert sel["chosen"] == "head.0" and [c["fid"] for c in sel["candidates"]] == [50.0, 20.0, 35.0]
    assert all(c["n_features"] > 0 and c["pct_target_variance"] > 0 for c in sel["candidates"])
    assert metrics["cnn"]["layer"] == "head.0"
    saved = json.loads((tmp_path / "e" / "layers" / "layer_selection.json").read_text())
    assert saved["chosen"] == "head.0"
    from models.report import build_report
    page = build_report(tmp_path / "e").read_text()
    assert "candidate layers chosen by FID" in page and "features.7.0" in page


def test_cli_takes_candidate_layers():
    import argparse

    from models.cli import _add_explain_args, explain_config_from_args
    p = argparse.ArgumentParser()
    _add_explain_args(p)
    assert explain_config_from_args(p.parse_args(["--layers", "final,head.0"])).layers == ("final", "head.0")
    assert explain_config_from_args(p.parse_args(["--layers", "auto"])).layers == "auto"
    assert explain_config_from_args(p.parse_args([])).layers is None
