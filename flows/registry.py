"""The adapter between FIGAN and the MLflow Model Registry: the registered-CNN contract and published explanations.

This is the only module that knows tag names and the artifact layout; flows/ and services/ call its functions and
never spell a ``figan.*`` tag or an artifact path themselves.

**The contract** (what the explanation flow needs to know about a registered CNN) lives in tags, read from the
model version, falling back to the registered model (version tags win), so a team can set dataset/task once on
the model and override per version:

=====================  ========================================================================  ==========
tag                    meaning                                                                   required
=====================  ========================================================================  ==========
``figan.dataset``      dataset name (the DVC-versioned folder the CNN is explained on)           yes
``figan.dataset_md5``  DVC md5 of that dataset version (``<32 hex>`` or ``<32 hex>.dir``)        no
``figan.target``       target column (or a JSON list of columns)                                 yes
``figan.task``         ``regression`` or ``classification``                                      yes
``figan.layer``        layer whose output is explained (default: input of the final Linear)      no
``figan.input_shape``  JSON ``[C, H, W]`` the CNN takes                                          yes
``figan.class_names``  JSON list of class names                                                  no
``figan.explain``      ``true``: opt in to automatic explanation                                 no
=====================  ========================================================================  ==========

A missing or malformed tag is a :class:`ContractError` whose message names the version and the tag, so the flow
can mark just that version failed with a message a data scientist can act on.

**The CNN's identity** (:func:`cnn_identity`): a hash of what the registry fixed when the version was created
(its creation time, source URI, run id and MLflow 3 model id). A name and version number do not name a CNN: a
registered model deleted and re-created starts again at version 1. The identity is part of the explanation key,
tags every explanation run (``figan.cnn_id``) and is checked by whoever serves one, so the new version 1 is never
served, nor resumed from, the old one's explanation.

**Status** of a version's explanation is kept in version tags: ``figan.status`` (queued | running | done |
failed), ``figan.run_id``, ``figan.error``, ``figan.key`` (the idempotency key), ``figan.updated`` (ISO time)
and headline metrics (``figan.fid_best``, ``figan.fid_extractor``, ``figan.faithfulness`` and
``figan.pct_variance`` as JSON lists, one entry per PLS component) and the verdict ``figan.verdict``: ``pass``,
or ``fail: fid, diversity`` naming the failing gates (from ``metrics.json``'s ``verdict``, see
:func:`models.verdict.verdict_of`), and ``figan.manifest_sha256``, the digest of the run's signed manifest (what
``figan verify`` and the service check the run against). ``done`` means published; the verdict says whether to trust it. Status is
written last, so whoever sees ``done`` also sees the run id, the metrics and the verdict. With the setting
``pass_alias`` (``FIGAN_PASS_ALIAS``) publishing also points that registered-model alias at the version when its
verdict is pass (and takes it off the version when a re-explanation fails), so ``models:/<name>@<alias>`` only
ever names explanations that passed (:func:`apply_pass_alias`). A failure also records ``figan.error_kind``
(contract | transient | program | crash, :mod:`flows.failures`), ``figan.attempts`` and ``figan.retry_after`` (the
trigger's backoff) and, for contract errors, ``figan.contract_hash`` (not retried until the contract tags change),
for programming errors ``figan.program_hash`` (not retried until the code, config or contract tags change).
``figan.progress`` says where the version's explain run is (stage, GAN step, when; :func:`write_progress`): the
worker names it when that run crashes and cancels the run when it stops moving.
``figan.last_good_run_id`` and ``figan.last_good_key`` name the version's last published run and its key: set
whenever the status becomes ``done`` and left alone by every other status, so while a version is re-explained
(queued, running) or its re-run failed the service keeps serving that run.

**How a CNN is stored.** :func:`register_cnn` logs the model with ``mlflow.pytorch.log_model`` in the
``pt2`` (torch.export) format, chosen explicitly: pickle-free, and a standard MLflow model that MLflow itself can
load and serve. Its input example has batch size 2 so the exported batch dimension stays dynamic (a batch-1
example would freeze it at 1). A torch.export program, however, is a flat graph: its ``named_modules()`` no
longer contain ``nn.Linear`` layers and module hooks never fire, so FIGAN cannot read features from it. The
model therefore also carries ``extra_files/cnn.json`` (the :class:`~models.cnn.CNNSpec`) and
``extra_files/cnn.pt`` (a state dict, loaded with ``weights_only=True``), and :func:`load_cnn_version` rebuilds the
eager ``nn.Module`` from them: exact, hookable, any batch size, and no code unpickled. CNNs registered the
plain MLflow way load too (:func:`load_cnn_version`): a ``pt2`` program is explained from its graph, a pickled
eager model only under the pickle policy (:func:`pickle_allowed`), a TorchScript model is refused with what to
register instead.

**An explanation** is one run in the ``figan-explanations`` experiment holding the artifacts folder written by
``models.explain.explain`` (minus the GAN's training checkpoints and the cached features, which are large and
only needed to resume), the flattened metrics as run metrics (the FID trace as a step series), lineage as
``lineage.*`` run tags plus ``lineage.json``, the DVC dataset and (MLflow 3) the CNN's LoggedModel as run inputs,
the headline metrics (FID, faithfulness, % variance, the verdict as ``verdict_pass``) also against that LoggedModel
so they show on the CNN's model page, and last a signed manifest ``audit/manifest.json`` of every file and of the inputs
(:mod:`models.audit`), whose sha256 is the tag ``figan.manifest_sha256`` on the run and the version. Images are plain
artifact files, which the MLflow UI's artifact viewer displays.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import mlflow
import mlflow.artifacts
import mlflow.models
import mlflow.pytorch
import numpy as np
import torch
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity, DatasetInput, InputTag, LoggedModelInput, Metric, Param, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.model_utils import _add_code_from_conf_to_system_path
from torch import nn

from models import audit, layout
from models.cnn import ARCHITECTURES, CNNSpec, build_cnn
from models.exported import ExportedCNN
from models.verdict import FAIL, PASS, verdict_of

__all__ = [
    "TAG_DATASET", "TAG_DATASET_MD5", "TAG_TARGET", "TAG_TASK", "TAG_LAYER", "TAG_INPUT_SHAPE", "TAG_CLASS_NAMES",
    "TAG_EXPLAIN", "TAG_LAYERS", "TAG_LAYER_CHOSEN", "TAG_STATUS", "TAG_RUN_ID", "TAG_ERROR", "TAG_KEY", "TAG_UPDATED", "TAG_FID_BEST",
    "TAG_FID_EXTRACTOR", "TAG_FAITHFULNESS", "TAG_PCT_VARIANCE", "STATUSES", "EXPLANATIONS_EXPERIMENT",
    "CNN_EXPERIMENT", "ContractError", "Contract", "DVCDatasetSource", "read_contract", "explain_requested",
    "register_cnn", "load_cnn_version", "pickle_allowed", "TAG_TRUST", "set_status", "get_status", "publish_explanation", "find_explanation",
    "download_explanation", "list_versions", "flatten_metrics", "TAG_ATTEMPTS", "TAG_RETRY_AFTER", "TAG_ERROR_KIND",
    "TAG_CONTRACT_HASH", "TAG_PROGRAM_HASH", "TAG_PROGRESS", "contract_fingerprint", "write_progress",
    "TAG_VERDICT", "verdict_tag", "parse_verdict_tag", "apply_pass_alias",
    "run_verdict", "logged_model_id", "TAG_MANIFEST", "RUN_TAG_MANIFEST", "MANIFEST_PATH", "SERVED_ARTIFACTS",
    "run_manifest_sha256", "cnn_identity", "RUN_TAG_CNN_ID", "VersionReplacedError", "TAG_LAST_GOOD_RUN_ID",
    "TAG_LAST_GOOD_KEY", "version_row",
]

# --------------------------------------------------------------------------------------------- tag names

# contract (model version, falling back to the registered model)
TAG_DATASET = "figan.dataset"
TAG_DATASET_MD5 = "figan.dataset_md5"
TAG_TARGET = "figan.target"
TAG_TASK = "figan.task"
TAG_LAYER = "figan.layer"
TAG_LAYERS = "figan.layers"                # optional: "auto" or a JSON list of candidate layers chosen among by FID
TAG_LAYER_CHOSEN = "figan.layer_chosen"    # the candidate the FID selection kept (set by the flow)
TAG_INPUT_SHAPE = "figan.input_shape"
TAG_CLASS_NAMES = "figan.class_names"
TAG_EXPLAIN = "figan.explain"
# explanation status (model version)
TAG_STATUS = "figan.status"
TAG_RUN_ID = "figan.run_id"
TAG_ERROR = "figan.error"
TAG_KEY = "figan.key"
TAG_UPDATED = "figan.updated"
TAG_FID_BEST = "figan.fid_best"
TAG_FID_EXTRACTOR = "figan.fid_extractor"
TAG_FAITHFULNESS = "figan.faithfulness"
TAG_PCT_VARIANCE = "figan.pct_variance"
TAG_VERDICT = "figan.verdict"              # pass | fail: <failing gates, comma-separated>
TAG_MANIFEST = "figan.manifest_sha256"     # sha256 of the published run's signed manifest (models.audit)
# retry bookkeeping and the explain run's progress (model version)
TAG_ATTEMPTS = "figan.attempts"            # failed attempts for the current key
TAG_RETRY_AFTER = "figan.retry_after"      # epoch seconds before which a failed key is not retried
TAG_ERROR_KIND = "figan.error_kind"        # contract | transient | program | crash (flows.failures)
TAG_CONTRACT_HASH = "figan.contract_hash"  # fingerprint of the contract tags a contract error was raised on
TAG_PROGRAM_HASH = "figan.program_hash"    # fingerprint of the code, config and contract a programming error was
                                           # raised on (flows.failures.program_fingerprint)
TAG_TRUST = "figan.trust"                  # "pickle": the CNN was unpickled (its registrant's code ran)
TAG_PROGRESS = "figan.progress"            # JSON {flow_run, stage, step, at}: where the explain run is now
TAG_LAST_GOOD_RUN_ID = "figan.last_good_run_id"   # the version's last published (done) run, kept while it is
TAG_LAST_GOOD_KEY = "figan.last_good_key"         # re-explained or a re-run failed: what the service serves then
# explanation run tags
RUN_TAG_MODEL = "figan.model"
RUN_TAG_VERSION = "figan.version"
RUN_TAG_KEY = "figan.key"
RUN_TAG_MANIFEST = "figan.manifest_sha256"
RUN_TAG_CNN_ID = "figan.cnn_id"           # cnn_identity() of the version the run explains
LINEAGE_TAG_PREFIX = "lineage."

STATUSES = ("queued", "running", "done", "failed")
TASKS = ("regression", "classification")
EXPLANATIONS_EXPERIMENT = "figan-explanations"
CNN_EXPERIMENT = "figan-cnns"

# set_status(**fields) keyword → tag; lists are stored as JSON
_STATUS_FIELDS = {"run_id": TAG_RUN_ID, "error": TAG_ERROR, "key": TAG_KEY, "fid_best": TAG_FID_BEST,
                  "fid_extractor": TAG_FID_EXTRACTOR, "faithfulness": TAG_FAITHFULNESS,
                  "pct_variance": TAG_PCT_VARIANCE, "attempts": TAG_ATTEMPTS, "retry_after": TAG_RETRY_AFTER,
                  "error_kind": TAG_ERROR_KIND, "contract_hash": TAG_CONTRACT_HASH, "program_hash": TAG_PROGRAM_HASH,
                  "verdict": TAG_VERDICT, "manifest_sha256": TAG_MANIFEST}
_MAX_ERROR_CHARS = 4000

# artifact layout
MODEL_NAME_IN_RUN = "model"                 # log_model(name=...)
SPEC_FILE, WEIGHTS_FILE = "cnn.json", "cnn.pt"
PICKLE_ALLOWLIST_ENV = "FIGAN_PICKLE_ALLOWLIST"
SAFE_PICKLE_MODULES = frozenset({"pickle", "cloudpickle", "mlflow.pytorch.pickle_module"})
MANIFEST_PATH = layout.MANIFEST                  # the signed manifest, logged last
SERVED_ARTIFACTS = layout.SERVED_ARTIFACTS       # what download_explanation fetches (and a service checks)
# run metrics also logged against the CNN's LoggedModel (MLflow 3), so they show on the CNN's model page
_MODEL_METRICS_RE = re.compile(r"^(fid_best|fid_floor|verdict_pass|c\d+_(faithfulness_rho_mean|pct_target_variance))$")

_MD5_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
_LOGGED_MODEL_SOURCE_RE = re.compile(r"models:/(m-[0-9a-f]{32})")
_METRIC_BAD_CHARS = re.compile(r"[^\w./\- :]")


class ContractError(ValueError):
    """A registered CNN does not meet the contract; the message names the model version and the tag."""


# --------------------------------------------------------------------------------------------- contract

@dataclass
class Contract:
    """What the explanation flow needs to know about one registered CNN version."""
    name: str
    version: str
    dataset: str
    dataset_md5: str | None
    target: str | list[str]
    task: str
    layer: str | None
    input_shape: tuple[int, int, int]
    class_names: list[str] | None
    layers: str | tuple[str, ...] | None = None      # candidate layers (figan.layers): "auto" or names
    cnn_id: str | None = None                        # cnn_identity() of the version (not a tag)

    def tags(self) -> dict[str, str]:
        """The contract as tags (inverse of :func:`read_contract`)."""
        tags = _contract_tags(self.dataset, self.dataset_md5, self.target, self.task, self.layer,
                              list(self.input_shape), self.class_names)
        if self.layers is not None:
            tags[TAG_LAYERS] = self.layers if self.layers == "auto" else json.dumps(list(self.layers))
        return tags


def _contract_tags(dataset: str, dataset_md5: str | None, target: str | list[str], task: str, layer: str | None,
                   input_shape: list[int], class_names: list[str] | None) -> dict[str, str]:
    tags = {TAG_DATASET: dataset, TAG_TARGET: target if isinstance(target, str) else json.dumps(list(target)),
            TAG_TASK: task, TAG_INPUT_SHAPE: json.dumps([int(v) for v in input_shape])}
    if dataset_md5:
        tags[TAG_DATASET_MD5] = dataset_md5
    if layer:
        tags[TAG_LAYER] = layer
    if class_names:
        tags[TAG_CLASS_NAMES] = json.dumps(list(class_names))
    return tags


def _parse_contract(name: str, version: str, tags: dict[str, str]) -> Contract:
    where = f"model version {name}/{version}"

    def get(tag: str, required: bool) -> str | None:
        value = tags.get(tag)
        if value is None or not value.strip():
            if required:
                state = "is empty" if value is not None else "is missing"
                raise ContractError(f"{where}: tag {tag} {state} (set it on the model version or the registered "
                                    f"model)")
            return None
        return value.strip()

    def json_value(tag: str, raw: str, expected: str) -> Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ContractError(f"{where}: tag {tag} must be {expected}, got {raw!r}") from None

    dataset = get(TAG_DATASET, True)
    md5 = get(TAG_DATASET_MD5, False)
    if md5 is not None and not _MD5_RE.match(md5):
        raise ContractError(f"{where}: tag {TAG_DATASET_MD5} must be a DVC md5 (32 hex digits, optionally "
                            f"followed by .dir), got {md5!r}")
    task = get(TAG_TASK, True)
    if task not in TASKS:
        raise ContractError(f"{where}: tag {TAG_TASK} must be regression or classification, got {task!r}")
    raw_target = get(TAG_TARGET, True)
    target: str | list[str] = raw_target
    if raw_target.startswith("["):
        target = json_value(TAG_TARGET, raw_target, "a column name or a JSON list of column names")
        if not (isinstance(target, list) and target and all(isinstance(t, str) and t for t in target)):
            raise ContractError(f"{where}: tag {TAG_TARGET} must be a column name or a non-empty JSON list of "
                                f"column names, got {raw_target!r}")
    raw_shape = get(TAG_INPUT_SHAPE, True)
    shape = json_value(TAG_INPUT_SHAPE, raw_shape, "a JSON list [C, H, W] of positive integers")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise ContractError(f"{where}: tag {TAG_INPUT_SHAPE} must be a JSON list [C, H, W] of positive integers, "
                            f"got {raw_shape!r}")
    class_names = None
    raw_classes = get(TAG_CLASS_NAMES, False)
    if raw_classes is not None:
        class_names = json_value(TAG_CLASS_NAMES, raw_classes, "a JSON list of strings")
        if not (isinstance(class_names, list) and class_names and all(isinstance(c, str) for c in class_names)):
            raise ContractError(f"{where}: tag {TAG_CLASS_NAMES} must be a non-empty JSON list of strings, "
                                f"got {raw_classes!r}")
    layers = get(TAG_LAYERS, False)
    if layers is not None and layers != "auto":
        layers = json_value(TAG_LAYERS, layers, "'auto' or a JSON list of layer names")
        if not (isinstance(layers, list) and layers and all(isinstance(n, str) and n for n in layers)):
            raise ContractError(f"{where}: tag {TAG_LAYERS} must be 'auto' or a non-empty JSON list of layer names "
                                f"(as named_modules() names them, or 'final'), got {get(TAG_LAYERS, False)!r}")
        layers = tuple(layers)
    return Contract(name=name, version=str(version), dataset=dataset, dataset_md5=md5, target=target, task=task,
                    layer=get(TAG_LAYER, False), input_shape=(shape[0], shape[1], shape[2]),
                    class_names=class_names, layers=layers)


def _merged_tags(client: MlflowClient, name: str, version: str | int,
                 mv: ModelVersion | None = None) -> dict[str, str]:
    """Registered-model tags overridden by model-version tags."""
    mv = mv or client.get_model_version(name, str(version))
    rm = client.get_registered_model(name)
    return {**(rm.tags or {}), **(mv.tags or {})}


def cnn_identity(mv: ModelVersion) -> str:
    """Which CNN a model version is: a hash of its creation time, source URI, run id and model id, all fixed when
    the version was created. A registered model deleted and re-created restarts at version 1; its new version 1
    has another creation time (and, registered from another training run, another source, run and model id), so
    it gets another identity even when everything else about it is the same."""
    blob = json.dumps([mv.creation_timestamp, mv.source, mv.run_id, getattr(mv, "model_id", None)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_contract(client: MlflowClient, name: str, version: str | int) -> Contract:
    """The contract of a registered CNN version, with its :func:`cnn_identity`; :class:`ContractError` names a
    missing/invalid tag."""
    mv = client.get_model_version(name, str(version))
    contract = _parse_contract(name, str(version), _merged_tags(client, name, version, mv))
    contract.cnn_id = cnn_identity(mv)
    return contract


def explain_requested(client: MlflowClient, name: str, version: str | int) -> bool:
    """True when the version (or its registered model) opted in with ``figan.explain=true``."""
    return _merged_tags(client, name, version).get(TAG_EXPLAIN, "").strip().lower() == "true"


# --------------------------------------------------------------------------------------------- lineage

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


# --------------------------------------------------------------------------------------------- helpers

@contextmanager
def _use_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore the caller's setting."""
    if uri is None:
        yield
        return
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:                       # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(name)
    except MlflowException:                       # created concurrently
        client.get_registered_model(name)


