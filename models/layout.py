"""The explanation folder's layout: every file name an explanation writes, publishes, serves, renders or compares.

``models.explain`` writes the folder; ``flows.registry`` publishes it as one MLflow run and downloads
:data:`SERVED_ARTIFACTS` of it for the service; ``services.store`` serves that copy; ``models.report`` renders it;
``flows.drift`` and ``models.diff`` compare two of them. The names are the format of published runs: changing one
makes every published run unreadable. Paths are relative to the folder, ``/``-separated (as MLflow names artifacts)::

    config.json                CONFIG           the ExplainConfig and its hash, the CNN and dataset (models.explain)
    features.npy               FEATURES         N x F learned features, a cache: not published (models.explain)
    pls/                       PLS_DIR          the fitted PLS state (models.pls.save_pls):
        pls.npz                  PLS_ARRAYS       its arrays
        pls.json                 PLS_META         its sizes and names
    pls_variance.png / .csv    PLS_VARIANCE_*   % of target variance per component (models.explain)
    scores.csv                 SCORES           each image's standardised component scores (models.explain)
    gan/                       GAN_DIR          the generator's training folder (models.explain, models.cgan):
        best/                    GENERATOR_DIR    the kept generator G(z, c) (models.cgan, models.patient_generator):
            generator.pt           GENERATOR_WEIGHTS
            generator.json         GENERATOR_META   its kind, config and sizes
        last.pt                  CHECKPOINT       the cGAN's full training state (exact resume): not published
        pose.pt                  POSE             the patient generator's registration, kept for a re-run: not published
    fid_trace.json / .png      FID_TRACE_*      the cGAN's FID at every checkpoint (models.explain)
    layers/                    LAYERS_DIR       when several layers are asked for (models.layer_selection): each
                                                candidate's explanation, layer_selection.json and their shared pose.pt
    sequences/                 SEQUENCES        per component j (1-based), component_file(root, j, kind):
        component_j.gif                gif              the sweep, seed 0 (models.sequences.write_component)
        component_j_strip.png          strip            every seed's frames
        component_j_eigen.png          eigen            the sweep's principal change
        component_j_deviation.png      deviation        frame minus base frame
        component_j.npz                npz              values, frames, eigen, deviation of the shown seeds
        component_j_attribution.png    attribution      Captum maps beside the sweep (models.attribution)
        component_j_real_cases.png     real_cases       real patients swept around themselves (models.real_cases)
        component_j_real_cases.json    real_cases_json  which cases, their scores
    metrics.json               METRICS          every check and the verdict (models.explain, models.checks)
    summary.txt                SUMMARY          the same in words
    diff/                      DIFF_DIR         against the previous version (flows.drift, models.diff):
        diff.json                DIFF_JSON
        matched_components.png   DIFF_IMAGE
    drift/                     DRIFT_DIR        Evidently drift against the previous version (flows.drift):
        summary.json             DRIFT_SUMMARY
        data_drift.html          DATA_DRIFT_REPORT
        feature_drift.html       FEATURE_DRIFT_REPORT
    report.html                REPORT           the auditor's page (models.report)
    lineage.json               LINEAGE          what it was made from, added at publication (flows.registry)
    audit/                     AUDIT_DIR
        manifest.json            MANIFEST         signed sha256 of every file, logged last (models.audit)
    service/                   SERVICE_DIR      a service's own derived files in its cached copy (services.store):
        fid_trace.png            SERVICE_FID_TRACE  the FID figure redrawn from metrics.json
"""
from __future__ import annotations

import operator
from pathlib import Path

CONFIG = "config.json"
FEATURES = "features.npy"
PLS_DIR = "pls"
PLS_ARRAYS, PLS_META = "pls.npz", "pls.json"                    # inside PLS_DIR
PLS_VARIANCE_PNG, PLS_VARIANCE_CSV = "pls_variance.png", "pls_variance.csv"
SCORES = "scores.csv"

GAN_DIR = "gan"
KEPT_GENERATOR, TRAINING_STATE, REGISTRATION = "best", "last.pt", "pose.pt"    # inside a training folder
GENERATOR_DIR = f"{GAN_DIR}/{KEPT_GENERATOR}"
GENERATOR_WEIGHTS, GENERATOR_META = "generator.pt", "generator.json"           # inside GENERATOR_DIR
CHECKPOINT = f"{GAN_DIR}/{TRAINING_STATE}"
POSE = f"{GAN_DIR}/{REGISTRATION}"
FID_TRACE_JSON, FID_TRACE_PNG = "fid_trace.json", "fid_trace.png"
LAYERS_DIR = "layers"

SEQUENCES = "sequences"
COMPONENT_SUFFIXES = {"gif": ".gif", "strip": "_strip.png", "eigen": "_eigen.png", "deviation": "_deviation.png",
                      "npz": ".npz", "attribution": "_attribution.png", "real_cases": "_real_cases.png",
                      "real_cases_json": "_real_cases.json"}

METRICS = "metrics.json"
SUMMARY = "summary.txt"
DIFF_DIR = "diff"
DIFF_JSON, DIFF_IMAGE = f"{DIFF_DIR}/diff.json", f"{DIFF_DIR}/matched_components.png"
DRIFT_DIR = "drift"
DRIFT_SUMMARY = f"{DRIFT_DIR}/summary.json"
DATA_DRIFT_REPORT, FEATURE_DRIFT_REPORT = f"{DRIFT_DIR}/data_drift.html", f"{DRIFT_DIR}/feature_drift.html"
REPORT = "report.html"
LINEAGE = "lineage.json"
AUDIT_DIR = "audit"
MANIFEST = f"{AUDIT_DIR}/manifest.json"
SERVICE_DIR = "service"
SERVICE_FID_TRACE = f"{SERVICE_DIR}/fid_trace.png"

# what a service needs from a published explanation (required), what it uses when present, and both
SERVICE_ARTIFACTS = (GENERATOR_DIR, PLS_DIR, SEQUENCES, METRICS)
SERVICE_OPTIONAL = (CONFIG, LINEAGE, SUMMARY, FID_TRACE_PNG, PLS_VARIANCE_PNG, REPORT)
SERVED_ARTIFACTS = SERVICE_ARTIFACTS + SERVICE_OPTIONAL


def component_name(component: int, kind: str) -> str:
    """File name (inside :data:`SEQUENCES`) of a 1-based component's ``kind`` (a key of :data:`COMPONENT_SUFFIXES`)."""
    if kind not in COMPONENT_SUFFIXES:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(COMPONENT_SUFFIXES)}")
    try:
        j = operator.index(component)
    except TypeError:
        raise ValueError(f"component: {component!r} is not an integer (components are numbered from 1)") from None
    if j < 1:
        raise ValueError(f"component: {j} is below 1 (components are numbered from 1)")
    return f"component_{j}{COMPONENT_SUFFIXES[kind]}"


def component_file(root: str | Path, component: int, kind: str) -> Path:
    """Path of a 1-based component's ``kind`` file in the explanation folder ``root``."""
    return Path(root) / SEQUENCES / component_name(component, kind)
