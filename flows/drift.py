"""Across releases: Evidently drift reports, the explanation diff to the previous version, and the auditor report.

Inside the explain flow (`flows.explain.explain_version`) two tasks run after the checks and before publishing:

* **drift** (:func:`drift_task`) compares the version being explained with the latest *earlier* version of the
  same registered model whose explanation is ``done`` (found with ``flows.registry.list_versions``):

  - **data drift** between the previous version's dataset version (its ``lineage.json``) and the current one,
    on per-image statistics (intensity mean, SD, skewness, kurtosis, percentiles, edge energy: Evidently's
    ``DataDriftPreset`` on those columns; per-column K-S or normed Wasserstein chosen by Evidently) and on the
    *current* CNN's embeddings of both image sets (``evidently.metrics.EmbeddingsDrift`` with the embedding
    columns declared in the ``DataDefinition`` — ``DataDriftPreset``'s own ``embeddings`` argument is ignored by
    0.7.23). The embeddings come from one CNN, so both clouds live in the same feature space. Skipped (with
    the reason) when both versions were explained on the same dataset version.
  - **explanation diff** (``models.diff``): the previous CNN (``load_cnn_version``) and its published PLS state
    are run over the *current* images, so both versions' component scores live on shared data; matching,
    principal angles, change of % variance, and the "new top component" flag; ``diff/diff.json`` and
    ``diff/matched_components.png``.
  - **learned-feature drift** between the two CNN versions on the same images. Raw features of two CNNs are in
    unrelated coordinates (another architecture, or units permuted and rotated by another seed), so comparing
    them column by column would always "drift". The comparison is made in the coordinates both versions share
    after the diff: the matched, sign-aligned component scores of the axes that matter (≥ 5 % of the target
    variance). ``EmbeddingsDrift`` with Evidently's ratio method (normed Wasserstein distance per axis, an axis
    moved at ≥ 0.3, drift when more than 20 % of the axes moved), plus drift whenever the new top component has
    no counterpart. It answers "are images spread differently along the explanation axes?"; whether the axes
    mean the same is the diff's job (per-image correlations). Distribution tests cannot see a change of meaning
    whose marginal looks alike (a uniform factor replaced by another uniform factor): read it with the diff.

  The Evidently pages are saved as ``drift/data_drift.html`` and ``drift/feature_drift.html``; headline results
  become version tags (``flows.registry.set_drift_tags``). **Nothing here fails the explanation**: every part
  catches its errors, logs a warning and records the error in the summary.

* **report** (:func:`report_task`) writes the self-contained ``report.html`` (``models.report``).

Evidently's ``Report.run`` takes ``current_data`` first, then ``reference_data``; the previous version is
always the reference.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from scipy import stats

from models import layout
from models.data import ImageDataset
from models.diff import DiffConfig, explanation_diff, plot_matched
from models.explain import cnn_input
from models.features import extract_features
from models.pls import images_to_scores, load_pls
from models.report import build_report

from . import registry as R

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from models.explain import ExplainRun

    from .explain import Job
    from .settings import Settings

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
STAT_COLUMNS = ["intensity_mean", "intensity_sd", "intensity_skew", "intensity_kurtosis",
                *[f"intensity_p{q:02d}" for q in PERCENTILES], "edge_energy"]
EMBEDDING_NAME = "cnn_features"
SCORES_NAME = "pls_scores"

__all__ = ["STAT_COLUMNS", "image_statistics", "data_drift", "feature_drift", "compare_versions",
           "previous_explained", "drift_task", "report_task"]

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- per-image statistics

def image_statistics(batches: Iterable) -> pd.DataFrame:
    """One row of intensity statistics per image, from batches of images float (B, C, H, W) in [0, 1]
    (or ``ImageDataset.iter_batches``' ``(indices, images)`` tuples). Colour images are reduced to their
    channel mean. Columns: :data:`STAT_COLUMNS` (excess kurtosis; edge energy = mean absolute gradient)."""
    rows = []
    for b in batches:
        x = np.asarray(b[1] if isinstance(b, tuple) else b, dtype=np.float64)
        lum = x.mean(axis=1)                                   # (B, H, W)
        flat = lum.reshape(len(lum), -1)
        sd = flat.std(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # constant image: skew/kurtosis undefined -> 0
            skew = np.nan_to_num(stats.skew(flat, axis=1))
            kurt = np.nan_to_num(stats.kurtosis(flat, axis=1))
        pct = np.percentile(flat, PERCENTILES, axis=1).T      # (B, len(PERCENTILES))
        edge = 0.5 * (np.abs(np.diff(lum, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(lum, axis=2)).mean(axis=(1, 2)))
        rows.append(np.column_stack([flat.mean(axis=1), sd, skew, kurt, pct, edge]))
    if not rows:
        raise ValueError("image_statistics: no images")
    return pd.DataFrame(np.concatenate(rows), columns=STAT_COLUMNS)


def _sample(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Sorted row indices: all rows, or a seeded sample of ``max_rows`` of them."""
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def _embedding_frame(emb: np.ndarray, prefix: str) -> pd.DataFrame:
    e = np.asarray(emb, dtype=np.float64)
    return pd.DataFrame(e, columns=[f"{prefix}_{i:03d}" for i in range(e.shape[1])])


def _column_results(snapshot) -> dict[str, dict]:
    """Per-column drift from the snapshot's ValueDrift results: method, score, threshold, drifted.

    Evidently's rule: a p-value method drifts when p < threshold, a distance when distance >= threshold."""
    out = {}
    for m in snapshot.dict()["metrics"]:
        cfg = m.get("config") or {}
        if cfg.get("type", "").endswith(":ValueDrift"):
            method, th, v = str(cfg.get("method")), cfg.get("threshold"), float(m["value"])
            drifted = v < th if "p_value" in method else v >= th
            out[cfg["column"]] = {"method": method, "score": float(f"{v:.4g}"), "threshold": th,
                                  "drifted": bool(drifted)}
    return out


def _embeddings_result(method, current: pd.DataFrame, reference: pd.DataFrame) -> tuple[float, bool, str]:
    """The (score, drifted, method name) of an Evidently embeddings drift method on the same columns.

    ``EmbeddingsDrift``'s snapshot value is the score only; the decision (bootstrap percentile or threshold) is
    not exposed, so it is recomputed with the same deterministic method object (fixed random states)."""
    score, drifted, name = method(current.copy(), reference.copy())
    return float(score), bool(drifted), str(name)


# --------------------------------------------------------------------------------------------- data drift

def data_drift(reference_stats: pd.DataFrame, current_stats: pd.DataFrame,
               reference_embeddings: np.ndarray | None = None, current_embeddings: np.ndarray | None = None,
               out_html: str | Path | None = None, drift_share: float = 0.5, max_rows: int | None = 1000,
               seed: int = 0, reference_label: str = "previous", current_label: str = "current") -> dict:
    """Evidently data drift between two image sets: per-image statistics + CNN embeddings (same CNN for both).

    ``*_stats``: :func:`image_statistics` frames. ``*_embeddings``: (N, F ≥ 2) features of the same images from
    ONE CNN (optional). At most ``max_rows`` rows per side (seeded sample). Embedding drift uses Evidently's
    domain-classifier method (ROC AUC of a classifier telling the two sets apart; bootstrap test against random
    AUCs when the reference has < 1000 rows, else AUC > 0.55). Writes the Evidently HTML to ``out_html`` when
    given. Returns the summary: drifted (statistics share ≥ ``drift_share`` or embeddings drifted),
    share/number of drifted statistics, per-column results, embedding score and decision, headline."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.presets import DataDriftPreset

    ri, ci = _sample(len(reference_stats), max_rows, seed), _sample(len(current_stats), max_rows, seed + 1)
    ref = reference_stats.iloc[ri].reset_index(drop=True)
    cur = current_stats.iloc[ci].reset_index(drop=True)
    stat_cols = list(ref.columns)
    metrics: list = [DataDriftPreset(columns=stat_cols, drift_share=drift_share)]
    emb_cols: list[str] = []
    method = None
    if reference_embeddings is not None and current_embeddings is not None and np.shape(reference_embeddings)[1] > 1:
        re_, ce_ = _embedding_frame(np.asarray(reference_embeddings)[ri], "emb"), \
            _embedding_frame(np.asarray(current_embeddings)[ci], "emb")
        if re_.shape[1] != ce_.shape[1]:
            raise ValueError(f"embeddings must come from one CNN: {re_.shape[1]} vs {ce_.shape[1]} features")
        emb_cols = list(re_.columns)
        ref, cur = pd.concat([ref, re_], axis=1), pd.concat([cur, ce_], axis=1)
        method = ModelDriftMethod(bootstrap=len(ref) < 1000)
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING_NAME, drift_method=method))
    definition = DataDefinition(numerical_columns=stat_cols + emb_cols,
                                embeddings={EMBEDDING_NAME: emb_cols} if emb_cols else None)
    snapshot = Report(metrics).run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                                   reference_data=Dataset.from_pandas(ref, data_definition=definition),
                                   name=f"data drift {reference_label} -> {current_label}")
    columns = _column_results(snapshot)
    n_drifted = sum(c["drifted"] for c in columns.values())
    share = n_drifted / max(1, len(columns))
    out = {"status": "done", "reference": reference_label, "current": current_label, "n_reference": len(ref),
           "n_current": len(cur), "n_statistics": len(columns), "n_drifted_statistics": n_drifted,
           "share_drifted": round(share, 4), "drift_share_threshold": drift_share,
           "statistics_drifted": share >= drift_share}
    emb_part = ""
    if emb_cols:
        score, drifted, name = _embeddings_result(method, cur[emb_cols], ref[emb_cols])
        value = next(m["value"] for m in snapshot.dict()["metrics"]
                     if (m.get("config") or {}).get("type", "").endswith(":EmbeddingsDrift"))
        if not np.isclose(value, score):
            _log.warning(f"embedding drift: Evidently reported {value}, the recomputation {score}")
        out.update({"embedding_score": round(float(value), 4), "embedding_drifted": drifted,
                    "embedding_method": f"{name} (ROC AUC of a domain classifier)", "n_embedding_dims": len(emb_cols)})
        emb_part = f"; CNN embeddings: {'drift' if drifted else 'no drift'}, domain-classifier ROC AUC {value:.3f}"
    out["drifted"] = bool(out["statistics_drifted"] or out.get("embedding_drifted", False))
    out["headline"] = (f"{'DRIFT' if out['drifted'] else 'No drift'} {reference_label} → {current_label}: "
                       f"{n_drifted} of {len(columns)} image statistics drifted (share {share:.2f}){emb_part}")
    out["columns"] = columns
    if out_html is not None:
        Path(out_html).parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(out_html))
        out["report"] = f"{layout.DRIFT_DIR}/{Path(out_html).name}"
    return out


# --------------------------------------------------------------------------------------------- feature drift

def compared_axes(diff: dict, cur_pct, min_pct: float = 5.0) -> list[dict]:
    """The diff's pairs worth comparing: matched (|r| ≥ the diff's threshold) and carrying at least ``min_pct``
    % of the current version's target variance (the top component always counts when matched)."""
    return [p for p in diff["pairs"]
            if p["matched"] and (p["current"] == 1 or float(cur_pct[p["current"] - 1]) >= min_pct)]


