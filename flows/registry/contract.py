"""The registered-CNN contract: tags read from the model version, falling back to the registered model; a
missing or malformed tag is a :class:`ContractError` naming the version and the tag. Also the CNN's identity
(:func:`cnn_identity`) and the contract's fingerprint (a contract error is not retried until it changes)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from .tags import (
    _MD5_RE,
    TAG_CLASS_NAMES,
    TAG_DATASET,
    TAG_DATASET_MD5,
    TAG_EXPLAIN,
    TAG_INPUT_SHAPE,
    TAG_LAYER,
    TAG_LAYERS,
    TAG_TARGET,
    TAG_TASK,
    TASKS,
)


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
    return contract_of(mv, _merged_tags(client, name, version, mv))


def contract_of(mv: ModelVersion, tags: dict[str, str]) -> Contract:
    """The contract a model version's merged tags (registered model's, overridden by the version's) state, with its
    :func:`cnn_identity`: :func:`read_contract` without the reads, for a listing that has both already."""
    contract = _parse_contract(mv.name, str(mv.version), tags)
    contract.cnn_id = cnn_identity(mv)
    return contract


def explain_requested(client: MlflowClient, name: str, version: str | int) -> bool:
    """True when the version (or its registered model) opted in with ``figan.explain=true``."""
    return _merged_tags(client, name, version).get(TAG_EXPLAIN, "").strip().lower() == "true"


CONTRACT_TAGS = (TAG_DATASET, TAG_DATASET_MD5, TAG_TARGET, TAG_TASK, TAG_LAYER, TAG_LAYERS, TAG_INPUT_SHAPE,
                  TAG_CLASS_NAMES, TAG_EXPLAIN)


def contract_fingerprint(client: MlflowClient, name: str, version: str | int) -> str:
    """A hash of the contract tags as they are now (model tags overridden by version tags): a version that failed
    with a contract error is not retried until this changes."""
    tags = _merged_tags(client, name, version)
    blob = json.dumps({t: tags.get(t) for t in CONTRACT_TAGS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
