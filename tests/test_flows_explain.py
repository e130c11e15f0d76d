"""The explain flow on real components: an MLflow server (SQLite, loopback), a git+DVC data store with a local
remote, and real Prefect flow runs."""
import json
import shutil
import types

import pytest
import yaml
from mlflow import MlflowClient

from flows.audit import signing_key, verify_version
from flows.cli import main
from flows.data import _add_version, _store_lock, dataset_md5, list_versions, open_store
from flows.explain import explain_version, version_dataset_flow
from flows.mlflow_server import start_server
from flows.registry import (ContractError, download_explanation, get_status, register_cnn, TAG_INPUT_SHAPE, TAG_KEY,
                            TAG_TASK, EXPLANATIONS_EXPERIMENT)
from flows.settings import Settings
from models.cgan import load_generator
from models.cnn import TrainConfig, train_cnn
from models.phantom import PhantomConfig, write_phantom
from models.pls import load_pls

TINY = dict(steps=20, ckpt_every=10, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32, fid_extractor="randconv",
            frames=4, seeds=[0, 1], n_components=2, regressor_steps=20, check_seeds=8, reader_epochs=2,
            register_iters=30)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home = tmp_path_factory.mktemp("platform")
    mp = pytest.MonkeyPatch()
    (home / "explain.yaml").write_text(yaml.safe_dump(TINY))
    mp.setenv("FIGAN_HOME", str(home))
    mp.setenv("FIGAN_EXPLAIN_CONFIG", str(home / "explain.yaml"))
    mp.setenv("FIGAN_PASS_ALIAS", "trusted")
    mp.delenv("FIGAN_TRACKING_URI", raising=False)
    server = start_server(home / "mlflow")
    try:
        data = home / "src" / "phantom"
        ds = write_phantom(data, PhantomConfig(n=96, size=32, seed=5))
        md5 = version_dataset_flow(str(data))["md5"]
        model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
        yield types.SimpleNamespace(home=home, server=server, client=MlflowClient(server.uri), md5=md5,
                                    model=model, spec=spec, ds=ds)
    finally:
        server.stop()
        mp.undo()


def _register(p, name, **kw):
    return register_cnn(p.model, p.spec, name, "phantom", kw.pop("md5", p.md5), tracking_uri=p.server.uri, **kw).version


def test_explain_publishes_and_is_idempotent(platform, tmp_path):
    p = platform
    v = _register(p, "cnn-a")
    res = explain_version("cnn-a", v)
    assert res["status"] == "done" and res["new"]
    st = get_status(p.client, "cnn-a", v)
    assert st["status"] == "done" and st["run_id"] == res["run_id"] and st["key"] == res["key"]
    assert isinstance(st["fid_best"], float) and "randconv" in st["fid_extractor"].lower()
    assert len(st["faithfulness"]) == 2 and len(st["pct_variance"]) == 2
    verdict = res["verdict"]                         # metrics.json's verdict, as the tag and the pass alias say
    assert verdict["verdict"] in ("pass", "fail") and (st["verdict"], st["failing_gates"]) == (
        verdict["verdict"], verdict["failing"])
    aliases = p.client.get_registered_model("cnn-a").aliases or {}
    assert (aliases.get("trusted") == v) == (verdict["verdict"] == "pass"), (aliases, verdict)
    run = p.client.get_run(res["run_id"])
    lineage = {k: v for k, v in run.data.tags.items() if k.startswith("lineage.")}
    assert p.md5 in json.dumps(lineage)
    listed = {a.path for a in p.client.list_artifacts(res["run_id"])}
    assert {"pls_variance.png", "summary.txt", "metrics.json", "sequences", "report.html"} <= listed, listed
    got = download_explanation(p.client, res["run_id"], tmp_path / "dl")
    for f in ["sequences/component_1.gif", "sequences/component_2_eigen.png", "metrics.json"]:
        assert (got / f).exists(), f
    assert not (got / "gan/last.pt").exists() and not (got / "features.npy").exists()
    G, cfg, step = load_generator(got / "gan/best")
    assert cfg.k == 2 and load_pls(got / "pls").n_components == 2
    # signed with the key made on first use (mode 0600): the run verifies, with the inputs it was made from
    assert (p.home / "audit.key").stat().st_mode & 0o777 == 0o600
    _, check = verify_version(p.client, signing_key(Settings.load()), "cnn-a", v)
    assert check.ok and st["manifest_sha256"] == check.manifest_sha256, check.problems
    assert {"report.html", "metrics.json", "lineage.json", "sequences/component_1.gif"} <= set(check.manifest["files"])
    inputs = check.inputs
    assert inputs["dataset_md5"] == p.md5.removesuffix(".dir") and inputs["dataset_created"].startswith("20")
    assert len(inputs["cnn_digest"]) == 64 and inputs["cnn_model_id"].startswith("m-")
    report = (got / "report.html").read_text()
    assert inputs["cnn_digest"] in report and inputs["dataset_created"] in report
    assert f"figan verify cnn-a {v}" in report
    # same key again: nothing new, same run
    again = explain_version("cnn-a", v)
    assert again == {"status": "done", "run_id": res["run_id"], "key": res["key"], "new": False}
    exp = p.client.get_experiment_by_name(EXPLANATIONS_EXPERIMENT)
    runs = p.client.search_runs([exp.experiment_id], f"tags.`{TAG_KEY}` = '{res['key']}'")
    assert len(runs) == 1
    from flows.status import status_table
    row = [line for line in status_table("cnn-a").splitlines() if line.startswith("cnn-a")][0]
    assert " done " in row and f" {verdict['verdict']}" in row


