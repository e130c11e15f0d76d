"""How a CNN is stored and loaded: :func:`register_cnn` (pt2 plus an eager state dict) and
:func:`load_cnn_version` for every format the registry holds (pt2, state dict, pickle under the policy;
TorchScript refused with what to register instead)."""
from __future__ import annotations

import fnmatch
import importlib
import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import mlflow.artifacts
import mlflow.models
import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.model_utils import _add_code_from_conf_to_system_path
from torch import nn

from models import audit
from models.cnn import ARCHITECTURES, CNNSpec, build_cnn
from models.exported import ExportedCNN

from .client import (
    _ensure_registered_model,
    _experiment_id,
    _finite,
    _tag_value,
    _use_tracking_uri,
)
from .contract import ContractError, _contract_tags, _parse_contract
from .explanations import _dvc_dataset
from .tags import (
    CNN_EXPERIMENT,
    MODEL_NAME_IN_RUN,
    PICKLE_ALLOWLIST_ENV,
    SAFE_PICKLE_MODULES,
    SPEC_FILE,
    TAG_EXPLAIN,
    TAG_LAYER,
    TAG_TRUST,
    WEIGHTS_FILE,
)


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
    from mlflow.pytorch import (
        _validate_pt2_archive_is_pickle_free,  # MLflow's own check (private name)
    )
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
