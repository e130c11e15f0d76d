"""Automatic explanation on real components: an MLflow server (SQLite, loopback) delivering signed webhooks to a
real worker process (`figan worker`: receiver + reconciler + dispatcher) that submits flow runs of the explain
deployment to a real Prefect server, whose real process worker runs each in its own process; a git+DVC data store.
Registrations go through the plain MLflow client, as a data scientist would make them. How many flow runs a key got
is read from Prefect's API, not from our tags."""
import json
import os
import re
import signal
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

import psutil
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.registry as R
from flows import runs
from flows.explain import version_dataset_flow
from flows.mlflow_server import start_server
from flows.platform import prefect_api_url, start_prefect, start_prefect_worker, start_worker
from flows.procs import find_daemon, free_port, stop_daemon
from flows.settings import Settings
from flows.trigger import Decision, Verifier, Rejected, WEBHOOK_PATH, Worker, decide, sign, webhook_secret
from models import layout
from models.cnn import TrainConfig, train_cnn
from models.phantom import PhantomConfig, write_phantom

# 120 GAN steps with a checkpoint every 20: long enough to kill a run mid-training, short on 2 cores
TINY = dict(generator="cgan", steps=120, ckpt_every=20, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32,
            fid_extractor="randconv", frames=4, seeds=[0, 1], n_components=2, regressor_steps=20, check_seeds=4,
            reader_epochs=1)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
