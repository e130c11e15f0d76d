"""The platform's main job as Prefect 3 flows: version a dataset, and explain one registered CNN version.

`explain_version(name, version)` — one flow run per model version, one task per stage:

    resolve (MLflow contract + CNN) → data (DVC fetch of the pinned md5) → features (cached by CNN version and
    data md5) → pls → train (cGAN; resumes from its checkpoint after a crash) → sequences → checks → drift →
    lineage → report → publish (signed: `flows.audit`)

* **Status** lives on the model version (`flows.registry`): `running` when work starts, `done` with headline
  metrics and the verdict (`figan.verdict`: pass, or fail + the failing gates) when the MLflow run holding every
  artifact is published, `failed` with the error message otherwise. `done` means published; with
  `FIGAN_PASS_ALIAS` set, that alias is also moved to the version when its verdict is pass.
* **Idempotent by key** = (model name, version, the CNN's identity, dataset md5, explain-config hash): a key that
  already has a published run is not explained again (the flow returns it), and right before publishing the flow
  checks again, holding the platform's one publishing slot (the publishing gate). The identity
  (`flows.registry.cnn_identity`) tells a deleted and re-created model's version 1 from the old one. The cached
  features are keyed the same way; each flow run works in its own folder under the key's (:func:`run_folder`),
  seeded with the previous run's `gan/`, so a re-run after a crash reuses the cached features and resumes GAN
  training from `gan/last.pt`, and another CNN never does.
* **Progress** (`figan.progress` on the version: stage, GAN step at each checkpoint) tells the worker where a
  crashed run died and when a running one stopped moving (:mod:`flows.trigger`).
* **Retries** (`flows.failures`): tasks that do MLflow/DVC I/O retry on transient errors (I/O, connection, server
  errors) at once; the flow's failure is recorded with its kind, which tells the worker when to try again:
  transient errors after a backoff, contract errors when the contract tags change, programming errors (TypeError,
  KeyError, ...) when the code, the explain config or the contract tags change.

`version_dataset_flow(src)` validates a dataset folder, `dvc add` + `dvc push`es it into the data store and
returns the md5 that names the version.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from models.audit import library_versions
from models.data import DatasetError, ImageDataset
from models.explain import (ExplainConfig, ExplainRun, cnn_input, prepare, stage_attribution, stage_checks,
                            stage_features, stage_pls, stage_sequences, stage_train)
from models.features import FeatureError, model_output
from models.layer_selection import candidate_layers, chosen_layer, select_layer
from models.verdict import verdict_of, verdict_text

from . import registry as R
from . import runs
from .audit import signing_key
from .drift import drift_task, report_task          # across releases: drift + diff, auditor report
from .data import (DataVersionError, InvalidDatasetError, dataset_version, fetch_dataset, list_versions, open_store,
                   version_dataset)
from .failures import CONTRACT, PROGRAM, TRANSIENT, describe, failure_kind, program_fingerprint
from .settings import Settings


class PlatformError(RuntimeError):
    """The platform itself is not usable as configured (no tracking server, …)."""


def tracking_uri(settings: Settings) -> str:
    """The configured MLflow URI, or the embedded server's (started by `figan up`); an error saying how to get one."""
    uri = settings.mlflow_uri()
    if uri is None:
        raise PlatformError(f"no MLflow server: start the embedded one with `figan up` (home {settings.mlflow_home})"
                            f" or set FIGAN_TRACKING_URI")
    return uri


def explanation_key(name: str, version: str, cnn_id: str, dataset_md5: str, config_hash: str) -> str:
    """What one explanation is of: the CNN (name, version and its identity), the data version and the config."""
    return hashlib.sha256(f"{name}|{version}|{cnn_id}|{dataset_md5}|{config_hash}".encode()).hexdigest()[:16]


