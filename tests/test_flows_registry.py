"""The MLflow layer against a real `mlflow server` (SQLite, loopback, free port): one server for the module.

Covers flows.mlflow_server (start, idempotent start, find, stop leaves no process), flows.registry (register a
tiny trained CNN with its contract, load it back as a hookable nn.Module, contract errors name the tag, status
tags, publishing/finding/downloading an explanation run, the verdict tag and the pass alias, the status table,
the CNN's LoggedModel as the run's input with the headline metrics on it) and the audit trail (`figan verify`
on the signed manifest: an edited byte, a missing and an extra file, another key).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from flows import registry as R
from flows.mlflow_server import find_server, start_server, stop_server
from models import layout
from models.cnn import TrainConfig, train_cnn
from models.features import extract_features
from models.phantom import PhantomConfig, write_phantom
from models.verdict import verdict_of, verdict_text

MD5 = "0123456789abcdef0123456789abcdef.dir"
SIGNING_KEY = b"registry-test-audit-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-home")
    srv = start_server(home)
    yield srv
    stop_server(home)
    assert not srv.alive() and not srv.processes()


@pytest.fixture(scope="module")
def client(server):
    return MlflowClient(tracking_uri=server.uri)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ds = write_phantom(tmp_path_factory.mktemp("data") / "phantom", PhantomConfig(n=64, size=16))
    model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda _: None)
    return ds, model, spec


@pytest.fixture(scope="module")
def registered(server, trained):
    _, model, spec = trained
    return R.register_cnn(model, spec, "cnn", dataset="phantom", dataset_md5=MD5, tracking_uri=server.uri)


def test_server_start_is_idempotent(server):
    assert server.alive() and server.healthy()
    assert server.uri.startswith("http://127.0.0.1:")
    again = start_server(server.home)
    assert again.pid == server.pid and again.uri == server.uri
    found = find_server(server.home)
    assert found is not None and found.pid == server.pid
    info = json.loads((server.home / "server.json").read_text())
    assert info["uri"] == server.uri and info["pid"] == server.pid
    assert (server.home / "webhook.key").read_text().strip()
    assert 1 <= len(server.processes()) <= 3          # launcher + one uvicorn worker, no job runners


def test_register_and_read_contract(client, registered, trained):
    _, _, spec = trained
    mv = registered
    assert mv.name == "cnn" and mv.version == "1"
    c = R.read_contract(client, "cnn", mv.version)
    assert (c.dataset, c.dataset_md5, c.task, c.target) == ("phantom", MD5, "regression", spec.target)
    assert c.input_shape == (1, 16, 16) and c.layer is None and c.class_names is None
    assert R.explain_requested(client, "cnn", mv.version)
    run = client.get_run(mv.run_id)
    assert "test_r2" in run.data.metrics and "epoch_loss" in run.data.metrics
    assert "cnn.json" in {a.path for a in client.list_artifacts(mv.run_id)}
    assert os.environ.get("MLFLOW_TRACKING_URI") != client.tracking_uri     # the caller's setting restored
    (ds_input,) = run.inputs.dataset_inputs
    assert ds_input.dataset.digest == MD5 and MD5 in ds_input.dataset.source


def test_loaded_cnn_matches_and_is_hookable(client, registered, trained):
    ds, model, _ = trained
    loaded, spec = R.load_cnn_version(client, "cnn", registered.version)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training and spec is not None
    assert any(isinstance(m, torch.nn.Linear) for _, m in loaded.named_modules())
    x = torch.from_numpy(ds.load(np.arange(5)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    feats = extract_features(loaded, x)
    assert feats.shape == (5, 64) and np.allclose(feats, extract_features(model, x), atol=1e-6)


def test_contract_errors_name_the_tag(client, registered):
    v = registered.version
    client.set_model_version_tag("cnn", v, R.TAG_TASK, "foo")
    with pytest.raises(R.ContractError, match=r"model version cnn/1: tag figan.task must be regression or "
                                              r"classification, got 'foo'"):
        R.read_contract(client, "cnn", v)
    client.set_model_version_tag("cnn", v, R.TAG_TASK, "regression")
    client.set_model_version_tag("cnn", v, R.TAG_INPUT_SHAPE, "[1, 16]")
    with pytest.raises(R.ContractError, match="tag figan.input_shape"):
        R.read_contract(client, "cnn", v)
    client.set_model_version_tag("cnn", v, R.TAG_INPUT_SHAPE, "[1, 16, 16]")
    client.delete_model_version_tag("cnn", v, R.TAG_DATASET)
    with pytest.raises(R.ContractError, match="tag figan.dataset is missing"):
        R.read_contract(client, "cnn", v)
    client.set_registered_model_tag("cnn", R.TAG_DATASET, "phantom-on-model")   # model-level fallback
    assert R.read_contract(client, "cnn", v).dataset == "phantom-on-model"
    client.set_model_version_tag("cnn", v, R.TAG_DATASET, "phantom")             # the version wins
    assert R.read_contract(client, "cnn", v).dataset == "phantom"


def test_non_torch_version_is_a_contract_error(client, tmp_path):
    exp = client.create_experiment("not-a-cnn")
    run = client.create_run(exp)
    (tmp_path / "notes.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "notes.txt"), "stuff")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("notes")
    mv = client.create_model_version("notes", f"{run.info.artifact_uri}/stuff", run_id=run.info.run_id)
    with pytest.raises(R.ContractError, match="is not a PyTorch CNN"):
        R.load_cnn_version(client, "notes", mv.version)


def test_status_roundtrip(client, registered):
    v = registered.version
    assert R.get_status(client, "cnn", v)["status"] is None
    R.set_status(client, "cnn", v, "queued", key="k0")
    with pytest.raises(ValueError, match="requires error"):
        R.set_status(client, "cnn", v, "failed")
    with pytest.raises(ValueError, match="status must be one of"):
        R.set_status(client, "cnn", v, "exploded", error="x")
    R.set_status(client, "cnn", v, "failed", error="tag figan.task must be ...")
    st = R.get_status(client, "cnn", v)
    assert st["status"] == "failed" and st["error"].startswith("tag figan.task") and st["key"] == "k0"
    assert st["updated"]
    R.set_status(client, "cnn", v, "running")
    st = R.get_status(client, "cnn", v)
    assert st["status"] == "running" and st["error"] is None


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)


@pytest.fixture
def fake_explanation(tmp_path) -> tuple[Path, dict]:
    d = tmp_path / "explanation"
    metrics = {"schema": "figan.metrics/1", "config_hash": "abc123def456",
               "pls": {"n_components": 2, "pct_target_variance": [60.5, 20.25]},
               "fid": {"extractor": "randconv", "best": 12.5, "best_step": 20, "floor": 1.0,
                       "trace": [{"step": 10, "fid": 30.0}, {"step": 20, "fid": 12.5}]},
               "components": [{"component": 1, "pct_target_variance": 60.5,
                               "faithfulness": {"rho_mean": 0.9, "rho_per_seed": [0.9, 0.9]},
                               "ground_truth": {"heart_size": {"rho": 0.8, "effect_sd": float("nan")}}},
                              {"component": 2, "pct_target_variance": 20.25,
                               "faithfulness": {"rho_mean": 0.5, "rho_per_seed": [0.4, 0.6]}}],
               "gates": {"all_pass": True}}
    _png(d / "fid_trace.png")
    _png(d / "sequences" / "component_1_strip.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "sequences" / "component_1.gif",
                                                     save_all=True, append_images=[Image.new("L", (8, 8), 255)])
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "gan" / "best").mkdir(parents=True)
    torch.save({"w": torch.zeros(3)}, d / "gan" / "last.pt")
    torch.save({"w": torch.ones(3)}, d / "gan" / "best" / "generator.pt")
    (d / "pls").mkdir()
    (d / "pls" / "pls.json").write_text('{"k": 2}')
    np.save(d / "features.npy", np.zeros((4, 4), np.float32))
    return d, metrics


def test_publish_find_download(client, registered, fake_explanation, tmp_path):
    d, metrics = fake_explanation
    v = registered.version
    assert R.find_explanation(client, "cnn", v, "key-1") is None
    run_id = R.publish_explanation(client, "cnn", v, d, metrics, {"dataset": "phantom", "dataset_md5": MD5},
                                   key="key-1", signing_key=SIGNING_KEY)
    files = {f.relative_to(d).as_posix() for f in d.rglob("*") if f.is_file()}
    art: set[str] = set()
    stack = [None]
    while stack:
        for a in client.list_artifacts(run_id, stack.pop()):
            (stack.append(a.path) if a.is_dir else art.add(a.path))
    assert art == files - {"gan/last.pt", "features.npy"} | {"lineage.json", "audit/manifest.json"}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["fid_best"] == 12.5 and m["c1_faithfulness_rho_mean"] == 0.9 and m["c2_pct_target_variance"] == 20.25
    assert m["gates_all_pass"] == 1.0 and "c1_ground_truth_heart_size_effect_sd" not in m   # NaN skipped
    assert [p.step for p in client.get_metric_history(run_id, "fid")] == [10, 20]
    t = run.data.tags
    assert (t["figan.model"], t["figan.version"], t["figan.key"]) == ("cnn", v, "key-1")
    assert t["lineage.dataset_md5"] == MD5 and t["lineage.config_hash"] == "abc123def456"
    assert t["lineage.code_version"]

    st = R.get_status(client, "cnn", v)
    assert st["status"] == "done" and st["run_id"] == run_id and st["key"] == "key-1"
    assert st["fid_best"] == 12.5 and st["fid_extractor"] == "randconv"
    assert st["faithfulness"] == [0.9, 0.5] and st["pct_variance"] == [60.5, 20.25]
    assert client.get_model_version("cnn", v).tags[R.TAG_VERDICT] == "pass"
    assert (st["verdict"], st["failing_gates"]) == ("pass", [])

    assert R.find_explanation(client, "cnn", v, "key-1") == run_id
    assert R.find_explanation(client, "cnn", v, "key-2") is None
    assert R.find_explanation(client, "cnn", "99", "key-1") is None

    out = R.download_explanation(client, run_id, tmp_path / "served")
    assert (out / "gan" / "best" / "generator.pt").is_file() and not (out / "gan" / "last.pt").exists()
    assert torch.equal(torch.load(out / "gan" / "best" / "generator.pt")["w"], torch.ones(3))
    assert json.loads((out / "metrics.json").read_text()) == json.loads((d / "metrics.json").read_text())
    assert (out / "pls" / "pls.json").is_file() and (out / "sequences" / "component_1.gif").is_file()
    assert (out / "audit" / "manifest.json").is_file()
    assert json.loads((out / "lineage.json").read_text())["cnn_version"] == v

    rows = R.list_versions(client, "cnn")
    assert [(r["name"], r["version"], r["status"], r["explain"]) for r in rows] == [("cnn", v, "done", True)]
    client.set_registered_model_alias("cnn", "champion", v)
    (row,) = R.list_versions(client, "cnn")
    assert row["aliases"] == ["champion"] and row["faithfulness"] == [0.9, 0.5]
    assert {r["name"] for r in R.list_versions(client)} >= {"cnn"}


def test_verdict_of_and_its_tag():
    gates = {"faithfulness": {"pass": True, "threshold": 0.9}, "fid": {"pass": False}, "diversity": {"pass": False},
             "all_pass": False}
    failing = {"verdict": "fail", "failing": ["fid", "diversity"]}
    assert verdict_of({"gates": gates}) == failing                          # older metrics.json: from the gates
    assert verdict_of({"gates": {"fid": {"pass": True}, "all_pass": True}}) == {"verdict": "pass", "failing": []}
    stored = {"verdict": "fail", "failing": ["conditioning"]}
    assert verdict_of({"gates": {"all_pass": True}, "verdict": stored}) == stored   # the stored verdict wins
    assert verdict_of({}) is None and verdict_text(None) == "not evaluated"
    assert verdict_text(failing) == "FAIL — failing gates: fid, diversity" and verdict_text(verdict_of(
        {"gates": {"all_pass": True}})) == "PASS"
    assert R.verdict_tag(failing) == "fail: fid, diversity" and R.verdict_tag({"verdict": "pass"}) == "pass"
    assert R.parse_verdict_tag("fail: fid, diversity") == failing and R.parse_verdict_tag("pass")["failing"] == []
    assert R.verdict_tag(None) is None and R.parse_verdict_tag(None) is None and R.parse_verdict_tag("?") is None


def _gates(*failing: str) -> dict:
    gates = {g: {"pass": g not in failing} for g in ("faithfulness", "conditioning", "fid", "diversity")}
    return {**gates, "all_pass": not failing}


def test_verdict_tag_status_column_and_pass_alias(client, registered, fake_explanation, monkeypatch):
    """Publishing tags the verdict; `figan status` shows it; the pass alias only ever names a passing version."""
    from flows.status import status_table

    d, metrics = fake_explanation
    first = client.get_model_version("cnn", registered.version)
    model_id = first.model_id or first.source.removeprefix("models:/")
    v_pass, v_fail = (client.create_model_version("cnn", first.source, first.run_id, model_id=model_id).version
                      for _ in range(2))

    def publish(version: str, key: str, gates: dict) -> str:
        m = {**metrics, "gates": gates}
        (d / "metrics.json").write_text(json.dumps(m))
        return R.publish_explanation(client, "cnn", version, d, m, {}, key=key, signing_key=SIGNING_KEY,
                                     pass_alias="trusted")

    run_pass = publish(v_pass, "key-pass", _gates())
    run_fail = publish(v_fail, "key-fail", _gates("fid", "diversity"))
    tags = {v: client.get_model_version("cnn", v).tags for v in (v_pass, v_fail)}
    assert tags[v_pass][R.TAG_VERDICT] == "pass" and tags[v_fail][R.TAG_VERDICT] == "fail: fid, diversity"
    assert tags[v_pass][R.TAG_STATUS] == tags[v_fail][R.TAG_STATUS] == "done"      # done = published, either way
    assert client.get_registered_model("cnn").aliases["trusted"] == v_pass
    assert R.run_verdict(client, run_fail) == {"verdict": "fail", "failing": ["fid", "diversity"]}
    assert R.run_verdict(client, run_pass) == {"verdict": "pass", "failing": []}
    rows = {r["version"]: r for r in R.list_versions(client, "cnn")}
    assert (rows[v_fail]["verdict"], rows[v_fail]["failing_gates"]) == ("fail", ["fid", "diversity"])
    assert (rows[v_pass]["verdict"], rows[v_pass]["failing_gates"]) == ("pass", [])

    monkeypatch.setenv("FIGAN_TRACKING_URI", client.tracking_uri)
    monkeypatch.setenv("FIGAN_HOME", str(d.parent / "home"))
    lines = {line.split()[1]: line for line in status_table("cnn").splitlines() if line.startswith("cnn ")}
    assert "verdict" in status_table("cnn").splitlines()[0]
    assert " done     pass " in lines[v_pass] and " done     fail: fid, diversity " in lines[v_fail]
    R.set_status(client, "cnn", v_fail, "running", key="key-again")       # the tag is the previous explanation's
    assert " running  - " in {line.split()[1]: line for line in status_table("cnn").splitlines()
                               if line.startswith("cnn ")}[v_fail]

    fixed, failed_again = {"verdict": "pass", "failing": []}, {"verdict": "fail", "failing": ["conditioning"]}
    assert R.apply_pass_alias(client, "cnn", v_fail, "trusted", fixed)      # re-explained, passes: takes the alias
    assert client.get_registered_model("cnn").aliases["trusted"] == v_fail
    assert not R.apply_pass_alias(client, "cnn", v_pass, "trusted", failed_again)   # not its alias: left alone
    assert client.get_registered_model("cnn").aliases["trusted"] == v_fail
    assert not R.apply_pass_alias(client, "cnn", v_fail, "trusted", failed_again)   # fails again: taken off
    assert "trusted" not in (client.get_registered_model("cnn").aliases or {})


# --------------------------------------------------------------------------------------------- audit trail

def stored_artifact(server, client, run_id: str, rel: str) -> Path:
    """Where the server keeps a run's artifact on disk: what someone with access to the artifact store edits."""
    uri = client.get_run(run_id).info.artifact_uri            # mlflow-artifacts:/<experiment>/<run>/artifacts
    return server.home / "artifacts" / uri.partition(":")[2].lstrip("/") / rel


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def verify(client, monkeypatch, capsys, tmp_path):
    """`figan verify cnn VERSION` in-process against this server, with the signing key (or ``key``); returns the
    exit code and what it printed."""
    from flows.cli import main

    monkeypatch.setenv("FIGAN_TRACKING_URI", client.tracking_uri)
    monkeypatch.setenv("FIGAN_HOME", str(tmp_path / "home"))

    def run(version: str, key: bytes = SIGNING_KEY) -> tuple[int, str]:
        monkeypatch.setenv("FIGAN_AUDIT_KEY", key.decode())
        code = main(["verify", "cnn", version])
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    return run