def _finite(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
        return float(v)
    return None


def _metric_key(parts: list[str]) -> str:
    return _METRIC_BAD_CHARS.sub("_", "_".join(parts))[:250]


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json → flat ``{name: value}`` run metrics.

    Nested keys are joined with ``_`` (``fid.best`` → ``fid_best``); the per-component list becomes ``c<j>_``
    prefixes (``c1_faithfulness_rho_mean``, ``c1_ground_truth_heart_size_rho``); booleans become 1/0. Lists of
    plain numbers, strings and non-finite values are skipped (they stay in metrics.json; the FID trace is logged
    separately as a step series)."""
    out: dict[str, float] = {}

    def walk(obj: Any, prefix: list[str]) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if prefix == ["fid"] and k == "trace":
                    continue
                walk(v, prefix + [str(k)])
        elif isinstance(obj, list):
            if obj and all(isinstance(x, dict) and "component" in x for x in obj):
                for x in obj:
                    walk({k: v for k, v in x.items() if k != "component"},
                         prefix[:-1] + [f"c{x['component']}"])
        else:
            v = _finite(obj)
            if v is not None and prefix:
                out[_metric_key(prefix)] = v

    walk(metrics, [])
    return out


def verdict_tag(verdict: dict | None) -> str | None:
    """The ``figan.verdict`` tag of a verdict dict: ``pass`` or ``fail: fid, diversity`` (None: not evaluated)."""
    if not verdict:
        return None
    if verdict["verdict"] == PASS:
        return PASS
    failing = verdict.get("failing") or []
    return f"{FAIL}: {', '.join(failing)}" if failing else FAIL


def parse_verdict_tag(raw: str | None) -> dict | None:
    """``figan.verdict`` → ``{"verdict": "pass" | "fail", "failing": [...]}``; None when unset or unreadable."""
    if not raw:
        return None
    head, _, rest = raw.strip().partition(":")
    head = head.strip().lower()
    if head == PASS:
        return {"verdict": PASS, "failing": []}
    if head == FAIL:
        return {"verdict": FAIL, "failing": [g.strip() for g in rest.split(",") if g.strip()]}
    return None


def _headline(metrics: dict) -> dict[str, Any]:
    """The status-tag headline of metrics.json: best FID + extractor, faithfulness and % variance per component,
    and the verdict."""
    fid = metrics.get("fid") or {}
    comps = metrics.get("components") or []
    pct = (metrics.get("pls") or {}).get("pct_target_variance") or [c.get("pct_target_variance") for c in comps]
    faith = [(c.get("faithfulness") or {}).get("rho_mean") for c in comps]
    return {"fid_best": _finite(fid.get("best")), "fid_extractor": fid.get("extractor"),
            "faithfulness": [_finite(v) for v in faith] if comps else None,
            "pct_variance": [_finite(v) for v in pct] if pct else None,
            "verdict": verdict_tag(verdict_of(metrics))}


def _tag_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


# --------------------------------------------------------------------------------------------- register / load

def register_cnn(model: nn.Module, spec: CNNSpec, name: str, dataset: str, dataset_md5: str | None,
                 tracking_uri: str | None = None, layer: str | None = None,
                 extra_tags: dict[str, str] | None = None, explain: bool = True,
                 experiment: str = CNN_EXPERIMENT) -> ModelVersion:
    """Log a trained CNN to MLflow and register it as a new version of ``name`` that meets the contract.

    One run in ``experiment`` holds: the MLflow PyTorch model (pt2, dynamic batch, plus ``cnn.json`` and a
    weights-only ``cnn.pt`` as extra files), ``cnn.json`` as a run artifact, ``spec.metrics`` as run metrics (the
    per-epoch history as step series ``epoch_*``), the architecture as params, and the DVC dataset as a run input.
    The version is created with the contract tags (+ ``figan.explain=true`` when ``explain``; ``extra_tags`` are
    added last) already set, so a registration trigger never sees a version without its contract. The contract is
    validated before anything is logged (:class:`ContractError`)."""
    if spec.arch not in ARCHITECTURES:
        raise ValueError(f"spec.arch {spec.arch!r} is not a known architecture ({sorted(ARCHITECTURES)}); "
                         f"register_cnn stores CNNs that models.cnn.build_cnn can rebuild")
    tags = _contract_tags(dataset, dataset_md5, spec.target, spec.task, layer, list(spec.input_shape),
                          spec.class_names)
    if explain:
        tags[TAG_EXPLAIN] = "true"
    tags.update({k: _tag_value(v) for k, v in (extra_tags or {}).items()})
    _parse_contract(name, "(new)", tags)
    if layer and layer not in dict(model.named_modules()):
        raise ContractError(f"model version {name}/(new): tag {TAG_LAYER}={layer!r} names no layer of the model")

    client = MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    c, h, w = (int(v) for v in spec.input_shape)
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="figan-register-") as tmp, _use_tracking_uri(tracking_uri):
            spec_path, weights_path = Path(tmp) / SPEC_FILE, Path(tmp) / WEIGHTS_FILE
            spec_path.write_text(json.dumps(asdict(spec), indent=2))
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights_path)
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name}-{spec.arch}",
                                  nested=mlflow.active_run() is not None) as run:
                mlflow.log_params({"arch": spec.arch, "task": spec.task, "dataset": dataset,
                                   "dataset_md5": dataset_md5 or "", "input_shape": json.dumps([c, h, w]),
                                   "target": _tag_value(spec.target),
                                   **{f"cnn.{k}": v for k, v in spec.kwargs.items()
                                      if isinstance(v, (int, float, str, bool))}})
                metrics = {k: _finite(v) for k, v in spec.metrics.items() if k != "history"}
                mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})
                for row in spec.metrics.get("history", []) or []:
                    step = int(row.get("epoch", 0))
                    vals = {f"epoch_{k}": _finite(v) for k, v in row.items() if k != "epoch"}
                    mlflow.log_metrics({k: v for k, v in vals.items() if v is not None}, step=step)
                if dataset_md5:
                    mlflow.log_input(_dvc_dataset(dataset, dataset_md5), context="training")
                mlflow.log_artifact(str(spec_path))
                example = np.zeros((2, c, h, w), dtype=np.float32)     # batch 2: the batch dim stays dynamic
                info = mlflow.pytorch.log_model(
                    model, name=MODEL_NAME_IN_RUN, serialization_format="pt2", input_example=example,
                    extra_files=[str(spec_path), str(weights_path)],
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
                run_id = run.info.run_id
        _ensure_registered_model(client, name)
        md5 = f" ({dataset_md5})" if dataset_md5 else ""
        return client.create_model_version(
            name=name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id,
            description=f"{spec.arch} {spec.task} CNN on {dataset}{md5}, target {_tag_value(spec.target)}")
    finally:
        model.train(was_training)


def pickle_allowed(name: str) -> bool:
    """Unpickling a CNN runs whatever code its registrant shipped, with this process's secrets. Allowed when
    MLflow's ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is true (MLflow's default, kept by the embedded laptop
    platform) or the registered model's name matches one of the comma-separated ``fnmatch`` patterns in
    ``FIGAN_PICKLE_ALLOWLIST`` (the team configuration sets the former to false and lists trusted models here)."""
    patterns = [p.strip() for p in os.environ.get(PICKLE_ALLOWLIST_ENV, "").split(",") if p.strip()]
    return bool(MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get()) or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def load_cnn_version(client: MlflowClient, name: str, version: str | int) -> tuple[nn.Module, CNNSpec | None]:
    """The registered CNN as an ``nn.Module`` in eval mode, and its spec when it has one. Its format is recorded
    on the module as ``figan_format`` (state-dict | pt2 | pickle), and the sha256 of the model files it was loaded
    from (:func:`models.audit.tree_digest` of MLmodel and what it read) as ``figan_digest``.

    Reads the version's ``MLmodel`` first (a non-PyTorch version is refused without downloading it), then, by
    what the model holds, without running any code it ships unless the pickle policy allows it:

    * ``cnn.json`` + ``cnn.pt`` (:func:`register_cnn`): the eager CNN rebuilt, weights loaded ``weights_only``;
    * ``model.pt2`` (``torch.export``): checked pickle-free by MLflow's own validator, loaded, and wrapped so the
      final Linear's input is read from the graph (:class:`models.exported.ExportedCNN`);
    * a TorchScript ``model.pth``: refused with what to register instead (its layers run in the TorchScript
      interpreter, where no hook can read them);
    * a pickled ``model.pth``: only when :func:`pickle_allowed`, with a standard pickle module; the version then
      gets the tag ``figan.trust=pickle`` (shown in report.html). Refused otherwise, before anything is imported.

    A missing version raises MLflow's RESOURCE_DOES_NOT_EXIST error; anything else that cannot be explained is a
    :class:`ContractError` naming the version."""
    where = f"model version {name}/{version}"
    mv = client.get_model_version(name, str(version))
    root = client.get_model_version_download_uri(name, str(version)).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="figan-cnn-") as tmp:
        def fetch(rel: str) -> Path:
            dst = Path(tmp) / "model" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{rel}" if rel else root,
                                                            dst_path=str(dst.parent),
                                                            tracking_uri=client.tracking_uri))
        try:
            mlmodel = fetch("MLmodel")
        except (MlflowException, OSError) as e:
            raise ContractError(f"{where} is not a PyTorch CNN: no readable MLmodel file at {mv.source}") from e
        flavors = mlflow.models.Model.load(str(mlmodel)).flavors or {}
        if "pytorch" not in flavors:
            raise ContractError(f"{where} is not a PyTorch CNN: its MLflow model has flavors {sorted(flavors)}, "
                                f"no 'pytorch' flavor")
        flavor = flavors["pytorch"]
        extra = {Path(e["path"]).name: e["path"] for e in flavor.get("extra_files") or []}
        if SPEC_FILE in extra and WEIGHTS_FILE in extra:
            try:
                spec = CNNSpec(**json.loads(fetch(extra[SPEC_FILE]).read_text()))
                model = build_cnn(spec)
                model.load_state_dict(torch.load(fetch(extra[WEIGHTS_FILE]), map_location="cpu",
                                                 weights_only=True))
            except (MlflowException, OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
                raise ContractError(f"{where}: its {SPEC_FILE}/{WEIGHTS_FILE} do not rebuild a CNN ({e})") from e
            model.figan_digest = audit.tree_digest(Path(tmp) / "model")
            return _with_format(model.eval(), "state-dict"), spec
        data_dir = flavor.get("model_data", "data")
        try:
            data = fetch(data_dir)
        except (MlflowException, OSError) as e:
            raise ContractError(f"{where}: its PyTorch model at {mv.source} cannot be downloaded ({e})") from e
        if (data / "model.pt2").is_file():
            model = _load_exported(data / "model.pt2", where)
        elif (data / "model.pth").is_file():
            if _is_torchscript(data / "model.pth"):
                raise ContractError(
                    f"{where} is a TorchScript model: its layers run inside the TorchScript interpreter, where FIGAN "
                    f"cannot read the input of the final Linear. Register the same CNN as a torch.export program "
                    f"(mlflow.pytorch.log_model(model, serialization_format='pt2', input_example=<a batch of 2 "
                    f"images>)) or with flows.registry.register_cnn")
            if not pickle_allowed(name):
                raise ContractError(
                    f"{where} is a pickled PyTorch model, and unpickling runs its registrant's code: refused by this "
                    f"platform's policy (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false and {name!r} not in "
                    f"{PICKLE_ALLOWLIST_ENV}). Register it as a torch.export program "
                    f"(serialization_format='pt2') or with flows.registry.register_cnn, or ask the operator to "
                    f"trust this model by name")
            if flavor.get("code"):
                fetch(flavor["code"])                   # the registrant's code_paths, put on sys.path to unpickle
            model = _unpickle(Path(tmp) / "model", data, flavor, where)
            client.set_model_version_tag(name, str(version), TAG_TRUST, "pickle")
        else:
            raise ContractError(f"{where}: its PyTorch flavor holds neither model.pt2 nor model.pth in {data_dir}/")
        digest = audit.tree_digest(Path(tmp) / "model")
    if not isinstance(model, nn.Module):
        raise ContractError(f"{where} is not a PyTorch CNN: loading gave {type(model).__name__}")
    model.figan_digest = digest
    return model.eval(), None


def _with_format(model: nn.Module, fmt: str) -> nn.Module:
    model.figan_format = fmt
    return model


def _load_exported(path: Path, where: str) -> nn.Module:
    """A ``torch.export`` archive: refused unless every record is pickle-free (MLflow's validator, the check it
    runs itself when pickle is disallowed), then loaded and made explainable."""
    from mlflow.pytorch import _validate_pt2_archive_is_pickle_free       # MLflow's own check (private name)
    try:
        _validate_pt2_archive_is_pickle_free(str(path))
    except MlflowException as e:
        raise ContractError(f"{where}: its torch.export archive is not pickle-free ({e.message})") from e
    try:
        return _with_format(ExportedCNN(torch.export.load(str(path))), "pt2")
    except (RuntimeError, ValueError, KeyError) as e:
        raise ContractError(f"{where}: its torch.export program cannot be explained ({e})") from e


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive carries its compiled code (``<archive>/code/...``); an eager ``torch.save`` does not.
    Read from the zip's table of contents: nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False                                    # a legacy (non-zip) torch.save pickle


def _unpickle(local: Path, data: Path, flavor: dict, where: str) -> nn.Module:
    """A trusted pickled CNN: its ``code_paths`` on sys.path, then ``torch.load``. Only the standard pickle
    modules may be named in ``pickle_module_info.txt`` (MLflow imports whatever module is named there)."""
    info = data / "pickle_module_info.txt"
    module_name = info.read_text().strip() if info.is_file() else "pickle"
    if module_name not in SAFE_PICKLE_MODULES:
        raise ContractError(f"{where}: its pickle_module_info.txt names {module_name[:80]!r}; only "
                            f"{sorted(SAFE_PICKLE_MODULES)} are imported to unpickle a CNN")
    _add_code_from_conf_to_system_path(str(local), flavor)
    try:
        model = torch.load(data / "model.pth", map_location="cpu", weights_only=False,
                           pickle_module=importlib.import_module(module_name))
    except (OSError, RuntimeError, AttributeError, ImportError, pickle.UnpicklingError) as e:
        raise ContractError(f"{where}: its pickled PyTorch model cannot be loaded ({e})") from e
    return _with_format(model, "pickle") if isinstance(model, nn.Module) else model


# --------------------------------------------------------------------------------------------- status

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str | None],
                current: dict[str, str] | None = None) -> None:
    """Set version tags; a None value deletes that tag (if present). ``current``: the version's tags when the
    caller has just read them."""
    current = (client.get_model_version(name, version).tags or {}) if current is None else current
    for tag, value in tags.items():
        if value is None:
            if tag in current:
                client.delete_model_version_tag(name, version, tag)
        else:
            client.set_model_version_tag(name, version, tag, value)


def set_status(client: MlflowClient, name: str, version: str | int, status: str, **fields: Any) -> None:
    """Set ``figan.status`` (+ ``figan.updated``) and any of the fields run_id, error, key, fid_best,
    fid_extractor, faithfulness, pct_variance, verdict (the :func:`verdict_tag` string) on the model version (None
    deletes a field's tag).

    ``failed`` requires ``error``; any other status clears a previous error. The status tag is written last."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    unknown = set(fields) - set(_STATUS_FIELDS)
    if unknown:
        raise ValueError(f"unknown status field(s) {sorted(unknown)}; known: {sorted(_STATUS_FIELDS)}")
    if status == "failed":
        err = fields.get("error")
        if not isinstance(err, str) or not err.strip():
            raise ValueError("status 'failed' requires error='<what went wrong>'")
        if len(err) > _MAX_ERROR_CHARS:
            fields["error"] = err[:_MAX_ERROR_CHARS - 40] + f" ... [{len(err)} chars, truncated]"
    else:                   # a new state clears what only a failure means; done also resets the attempt count
        for cleared in ("error", "error_kind", "retry_after", "contract_hash", "program_hash") + (
                ("attempts",) if status == "done" else ()):
            fields.setdefault(cleared, None)
    version = str(version)
    current = client.get_model_version(name, version).tags or {}
    tags = {_STATUS_FIELDS[f]: None if v is None else _tag_value(v) for f, v in fields.items()}
    tags.update(_last_good(status, fields, current))
    _write_tags(client, name, version, tags, current)
    client.set_model_version_tag(name, version, TAG_UPDATED, _now())
    client.set_model_version_tag(name, version, TAG_STATUS, status)


def _last_good(status: str, fields: dict[str, Any], current: dict[str, str]) -> dict[str, str | None]:
    """The last-good tags a status change writes: the new run when it is ``done``; for any other status, the run
    the version was ``done`` with until now when no last-good run is recorded yet (versions published before these
    tags existed), else nothing."""
    if status == "done" and fields.get("run_id"):
        key = fields.get("key")
        return {TAG_LAST_GOOD_RUN_ID: str(fields["run_id"]), TAG_LAST_GOOD_KEY: None if key is None else str(key)}
    if (status != "done" and current.get(TAG_STATUS) == "done" and current.get(TAG_RUN_ID)
            and current.get(TAG_KEY) and not current.get(TAG_LAST_GOOD_RUN_ID)):
        return {TAG_LAST_GOOD_RUN_ID: current[TAG_RUN_ID], TAG_LAST_GOOD_KEY: current[TAG_KEY]}
    return {}


def _json_or_none(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def _float_or_none(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _status_from_tags(tags: dict[str, str]) -> dict[str, Any]:
    verdict = parse_verdict_tag(tags.get(TAG_VERDICT))
    return {"status": tags.get(TAG_STATUS), "run_id": tags.get(TAG_RUN_ID), "error": tags.get(TAG_ERROR),
            "key": tags.get(TAG_KEY), "updated": tags.get(TAG_UPDATED),
            "fid_best": _float_or_none(tags.get(TAG_FID_BEST)), "fid_extractor": tags.get(TAG_FID_EXTRACTOR),
            "faithfulness": _json_or_none(tags.get(TAG_FAITHFULNESS)),
            "pct_variance": _json_or_none(tags.get(TAG_PCT_VARIANCE)),
            "attempts": int(_float_or_none(tags.get(TAG_ATTEMPTS)) or 0),
            "retry_after": _float_or_none(tags.get(TAG_RETRY_AFTER)), "error_kind": tags.get(TAG_ERROR_KIND),
            "contract_hash": tags.get(TAG_CONTRACT_HASH), "program_hash": tags.get(TAG_PROGRAM_HASH),
            "progress": _json_or_none(tags.get(TAG_PROGRESS)),
            "verdict": verdict and verdict["verdict"], "failing_gates": verdict and verdict["failing"],
            "manifest_sha256": tags.get(TAG_MANIFEST),
            "last_good_run_id": tags.get(TAG_LAST_GOOD_RUN_ID), "last_good_key": tags.get(TAG_LAST_GOOD_KEY)}


def get_status(client: MlflowClient, name: str, version: str | int) -> dict[str, Any]:
    """The explanation status of a version: status, run_id, error, key, updated, fid_best (float),
    fid_extractor, faithfulness and pct_variance (lists), verdict (pass | fail), failing_gates (list),
    manifest_sha256, last_good_run_id and last_good_key (the last published run, see the module docstring); None for
    whatever is not set."""
    return _status_from_tags(client.get_model_version(name, str(version)).tags or {})


# --------------------------------------------------------------------------------------------- contract + progress

CONTRACT_TAGS = (TAG_DATASET, TAG_DATASET_MD5, TAG_TARGET, TAG_TASK, TAG_LAYER, TAG_LAYERS, TAG_INPUT_SHAPE,
                  TAG_CLASS_NAMES, TAG_EXPLAIN)


def contract_fingerprint(client: MlflowClient, name: str, version: str | int) -> str:
    """A hash of the contract tags as they are now (model tags overridden by version tags): a version that failed
    with a contract error is not retried until this changes."""
    tags = _merged_tags(client, name, version)
    blob = json.dumps({t: tags.get(t) for t in CONTRACT_TAGS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_progress(client: MlflowClient, name: str, version: str | int, flow_run: str | None, stage: str,
                   step: int | None = None) -> None:
    """Record where the explain run ``flow_run`` is now (``figan.progress`` = {flow_run, stage, step, at}): the
    worker names it when a run crashes and cancels a run whose progress is older than ``FIGAN_HANG_SECONDS``."""
    client.set_model_version_tag(name, str(version), TAG_PROGRESS, json.dumps(
        {"flow_run": flow_run, "stage": stage, "step": step, "at": round(time.time(), 1)}))


# --------------------------------------------------------------------------------------------- explanations

def _published(rel: Path) -> bool:
    """Whether an artifacts-folder file goes into the explanation run: everything except the cached features,
    the GAN's training checkpoints (``gan/*.pt``; ``gan/best/`` is kept), hidden files and a manifest left from
    an earlier publication (each run gets its own)."""
    if any(part.startswith(".") for part in rel.parts):
        return False
    if rel.as_posix() in (layout.FEATURES, layout.MANIFEST):
        return False
    if len(rel.parts) == 2 and rel.parts[0] == layout.GAN_DIR and rel.suffix == ".pt":
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

    The run (experiment ``figan-explanations``) gets every file of ``artifacts_dir`` except ``features.npy`` and
    ``gan/*.pt`` (``gan/best/`` is kept), ``metrics`` flattened into run metrics and the FID trace as the step
    series ``fid``, the verdict as the param ``verdict`` and the metric ``verdict_pass``, the tags
    ``figan.model``/``figan.version``/``figan.key`` and ``figan.cnn_id`` (the version's :func:`cnn_identity`),
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


def _quote(value: str) -> str:
    """A string literal for an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search for {value!r}: it contains both quote characters")


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


# --------------------------------------------------------------------------------------------- listing

def list_versions(client: MlflowClient, name: str | None = None) -> list[dict[str, Any]]:
    """One row per model version (of ``name``, or of every registered model): name, version, cnn_id
    (:func:`cnn_identity`), aliases, explain (opt-in), the status fields of :func:`get_status`, sorted by name and
    version. Cost: one call per page of registered models, then one per page of each model's versions."""
    if name is not None:
        models = [client.get_registered_model(name)]
    else:
        models, token = [], None
        while True:
            page = client.search_registered_models(page_token=token)
            models.extend(page)
            token = page.token
            if not token:
                break
    rows = []
    for rm in models:
        token = None
        while True:
            page = client.search_model_versions(f"name = {_quote(rm.name)}", page_token=token)
            rows.extend(_version_row(rm, mv) for mv in page)
            token = page.token
            if not token:
                break
    return sorted(rows, key=lambda r: (r["name"], int(r["version"]) if r["version"].isdigit() else 0))


def version_row(client: MlflowClient, name: str, version: str | int) -> dict[str, Any]:
    """The :func:`list_versions` row of one version, in two calls (its registered model and the version) whatever
    the number of versions: what a decision about one candidate reads."""
    return _version_row(client.get_registered_model(name), client.get_model_version(name, str(version)))


def _version_row(rm, mv: ModelVersion) -> dict[str, Any]:
    aliases = sorted(alias for alias, v in (rm.aliases or {}).items() if str(v) == str(mv.version))
    tags = {**(rm.tags or {}), **(mv.tags or {})}
    return {"name": mv.name, "version": str(mv.version), "cnn_id": cnn_identity(mv), "aliases": aliases,
            "explain": tags.get(TAG_EXPLAIN, "").strip().lower() == "true", **_status_from_tags(mv.tags or {})}


# --------------------------------------------------------------------------------------------- drift (across releases)

TAG_DRIFT_DATA = "figan.drift.data"            # headline of the data drift against the previous version (JSON)
TAG_DRIFT_FEATURES = "figan.drift.features"    # headline of the learned-feature drift (JSON)
TAG_DIFF = "figan.diff"                        # headline of the explanation diff to the previous version (JSON)
_DRIFT_FIELDS = {"data": TAG_DRIFT_DATA, "features": TAG_DRIFT_FEATURES, "diff": TAG_DIFF}


def set_drift_tags(client: MlflowClient, name: str, version: str | int, **headlines: dict | None) -> None:
    """Set the drift headlines (``data``, ``features``, ``diff``: small dicts, stored as JSON) as version tags;
    None deletes that tag. Written by the explain flow's drift task (``flows.drift``)."""
    unknown = set(headlines) - set(_DRIFT_FIELDS)
    if unknown:
        raise ValueError(f"unknown drift field(s) {sorted(unknown)}; known: {sorted(_DRIFT_FIELDS)}")
    _write_tags(client, name, str(version), {_DRIFT_FIELDS[f]: None if v is None else json.dumps(v, default=str)
                                             for f, v in headlines.items()})


def get_drift_tags(client: MlflowClient, name: str, version: str | int) -> dict[str, Any]:
    """The drift headlines of a version: ``{"data": ..., "features": ..., "diff": ...}`` (None when unset)."""
    tags = client.get_model_version(name, str(version)).tags or {}
    return {k: _json_or_none(tags.get(tag)) for k, tag in _DRIFT_FIELDS.items()}


def code_version() -> str:
    """The lineage's code version: ``git rev-parse HEAD`` of this checkout, else the installed package's version
    (``figan-platform <version>``, e.g. in a container without .git), else ``"unknown"``."""
    package = audit.library_versions(("figan-platform",)).get("figan-platform")
    return _code_version() or (f"figan-platform {package}" if package else "unknown")
