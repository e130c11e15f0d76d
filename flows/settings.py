"""One typed settings object for the platform, read once from a YAML file and/or environment variables.

Precedence: environment variable > settings file (``FIGAN_SETTINGS`` or ``./figan.yaml``) > default.

| setting          | env var                | default                          | meaning                                        |
|------------------|------------------------|----------------------------------|------------------------------------------------|
| home             | FIGAN_HOME             | ./runs/platform                  | everything the embedded default writes         |
| tracking_uri     | FIGAN_TRACKING_URI     | (embedded server in home/mlflow) | any MLflow URI (e.g. Postgres+S3 server)       |
| data_store       | FIGAN_DATA_STORE       | home/data-store                  | the git+DVC data registry                      |
| dvc_remote       | FIGAN_DVC_REMOTE       | home/dvc-remote                  | local folder or s3://… (by configuration)      |
| work_dir         | FIGAN_WORK_DIR         | home/work                        | explanations in progress (resumable)           |
| explain_config   | FIGAN_EXPLAIN_CONFIG   | (ExplainConfig defaults)         | YAML of ExplainConfig fields                   |
| device           | FIGAN_DEVICE           | auto                             | cpu / cuda / auto                              |
| model_allowlist  | FIGAN_MODELS           | (all opted-in models)            | comma-separated registered model names         |
| receiver_port    | FIGAN_RECEIVER_PORT    | 5081                             | webhook receiver (loopback unless host set)    |
| service_port     | FIGAN_SERVICE_PORT     | 3000                             | explanation service started by `figan up`      |
| receiver_host    | FIGAN_RECEIVER_HOST    | 127.0.0.1                        | address the receiver binds                     |
| public_receiver_url | FIGAN_RECEIVER_URL  | http://<host>:<port>             | URL MLflow delivers webhooks to (containers)   |
| explain_deployment | FIGAN_EXPLAIN_DEPLOYMENT | (local `figan explain-version` process) | Prefect deployment to submit to instead |
| reconcile_seconds| FIGAN_RECONCILE_SECONDS| 30                               | reconciler period                              |
| max_concurrent   | FIGAN_MAX_CONCURRENT   | 1                                | simultaneous explanations per worker           |
| lease_seconds    | FIGAN_LEASE_SECONDS    | 120                              | run lease TTL (renewed every third of it)      |
| max_attempts     | FIGAN_MAX_ATTEMPTS     | 3                                | failed runs of one key before it stays failed  |
| retry_backoff    | FIGAN_RETRY_BACKOFF    | 60                               | seconds before the first retry, doubling       |
| pass_alias       | FIGAN_PASS_ALIAS       | (none)                           | registered-model alias moved to a version when |
|                  |                        |                                  | its explanation's verdict is pass              |
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import yaml

from models.explain import ExplainConfig

_ENV = {"home": "FIGAN_HOME", "tracking_uri": "FIGAN_TRACKING_URI", "data_store": "FIGAN_DATA_STORE",
        "dvc_remote": "FIGAN_DVC_REMOTE", "work_dir": "FIGAN_WORK_DIR", "explain_config": "FIGAN_EXPLAIN_CONFIG",
        "device": "FIGAN_DEVICE", "model_allowlist": "FIGAN_MODELS", "receiver_port": "FIGAN_RECEIVER_PORT",
        "service_port": "FIGAN_SERVICE_PORT",
        "receiver_host": "FIGAN_RECEIVER_HOST", "reconcile_seconds": "FIGAN_RECONCILE_SECONDS",
        "max_concurrent": "FIGAN_MAX_CONCURRENT", "lease_seconds": "FIGAN_LEASE_SECONDS",
        "max_attempts": "FIGAN_MAX_ATTEMPTS", "retry_backoff": "FIGAN_RETRY_BACKOFF",
        "public_receiver_url": "FIGAN_RECEIVER_URL", "explain_deployment": "FIGAN_EXPLAIN_DEPLOYMENT",
        "pass_alias": "FIGAN_PASS_ALIAS"}
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)       # MLflow refuses these
_NUMBERS = {"receiver_port": int, "service_port": int, "reconcile_seconds": float, "max_concurrent": int, "lease_seconds": float,
            "max_attempts": int, "retry_backoff": float}


@dataclass(frozen=True)
class Settings:
    home: Path = Path("runs/platform")
    tracking_uri: str | None = None
    data_store: Path | None = None
    dvc_remote: str | None = None
    work_dir: Path | None = None
    explain_config: Path | None = None
    device: str = "auto"
    model_allowlist: tuple[str, ...] = ()
    receiver_port: int = 5081
    service_port: int = 3000
    receiver_host: str = "127.0.0.1"
    reconcile_seconds: float = 30.0
    max_concurrent: int = 1
    lease_seconds: float = 120.0
    max_attempts: int = 3
    retry_backoff: float = 60.0
    public_receiver_url: str | None = None
    explain_deployment: str | None = None
    pass_alias: str | None = None

    def __post_init__(self):
        home = Path(self.home).absolute()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "data_store", Path(self.data_store or home / "data-store").absolute())
        object.__setattr__(self, "dvc_remote", str(self.dvc_remote or home / "dvc-remote"))
        object.__setattr__(self, "work_dir", Path(self.work_dir or home / "work").absolute())
        if isinstance(self.model_allowlist, str):
            object.__setattr__(self, "model_allowlist", tuple(m for m in self.model_allowlist.split(",") if m))
        for name, kind in _NUMBERS.items():
            try:
                value = kind(getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"settings: {name} must be a number, got {getattr(self, name)!r}") from None
            if value <= 0 and name != "retry_backoff" or value < 0:
                raise ValueError(f"settings: {name} must be positive, got {value}")
            object.__setattr__(self, name, value)
        for name in ("receiver_port", "service_port"):
            if getattr(self, name) > 65535:
                raise ValueError(f"settings: {name} must be a TCP port (1-65535), got {getattr(self, name)}")
        if self.pass_alias is not None and not (_ALIAS_RE.match(str(self.pass_alias))
                                                and not _RESERVED_ALIAS_RE.match(str(self.pass_alias))):
            raise ValueError(f"settings: pass_alias must be an MLflow alias (a letter or _, then letters, digits, _ "
                             f"or -; not 'latest' or v<number>), got {self.pass_alias!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"settings: device must be auto, cpu or cuda[:N], got {self.device!r}")

    @property
    def mlflow_home(self) -> Path:
        return self.home / "mlflow"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def receiver_url(self) -> str:
        if self.public_receiver_url:
            return self.public_receiver_url.rstrip("/")
        host = "127.0.0.1" if self.receiver_host in ("", "0.0.0.0") else self.receiver_host
        return f"http://{host}:{self.receiver_port}"

    @property
    def features_cache(self) -> Path:
        return self.home / "cache" / "features"

    def explain_cfg(self) -> ExplainConfig:
        d = {}
        if self.explain_config:
            p = Path(self.explain_config)
            if not p.is_file():
                raise ValueError(f"settings: explain_config {p} does not exist")
            d = yaml.safe_load(p.read_text()) or {}
        d.setdefault("device", self.device)
        return ExplainConfig.from_dict(d)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, file: str | Path | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        values: dict = {}
        path = file or env.get("FIGAN_SETTINGS") or ("figan.yaml" if Path("figan.yaml").is_file() else None)
        if path:
            data = yaml.safe_load(Path(path).read_text()) or {}
            unknown = set(data) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"settings file {path}: unknown key(s) {sorted(unknown)}")
            values.update(data)
        for name, var in _ENV.items():
            if env.get(var):
                values[name] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