def _publish_new_version(client, registered, d: Path, metrics: dict, key: str, source: str | None = None,
                         **lineage) -> tuple[str, str]:
    """A new version of the registered CNN (from its LoggedModel, or ``source``) with the explanation published."""
    model_id = None if source else registered.source.removeprefix("models:/")
    version = client.create_model_version("cnn", source or registered.source, registered.run_id,
                                          model_id=model_id).version
    run_id = R.publish_explanation(client, "cnn", version, d, metrics, {"dataset": "phantom", "dataset_md5": MD5,
                                                                         **lineage},
                                   key=key, signing_key=SIGNING_KEY)
    return version, run_id


def test_published_explanation_is_signed_and_linked_to_the_cnn(client, registered, fake_explanation, verify,
                                                               tmp_path):
    d, metrics = fake_explanation
    v, run_id = _publish_new_version(client, registered, d, metrics, "key-audit", dataset_created="2026-11-29",
                                     cnn_digest="c" * 64)
    code, out = verify(v)
    assert code == 0 and "VERIFIED in " in out and "signature  valid" in out, out
    digest = client.get_model_version("cnn", v).tags[R.TAG_MANIFEST]
    run = client.get_run(run_id)
    assert run.data.tags[R.RUN_TAG_MANIFEST] == digest and f"manifest sha256 {digest}" in out
    assert R.list_versions(client, "cnn")[int(v) - 1]["manifest_sha256"] == digest

    manifest = json.loads(Path(client.download_artifacts(run_id, layout.MANIFEST, str(tmp_path))).read_text())
    published = {f.relative_to(d).as_posix() for f in d.rglob("*") if f.is_file()} - {"gan/last.pt", "features.npy"}
    assert set(manifest["files"]) == published | {"lineage.json"}              # every artifact but the manifest
    assert manifest["subject"] == {"model": "cnn", "version": v, "key": "key-audit", "run_id": run_id}
    model_id = registered.source.removeprefix("models:/")
    inputs = manifest["inputs"]
    assert (inputs["dataset"], inputs["dataset_md5"], inputs["dataset_created"]) == ("phantom", MD5, "2026-11-29")
    assert inputs["cnn_digest"] == "c" * 64 and inputs["cnn_model_id"] == model_id
    assert inputs["config_hash"] == "abc123def456" and inputs["code_version"]
    assert inputs["libraries"]["torch"] == torch.__version__ and inputs["libraries"]["mlflow"]

    # MLflow 3: the CNN's LoggedModel is the run's input, and the headline metrics show on the CNN's model page
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics if m.run_id == run_id}
    assert linked == {"fid_best": 12.5, "fid_floor": 1.0, "verdict_pass": 1.0, "c1_faithfulness_rho_mean": 0.9,
                      "c2_faithfulness_rho_mean": 0.5, "c1_pct_target_variance": 60.5, "c2_pct_target_variance": 20.25}
    assert run.data.params["verdict"] == "pass" and run.data.metrics["verdict_pass"] == 1.0


