"""Published explanations: one run in the ``figan-explanations`` experiment per explanation (artifacts,
flattened metrics, lineage, run inputs, signed manifest), found by key, downloaded for the service."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelInput,
    Metric,
    Param,
    RunStatus,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models import audit, layout
from models.verdict import PASS, verdict_of

from .client import (
    _quote,
    _experiment_id,
    _finite,
    _headline,
    _metric_key,
    _tag_value,
    flatten_metrics,
    parse_verdict_tag,
)
from .contract import cnn_identity
from .status import set_status
from .tags import (
    _LOGGED_MODEL_SOURCE_RE,
    _MODEL_METRICS_RE,
    EXPLANATIONS_EXPERIMENT,
    LINEAGE_TAG_PREFIX,
    RUN_TAG_CNN_ID,
    RUN_TAG_KEY,
    RUN_TAG_MANIFEST,
    RUN_TAG_MODEL,
    RUN_TAG_VERSION,
)


class DVCDatasetSource(DatasetSource):
    """A dataset version pinned by DVC: dataset name + md5 (what ``mlflow.log_input`` records as the source)."""

    def __init__(self, dataset: str, md5: str):
        self.dataset = dataset
        self.md5 = md5

    @property
    def uri(self) -> str:
        return f"dvc:{self.dataset}@{self.md5}"

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> Any:
        raise NotImplementedError(f"fetch {self.uri} with `dvc pull` / `dvc get`; MLflow only records it")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "DVCDatasetSource":
        raise NotImplementedError("DVC dataset sources are created explicitly")

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "dataset": self.dataset, "md5": self.md5}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "DVCDatasetSource":
        return cls(source_dict["dataset"], source_dict["md5"])


def _dvc_dataset(dataset: str, md5: str) -> MetaDataset:
    return MetaDataset(DVCDatasetSource(dataset, md5), name=dataset, digest=md5)


def _code_version() -> str | None:
    """``git rev-parse HEAD`` of the checkout this module lives in (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _published(rel: Path) -> bool:
    """Whether an artifacts-folder file goes into the explanation run: everything except caches and training state,
    at any depth (the layer-selection candidates under ``layers/`` have their own): cached features, a GAN's
    training checkpoint and registration (``gan/*.pt``; ``gan/best/`` is kept), the shared registration
    ``layers/pose.pt``, hidden files and a manifest left from an earlier publication (each run gets its own)."""
    if any(part.startswith(".") for part in rel.parts):
        return False
    if rel.as_posix() == layout.MANIFEST or rel.name in (layout.FEATURES, layout.REGISTRATION):
        return False
    if len(rel.parts) >= 2 and rel.parts[-2] == layout.GAN_DIR and rel.suffix == ".pt":
        return False
    return True


def _stage(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class VersionReplacedError(RuntimeError):
    """The model version was deleted and re-created (another CNN) while its explanation was being made."""


def publish_explanation(client: MlflowClient, name: str, version: str | int, artifacts_dir: Path, metrics: dict,
                        lineage: dict, key: str, signing_key: bytes, pass_alias: str | None = None,
                        cnn_id: str | None = None) -> str:
    """Publish an explanation's artifacts folder as one finished run and mark the version ``done`` with its
    headline metrics, verdict (``figan.verdict``) and manifest digest; with ``pass_alias``, then
    :func:`apply_pass_alias`.

    The run (experiment ``figan-explanations``) gets every file of ``artifacts_dir`` except caches and training
    state at any depth (``features.npy``, ``gan/*.pt``, ``pose.pt``; ``gan/best/`` is kept), ``metrics``
    flattened into run metrics and the FID trace as the step series ``fid``, the verdict as the param ``verdict``
    and the metric ``verdict_pass``, the tags ``figan.model``/``figan.version``/``figan.key`` and ``figan.cnn_id``
    (the version's :func:`cnn_identity`),
    lineage as ``lineage.<k>`` tags and ``lineage.json`` (the code version, library versions and the CNN's
    LoggedModel id are added when missing), the DVC dataset as an input when lineage names it and the CNN's
    LoggedModel as an input when the version has one (its headline metrics are logged against it too). Last, the
    signed manifest of every file and of the inputs (``audit/manifest.json``, signed with ``signing_key``; its sha256
    is the run tag and the version tag ``figan.manifest_sha256``). ``cnn_id`` is the identity of the CNN that was
    explained: when the version now is another CNN (deleted and re-created meanwhile) nothing is published
    (:class:`VersionReplacedError`). If anything fails the run is marked FAILED (so :func:`find_explanation` ignores
    it) and the error is raised; the version's status is left to the caller. Returns the run id."""
    artifacts_dir = Path(artifacts_dir)
    if not artifacts_dir.is_dir():
        raise FileNotFoundError(f"explanation artifacts folder {artifacts_dir} does not exist")
    version = str(version)
    current = cnn_identity(client.get_model_version(name, version))
    if cnn_id is not None and cnn_id != current:
        raise VersionReplacedError(f"model version {name}/{version} is another CNN now (identity {current}, "
                                   f"explained {cnn_id}): it was deleted and re-created; not publishing")
    model_id = logged_model_id(client, name, version)
    lineage = _complete_lineage(lineage, name, version, metrics, key, model_id)
    lineage["cnn_id"] = current

    experiment_id = _experiment_id(client, EXPLANATIONS_EXPERIMENT)
    run_tags = {RUN_TAG_MODEL: name, RUN_TAG_VERSION: version, RUN_TAG_KEY: key, RUN_TAG_CNN_ID: current}
    for k, v in lineage.items():
        value = _tag_value(v)
        if len(value) <= 5000:
            run_tags[_metric_key([LINEAGE_TAG_PREFIX + str(k)])] = value
    run = client.create_run(experiment_id, run_name=f"{name}-v{version}", tags=run_tags)
    run_id = run.info.run_id
    headline = _headline(metrics)
    try:
        with tempfile.TemporaryDirectory(prefix="figan-publish-") as tmp:
            stage = Path(tmp) / "artifacts"
            for path in sorted(artifacts_dir.rglob("*")):
                rel = path.relative_to(artifacts_dir)
                if path.is_file() and _published(rel):
                    _stage(path, stage / rel)
            (stage / layout.LINEAGE).write_text(json.dumps(lineage, indent=2, default=str))
            client.log_artifacts(run_id, str(stage))
            _log_metrics(client, run_id, metrics, headline["verdict"], model_id)
            _log_inputs(client, run_id, lineage, model_id)
            manifest = audit.sign(audit.build_manifest(
                audit.folder_digests(stage), inputs={k: v for k, v in lineage.items() if k not in ("config", "key")},
                subject={"model": name, "version": version, "key": key, "run_id": run_id}), signing_key)
            manifest_path, manifest_sha256 = audit.write_manifest(Path(tmp) / "signed", manifest)
            client.set_tag(run_id, RUN_TAG_MANIFEST, manifest_sha256)
            client.log_artifact(run_id, str(manifest_path), artifact_path=layout.AUDIT_DIR)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    set_status(client, name, version, "done", run_id=run_id, key=key, manifest_sha256=manifest_sha256, **headline)
    if pass_alias:
        apply_pass_alias(client, name, version, pass_alias, parse_verdict_tag(headline["verdict"]))
    return run_id


def _complete_lineage(lineage: dict, name: str, version: str, metrics: dict, key: str,
                      model_id: str | None) -> dict:
    """The caller's lineage plus what the registry knows: CNN name, version and LoggedModel id, config hash, code
    version (git commit, else the installed package), library versions and the explanation key."""
    lineage = dict(lineage)
    lineage.setdefault("cnn_name", name)
    lineage.setdefault("cnn_version", version)
    if model_id:
        lineage.setdefault("cnn_model_id", model_id)
    if metrics.get("config_hash"):
        lineage.setdefault("config_hash", metrics["config_hash"])
    if "code_version" not in lineage:
        lineage["code_version"] = code_version()
    lineage.setdefault("libraries", audit.library_versions())
    lineage["key"] = key
    return lineage


def _log_metrics(client: MlflowClient, run_id: str, metrics: dict, verdict: str | None,
                 model_id: str | None) -> None:
    """metrics.json flattened into run metrics, the FID trace as the step series ``fid``, the verdict as the
    param ``verdict`` and the metric ``verdict_pass`` (1/0); the headline ones also against ``model_id``."""
    flat = flatten_metrics(metrics)
    if verdict:
        flat["verdict_pass"] = float(verdict == PASS)
    ts = int(datetime.now(timezone.utc).timestamp() * 1000)
    batch = [Metric(k, v, ts, 0, model_id=model_id if model_id and _MODEL_METRICS_RE.match(k) else None)
             for k, v in flat.items()]
    for point in (metrics.get("fid") or {}).get("trace") or []:
        v = _finite(point.get("fid"))
        if v is not None:
            batch.append(Metric("fid", v, ts, int(point.get("step", 0))))
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])
    if verdict:
        client.log_batch(run_id, params=[Param("verdict", verdict)])


