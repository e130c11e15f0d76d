"""Small MLflow helpers shared by the registry's modules: the fluent API's URI, experiments, registered models,
and the formats of metric and tag values (flattened metrics, the verdict tag, the status headline)."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Any, Iterator

import mlflow
import mlflow.artifacts
import mlflow.models
import mlflow.pytorch
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models.verdict import FAIL, PASS, verdict_of

from .tags import _METRIC_BAD_CHARS


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


def _quote(value: str) -> str:
    """A string literal for an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search for {value!r}: it contains both quote characters")