def _transient(task_, task_run, state) -> bool:
    """Retry only what a retry can fix (:func:`flows.failures.failure_kind`): I/O and server errors."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 — the state's own error
            exc = e
    return isinstance(exc, BaseException) and failure_kind(exc) == TRANSIENT


IO_TASK = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, cache_policy=NO_CACHE)
WORK_TASK = dict(cache_policy=NO_CACHE)


@dataclass
class Job:
    name: str
    version: str
    key: str
    dataset: str
    dataset_md5: str
    contract: R.Contract
    cfg: ExplainConfig
    existing_run: str | None = None


# --------------------------------------------------------------------------------------------- tasks

def resolve_job(client: MlflowClient, settings: Settings, name: str, version: str) -> Job:
    """The job for a version as things stand now: contract, dataset version (pinned md5 or the latest one), config,
    idempotency key and the run already published for that key, if any. Used by the flow and by the reconciler."""
    contract = R.read_contract(client, name, version)
    cfg = job_config(settings, contract)
    md5 = contract.dataset_md5 or latest_dataset_md5(settings, contract)
    md5 = md5.removesuffix(".dir")
    key = explanation_key(name, version, contract.cnn_id, md5, cfg.config_hash())
    return Job(name, version, key, contract.dataset, md5, contract, cfg, R.find_explanation(client, name, version, key))


def job_config(settings: Settings, contract: R.Contract) -> ExplainConfig:
    """The explain config for a version: the platform's, with the layer(s) its contract names."""
    cfg = settings.explain_cfg()
    if contract.layer:
        cfg.layer = contract.layer
    if contract.layers:
        cfg.layers = contract.layers
    return cfg


def latest_dataset_md5(settings: Settings, contract: R.Contract) -> str:
    """The md5 of the newest version of the contract's dataset in the data store (the contract pins none)."""
    versions = list_versions(open_store(settings.data_store, settings.dvc_remote), contract.dataset)
    if not versions:
        raise DataVersionError(f"model version {contract.name}/{contract.version}: dataset {contract.dataset!r} has "
                               f"no version in the data store {settings.data_store}")
    return versions[-1].md5


@task(name="resolve", **IO_TASK)
def resolve(client: MlflowClient, settings: Settings, name: str, version: str) -> Job:
    return resolve_job(client, settings, name, version)


@task(name="load-cnn", **IO_TASK)
def load_cnn(client: MlflowClient, job: Job):
    return R.load_cnn_version(client, job.name, job.version)


@task(name="data", **IO_TASK)
def fetch_data(settings: Settings, job: Job) -> ImageDataset:
    """The dataset version the job names, validated completely (dataset.yaml, manifest) before any training: a
    version that does not validate (e.g. stored before a check existed) is a contract error, not retried."""
    store = open_store(settings.data_store, settings.dvc_remote)
    dest = settings.home / "datasets" / f"{job.dataset}@{job.dataset_md5[:12]}"
    try:
        return ImageDataset(fetch_dataset(store, job.dataset, job.dataset_md5, dest))
    except InvalidDatasetError as e:
        raise R.ContractError(f"model version {job.name}/{job.version}: dataset {job.dataset} version "
                              f"{job.dataset_md5} (tags {R.TAG_DATASET} / {R.TAG_DATASET_MD5}) is not valid: "
                              f"{e}") from e


@task(name="features", **WORK_TASK)
def features(run: ExplainRun, cache: Path) -> None:
    stage_features(run, cache)


@task(name="pls", **WORK_TASK)
def pls(run: ExplainRun) -> None:
    stage_pls(run)


@task(name="train-gan", **WORK_TASK)
def train(run: ExplainRun, stop_after: int | None, pose_cache: Path | None = None,
          on_checkpoint: Callable[[int], None] | None = None) -> int:
    return stage_train(run, stop_after, pose_cache=pose_cache, on_checkpoint=on_checkpoint).step   # bar on stderr


def probe_cnn_input(model, ds: ImageDataset, contract: R.Contract, where: str) -> None:
    """One image through the contract's input shape and the CNN: a mismatch is a contract error now, not after the
    features, PLS and generator were fitted."""
    try:
        model_output(model, ds.load([0]), transform=cnn_input(tuple(contract.input_shape)))
    except FeatureError as e:
        raise R.ContractError(f"{where}: tag {R.TAG_INPUT_SHAPE}={list(contract.input_shape)} does not fit the "
                              f"CNN: {e}") from e


@task(name="evaluate-layer", **WORK_TASK)
def evaluate_layer(evaluate: Callable[[int, str | None], dict], i: int, layer: str | None) -> dict:
    return evaluate(i, layer)