def _log_inputs(client: MlflowClient, run_id: str, lineage: dict, model_id: str | None) -> None:
    """The DVC dataset version (when lineage names it) and the CNN's LoggedModel (when there is one) as inputs."""
    datasets = []
    if lineage.get("dataset") and lineage.get("dataset_md5"):
        ds = _dvc_dataset(str(lineage["dataset"]), str(lineage["dataset_md5"]))
        entity = DatasetEntity(name=ds.name, digest=ds.digest, source_type="dvc", source=ds.source.to_json())
        datasets.append(DatasetInput(entity, [InputTag("mlflow.data.context", "explanation")]))
    models = [LoggedModelInput(model_id)] if model_id else []
    if datasets or models:
        client.log_inputs(run_id, datasets=datasets or None, models=models or None)


def logged_model_id(client: MlflowClient, name: str, version: str | int) -> str | None:
    """The id of the MLflow 3 LoggedModel a registered version was made from: the version's ``model_id``, else the
    one its ``models:/m-…`` source names (the registry does not always return ``model_id``); None for a version
    registered the older way (a ``runs:/`` or storage source) or whose LoggedModel is gone."""
    mv = client.get_model_version(name, str(version))
    found = _LOGGED_MODEL_SOURCE_RE.fullmatch(mv.source or "")
    model_id = mv.model_id or (found and found.group(1))
    if not model_id:
        return None
    try:
        return client.get_logged_model(model_id).model_id
    except MlflowException:
        return None