def test_candidate_layers_are_chosen_by_fid_and_published(platform, tmp_path):
    p = platform
    v = _register(p, "cnn-l")
    p.client.set_model_version_tag("cnn-l", v, "figan.layers", '["final", "head.0"]')
    res = explain_version("cnn-l", v)
    assert res["status"] == "done"
    got = download_explanation(p.client, res["run_id"], tmp_path / "dl")
    sel = json.loads((got / "metrics.json").read_text())["layer_selection"]
    assert [c["layer"] for c in sel["candidates"]] == ["final", "head.0"]
    best = min(sel["candidates"], key=lambda c: c["fid"])["layer"]
    assert sel["chosen"] == best == p.client.get_model_version("cnn-l", v).tags["figan.layer_chosen"]


def test_publishing_is_a_gate(platform, monkeypatch):
    """A run whose key another run published while it worked (a person's run beside the platform's, a cancelled
    run's process beside its retry) publishes nothing: right before publishing it finds that run and returns it."""
    import flows.explain as fe
    import flows.registry as R
    p = platform
    v = _register(p, "cnn-g")
    other = {}
    real_report = fe.report_task

    def report_while_another_run_publishes(job, run, drift_summary, lineage):
        real_report(job, run, drift_summary, lineage)
        metrics = json.loads((run.out / "metrics.json").read_text())
        other["run_id"] = R.publish_explanation(p.client, job.name, job.version, run.out, metrics, lineage, job.key,
                                                signing_key=signing_key(Settings.load(), create=True),
                                                cnn_id=job.contract.cnn_id)
        # the interleaving where this run marked the version running after that publish (it resolved just before)
        R.set_status(p.client, job.name, job.version, "running", key=job.key)

    monkeypatch.setattr(fe, "report_task", report_while_another_run_publishes)
    res = explain_version("cnn-g", v)
    assert res == {"status": "done", "run_id": other["run_id"], "key": res["key"], "new": False}
    exp = p.client.get_experiment_by_name(EXPLANATIONS_EXPERIMENT)
    assert [r.info.run_id for r in p.client.search_runs([exp.experiment_id], f"tags.`{TAG_KEY}` = '{res['key']}'")] \
        == [other["run_id"]]
    st = get_status(p.client, "cnn-g", v)
    assert (st["status"], st["run_id"], st["last_good_run_id"]) == ("done", other["run_id"], other["run_id"])


