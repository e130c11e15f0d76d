"""Automatic explanation on real components: an MLflow server (SQLite, loopback) delivering signed webhooks to a
real worker process (`figan worker`: receiver + reconciler + dispatcher), explain flows as real Prefect runs in
their own processes, a git+DVC data store. Registrations go through the plain MLflow client, as a data scientist
would make them."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
import uuid

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import flows.registry as R
from flows.explain import version_dataset_flow
from flows.mlflow_server import start_server
from flows.platform import start_prefect, start_worker
from flows.procs import find_daemon, stop_daemon
from flows.settings import Settings
from flows.trigger import Decision, Verifier, Rejected, WEBHOOK_PATH, decide, sign, webhook_secret
from models import artifacts
from models.cnn import TrainConfig, train_cnn
from models.phantom import PhantomConfig, write_phantom

# 120 GAN steps with a checkpoint every 20: long enough to kill a worker mid-training, short on 2 cores
TINY = dict(generator="cgan", steps=120, ckpt_every=20, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32,
            fid_extractor="randconv", frames=4, seeds=[0, 1], n_components=2, regressor_steps=20, check_seeds=4,
            reader_epochs=1)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home = tmp_path_factory.mktemp("trigger")
    mp = pytest.MonkeyPatch()
    (home / "explain.yaml").write_text(yaml.safe_dump(TINY))
    env = {"FIGAN_HOME": str(home), "FIGAN_EXPLAIN_CONFIG": str(home / "explain.yaml"),
           "FIGAN_RECONCILE_SECONDS": "3", "FIGAN_LEASE_SECONDS": "20", "FIGAN_RETRY_BACKOFF": "1",
           "FIGAN_RECEIVER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    for k, v in env.items():
        mp.setenv(k, v)
    mp.delenv("FIGAN_TRACKING_URI", raising=False)
    server = start_server(home / "mlflow")
    mp.setenv("FIGAN_TRACKING_URI", server.uri)
    try:
        data = home / "src" / "phantom"
        ds = write_phantom(data, PhantomConfig(n=96, size=32, seed=5))
        md5 = version_dataset_flow(str(data))["md5"]
        model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
        p = types.SimpleNamespace(home=home, server=server, client=MlflowClient(server.uri), md5=md5, model=model,
                                  spec=spec, url=f"http://127.0.0.1:{env['FIGAN_RECEIVER_PORT']}")
        start_prefect(Settings.load())
        p.start_worker = lambda receiver=True: start_worker(Settings.load(), server.uri, receiver)
        p.start_worker()
        yield p
    finally:
        stop_daemon(home, "worker")
        stop_daemon(home, "prefect")
        server.stop()
        mp.undo()


CONTRACT = {R.TAG_DATASET: "phantom", R.TAG_TARGET: "label", R.TAG_TASK: "classification",
            R.TAG_INPUT_SHAPE: "[1, 32, 32]", R.TAG_EXPLAIN: "true"}


def register_plain(p, name: str, tags: dict | None = None) -> str:
    """What a data scientist does: a registered model carrying the contract tags, then log_model with
    registered_model_name (an eager, pickled PyTorch model)."""
    try:
        p.client.create_registered_model(name, tags={**CONTRACT, **(tags or {})})
    except MlflowException:
        pass
    mlflow.set_tracking_uri(p.server.uri)
    mlflow.set_experiment("data-scientist")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(p.model, name="model", registered_model_name=name,
                                        serialization_format="pickle")
    return str(info.registered_model_version)


def wait_status(p, name, version, want=("done",), timeout=240.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = R.get_status(p.client, name, version)
        if st["status"] in want:
            return st
        if st["status"] == "failed" and "failed" not in want:
            pytest.fail(f"{name}/{version} failed: {st['error']}")
        time.sleep(0.5)
    pytest.fail(f"{name}/{version} not {want} within {timeout} s: {R.get_status(p.client, name, version)}; "
                f"worker log tail: {_tail(p.home / 'logs' / 'worker.log')}")


def _tail(path, n=3000):
    return path.read_text()[-n:] if path.is_file() else "(none)"


def published_runs(p, name, version) -> list:
    exp = p.client.get_experiment_by_name(R.EXPLANATIONS_EXPERIMENT)
    if exp is None:
        return []
    return p.client.search_runs([exp.experiment_id], f"tags.`figan.model` = '{name}' and "
                                                     f"tags.`figan.version` = '{version}'")


def health(p) -> dict:
    with _DIRECT.open(p.url + "/health", timeout=10) as r:
        return json.loads(r.read())


def artifact_json(p, run_id: str, path: str) -> dict:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=p.server.uri)
    return json.loads(open(local).read())


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with _DIRECT.open(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --------------------------------------------------------------------------------------------- pure policy

def test_decide_policy():
    now = 1000.0
    assert decide({"status": "done", "key": "k"}, "k", None, None, 3, now) == Decision(False, "done")
    assert decide({"status": "done", "key": "old"}, "k", None, None, 3, now).run          # new data/config
    assert decide({}, "k", None, None, 3, now).run
    failed = {"status": "failed", "key": "k", "attempts": 1, "retry_after": now + 30}
    assert not decide(failed, "k", None, None, 3, now).run                                 # backing off
    assert decide({**failed, "retry_after": now - 1}, "k", None, None, 3, now).run         # retry
    assert not decide({**failed, "attempts": 3, "retry_after": 0}, "k", None, None, 3, now).run   # gave up
    err = R.ContractError("tag figan.task is missing")
    contract_failed = {"status": "failed", "error_kind": "contract", "contract_hash": "h1"}
    assert not decide(contract_failed, None, err, "h1", 3, now).run                       # same tags: wait
    assert decide(contract_failed, None, err, "h2", 3, now).run                           # tags changed
    bug = {"status": "failed", "key": "k", "error_kind": "program", "program_hash": "p1", "attempts": 1}
    assert not decide(bug, "k", None, None, 3, now, program_hash="p1").run               # same code: wait
    assert decide(bug, "k", None, None, 3, now, program_hash="p2").run                   # code/config/tags changed
    assert decide(bug, "k2", None, None, 3, now, program_hash="p1").run                  # new data/config: new key
    in_resolve = {**bug, "key": None}                                                     # raised before a key
    assert not decide(in_resolve, None, TypeError("x"), None, 3, now, program_hash="p1").run
    live = {"status": "running", "key": "k",
            "lease": {"owner": f"{socket.gethostname()}:{os.getpid()}:x", "key": "k", "expires": time.time() + 60}}
    assert not decide(live, "k", None, None, 3).run                                        # someone works on it
    dead = {**live, "lease": {**live["lease"], "owner": f"{socket.gethostname()}:999999999:x"}}
    assert decide(dead, "k", None, None, 3).run                                            # its worker died
    expired = {**live, "lease": {**live["lease"], "expires": time.time() - 1}}
    assert decide(expired, "k", None, None, 3).run


def test_worker_lines_reach_stderr_after_prefect_configured_logging():
    """A container's log is the worker's stderr: its INFO lines (what queued a version) must reach it although
    importing Prefect has already configured the root logger (WARNING), which makes logging.basicConfig a no-op."""
    code = ("import prefect, logging; from flows.trigger import log, log_to_stderr; log_to_stderr(); "
            "log.info('m/1: queued by webhook (new)'); logging.getLogger('other').info('not ours')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert [(x["level"], x["msg"]) for x in lines] == [("INFO", "m/1: queued by webhook (new)")], res.stderr[-2000:]


def test_verifier_rejects_all_but_genuine_fresh_first_deliveries(tmp_path):
    v = Verifier("s3cret", tmp_path / "r.db", window=300)
    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}})
    now = time.time()
    ts, did = str(int(now)), str(uuid.uuid4())
    good = {"X-MLflow-Signature": sign("s3cret", did, ts, body), "X-MLflow-Timestamp": ts,
            "X-MLflow-Delivery-Id": did}
    cases = {
        "unsigned": ({k: v_ for k, v_ in good.items() if k != "X-MLflow-Signature"}, body, 401),
        "wrong secret": ({**good, "X-MLflow-Signature": sign("other", did, ts, body)}, body, 401),
        "tampered payload": (good, body.replace('"1"', '"2"'), 401),
        "stale": ({**good, "X-MLflow-Timestamp": str(int(now) - 3600),
                   "X-MLflow-Signature": sign("s3cret", did, str(int(now) - 3600), body)}, body, 401),
    }
    for what, (headers, payload, code) in cases.items():
        with pytest.raises(Rejected) as e:
            v.verify(headers, payload.encode(), now)
        assert e.value.status == code, what
    assert v.verify(good, body.encode(), now)["data"]["version"] == "1"
    with pytest.raises(Rejected, match="replayed"):
        v.verify(good, body.encode(), now)
    # seen ids survive a restart of the receiver
    with pytest.raises(Rejected, match="replayed"):
        Verifier("s3cret", tmp_path / "r.db").verify(good, body.encode(), now)


def _signed(secret: str, payload: str) -> dict:
    ts, did = str(int(time.time())), str(uuid.uuid4())
    return {"X-MLflow-Signature": sign(secret, did, ts, payload), "X-MLflow-Timestamp": ts,
            "X-MLflow-Delivery-Id": did, "Content-Type": "application/json"}


def test_receiver_caps_bodies_checks_shapes_and_guards_reconcile(tmp_path):
    """No MLflow needed: the app in-process. Oversized bodies are refused before being read (Content-Length) or
    while streamed; signed JSON that is not an object is a 400, not a 500; /reconcile needs the secret; a version
    is queued once however often it is announced, and the queue is bounded."""
    from starlette.testclient import TestClient

    from flows.settings import Settings
    from flows.trigger import MAX_WEBHOOK_BYTES, Worker, create_app
    worker = Worker(Settings(home=tmp_path), "http://127.0.0.1:9")            # never started: nothing dispatched
    app = create_app(worker, Verifier("s3cret", tmp_path / "r.db"), "s3cret")
    with TestClient(app) as http:
        big = "x" * (MAX_WEBHOOK_BYTES + 1)
        assert http.post("/webhooks/mlflow", content=big, headers=_signed("s3cret", big)).status_code == 413
        streamed = http.post("/webhooks/mlflow", content=iter([b"x" * 40_000] * 3),
                             headers={k: v for k, v in _signed("s3cret", "x").items()})
        assert streamed.status_code == 413
        for payload in ("[1, 2]", '"text"', '{"entity": "model_version", "data": [1]}'):
            resp = http.post("/webhooks/mlflow", content=payload, headers=_signed("s3cret", payload))
            assert resp.status_code == 400 and "JSON object" in resp.json()["error"], payload
        event = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}})
        first = http.post("/webhooks/mlflow", content=event, headers=_signed("s3cret", event))
        again = http.post("/webhooks/mlflow", content=event, headers=_signed("s3cret", event))
        assert first.status_code == again.status_code == 202
        assert first.json()["queued"] is True and again.json()["queued"] is False
        assert worker.candidates.qsize() == 1
        assert http.post("/reconcile").status_code == 401
        assert http.post("/reconcile", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/reconcile", headers={"Authorization": "Bearer s3cret"}).status_code == 202
    worker.candidates = type(worker.candidates)(2)                             # a full queue drops, counted
    worker.pending.clear()
    assert [worker.submit("m", str(v), "test") for v in range(3)] == [True, True, False]
    assert worker.dropped == 1 and worker.health()["pending"] == 2


# --------------------------------------------------------------------------------------------- real platform

def test_lease_admits_exactly_one_of_many_concurrent_owners(platform):
    p = platform
    name = "lease-race"
    p.client.create_registered_model(name, tags={**CONTRACT, R.TAG_EXPLAIN: "false"})
    run = p.client.create_run(p.client.get_experiment_by_name("Default").experiment_id)
    mv = p.client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    owners = [R.new_owner() for _ in range(6)]
    won = []
    barrier = threading.Barrier(len(owners))

    def grab(owner):
        barrier.wait()
        if R.acquire_lease(MlflowClient(p.server.uri), name, mv.version, "k", owner, ttl=30, settle=1.0):
            won.append(owner)

    threads = [threading.Thread(target=grab, args=(o,)) for o in owners]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1
    assert R.read_lease(p.client, name, mv.version).owner == won[0]
    assert not R.renew_lease(p.client, name, mv.version, owners[0] if owners[0] != won[0] else owners[1], 30)
    R.release_lease(p.client, name, mv.version, won[0])
    assert R.read_lease(p.client, name, mv.version) is None


def test_webhook_endpoint_accepts_only_the_genuine_delivery(platform):
    p = platform
    secret = webhook_secret(types.SimpleNamespace(home=p.home))
    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "nobody", "version": "1"}})
    ts, did = str(int(time.time())), str(uuid.uuid4())
    good = {"X-MLflow-Signature": sign(secret, did, ts, body), "X-MLflow-Timestamp": ts, "X-MLflow-Delivery-Id": did}
    url = p.url + WEBHOOK_PATH
    assert post(url, body.encode(), {k: v for k, v in good.items() if k != "X-MLflow-Signature"})[0] == 401
    assert post(url, body.replace("nobody", "other").encode(), good)[0] == 401
    old = str(int(time.time()) - 3600)
    stale = {**good, "X-MLflow-Timestamp": old, "X-MLflow-Signature": sign(secret, did, old, body)}
    assert post(url, body.encode(), stale)[0] == 401
    code, answer = post(url, body.encode(), good)
    assert code == 202 and answer == {"accepted": True, "name": "nobody", "version": "1", "queued": True}
    assert post(url, body.encode(), good)[0] == 409                                    # replayed
    # a status tag of ours is signed and fresh but irrelevant: ignored, no trigger
    tag = json.dumps({"entity": "model_version_tag", "action": "set",
                      "data": {"name": "nobody", "version": "1", "key": R.TAG_STATUS, "value": "done"}})
    did2 = str(uuid.uuid4())
    code, answer = post(url, tag.encode(), {"X-MLflow-Signature": sign(secret, did2, ts, tag),
                                            "X-MLflow-Timestamp": ts, "X-MLflow-Delivery-Id": did2})
    assert code == 200 and answer["accepted"] is False


def test_registrations_are_explained_with_no_other_call(platform):
    """Two versions registered at the same moment through the plain MLflow client → both done, not mixed."""
    p = platform
    versions = {}
    t0 = time.time()
    threads = [threading.Thread(target=lambda n=n: versions.__setitem__(n, register_plain(p, n)))
               for n in ("auto-a", "auto-b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    running = {n: wait_status(p, n, v, want=("running", "done"))["status"] for n, v in versions.items()}
    first_running = time.time() - t0
    statuses = {n: wait_status(p, n, v) for n, v in versions.items()}
    for n, v in versions.items():
        runs = published_runs(p, n, v)
        assert len(runs) == 1 and runs[0].info.run_id == statuses[n]["run_id"]
        lineage = artifact_json(p, runs[0].info.run_id, artifacts.LINEAGE)
        assert lineage["cnn_name"] == n and lineage["cnn_version"] == v and lineage["dataset_md5"] == p.md5
    assert statuses["auto-a"]["run_id"] != statuses["auto-b"]["run_id"]
    # the worker's log (a container's log in deploy/) says what queued each version and how its run ended; the
    # exit line follows the status (the explain process still shuts down after publishing), so it is waited for
    wanted = [rf'"msg": "{n}/{v}: {what}' for n, v in versions.items()
              for what in ("queued by (webhook|reconciler)", "explain process exited 0 .* after")]
    deadline = time.monotonic() + 60
    while not all(re.search(w, log := (p.home / "logs" / "worker.log").read_text()) for w in wanted):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.5)
    print(f"registration → first running/done seen after {first_running:.1f} s ({running})")


def test_receiver_down_reconciler_catches_up(platform):
    p = platform
    assert stop_daemon(p.home, "worker")
    v = register_plain(p, "missed")                     # MLflow's delivery fails: nobody listens
    time.sleep(1)
    assert R.get_status(p.client, "missed", v)["status"] is None
    p.start_worker(receiver=False)                      # the reconciler alone
    t0 = time.time()                                    # the worker answers: its imports (~20 s on busy cores) are done
    try:
        key = f"missed/{v}"
        while key not in health(p)["inflight"] and R.get_status(p.client, "missed", v)["status"] is None:
            assert time.time() - t0 < 3 + 15, "not queued within one reconcile period (3 s) + its first decision"
            time.sleep(0.2)
        wait_status(p, "missed", v)
    finally:
        stop_daemon(p.home, "worker")
        p.start_worker()


def test_worker_killed_mid_run_resumes_once(platform):
    p = platform
    v = register_plain(p, "crashy")
    wait_status(p, "crashy", v, want=("running",), timeout=120)
    key = R.get_status(p.client, "crashy", v)["key"]
    ckpt = p.home / "work" / f"crashy-v{v}-{key}" / "gan" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.is_file(), "training never checkpointed"
    worker = find_daemon(p.home, "worker")
    os.killpg(worker.pid, signal.SIGKILL)               # the worker and its explain process die mid-training
    while worker.alive():
        time.sleep(0.1)
    assert R.get_status(p.client, "crashy", v)["status"] == "running"     # stale: the lease says who is dead
    p.start_worker()
    st = wait_status(p, "crashy", v)
    runs = published_runs(p, "crashy", v)
    assert [r.info.run_id for r in runs] == [st["run_id"]]
    metrics = artifact_json(p, st["run_id"], "metrics.json")
    assert metrics["training"]["resumed_from_step"] > 0 and metrics["training"]["steps"] == TINY["steps"]


def test_simultaneous_webhook_reconciler_and_manual_trigger_run_once(platform):
    p = platform
    v = register_plain(p, "triple")                     # the webhook fires here
    secret = (p.home / "webhook.secret").read_text().strip()
    _DIRECT.open(urllib.request.Request(p.url + "/reconcile", data=b"", method="POST",
                                        headers={"Authorization": f"Bearer {secret}"}), timeout=5)
    manual = subprocess.run([sys.executable, "-m", "flows.cli", "explain-version", "--name", "triple",
                             "--version", v], capture_output=True, text=True, timeout=300)
    st = wait_status(p, "triple", v)
    assert manual.returncode == 0, manual.stderr[-2000:]
    assert json.loads(manual.stdout[manual.stdout.index("{"):])["status"] in ("done", "skipped")
    assert len(published_runs(p, "triple", v)) == 1
    assert R.get_status(p.client, "triple", v)["run_id"] == st["run_id"]


def test_contract_error_waits_for_the_tags_to_change(platform):
    p = platform
    v = register_plain(p, "no-task", tags={R.TAG_TASK: ""})
    st = wait_status(p, "no-task", v, want=("failed",), timeout=120)
    assert st["error_kind"] == "contract" and R.TAG_TASK in st["error"]
    updated = st["updated"]
    time.sleep(8)                                        # > 2 reconcile periods: not retried
    assert R.get_status(p.client, "no-task", v)["updated"] == updated
    p.client.set_model_version_tag("no-task", v, R.TAG_TASK, "classification")   # the fix re-triggers
    deadline = time.time() + 120
    while R.get_status(p.client, "no-task", v)["status"] == "failed":
        assert time.time() < deadline, "fixing the contract tag did not re-trigger the explanation"
        time.sleep(0.5)
    wait_status(p, "no-task", v)