def select_layers(ds: ImageDataset, model, job: Job, out: Path, pose_cache: Path) -> dict:
    """FIGAN's feature selection (:func:`models.layer_selection.select_layer`) with every candidate after the
    first as its own task, as many at once as the task runner (or the work pool's workers) allow."""
    try:
        candidates = candidate_layers(model, job.cfg.layers)
    except FeatureError as e:
        raise R.ContractError(f"model version {job.name}/{job.version}: tag {R.TAG_LAYERS}: {e}") from e

    def as_tasks(evaluate, rest):
        return [f.result() for f in [evaluate_layer.submit(evaluate, i, layer) for i, layer in rest]]
    c = job.contract
    return select_layer(ds, model, candidates, out, job.cfg, c.task, tuple(c.input_shape),
                        f"{job.name} v{job.version}", pose_cache, fan_out=as_tasks)


@task(name="sequences", **WORK_TASK)
def sequences(run: ExplainRun) -> None:
    stage_sequences(run)
    stage_attribution(run)


@task(name="checks", **WORK_TASK)
def checks(run: ExplainRun) -> dict:
    return stage_checks(run)


@task(name="lineage", **IO_TASK)
def lineage_of(client: MlflowClient, settings: Settings, job: Job, model) -> dict:
    """What the explanation is made from, as report.html shows it and the signed manifest records it: the dataset
    (name, DVC md5, the date that version was made), the CNN (name, version, LoggedModel id, format, digest of
    its files), the explain config and its hash, the code version and the library versions."""
    created = dataset_version(open_store(settings.data_store, settings.dvc_remote), job.dataset,
                              job.dataset_md5).created
    return {"dataset": job.dataset, "dataset_md5": job.dataset_md5, "dataset_created": created or None,
            "cnn_name": job.name, "cnn_version": job.version, "cnn_id": job.contract.cnn_id,
            "cnn_model_id": R.logged_model_id(client, job.name, job.version),
            "cnn_format": getattr(model, "figan_format", None), "cnn_digest": getattr(model, "figan_digest", None),
            "config_hash": job.cfg.config_hash(), "key": job.key, "config": asdict(job.cfg),
            "code_version": R.code_version(), "libraries": library_versions()}


@task(name="publish", **IO_TASK)
def publish(client: MlflowClient, settings: Settings, job: Job, run: ExplainRun, metrics: dict,
            lineage: dict) -> str:
    """The explanation run, signed with the platform's audit key (created on first use)."""
    return R.publish_explanation(client, job.name, job.version, run.out, metrics, lineage, job.key,
                                 signing_key=signing_key(settings, create=True), pass_alias=settings.pass_alias,
                                 cnn_id=job.contract.cnn_id)


# --------------------------------------------------------------------------------------------- flows

def record_failure(client: MlflowClient, settings: Settings, name: str, version: str, exc: BaseException,
                   key: str | None) -> None:
    """Mark the version failed with its message, its kind (:func:`flows.failures.failure_kind`) and what the worker
    reads to decide when to try again: transient errors after ``retry_backoff`` × 2^(attempts−1) s, contract errors
    when the contract tags change (their fingerprint), programming errors when the code, explain config or contract
    tags change (:func:`flows.failures.program_fingerprint`)."""
    prev = R.get_status(client, name, version)
    kind = failure_kind(exc)
    attempts = (prev["attempts"] + 1) if (prev.get("key") == key and prev.get("status") in ("failed", "running")
                                          and key is not None) else 1
    R.set_status(client, name, version, "failed", error=describe(exc), key=key, error_kind=kind, attempts=attempts,
                 retry_after=round(time.time() + settings.retry_backoff * 2 ** (attempts - 1), 1)
                 if kind == TRANSIENT else None,
                 contract_hash=R.contract_fingerprint(client, name, version) if kind == CONTRACT else None,
                 program_hash=program_fingerprint(client, settings, name, version) if kind == PROGRAM else None)


