"""The status of a version's explanation, in version tags: status, run id, error, key, headline metrics, verdict,
progress, the last good run; the listing of versions; the drift headlines across releases."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from .client import _quote, _tag_value, parse_verdict_tag
from .contract import ContractError, cnn_identity, contract_of
from .tags import (
    _MAX_ERROR_CHARS,
    _STATUS_FIELDS,
    STATUSES,
    TAG_ATTEMPTS,
    TAG_CONTRACT_HASH,
    TAG_ERROR,
    TAG_ERROR_KIND,
    TAG_EXPLAIN,
    TAG_FAITHFULNESS,
    TAG_FID_BEST,
    TAG_FID_EXTRACTOR,
    TAG_KEY,
    TAG_LAST_GOOD_KEY,
    TAG_LAST_GOOD_RUN_ID,
    TAG_MANIFEST,
    TAG_PCT_VARIANCE,
    TAG_PROGRAM_HASH,
    TAG_PROGRESS,
    TAG_RETRY_AFTER,
    TAG_RUN_ID,
    TAG_STATUS,
    TAG_UPDATED,
    TAG_VERDICT,
)


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


def write_progress(client: MlflowClient, name: str, version: str | int, flow_run: str | None, stage: str,
                   step: int | None = None) -> None:
    """Record where the explain run ``flow_run`` is now (``figan.progress`` = {flow_run, stage, step, at}): the
    worker names it when a run crashes and cancels a run whose progress is older than ``FIGAN_HANG_SECONDS``."""
    client.set_model_version_tag(name, str(version), TAG_PROGRESS, json.dumps(
        {"flow_run": flow_run, "stage": stage, "step": step, "at": round(time.time(), 1)}))


def list_versions(client: MlflowClient, name: str | None = None, with_contract: bool = False) -> list[dict[str, Any]]:
    """One row per model version (of ``name``, or of every registered model): name, version, cnn_id
    (:func:`cnn_identity`), aliases, explain (opt-in), the status fields of :func:`get_status`, sorted by name and
    version; ``with_contract`` adds ``contract``: the version's :class:`Contract`, or the :class:`ContractError` its
    tags raise. Cost: one call per page of registered models, then one per page of each model's versions."""
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
            rows.extend(_version_row(rm, mv, with_contract) for mv in page)
            token = page.token
            if not token:
                break
    return sorted(rows, key=lambda r: (r["name"], int(r["version"]) if r["version"].isdigit() else 0))


def version_row(client: MlflowClient, name: str, version: str | int) -> dict[str, Any]:
    """The :func:`list_versions` row of one version, in two calls (its registered model and the version) whatever
    the number of versions: what a decision about one candidate reads."""
    return _version_row(client.get_registered_model(name), client.get_model_version(name, str(version)))


def _version_row(rm, mv: ModelVersion, with_contract: bool = False) -> dict[str, Any]:
    aliases = sorted(alias for alias, v in (rm.aliases or {}).items() if str(v) == str(mv.version))
    tags = {**(rm.tags or {}), **(mv.tags or {})}
    row = {"name": mv.name, "version": str(mv.version), "cnn_id": cnn_identity(mv), "aliases": aliases,
           "explain": tags.get(TAG_EXPLAIN, "").strip().lower() == "true", **_status_from_tags(mv.tags or {})}
    if with_contract:
        try:
            row["contract"] = contract_of(mv, tags)
        except ContractError as e:
            row["contract"] = e
    return row


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