HANG_SECONDS, STALL_AT_STEP = 180, 40       # above any pause of a healthy tiny run on 2 busy cores, and above the
                                            # heartbeat automation's 3 × 30 s, so a dead worker's run is crashed first


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home = tmp_path_factory.mktemp("trigger")
    mp = pytest.MonkeyPatch()
    (home / "explain.yaml").write_text(yaml.safe_dump(TINY))
    env = {"FIGAN_HOME": str(home), "FIGAN_EXPLAIN_CONFIG": str(home / "explain.yaml"),
           "FIGAN_RECONCILE_SECONDS": "3", "FIGAN_RETRY_BACKOFF": "1", "FIGAN_HANG_SECONDS": str(HANG_SECONDS),
           "FIGAN_RECEIVER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "FIGAN_TEST_STALL": f"hangs:{STALL_AT_STEP}"}     # the flow's test hook: model "hangs" stops moving
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
        api = prefect_api_url(Settings.load())
        mp.setenv("PREFECT_API_URL", api)                   # for the daemons and subprocesses started from here
        # this process's Prefect settings were loaded before (version_dataset_flow): point its calls there too
        p.prefect = lambda: temporary_settings(updates={PREFECT_API_URL: api})
        start_prefect_worker(Settings.load(), server.uri)
        p.start_worker = lambda receiver=True: start_worker(Settings.load(), server.uri, receiver)
        p.start_worker()
        yield p
    finally:
        stop_daemon(home, "worker")
        stop_daemon(home, "prefect-worker")
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
        if st["status"] in want and (st["status"] != "failed" or st["error"]):
            return st
        # a counted crash is retried; a failed status without its error is one being cleared by the next run
        if st["status"] == "failed" and "failed" not in want and st["error_kind"] != "crash" and st["error"]:
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
    assert not decide({"status": "running", "key": "k"}, "k", None, None, 3, now, live_run="r (RUNNING)").run
    assert decide({"status": "running", "key": "k"}, "k", None, None, 3, now).run       # nothing live: resume
    # the attempt number (part of the idempotency key) follows the failures counted for this key
    assert decide({}, "k", None, None, 3, now).attempt == 1
    assert decide({**failed, "retry_after": now - 1}, "k", None, None, 3, now).attempt == 2
    assert decide({**failed, "key": "old", "attempts": 2}, "k", None, None, 3, now).attempt == 1
    assert decide({**bug, "attempts": 2}, "k", None, None, 3, now, program_hash="p2").attempt == 3


def test_a_flow_run_whose_heartbeats_are_slower_than_the_crash_window_refuses_to_start():
    """A work pool left at Prefect's default heartbeat (180 s) under an automation that crashes runs silent for
    3 × 30 s would lose healthy runs mid-training: the flow refuses first, naming both settings."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}):
        with pytest.raises(runs.HeartbeatPeriodError, match="PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30.*") as e:
            runs.check_heartbeat_period(30)
        assert "every 180 s" in str(e.value) and "FIGAN_HEARTBEAT_SECONDS=30" in str(e.value)
        runs.check_heartbeat_period(180)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        runs.check_heartbeat_period(30)


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


def test_a_reconcile_pass_reads_the_listing_alone_and_queues_what_is_not_done_now(tmp_path, environ, monkeypatch):
    """A steady pass costs the listing's pages, not calls per version: a version done under the key it would get
    now is settled by its row; one done under an older key (the data or the config changed), one that failed and
    one whose contract does not parse go to the dispatcher; a model that did not opt in is left alone."""
    import mlflow.utils.rest_utils as rest_utils
    from flows.explain import resolve_job
    environ({"FIGAN_HOME": str(tmp_path / "home")})
    server = start_server(tmp_path / "mlflow")
    try:
        client = MlflowClient(server.uri)
        pinned = {**CONTRACT, R.TAG_DATASET_MD5: "0" * 32}
        client.create_registered_model("cnn", tags=pinned)
        client.create_registered_model("other", tags={**pinned, R.TAG_EXPLAIN: "false"})
        run = client.create_run(client.create_experiment("training")).info.run_id
        for model, n in (("cnn", 5), ("other", 2)):
            for _ in range(n):
                client.create_model_version(model, f"runs:/{run}/model", run)
        settings = Settings.load()
        for v in ("1", "5"):
            R.set_status(client, "cnn", v, "done", key=resolve_job(client, settings, "cnn", v).key, run_id="r1")
        R.set_status(client, "cnn", "2", "done", key="explained-under-an-older-key", run_id="r0")
        R.set_status(client, "cnn", "3", "failed", key=resolve_job(client, settings, "cnn", "3").key, error="boom")
        client.set_model_version_tag("cnn", "4", R.TAG_INPUT_SHAPE, "[1, 32]")
        R.set_status(client, "other", "1", "done", key="anything", run_id="r2")

        calls = []
        original = rest_utils.http_request
        monkeypatch.setattr(rest_utils, "http_request", lambda *a, **k: calls.append(a) or original(*a, **k))
        worker = Worker(settings, server.uri)
        assert worker.reconcile_once() == 3
        assert sorted(worker.pending) == [("cnn", "2"), ("cnn", "3"), ("cnn", "4")]
        assert len(calls) == 3              # a page of registered models, then a page of each model's versions
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- real platform

def key_runs_of(p, name, version) -> list:
    """The flow runs Prefect holds for the version's current key (tag figan-key:<key>)."""
    with p.prefect():
        return runs.key_runs(R.get_status(p.client, name, version)["key"])


class LateClient:
    """An MLflow client each of whose calls lands ``delay`` seconds late (a client retrying, a slow database)."""

    def __init__(self, client: MlflowClient, delay: float):
        self._client, self._delay = client, delay

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def late(*args, **kwargs):
            time.sleep(self._delay)
            return attr(*args, **kwargs)
        return late


def test_concurrent_triggers_of_one_key_make_one_flow_run(platform):
    """Four workers deciding at the same moment, a fifth whose every MLflow read and write lands 1.5 s late (plus
    the platform's own, woken by the webhook) submit the same attempt of the same key: Prefect's server creates one
    flow run and hands it to all of them; no MLflow write takes part in that."""
    p = platform
    v = register_plain(p, "race")
    workers = [Worker(Settings.load(), p.server.uri) for _ in range(5)]
    workers[-1].client = LateClient(workers[-1].client, 1.5)
    barrier = threading.Barrier(len(workers))
    decisions = {}

    def trigger(i, w):
        with p.prefect():
            barrier.wait()
            decisions[i] = w.handle("race", v, "test")

    threads = [threading.Thread(target=trigger, args=(i, w)) for i, w in enumerate(workers)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    submitted = {h["flow_run"] for w in workers for h in w.history}
    assert len(submitted) <= 1, submitted                  # whoever submitted got the one run
    st = wait_status(p, "race", v)
    prefect_runs = key_runs_of(p, "race", v)
    assert len(prefect_runs) == 1 and prefect_runs[0].idempotency_key == f"{st['key']}:1"
    assert submitted <= {str(prefect_runs[0].id)}
    assert prefect_runs[0].state.type.value == "COMPLETED"
    assert [r.info.run_id for r in published_runs(p, "race", v)] == [st["run_id"]]


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
        lineage = artifact_json(p, runs[0].info.run_id, layout.LINEAGE)
        assert lineage["cnn_name"] == n and lineage["cnn_version"] == v and lineage["dataset_md5"] == p.md5
    assert statuses["auto-a"]["run_id"] != statuses["auto-b"]["run_id"]
    # the worker's log (a container's log in deploy/) says what submitted each version's flow run and how it ended;
    # the end is seen at the worker's next decision about the version (a tag webhook or the reconciler), waited for
    wanted = [rf'"msg": "{n}/{v}: {what}' for n, v in versions.items()
              for what in (r"flow run \S+ \(attempt 1\) for (webhook|reconciler)",
                           rf"flow run \S+ .* has ended; version done \(run {statuses[n]['run_id']}\)")]
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


def flow_run_process(p, run_id: str) -> psutil.Process | None:
    """The process running a flow run under the Prefect worker (its environment names the flow run; of several, the
    largest, as the OOM killer would choose)."""
    worker = psutil.Process(find_daemon(p.home, "prefect-worker").pid)
    found = []
    for proc in worker.children(recursive=True):
        try:
            if proc.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                found.append((proc.memory_info().rss, proc))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return max(found, key=lambda f: f[0])[1] if found else None


def wait_checkpoint(p, name, v, timeout=180.0) -> dict:
    """The version's progress once its run reports a GAN checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        prog = R.get_status(p.client, name, v)["progress"]
        if prog and prog.get("stage") == "train-gan" and prog.get("step"):
            return prog
        time.sleep(0.3)
    pytest.fail(f"{name}/{v}: no GAN checkpoint within {timeout} s: {R.get_status(p.client, name, v)}")


def test_killed_flow_run_is_counted_and_resubmitted_once(platform):
    """SIGKILL of the flow run's process (as the OOM killer would): Prefect marks it CRASHED, the worker counts
    attempt 1 with the stage and step it reached and submits attempt 2, which resumes the GAN and publishes."""
    p = platform
    v = register_plain(p, "crashy")
    prog = wait_checkpoint(p, "crashy", v)
    proc = flow_run_process(p, prog["flow_run"])
    assert proc is not None, "the flow run's process was not found under the Prefect worker"
    # in the daemon's process group: `figan down` stops it, and reaps it when the Prefect worker itself was killed
    assert os.getpgid(proc.pid) == find_daemon(p.home, "prefect-worker").pid
    proc.send_signal(signal.SIGKILL)
    counted = wait_status(p, "crashy", v, want=("failed",), timeout=120)
    assert counted["error_kind"] == "crash" and counted["attempts"] == 1, counted
    assert "crashed" in counted["error"] and "at stage train-gan, step " in counted["error"], counted["error"]
    st = wait_status(p, "crashy", v, timeout=300)
    time.sleep(8)                                       # > 2 reconcile periods: the finished run is not counted
    assert R.get_status(p.client, "crashy", v)["status"] == "done"
    prefect_runs = key_runs_of(p, "crashy", v)
    assert [(r.idempotency_key, r.state.type.value) for r in prefect_runs] == \
        [(f"{st['key']}:1", "CRASHED"), (f"{st['key']}:2", "COMPLETED")]
    assert [r.info.run_id for r in published_runs(p, "crashy", v)] == [st["run_id"]]
    metrics = artifact_json(p, st["run_id"], "metrics.json")
    assert metrics["training"]["resumed_from_step"] > 0 and metrics["training"]["steps"] == TINY["steps"]


def test_run_of_a_dead_prefect_worker_is_crashed_by_its_missing_heartbeats_and_retried(platform):
    """The Prefect worker dies with its flow run (a restarted container, a lost machine): no one is left to report the
    run, so it would stay RUNNING. Prefect's automation crashes it once its heartbeats stop (3 × 30 s, before the
    hang timeout); the worker counts it, and attempt 2 on the restarted Prefect worker resumes and publishes."""
    p = platform
    v = register_plain(p, "orphan")
    wait_checkpoint(p, "orphan", v)
    os.killpg(find_daemon(p.home, "prefect-worker").pid, signal.SIGKILL)     # the worker and its flow run
    killed = time.time()
    while find_daemon(p.home, "prefect-worker") is not None:                  # SIGKILL lands asynchronously
        assert time.time() - killed < 30, "the killed Prefect worker is still alive"
        time.sleep(0.2)
    start_prefect_worker(Settings.load(), p.server.uri)
    counted = wait_status(p, "orphan", v, want=("failed",), timeout=HANG_SECONDS + 60)
    assert counted["error_kind"] == "crash" and counted["attempts"] == 1, counted
    assert "no heartbeat for 90 s" in counted["error"] and "at stage train-gan" in counted["error"], counted["error"]
    assert time.time() - killed < HANG_SECONDS
    st = wait_status(p, "orphan", v, timeout=300)
    assert [(r.idempotency_key, r.state.type.value) for r in key_runs_of(p, "orphan", v)] == \
        [(f"{st['key']}:1", "CRASHED"), (f"{st['key']}:2", "COMPLETED")]
    assert [r.info.run_id for r in published_runs(p, "orphan", v)] == [st["run_id"]]
    metrics = artifact_json(p, st["run_id"], "metrics.json")
    assert metrics["training"]["resumed_from_step"] > 0


def test_hung_flow_run_is_cancelled_counted_and_retried(platform):
    """A run whose training stops moving (the flow's test hook stalls model "hangs" at step 40, its process alive)
    is cancelled through Prefect after FIGAN_HANG_SECONDS, counted, and attempt 2 (resumed from that checkpoint,
    so past the stall) publishes."""
    p = platform
    v = register_plain(p, "hangs")
    deadline = time.time() + 420 + HANG_SECONDS     # the decision queue (slow on 2 shared cores) + the run + the hang
    while time.time() < deadline:
        st = R.get_status(p.client, "hangs", v)
        if st["status"] == "failed" and st["error_kind"] == "crash":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"hung run not counted: {R.get_status(p.client, 'hangs', v)}; worker log "
                    f"{_tail(p.home / 'logs' / 'worker.log')}")
    assert "hung: no progress" in st["error"] and "stage train-gan, step 40" in st["error"] and st["attempts"] == 1
    first = key_runs_of(p, "hangs", v)[0]
    deadline = time.time() + 240                    # the process worker polls for cancellations (slow when busy)
    while key_runs_of(p, "hangs", v)[0].state.type.value != "CANCELLED" and time.time() < deadline:
        time.sleep(0.5)
    assert key_runs_of(p, "hangs", v)[0].state.type.value == "CANCELLED", first.state
    assert flow_run_process(p, str(first.id)) is None                  # the stalled process was stopped
    done = wait_status(p, "hangs", v, timeout=300)
    time.sleep(8)
    assert R.get_status(p.client, "hangs", v)["status"] == "done"
    assert [(r.idempotency_key, r.state.type.value) for r in key_runs_of(p, "hangs", v)] == \
        [(f"{done['key']}:1", "CANCELLED"), (f"{done['key']}:2", "COMPLETED")]
    assert [r.info.run_id for r in published_runs(p, "hangs", v)] == [done["run_id"]]


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
    assert json.loads(manual.stdout[manual.stdout.index("{"):])["status"] == "done"     # published, or gated
    assert len(published_runs(p, "triple", v)) == 1
    assert len(key_runs_of(p, "triple", v)) <= 1        # the webhook's and the reconciler's submissions: one run
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


def test_figan_commands_record_their_flow_runs_in_the_platforms_prefect(platform):
    """With the platform up and no PREFECT_API_URL of its own, `figan version-data` runs its flow against the
    platform's Prefect server (found through the platform's home), not a throwaway temporary one."""
    api = prefect_api_url(Settings.load())

    def version_dataset_runs() -> int:
        body = json.dumps({"flows": {"name": {"any_": ["version-dataset"]}}}).encode()
        req = urllib.request.Request(f"{api}/flow_runs/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return len(json.loads(resp.read()))

    before = version_dataset_runs()
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PYTHONPATH": os.getcwd()}
    src = platform.home / "src" / "phantom"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "version-data", "--src", str(src)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert platform.md5 in done.stdout
    assert version_dataset_runs() == before + 1
