"""Prefect orchestration and the MLflow / DVC adapters of the FIGAN platform.

MLflow's client telemetry is turned off for every process that imports this package (unless the operator set it):
the platform runs offline, and its background thread sets and unsets an environment variable, which races with any
thread reading ``os.environ`` (seen: ``KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`` inside an MLflow request).
"""
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