def aligned_scores(pairs: list[dict], prev_scores: np.ndarray, cur_scores: np.ndarray
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two versions' standardised scores in shared coordinates: one column per pair (named by the current
    component), the previous version's score sign-aligned to the current one."""
    ref = {f"c{p['current']}": p["sign"] * np.asarray(prev_scores)[:, p["previous"] - 1] for p in pairs}
    cur = {f"c{p['current']}": np.asarray(cur_scores)[:, p["current"] - 1] for p in pairs}
    return pd.DataFrame(ref), pd.DataFrame(cur)


def feature_drift(diff: dict, prev_scores: np.ndarray, cur_scores: np.ndarray, cur_pct,
                  out_html: str | Path | None = None, axis_threshold: float = 0.3, share_threshold: float = 0.2,
                  min_pct: float = 5.0, max_rows: int | None = 1000, seed: int = 0) -> dict:
    """Learned-feature drift between two CNN versions on the same images (see the module docstring).

    Axes = :func:`compared_axes` (matched explanation axes that matter). ``EmbeddingsDrift`` with Evidently's
    ratio method over them: normed Wasserstein distance per axis (an axis moved at ≥ ``axis_threshold``), drift
    when the share of moved axes exceeds ``share_threshold``; one ``ValueDrift`` per axis for the per-axis view.
    The default axis threshold 0.3 sits above retraining noise: two seeds of one CNN on the same data moved the
    top axis by 0.05–0.23 in the tests (Evidently's data-drift default 0.1 would flag plain retraining). When the
    current top component has no counterpart, the axes themselves changed: drift, without an Evidently page.
    At most ``max_rows`` images (seeded sample, the same rows for both versions) go into the Evidently report.
    Returns the summary (drifted, score = share of moved axes, per-axis results, headline); writes the
    Evidently HTML to ``out_html`` when given."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import RatioDriftMethod

    prev_label, cur_label = diff["previous"]["label"], diff["current"]["label"]
    pairs = compared_axes(diff, cur_pct, min_pct)
    new_top = diff["flags"]["new_top_component_unmatched"]
    base = {"status": "done", "reference": prev_label, "current": cur_label,
            "n_images": int(min(len(cur_scores), max_rows or len(cur_scores))),
            "axes": [f"{cur_label} c{p['current']} ~ {prev_label} c{p['previous']}" for p in pairs],
            "method": f"share of matched explanation axes (≥ {min_pct:g} % of the target variance) whose normed "
                      f"Wasserstein distance is ≥ {axis_threshold} (drift when > {share_threshold})"}
    if not pairs:
        return {**base, "n_axes": 0, "score": 1.0, "drifted": True,
                "headline": f"DRIFT {prev_label} → {cur_label}: no explanation axis of {cur_label} that matters has a "
                            f"counterpart in {prev_label}"}
    rows = _sample(len(cur_scores), max_rows, seed)
    ref, cur = aligned_scores(pairs, np.asarray(prev_scores)[rows], np.asarray(cur_scores)[rows])
    cols = list(ref.columns)
    method = RatioDriftMethod(component_stattest="wasserstein", component_stattest_threshold=axis_threshold,
                              threshold=share_threshold)
    definition = DataDefinition(numerical_columns=cols, embeddings={SCORES_NAME: cols})
    # EmbeddingsDrift draws a t-SNE map of the axes, which needs two of them; one axis gets its ValueDrift alone
    metrics = [EmbeddingsDrift(embeddings_name=SCORES_NAME, drift_method=method)] if len(cols) > 1 else []
    metrics += [ValueDrift(column=c, method="wasserstein", threshold=axis_threshold) for c in cols]
    snapshot = Report(metrics).run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                                   reference_data=Dataset.from_pandas(ref, data_definition=definition),
                                   name=f"learned-feature drift {prev_label} -> {cur_label}")
    score, moved, _ = _embeddings_result(method, cur, ref)
    axes = _column_results(snapshot)
    drifted = bool(moved or new_top)
    why = "; the top component has no counterpart" if new_top else ""
    out = {**base, "n_axes": len(cols), "score": round(score, 4), "drifted": drifted,
           "headline": f"{'DRIFT' if drifted else 'No drift'} {prev_label} → {cur_label}: "
                       f"{sum(a['drifted'] for a in axes.values())} of {len(cols)} matched explanation axes moved "
                       f"(score {score:.2f}){why}",
           "columns": axes}
    if out_html is not None:
        Path(out_html).parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(out_html))
        out["report"] = f"{layout.DRIFT_DIR}/{Path(out_html).name}"
    return out


# --------------------------------------------------------------------------------------------- both versions

def compare_versions(out_dir: str | Path, cur_ds: ImageDataset, cur_model, cur_scores: np.ndarray, cur_pct,
                     prev_model, prev_state, prev_input_shape, prev_layer: str | None = None,
                     prev_sequences: str | Path | None = None, prev_ds: ImageDataset | None = None,
                     cur_features: np.ndarray | None = None, cur_layer: str | None = None, cur_input_shape=None,
                     labels: tuple[str, str] = ("previous", "current"), diff_cfg: DiffConfig = DiffConfig(),
                     max_rows: int | None = 1000, seed: int = 0, device: str = "cpu",
                     log: Callable[[str], None] = _log.warning) -> dict:
    """Everything that compares a release with its predecessor, on loaded objects (no MLflow): writes
    ``diff/`` and ``drift/`` into ``out_dir`` and returns ``{"data", "features", "diff", "errors"}``.

    ``prev_ds=None`` skips data drift (same dataset version). Each part catches its own errors: the error is
    logged through ``log`` and recorded (``status: error``) — nothing here raises."""
    out = Path(out_dir)
    prev_label, cur_label = labels
    summary: dict = {"data": None, "features": None, "diff": None, "errors": []}

    def failed(part: str, e: Exception) -> dict:
        msg = f"{type(e).__name__}: {e}"
        log(f"{part} drift against {prev_label} failed (the explanation goes on): {msg}")
        summary["errors"].append(f"{part}: {msg}")
        return {"status": "error", "error": msg[:1000]}

    if prev_ds is not None:
        try:
            ri, ci = _sample(len(prev_ds), max_rows, seed), _sample(len(cur_ds), max_rows, seed + 1)
            to_cnn = cnn_input(tuple(cur_input_shape) if cur_input_shape else cur_ds.image_shape)
            ref_emb = extract_features(cur_model, prev_ds.iter_batches(256, ri), layer=cur_layer,
                                       transform=to_cnn, device=device)
            cur_emb = cur_features[ci] if cur_features is not None else \
                extract_features(cur_model, cur_ds.iter_batches(256, ci), layer=cur_layer, transform=to_cnn,
                                 device=device)
            summary["data"] = data_drift(image_statistics(prev_ds.iter_batches(256, ri)),
                                         image_statistics(cur_ds.iter_batches(256, ci)), ref_emb, cur_emb,
                                         out / layout.DATA_DRIFT_REPORT, max_rows=None, seed=seed,
                                         reference_label=f"{prev_ds.name} ({prev_label})",
                                         current_label=f"{cur_ds.name} ({cur_label})")
        except Exception as e:  # noqa: BLE001 - drift never fails the explanation
            summary["data"] = failed("data", e)
    else:
        summary["data"] = {"status": "skipped", "reason": f"{prev_label} was explained on the same dataset version"}

    try:
        prev_scores = images_to_scores(prev_model, cur_ds.iter_batches(256), prev_state, layer=prev_layer,
                                       transform=cnn_input(tuple(prev_input_shape)), device=device)
        prev_pct = (100.0 * np.asarray(prev_state.explained_target_variance)).tolist()
        diff = explanation_diff(prev_scores, cur_scores, prev_pct, cur_pct, diff_cfg, prev_label, cur_label)
        (out / layout.DIFF_DIR).mkdir(parents=True, exist_ok=True)
        (out / layout.DIFF_JSON).write_text(json.dumps(diff, indent=2))
        if prev_sequences is not None:
            plot_matched(diff, prev_sequences, out / layout.SEQUENCES, out / layout.DIFF_IMAGE)
        summary["diff"] = diff
    except Exception as e:  # noqa: BLE001
        summary["errors"].append(f"diff: {type(e).__name__}: {e}")
        log(f"explanation diff against {prev_label} failed (the explanation goes on): {type(e).__name__}: {e}")
        summary["features"] = {"status": "error", "error": "no diff, so no shared axes"}
        return summary
    try:
        summary["features"] = feature_drift(diff, prev_scores, cur_scores, cur_pct,
                                            out / layout.FEATURE_DRIFT_REPORT, max_rows=max_rows, seed=seed)
    except Exception as e:  # noqa: BLE001
        summary["features"] = failed("learned-feature", e)
    return summary


# --------------------------------------------------------------------------------------------- the flow's tasks

def previous_explained(client: "MlflowClient", name: str, version: str) -> dict | None:
    """The latest version of ``name`` before ``version`` whose explanation is done (a list_versions row)."""
    if not str(version).isdigit():
        return None
    rows = [r for r in R.list_versions(client, name) if r["version"].isdigit()
            and int(r["version"]) < int(version) and r["status"] == "done" and r["run_id"]]
    return rows[-1] if rows else None


def _headlines(summary: dict) -> dict:
    """The tag headlines of a drift summary (``flows.registry.set_drift_tags`` keyword arguments)."""
    prev = summary.get("previous") or {}
    d, f, x = summary.get("data") or {}, summary.get("features") or {}, summary.get("diff")
    pick = lambda part, keys: {k: part[k] for k in keys if k in part}  # noqa: E731
    data = pick(d, ("status", "drifted", "share_drifted", "embedding_score", "embedding_drifted", "reason", "error"))
    features = pick(f, ("status", "drifted", "score", "error"))
    for part in (data, features):
        if part:
            part["previous_version"] = prev.get("version")
    diff = None
    if x:
        diff = {"previous_version": prev.get("version"), "top_matched": x["top"]["matches_previous_top"],
                "top_abs_r": x["top"]["abs_r"], "n_matched": x["n_matched"], "n_components": x["current"]["n_components"]}
    return {"data": data or None, "features": features or None, "diff": diff}


@task(name="drift", cache_policy=NO_CACHE)
def drift_task(client: "MlflowClient", settings: "Settings", job: "Job", run: "ExplainRun") -> dict | None:
    """Compare the version being explained with the previous explained version (see the module docstring);
    set the headline tags; return the summary (None when there is no previous version). Never raises."""
    try:
        log = get_run_logger().warning
    except Exception:  # noqa: BLE001 - outside a flow run
        log = _log.warning
    for stale in (layout.DRIFT_DIR, layout.DIFF_DIR):         # a re-run into the same folder starts clean
        shutil.rmtree(run.out / stale, ignore_errors=True)
    try:
        prev = previous_explained(client, job.name, job.version)
        if prev is None:
            R.set_drift_tags(client, job.name, job.version, data=None, features=None, diff=None)
            return None
        with tempfile.TemporaryDirectory(prefix="figan-previous-") as tmp:
            prev_dir = R.download_explanation(client, prev["run_id"], Path(tmp) / "explanation")
            lineage = json.loads((prev_dir / layout.LINEAGE).read_text()) \
                if (prev_dir / layout.LINEAGE).is_file() else {}
            prev_model, _ = R.load_cnn_version(client, job.name, prev["version"])
            contract = R.read_contract(client, job.name, prev["version"])
            prev_layer = (lineage.get("config") or {}).get("layer") or contract.layer
            prev_md5 = str(lineage.get("dataset_md5") or contract.dataset_md5 or "").removesuffix(".dir")
            prev_name = lineage.get("dataset") or contract.dataset
            previous = {"version": prev["version"], "run_id": prev["run_id"], "dataset": prev_name,
                        "dataset_md5": prev_md5 or None}
            prev_ds, errors = None, []
            if prev_md5 and prev_md5 != job.dataset_md5:
                try:
                    from .data import fetch_dataset, open_store
                    store = open_store(settings.data_store, settings.dvc_remote)
                    dest = settings.home / "datasets" / f"{prev_name}@{prev_md5[:12]}"
                    prev_ds = ImageDataset(fetch_dataset(store, prev_name, prev_md5, dest))
                except Exception as e:  # noqa: BLE001
                    errors.append(f"data: {type(e).__name__}: {e}")
                    log(f"data drift: the previous dataset version {prev_name}@{prev_md5[:12]} cannot be fetched: {e}")
            elif not prev_md5:
                errors.append("data: the previous version's dataset md5 is unknown")
            summary = compare_versions(
                run.out, run.ds, run.model, run.scores, run.pct, prev_model, load_pls(prev_dir / layout.PLS_DIR),
                contract.input_shape, prev_layer, prev_dir / layout.SEQUENCES, prev_ds, cur_features=run.features,
                cur_layer=run.cfg.layer, cur_input_shape=run.input_shape,
                labels=(f"v{prev['version']}", f"v{job.version}"), seed=run.cfg.seed, device=run.device, log=log)
        summary["previous"] = previous
        if errors:                                  # the previous data could not be had: not "same version"
            summary["errors"] = errors + summary["errors"]
            summary["data"] = {"status": "error", "error": errors[0][:1000]}
        (run.out / layout.DRIFT_DIR).mkdir(parents=True, exist_ok=True)
        (run.out / layout.DRIFT_SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    except Exception as e:  # noqa: BLE001 - drift never fails the explanation
        log(f"drift against the previous version failed (the explanation goes on): {type(e).__name__}: {e}")
        summary = {"previous": None, "data": {"status": "error", "error": f"{type(e).__name__}: {e}"[:1000]},
                   "features": None, "diff": None, "errors": [f"{type(e).__name__}: {e}"]}
    try:
        R.set_drift_tags(client, job.name, job.version, **_headlines(summary))
    except Exception as e:  # noqa: BLE001
        log(f"drift tags could not be set: {type(e).__name__}: {e}")
    return summary


@task(name="report", cache_policy=NO_CACHE)
def report_task(job: "Job", run: "ExplainRun", summary: dict | None, lineage: dict) -> Path:
    """Write ``report.html`` (``models.report.build_report``, with the explanation's ``lineage``) into the
    artifacts folder; returns its path."""
    return build_report(run.out, lineage=lineage, drift=summary, diff=(summary or {}).get("diff"),
                        title=f"FIGAN explanation — {job.name} v{job.version}")