def test_interrupted_training_resumes(platform, monkeypatch):
    """The pixel cGAN trains in steps: the next flow run (in its own folder) resumes from the checkpoint of the run
    that stopped."""
    p = platform
    (p.home / "explain-cgan.yaml").write_text(yaml.safe_dump({**TINY, "generator": "cgan"}))
    monkeypatch.setenv("FIGAN_EXPLAIN_CONFIG", str(p.home / "explain-cgan.yaml"))
    v = _register(p, "cnn-b")
    first = explain_version("cnn-b", v, stop_after=10)
    assert first["status"] == "interrupted" and first["step"] == 10
    assert get_status(p.client, "cnn-b", v)["status"] == "queued"
    second = explain_version("cnn-b", v)
    assert second["status"] == "done" and second["key"] == first["key"]
    runs = sorted((p.home / "work" / f"cnn-b-v{v}-{first['key']}").iterdir())
    assert len(runs) == 2                           # one working folder per flow run; the second seeded by the first
    [done] = [d for d in runs if (d / "metrics.json").is_file()]
    metrics = json.loads((done / "metrics.json").read_text())
    assert metrics["training"]["resumed_from_step"] == 10 and metrics["training"]["steps"] == 20


def test_contract_errors_fail_that_version_only(platform, tmp_path):
    p = platform
    ok = _register(p, "cnn-c")
    explain_version("cnn-c", ok)
    cases = []
    v = _register(p, "cnn-c")                                  # missing tag
    p.client.delete_model_version_tag("cnn-c", v, TAG_TASK)
    cases.append((v, "figan.task"))
    v = _register(p, "cnn-c", md5="0" * 32)                    # unknown dataset version
    cases.append((v, "0" * 8))
    v = _register(p, "cnn-c")                                  # a candidate layer the CNN does not have
    p.client.set_model_version_tag("cnn-c", v, "figan.layers", '["final", "head.9"]')
    cases.append((v, "figan.layers: layers: 'head.9' is not a layer"))
    v = _register(p, "cnn-c")                                  # input shape the CNN rejects
    p.client.set_model_version_tag("cnn-c", v, TAG_INPUT_SHAPE, "[3, 32, 32]")
    cases.append((v, "rejected input"))
    import mlflow                                              # not a CNN: a version whose artifact is a text file
    mlflow.set_tracking_uri(p.server.uri)
    with mlflow.start_run() as r:
        mlflow.log_text("hello", "model/readme.txt")
    mv = p.client.create_model_version("cnn-c", f"runs:/{r.info.run_id}/model", r.info.run_id,
                                       tags=p.client.get_model_version("cnn-c", ok).tags)
    cases.append((mv.version, "not a PyTorch CNN"))
    for version, needle in cases:
        with pytest.raises(Exception):
            explain_version("cnn-c", version)
        st = get_status(p.client, "cnn-c", version)
        assert st["status"] == "failed" and needle in st["error"], (version, st)
    assert get_status(p.client, "cnn-c", ok)["status"] == "done"      # other versions untouched


def test_invalid_dataset_yaml_is_refused_at_version_data_and_before_training(platform, tmp_path, capsys):
    """factors given as a list instead of {driving: [...], nuisance: [...]}: refused by `figan version-data`; a
    version stored before that check existed fails the flow as a contract error before any features or training."""
    p = platform
    bad = tmp_path / "phantom-bad"
    shutil.copytree(p.ds.root, bad)
    meta = yaml.safe_load((bad / "dataset.yaml").read_text())
    meta.update(name="phantom-bad", factors=meta["factors"]["driving"] + meta["factors"]["nuisance"])
    (bad / "dataset.yaml").write_text(yaml.safe_dump(meta))
    settings = Settings.load()
    store = open_store(settings.data_store, settings.dvc_remote)

    assert main(["version-data", "--src", str(bad)]) == 2
    assert "dataset.yaml: factors must be a mapping of driving/nuisance/shortcut" in capsys.readouterr().err
    assert list_versions(store, "phantom-bad") == []

    md5 = dataset_md5(bad)
    with _store_lock(store.root):               # stored as version-data did before it checked every field
        _add_version(store, store.root, bad, "phantom-bad", md5, len(p.ds), {"formats": {"PNG": len(p.ds)}})
    v = register_cnn(p.model, p.spec, "cnn-d", "phantom-bad", md5, tracking_uri=p.server.uri).version
    with pytest.raises(ContractError, match="factors must be a mapping"):
        explain_version("cnn-d", v)
    st = get_status(p.client, "cnn-d", v)
    assert st["status"] == "failed" and st["error_kind"] == "contract"
    assert f"dataset phantom-bad version {md5}" in st["error"] and "factors must be a mapping" in st["error"]
    assert not list((p.home / "work").glob("cnn-d-*"))                       # no working folder: nothing trained
    assert not list(settings.features_cache.glob("cnn-d-*"))                 # no features computed