def test_caches_and_training_state_are_not_published_at_any_depth(client, registered, fake_explanation, tmp_path):
    """Layer selection keeps each candidate's explanation under layers/: its record and kept generator are
    published, its features, checkpoints and registration (caches, hundreds of MB on real data) are not."""
    d, metrics = fake_explanation
    candidate = d / "layers" / "candidate-1"
    (candidate / "gan" / "best").mkdir(parents=True)
    for cache in (candidate / "features.npy", candidate / "gan" / "last.pt", candidate / "gan" / "pose.pt",
                  d / "layers" / "pose.pt"):
        cache.write_bytes(b"cache")
    (candidate / "gan" / "best" / "generator.pt").write_bytes(b"weights")
    (candidate / "metrics.json").write_text("{}")
    (d / "layers" / "layer_selection.json").write_text("{}")
    _, run_id = _publish_new_version(client, registered, d, metrics, "key-layers")
    manifest = json.loads(Path(client.download_artifacts(run_id, layout.MANIFEST, str(tmp_path))).read_text())
    assert {f for f in manifest["files"] if f.startswith("layers/")} == {
        "layers/layer_selection.json", "layers/candidate-1/metrics.json", "layers/candidate-1/gan/best/generator.pt"}
    assert "features.npy" not in manifest["files"] and "gan/last.pt" not in manifest["files"]


