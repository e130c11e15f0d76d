"""The "team" configuration for real, without containers: MLflow on Postgres (Debian's PostgreSQL, a throwaway
loopback cluster) with its artifacts on S3 (moto's S3 server), the DVC remote on the same S3, and the platform's
register → explain path through them (scripts/team_stack.py starts and stops the parts)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("figan_team_stack", ROOT / "scripts" / "team_stack.py")
team_stack = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = team_stack
_spec.loader.exec_module(team_stack)

pytestmark = pytest.mark.skipif(team_stack.pg_bin_dir() is None,
                                reason="PostgreSQL binaries not found (apt-get install postgresql): "
                                       "/usr/lib/postgresql/*/bin/initdb, FIGAN_PG_BIN or initdb on PATH")

TINY = dict(steps=20, ckpt_every=10, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32, fid_extractor="randconv",
            frames=4, seeds=[0, 1], n_components=2, regressor_steps=20)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("team")
    stack = team_stack.start_stack(home / "stack")
    mp = pytest.MonkeyPatch()
    try:
        (home / "explain.yaml").write_text(yaml.safe_dump(TINY))
        mp.setenv("FIGAN_HOME", str(home / "platform"))
        mp.setenv("FIGAN_EXPLAIN_CONFIG", str(home / "explain.yaml"))
        for k, v in stack.client_env().items():
            mp.setenv(k, v)
        yield types.SimpleNamespace(home=home, stack=stack, client=MlflowClient(stack.tracking_uri))
    finally:
        mp.undo()
        stack.stop()


def test_stack_is_postgres_and_s3(team):
    s = team.stack
    assert team.client.search_registered_models() == []           # answers, empty
    tables = {r[0] for r in s.psql("select tablename from pg_tables where schemaname = 'public'")}
    assert {"experiments", "runs", "registered_models", "model_versions", "webhooks"} <= tables, tables
    assert s.s3().head_bucket(Bucket=s.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    # the webhook settings: an http receiver on a loopback/private address is accepted, its secret encrypted
    hook = team.client.create_webhook(name="figan-probe", url="http://127.0.0.1:9/webhooks/mlflow",
                                      events=["model_version.created"], secret="probe-secret")
    try:
        assert s.psql("select count(*) from webhooks")[0][0] == 1
        assert "probe-secret" not in json.dumps(s.psql("select * from webhooks"), default=str)
    finally:
        team.client.delete_webhook(hook.webhook_id)


def test_register_explain_on_team_stack(team, tmp_path):
    from flows.explain import explain_version, version_dataset_flow
    from flows.registry import download_explanation, get_status, register_cnn
    from flows.settings import Settings
    from models.cnn import TrainConfig, train_cnn
    from models.phantom import PhantomConfig, write_phantom

    s = team.stack
    settings = Settings.load()
    assert settings.dvc_remote == "s3://figan/dvc" and settings.tracking_uri == s.tracking_uri

    # data: versioned into the git+DVC store, objects pushed to the S3 remote
    data = team.home / "src" / "phantom"
    ds = write_phantom(data, PhantomConfig(n=96, size=32, seed=5))
    md5 = version_dataset_flow(str(data))["md5"]
    keys = [o["Key"] for o in s.s3().list_objects_v2(Bucket=s.bucket, Prefix="dvc/")["Contents"]]
    assert len(keys) >= 97 and any(k.endswith(".dir") for k in keys), keys[:5]
    assert "s3://figan/dvc" in (settings.data_store / ".dvc" / "config").read_text()
    # the explain flow must read the data back from S3, not from the local DVC cache
    shutil.rmtree(settings.data_store / ".dvc" / "cache")

    # registration: a model version in the Postgres-backed registry, the model's files in S3
    model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda m: None)
    v = register_cnn(model, spec, "team-cnn", "phantom", md5, tracking_uri=s.tracking_uri).version
    assert s.psql("select name, version from model_versions") == [("team-cnn", int(v))]

    # explanation: the Prefect flow end to end; status on the version, artifacts in S3 through the server
    res = explain_version("team-cnn", v)
    assert res["status"] == "done" and res["new"], res
    st = get_status(team.client, "team-cnn", v)
    assert st["status"] == "done" and st["run_id"] == res["run_id"]
    assert len(st["faithfulness"]) == 2
    run = team.client.get_run(res["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    art = [o["Key"] for o in s.s3().list_objects_v2(Bucket=s.bucket, Prefix="mlflow/", MaxKeys=1000)["Contents"]]
    assert any(res["run_id"] in k and k.endswith("metrics.json") for k in art), art[:10]
    assert any(res["run_id"] in k and "sequences/" in k and k.endswith(".gif") for k in art)
    got = download_explanation(team.client, res["run_id"], tmp_path / "dl")
    assert json.loads((got / "metrics.json").read_text())["gates"]
    tags = dict(s.psql("select key, value from model_version_tags where name = 'team-cnn'"))
    assert tags["figan.status"] == "done" and tags["figan.run_id"] == res["run_id"]

    # the same key again: nothing new
    assert explain_version("team-cnn", v)["new"] is False
