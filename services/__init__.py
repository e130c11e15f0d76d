"""The FIGAN explanation service (BentoML). MLflow's client telemetry is off here too (see :mod:`flows`)."""
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
