"""Which failures are tried again, and when (flows/failures.py): the classification, and a failure recorded on a
version of a real MLflow server (SQLite, loopback) as the worker then decides about it (`Worker._decide`, the
dispatcher's own decision, without starting the worker)."""
from __future__ import annotations

import shutil
import time

import httpx
import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from flows import registry as R
from flows.data import DataVersionError
from flows.explain import record_failure, resolve_job
from flows.failures import CONTRACT, PROGRAM, TRANSIENT, code_digest, failure_kind
from flows.mlflow_server import start_server, stop_server
from flows.settings import Settings
from flows.trigger import Worker

MD5 = "0123456789abcdef0123456789abcdef"
CONTRACT_TAGS = {R.TAG_DATASET: "phantom", R.TAG_DATASET_MD5: MD5, R.TAG_TARGET: "label",
                 R.TAG_TASK: "classification", R.TAG_INPUT_SHAPE: "[1, 32, 32]", R.TAG_EXPLAIN: "true"}


def raised(make) -> BaseException:
    """The exception ``make()`` raises, with its traceback (as the flow catches it)."""
    try:
        make()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("nothing raised")


def test_failure_kinds():
    program = [lambda: len(None), lambda: None.get("x"), lambda: undefined_name, lambda: {}["x"],  # noqa: F821
               lambda: [][1], lambda: int("x"), lambda: (_ for _ in ()).throw(AssertionError("x")),
               lambda: (_ for _ in ()).throw(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST",
                                                            "message": "no such version"}))]
    transient = [ConnectionError("refused"), TimeoutError("timed out"), OSError("disk"),
                 requests.ConnectionError("Max retries exceeded"),
                 MlflowException("API request to http://mlflow/api failed with exception ..."),   # INTERNAL_ERROR
                 RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}),
                 RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}),
                 httpx.ConnectError("prefect api down"), DataVersionError("no version yet")]
    assert [failure_kind(raised(f)) for f in program] == [PROGRAM] * len(program)
    assert [failure_kind(e) for e in transient] == [TRANSIENT] * len(transient)
    assert failure_kind(R.ContractError("tag figan.task is missing")) == CONTRACT


def test_code_digest_changes_with_the_code_only(tmp_path):
    from flows import failures
    for d in failures.CODE_DIRS:
        shutil.copytree(failures.REPO / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(tmp_path)
    assert before == code_digest(failures.REPO)
    time.sleep(0.01)
    (tmp_path / "flows" / "explain.py").touch()                     # the same bytes: the same code
    assert code_digest(tmp_path) == before
    with open(tmp_path / "flows" / "explain.py", "a") as f:
        f.write("\n# fixed\n")
    assert code_digest(tmp_path) != before


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-home")
    server = start_server(home)
    yield MlflowClient(server.uri)
    stop_server(home)


def new_version(client: MlflowClient, name: str) -> str:
    """A registered version with the contract tags (the CNN itself is not needed to decide about it)."""
    client.create_registered_model(name)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    return client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id,
                                       tags=CONTRACT_TAGS).version


def settings_with(tmp_path, retry_backoff: float = 1, **config) -> Settings:
    path = tmp_path / "explain.yaml"
    path.write_text(yaml.safe_dump({"steps": 20, **config}))
    return Settings(home=tmp_path / "home", explain_config=path, retry_backoff=retry_backoff)


def test_programming_error_is_not_retried_until_code_config_or_contract_change(client, tmp_path):
    settings = settings_with(tmp_path)
    worker = Worker(settings, client.tracking_uri)
    v = new_version(client, "buggy")
    key = resolve_job(client, settings, "buggy", v).key
    assert worker._decide("buggy", v).run                                      # not explained yet
    record_failure(client, settings, "buggy", v, raised(lambda: {"factors": []}["factors"].get("driving")), key)
    st = R.get_status(client, "buggy", v)
    assert st["status"] == "failed" and st["error_kind"] == PROGRAM and st["retry_after"] is None
    assert st["error"].startswith("AttributeError: 'list' object has no attribute 'get' (at tests/test_failures.py:")
    time.sleep(1.5)                                                            # past any backoff
    for _ in range(2):
        decision = worker._decide("buggy", v)
        assert not decision.run and "programming error" in decision.reason

    client.set_model_version_tag("buggy", v, R.TAG_CLASS_NAMES, '["normal", "enlarged"]')    # the contract changed
    assert worker._decide("buggy", v).run
    client.delete_model_version_tag("buggy", v, R.TAG_CLASS_NAMES)                           # and back
    assert not worker._decide("buggy", v).run
    (tmp_path / "explain.yaml").write_text(yaml.safe_dump({"steps": 20}) + "# re-read\n")  # the config file changed
    assert worker._decide("buggy", v).run
    (tmp_path / "explain.yaml").write_text(yaml.safe_dump({"steps": 20}))
    assert not worker._decide("buggy", v).run
    assert Worker(settings_with(tmp_path, steps=30), client.tracking_uri)._decide("buggy", v).run   # another key


def test_transient_error_is_retried_with_backoff(client, tmp_path):
    settings = settings_with(tmp_path, retry_backoff=10)
    worker = Worker(settings, client.tracking_uri)
    v = new_version(client, "flaky")
    key = resolve_job(client, settings, "flaky", v).key
    record_failure(client, settings, "flaky", v, ConnectionError("MLflow went away"), key)
    st = R.get_status(client, "flaky", v)
    assert (st["status"], st["error_kind"], st["program_hash"]) == ("failed", TRANSIENT, None)
    assert st["error"] == "ConnectionError: MLflow went away" and st["retry_after"] > time.time()
    assert not worker._decide("flaky", v).run                                  # backing off (10 s)
    time.sleep(max(0.0, st["retry_after"] - time.time()) + 0.2)
    assert worker._decide("flaky", v).run
    for _ in range(2):                                                         # attempts 2 and 3 fail too
        record_failure(client, settings, "flaky", v, TimeoutError("again"), key)
    decision = worker._decide("flaky", v)
    assert not decision.run and "failed 3 times" in decision.reason