def run_manifest_sha256(client: MlflowClient, run_id: str) -> str | None:
    """The manifest digest a published run was tagged with (None for a run published without one)."""
    return client.get_run(run_id).data.tags.get(RUN_TAG_MANIFEST)


def apply_pass_alias(client: MlflowClient, name: str, version: str | int, alias: str, verdict: dict | None) -> bool:
    """Point the registered-model ``alias`` at ``version`` when its verdict is pass; otherwise take the alias off
    this version if it names it (a failed or unevaluated explanation never keeps it; another version holding the
    alias keeps it). Returns whether the alias names this version now."""
    version = str(version)
    if verdict and verdict.get("verdict") == PASS:
        client.set_registered_model_alias(name, alias, version)
        return True
    if str((client.get_registered_model(name).aliases or {}).get(alias)) == version:
        client.delete_registered_model_alias(name, alias)
    return False


def run_verdict(client: MlflowClient, run_id: str) -> dict | None:
    """The verdict of a published explanation run, from its ``metrics.json`` (None when it has none)."""
    with tempfile.TemporaryDirectory(prefix="figan-verdict-") as tmp:
        try:
            path = client.download_artifacts(run_id, layout.METRICS, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return verdict_of(json.loads(Path(path).read_text()))


def find_explanation(client: MlflowClient, name: str, version: str | int, key: str) -> str | None:
    """The id of the latest *finished* explanation run of this version for ``key`` (None if there is none)."""
    exp = client.get_experiment_by_name(EXPLANATIONS_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_TAG_KEY}` = {_quote(key)} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=100)
    for run in runs:
        tags = run.data.tags
        if tags.get(RUN_TAG_MODEL) == name and tags.get(RUN_TAG_VERSION) == str(version):
            return run.info.run_id
    return None


def download_explanation(client: MlflowClient, run_id: str, dest: Path) -> Path:
    """Download what a service needs from an explanation run (gan/best, pls, sequences, metrics.json, plus
    config.json, lineage.json, summary.txt, the figures, report.html and the signed manifest when present) into
    ``dest``; returns ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    present = {a.path for a in client.list_artifacts(run_id)}
    for folder in (layout.GAN_DIR, layout.AUDIT_DIR):       # GENERATOR_DIR and MANIFEST lie one level down
        present |= {a.path for a in client.list_artifacts(run_id, folder)} if folder in present else set()
    missing = [p for p in layout.SERVICE_ARTIFACTS if p not in present]
    if missing:
        raise FileNotFoundError(f"explanation run {run_id} lacks {missing} (has {sorted(present)})")
    for p in layout.SERVICE_ARTIFACTS + tuple(p for p in layout.SERVICE_OPTIONAL + (layout.MANIFEST,)
                                                 if p in present):
        parent = (dest / p).parent                  # download_artifacts puts <path>'s basename into dst_path
        parent.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(run_id, p, dst_path=str(parent))
    return dest


def code_version() -> str:
    """The lineage's code version: ``git rev-parse HEAD`` of this checkout, else the installed package's version
    (``figan-platform <version>``, e.g. in a container without .git), else ``"unknown"``."""
    package = audit.library_versions(("figan-platform",)).get("figan-platform")
    return _code_version() or (f"figan-platform {package}" if package else "unknown")