def test_a_version_registered_without_a_logged_model_still_publishes_and_verifies(client, registered,
                                                                                  fake_explanation, verify):
    d, metrics = fake_explanation
    v, run_id = _publish_new_version(client, registered, d, metrics, "key-old-way",
                                     source=f"runs:/{registered.run_id}/{R.MODEL_NAME_IN_RUN}")
    assert R.logged_model_id(client, "cnn", v) is None
    run = client.get_run(run_id)
    assert not run.inputs.model_inputs and "lineage.cnn_model_id" not in run.data.tags
    assert run.inputs.dataset_inputs[0].dataset.digest == MD5
    code, out = verify(v)
    assert code == 0 and "VERIFIED" in out, out


def test_verify_names_every_edited_missing_and_extra_file(server, client, registered, fake_explanation, verify):
    d, metrics = fake_explanation
    v, run_id = _publish_new_version(client, registered, d, metrics, "key-tampered")
    flip_one_byte(stored_artifact(server, client, run_id, "sequences/component_1.gif"))
    stored_artifact(server, client, run_id, "pls/pls.json").unlink()
    stored_artifact(server, client, run_id, "sequences/component_9.gif").write_bytes(b"GIF89a")
    code, out = verify(v)
    assert code == 1 and "NOT VERIFIED in " in out, out
    assert "signature  valid" in out and "1 changed, 1 missing, 1 extra" in out
    for line in ("FAILED     changed: sequences/component_1.gif", "FAILED     missing: pls/pls.json",
                 "FAILED     extra: sequences/component_9.gif"):
        assert line in out, out