def already_published(client: MlflowClient, settings: Settings, job: Job, run_id: str) -> dict:
    """The answer for a key that has a published run: its status on the version (re)written, nothing explained."""
    get_run_logger().info(f"{job.name}/{job.version}: explanation for key {job.key} already published (run {run_id})")
    name, version = job.name, job.version
    if R.get_status(client, name, version).get("status") != "done":
        R.set_status(client, name, version, "done", run_id=run_id, key=job.key,
                     verdict=R.verdict_tag(R.run_verdict(client, run_id)),
                     manifest_sha256=R.run_manifest_sha256(client, run_id))
    if settings.pass_alias:         # idempotent; also the retry of an alias write that failed after publishing
        R.apply_pass_alias(client, name, version, settings.pass_alias, R.get_status(client, name, version))
    return {"status": "done", "run_id": run_id, "key": job.key, "new": False}


class Progress:
    """Where this flow run is, on the version (:func:`flows.registry.write_progress`): each stage as it starts and
    the GAN step at every checkpoint. The worker reads it to name the stage of a crash and to cancel a run that
    stopped moving (``FIGAN_HANG_SECONDS``). A failed write is not a failed explanation: it is retried at the next
    report."""

    def __init__(self, client: MlflowClient, name: str, version: str, flow_run: str | None):
        self.client, self.name, self.version, self.flow_run = client, name, version, flow_run

    def stage(self, stage: str, step: int | None = None) -> None:
        try:
            R.write_progress(self.client, self.name, self.version, self.flow_run, stage, step)
        except Exception as e:  # noqa: BLE001
            get_run_logger().warning(f"progress not recorded ({type(e).__name__}: {e})")

    def checkpoint(self, step: int) -> None:
        self.stage("train-gan", step)
        _stall_for_tests(self.name, step)


def _stall_for_tests(name: str, step: int) -> None:
    """Test hook: ``FIGAN_TEST_STALL=<model name>:<step>`` makes that model's GAN training stop moving (sleep, the
    process alive) at the checkpoint of that step, as a hung run would (a run resumed from that checkpoint goes
    on); unset in any real deployment."""
    target, _, at = os.environ.get("FIGAN_TEST_STALL", "").rpartition(":")
    if target == name and at.isdigit() and step == int(at):
        while True:
            time.sleep(60)


def run_folder(base: Path, flow_run: str | None) -> Path:
    """This flow run's own working folder under the key's folder ``base``, seeded with the generator state (``gan/``:
    cGAN checkpoint, registration) of the key's most recent earlier run, so a retry after a crash resumes training
    while two runs of one key never write into the same files."""
    out = base / (flow_run or f"local-{uuid.uuid4().hex[:12]}")
    if (out / "gan").exists() or not base.is_dir():
        return out
    earlier = [d / "gan" for d in base.iterdir() if d != out and (d / "gan").is_dir()]
    if earlier:
        latest = max(earlier, key=lambda g: max((f.stat().st_mtime for f in g.rglob("*")), default=0.0))
        shutil.copytree(latest, out / "gan", dirs_exist_ok=True)
    return out


