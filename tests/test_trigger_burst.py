"""A burst of registrations on real components: 20 CNN versions registered at once through the plain MLflow client,
each delivered by MLflow's webhook to a real worker and offered again by its reconciler every few seconds, run by a
real Prefect process worker two at a time. Every one is explained, none twice: one Prefect flow run per key (read
from Prefect's API) and one published run per version."""
import threading
import time

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

import flows.registry as R
from flows import runs
from flows.explain import version_dataset_flow
from flows.mlflow_server import start_server
from flows.platform import platform_prefect, start_prefect, start_prefect_worker, start_worker
from flows.procs import free_port, stop_daemon
from flows.settings import Settings
from models.cnn import TrainConfig, train_cnn
from models.phantom import PhantomConfig, write_phantom

BURST = 20
# the least an explanation does end to end (8 GAN steps, one component, one seed): this measures the trigger path
MINIMAL = dict(generator="cgan", steps=8, ckpt_every=8, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=16,
               fid_extractor="randconv", frames=2, seeds=[0], n_components=1, regressor_steps=5, check_seeds=2,
               reader_epochs=1)
CONTRACT = {R.TAG_DATASET: "phantom", R.TAG_TARGET: "label", R.TAG_TASK: "classification",
            R.TAG_INPUT_SHAPE: "[1, 32, 32]", R.TAG_EXPLAIN: "true"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home = tmp_path_factory.mktemp("burst")
    mp = pytest.MonkeyPatch()
    (home / "explain.yaml").write_text(yaml.safe_dump(MINIMAL))
    for k, v in {"FIGAN_HOME": str(home), "FIGAN_EXPLAIN_CONFIG": str(home / "explain.yaml"),
                 "FIGAN_RECONCILE_SECONDS": "5", "FIGAN_MAX_CONCURRENT": "2", "FIGAN_RECEIVER_PORT": str(free_port()),
                 "OMP_NUM_THREADS": "1"}.items():
        mp.setenv(k, v)
    mp.delenv("FIGAN_TRACKING_URI", raising=False)
    server = start_server(home / "mlflow")
    mp.setenv("FIGAN_TRACKING_URI", server.uri)
    try:
        ds = write_phantom(home / "src" / "phantom", PhantomConfig(n=64, size=32, seed=3))
        version_dataset_flow(str(home / "src" / "phantom"))
        model, _ = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
        start_prefect(Settings.load())
        with platform_prefect(Settings.load()) as api:
            mp.setenv("PREFECT_API_URL", api)
        start_prefect_worker(Settings.load(), server.uri)
        start_worker(Settings.load(), server.uri)
        yield home, server, model
    finally:
        for name in ("worker", "prefect-worker", "prefect"):
            stop_daemon(home, name)
        server.stop()
        mp.undo()


def test_a_burst_of_registrations_is_explained_once_each(platform):
    home, server, model = platform
    client = MlflowClient(server.uri)
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_experiment("data-scientist")
    with mlflow.start_run() as run:                     # one trained CNN, registered under 20 names at once
        logged = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle")
    names = [f"burst-{i:02d}" for i in range(BURST)]
    barrier = threading.Barrier(BURST)
    errors = []

    def register(name):
        try:
            client.create_registered_model(name, tags=CONTRACT)
            barrier.wait()
            client.create_model_version(name, logged.model_uri, run.info.run_id, model_id=logged.model_id)
        except Exception as e:  # noqa: BLE001 — reported below, with the name
            errors.append(f"{name}: {e}")

    threads = [threading.Thread(target=register, args=(n,)) for n in names]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []

    deadline = time.time() + 1200
    status = {}
    while time.time() < deadline:
        status = {n: R.get_status(client, n, "1") for n in names}
        assert not [s["error"] for s in status.values() if s["status"] == "failed"]
        if all(s["status"] == "done" for s in status.values()):
            break
        time.sleep(2)
    assert [n for n, s in status.items() if s["status"] != "done"] == [], status
    time.sleep(12)                                      # > 2 reconcile periods: nothing is explained again
    exp = client.get_experiment_by_name(R.EXPLANATIONS_EXPERIMENT)
    published = client.search_runs([exp.experiment_id], "tags.`figan.model` LIKE 'burst-%'", max_results=1000)
    assert sorted(r.data.tags["figan.model"] for r in published) == names          # one published run each
    with platform_prefect(Settings.load()):
        flow_runs = {n: runs.key_runs(status[n]["key"]) for n in names}
    assert {n: [(r.idempotency_key, r.state.type.value) for r in fr] for n, fr in flow_runs.items()} == \
        {n: [(f"{status[n]['key']}:1", "COMPLETED")] for n in names}
    assert {n: R.get_status(client, n, "1")["run_id"] for n in names} == {n: status[n]["run_id"] for n in names}