def test_verify_fails_on_another_key_a_rewritten_tag_and_nothing_published(client, registered, fake_explanation,
                                                                          verify):
    d, metrics = fake_explanation
    v, run_id = _publish_new_version(client, registered, d, metrics, "key-other")
    code, out = verify(v, key=b"not-the-platform-key-0123456789")
    assert code == 1 and "signature  other key" in out and "made with another key" in out, out
    assert "0 changed, 0 missing, 0 extra" in out
    client.set_model_version_tag("cnn", v, R.TAG_MANIFEST, "0" * 64)       # a tag pointing at another manifest
    code, out = verify(v)
    assert code == 1 and f"is not the published {'0' * 64}" in out, out
    nothing = client.create_model_version("cnn", f"runs:/{registered.run_id}/{R.MODEL_NAME_IN_RUN}",
                                          registered.run_id).version
    code, out = verify(nothing)
    assert code == 2 and f"model version cnn/{nothing} has no published explanation" in out, out


def test_the_last_published_run_outlives_a_re_explanation(client, registered, fake_explanation):
    """Publishing records the version's last good run and key; a re-run (queued, running, failed) leaves them, a
    new publish moves them; a version published before these tags existed gets them on its next status change."""
    d, metrics = fake_explanation
    first = client.get_model_version("cnn", registered.version)
    model_id = first.model_id or first.source.removeprefix("models:/")
    v = client.create_model_version("cnn", first.source, first.run_id, model_id=model_id).version
    run_a = R.publish_explanation(client, "cnn", v, d, metrics, {}, key="key-a", signing_key=SIGNING_KEY)
    st = R.get_status(client, "cnn", v)
    assert (st["last_good_run_id"], st["last_good_key"]) == (run_a, "key-a")
    for status, extra in (("queued", {}), ("running", {}), ("failed", {"error": "train: out of memory"})):
        R.set_status(client, "cnn", v, status, key="key-b", **extra)
        st = R.get_status(client, "cnn", v)
        assert (st["status"], st["key"], st["last_good_run_id"], st["last_good_key"]) == (status, "key-b", run_a,
                                                                                          "key-a")
    run_b = R.publish_explanation(client, "cnn", v, d, metrics, {}, key="key-b", signing_key=SIGNING_KEY)
    st = R.get_status(client, "cnn", v)
    assert (st["last_good_run_id"], st["last_good_key"]) == (run_b, "key-b")
    (row,) = [r for r in R.list_versions(client, "cnn") if r["version"] == v]
    assert (row["last_good_run_id"], row["last_good_key"]) == (run_b, "key-b")

    for tag in (R.TAG_LAST_GOOD_RUN_ID, R.TAG_LAST_GOOD_KEY):       # as published before the tags existed
        client.delete_model_version_tag("cnn", v, tag)
    R.set_status(client, "cnn", v, "running", key="key-c")
    st = R.get_status(client, "cnn", v)
    assert (st["last_good_run_id"], st["last_good_key"]) == (run_b, "key-b")


def test_stop_server_leaves_no_process(server):
    pids = server.processes()
    assert pids
    assert stop_server(server.home) is True
    assert not server.alive() and find_server(server.home) is None
    assert all(not Path(f"/proc/{p}").exists() or b"mlflow" not in Path(f"/proc/{p}/cmdline").read_bytes()
               for p in pids)
    assert not (server.home / "server.json").exists()
    assert stop_server(server.home) is False