@flow(name="explain-model-version", log_prints=True)
def explain_version(name: str, version: str, stop_after: int | None = None) -> dict:
    """Explain one registered CNN version and publish the result on it. Settings come from the environment.

    Exactly one run per key is Prefect's job (:mod:`flows.runs`: one flow run per idempotency key); this flow adds
    the publishing gate: the key's published run answers at once, and right before publishing the flow checks
    again, inside the platform's one publishing slot (:func:`flows.runs.publishing_turn`), so a run that lost a
    race (or a person's run beside the platform's) publishes nothing. Each flow run works in its own folder
    (:func:`run_folder`)."""
    from prefect.runtime import deployment as this_deployment, flow_run as this_run
    log = get_run_logger()
    settings = Settings.load()
    client = MlflowClient(tracking_uri(settings))
    version = str(version)
    t0 = time.time()
    try:
        job = resolve(client, settings, name, version)
    except Exception as e:
        record_failure(client, settings, name, version, e, key=None)
        raise
    if job.existing_run:
        return already_published(client, settings, job, job.existing_run)
    progress = Progress(client, name, version, this_run.id)
    prev = R.get_status(client, name, version)
    R.set_status(client, name, version, "running", key=job.key,
                 attempts=prev["attempts"] if prev.get("key") == job.key else None)
    try:
        signing_key(settings, create=True)      # an unusable audit key fails now, not after the work
        if this_deployment.id:                  # a run the crash automation watches: its heartbeats must keep up
            runs.check_heartbeat_period(settings.heartbeat_seconds)
        res = job.cfg.resolution or "auto"       # the registration depends on the images alone: shared
        pose_cache = settings.features_cache / (f"{job.dataset}-{job.dataset_md5[:12]}-{res}-"
                                                f"{job.cfg.max_images or 'all'}-{job.cfg.register_iters}-pose.pt")
        progress.stage("load-cnn")
        model, spec = load_cnn(client, job)
        c = job.contract
        progress.stage("data")
        try:            # the contract's target and task, not the dataset.yaml default, define what is explained
            ds = fetch_data(settings, job).with_target(c.target, c.task)
        except DatasetError as e:
            raise R.ContractError(f"tags figan.target / figan.task do not fit dataset {job.dataset}: {e}") from e
        probe_cnn_input(model, ds, c, f"model version {name}/{version}")    # before any expensive work
        out = run_folder(settings.work_dir / f"{name}-v{version}-{job.key}", this_run.id)
        cfg, selection = job.cfg, None
        if cfg.layers:                   # FIGAN's feature selection: one candidate per layer, lowest FID kept
            progress.stage("select-layer")
            selection = select_layers(ds, model, job, out / "layers", pose_cache)
            cfg = dataclasses.replace(cfg, layer=chosen_layer(selection))
            client.set_model_version_tag(name, version, R.TAG_LAYER_CHOSEN, selection["chosen"])
        run = prepare(ds, model, out, cfg, task=c.task, input_shape=tuple(c.input_shape),
                      cnn_name=f"{name} v{version}")
        run.layer_selection = selection
        layer = cfg.layer or "final"
        progress.stage("features")
        features(run, settings.features_cache / (f"{name}-v{version}-{job.contract.cnn_id}-"
                                                 f"{job.dataset_md5[:12]}-{layer}.npy"))
        progress.stage("pls")
        pls(run)
        progress.stage("train-gan")
        step = train(run, stop_after, pose_cache, progress.checkpoint)
        if step < job.cfg.steps:
            R.set_status(client, name, version, "queued", key=job.key)
            log.warning(f"{name}/{version}: GAN training stopped at step {step}; a re-run resumes it")
            return {"status": "interrupted", "step": step, "key": job.key, "new": True}
        progress.stage("sequences")
        sequences(run)
        progress.stage("checks")
        metrics = checks(run)
        progress.stage("drift")
        drift_summary = drift_task(client, settings, job, run)    # never raises; tags figan.drift.*
        lineage = lineage_of(client, settings, job, model)
        progress.stage("report")
        report_task(job, run, drift_summary, lineage)             # report.html, published with the run
        progress.stage("publish")
        with runs.publishing_turn():        # the gate's check and the publication: one step for every process
            published = R.find_explanation(client, name, version, job.key)  # the gate: a published run is final
            if published:
                log.info(f"{name}/{version}: key {job.key} was published meanwhile; not publishing")
                return already_published(client, settings, job, published)  # our "running" undone
            run_id = publish(client, settings, job, run, metrics, lineage)
    except Exception as e:
        record_failure(client, settings, name, version, e, key=job.key)
        raise
    log.info(f"{name}/{version}: done in {time.time() - t0:.0f} s, run {run_id}; checks "
             f"{verdict_text(verdict_of(metrics))}")
    return {"status": "done", "run_id": run_id, "key": job.key, "new": True, "seconds": round(time.time() - t0, 1),
            "resumed_from_step": metrics.get("training", {}).get("resumed_from_step"),
            "gates": {k: v["pass"] for k, v in metrics["gates"].items() if isinstance(v, dict)},
            "verdict": verdict_of(metrics)}


@flow(name="version-dataset", log_prints=True)
def version_dataset_flow(src: str, name: str | None = None) -> dict:
    """Validate a dataset folder, add + push it with DVC; returns the version (its md5 names it)."""
    settings = Settings.load()
    store = open_store(settings.data_store, settings.dvc_remote)
    v = version_dataset(store, Path(src), name)
    print(f"dataset {v.name}: version {v.md5} ({v.n_images} images) in {store.root}, remote {store.remote}")
    return asdict(v)
