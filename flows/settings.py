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
| audit_key        | FIGAN_AUDIT_KEY        | (home/audit.key, made on first   | HMAC-SHA256 key signing explanation manifests  |
|                  |                        | use, mode 0600)                  | (flows.audit); ≥ 16 characters                 |

Loading refuses to start while a setting, or any ``FIGAN_*``, ``MLFLOW_*``, ``PREFECT_*`` or ``AWS_*`` environment
variable (the secrets deploy/ hands the worker, the service and the explanation Jobs), still holds the ``CHANGE-ME``
placeholder of deploy/env.example or deploy/k8s/secrets/: the error names each one, never its value.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
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
        "pass_alias": "FIGAN_PASS_ALIAS", "audit_key": "FIGAN_AUDIT_KEY"}
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)       # MLflow refuses these
PLACEHOLDER = "CHANGE-ME"
CHECKED_ENV_PREFIXES = ("FIGAN_", "MLFLOW_", "PREFECT_", "AWS_")
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
    audit_key: str | None = field(default=None, repr=False)      # a secret: never in a repr or log

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
    def audit_key_file(self) -> Path:
        return self.home / "audit.key"

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
        from_file: dict = {}
        path = file or env.get("FIGAN_SETTINGS") or ("figan.yaml" if Path("figan.yaml").is_file() else None)
        if path:
            from_file = yaml.safe_load(Path(path).read_text()) or {}
            unknown = set(from_file) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"settings file {path}: unknown key(s) {sorted(unknown)}")
        from_env = {name: env[var] for name, var in _ENV.items() if env.get(var)}
        given = {k: v for k, v in overrides.items() if v is not None}
        refuse_placeholders(env, {**from_file, **given})
        return cls(**{**from_file, **from_env, **given})


def refuse_placeholders(env: Mapping[str, str], values: Mapping[str, object] | None = None) -> None:
    """Raise ``ValueError`` naming every setting (``values``) and every platform environment variable (``env``
    names starting with ``FIGAN_``, ``MLFLOW_``, ``PREFECT_`` or ``AWS_``) that still holds the deploy examples'
    ``CHANGE-ME`` placeholder, so a worker, service or Job started from an unedited example fails at once with the
    name to fix instead of later with an authentication error (or, worse, running on a guessable secret)."""
    left = sorted(name for name, value in (values or {}).items() if PLACEHOLDER in str(value)) + \
        sorted(name for name, value in env.items() if name.startswith(CHECKED_ENV_PREFIXES) and PLACEHOLDER in value)
    if left:
        raise ValueError(f"settings: {', '.join(left)} still hold(s) the {PLACEHOLDER} placeholder of the deploy "
                         f"examples (deploy/env.example, deploy/k8s/secrets/*.env.example): set a real value")
