"""One typed settings object for the whole platform: flows, worker, receiver, service and the explanation Jobs.

pydantic-settings reads it once, validated at start (a wrong value is an error naming the variable before anything
starts). Precedence: environment variable > settings file (``FIGAN_SETTINGS`` or ``./figan.yaml``: YAML with the
setting names below) > default. :meth:`Settings.mlflow_uri` is the one place that resolves the MLflow URI.

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
| explain_deployment | FIGAN_EXPLAIN_DEPLOYMENT | explain-model-version/figan  | Prefect deployment every explain run is of     |
| work_pool        | FIGAN_WORK_POOL        | figan                            | process work pool of the embedded deployment   |
| reconcile_seconds| FIGAN_RECONCILE_SECONDS| 30                               | reconciler period                              |
| max_concurrent   | FIGAN_MAX_CONCURRENT   | 1                                | explanations at once (the Prefect worker's     |
|                  |                        |                                  | --limit on the embedded work pool)             |
| hang_seconds     | FIGAN_HANG_SECONDS     | 3600                             | a running explanation with no progress (stage  |
|                  |                        |                                  | or GAN checkpoint) this long is cancelled      |
| heartbeat_seconds| FIGAN_HEARTBEAT_SECONDS| 30                               | Prefect flow-run heartbeat period; a run silent|
|                  |                        |                                  | for 3 periods (its worker or machine died) is  |
|                  |                        |                                  | marked CRASHED by a Prefect automation         |
| max_attempts     | FIGAN_MAX_ATTEMPTS     | 3                                | failed runs of one key before it stays failed  |
| retry_backoff    | FIGAN_RETRY_BACKOFF    | 60                               | seconds before the first retry, doubling       |
| pass_alias       | FIGAN_PASS_ALIAS       | (none)                           | registered-model alias moved to a version when |
|                  |                        |                                  | its explanation's verdict is pass              |
| audit_key        | FIGAN_AUDIT_KEY        | (home/audit.key, made on first   | HMAC-SHA256 key signing explanation manifests  |
|                  |                        | use, mode 0600)                  | (flows.audit); ≥ 16 characters                 |
| service_*        | FIGAN_SERVICE_*        | see services.store.ServiceConfig | the explanation service (services/)            |

Loading refuses to start while a setting, or any ``FIGAN_*``, ``MLFLOW_*``, ``PREFECT_*`` or ``AWS_*`` environment
variable (the secrets deploy/ hands the worker, the service and the explanation Jobs), still holds the ``CHANGE-ME``
placeholder of deploy/env.example or deploy/k8s/secrets/: the error names each one, never its value.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Mapping

import yaml
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
                               YamlConfigSettingsSource)

from models.explain import ExplainConfig

PLACEHOLDER = "CHANGE-ME"
CHECKED_ENV_PREFIXES = ("FIGAN_", "MLFLOW_", "PREFECT_", "AWS_")
ENV_PREFIX = "FIGAN_"
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)       # MLflow refuses these
MiB, GiB = 1024 ** 2, 1024 ** 3


def settings_file() -> Path | None:
    """``FIGAN_SETTINGS``, else ``./figan.yaml`` when there is one."""
    named = os.environ.get("FIGAN_SETTINGS")
    if named:
        if not Path(named).is_file():
            raise ValueError(f"settings: FIGAN_SETTINGS={named} is not a file")
        return Path(named)
    return Path("figan.yaml") if Path("figan.yaml").is_file() else None


class Settings(BaseSettings):
    """The platform's settings (the table in this module's docstring); the service's are the ``service_*`` fields
    (:class:`services.store.ServiceConfig` says what each does). Paths left unset live under ``home``."""
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_ignore_empty=True,
                                      populate_by_name=True)

    home: Path = Path("runs/platform")
    tracking_uri: str | None = None
    data_store: Path | None = None
    dvc_remote: str | None = None
    work_dir: Path | None = None
    explain_config: Path | None = None
    device: str = "auto"
    model_allowlist: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias=AliasChoices("model_allowlist", "FIGAN_MODELS"))
    receiver_port: int = Field(5081, ge=1, le=65535)
    service_port: int = Field(3000, ge=1, le=65535)
    receiver_host: str = "127.0.0.1"
    reconcile_seconds: float = Field(30.0, gt=0)
    max_concurrent: int = Field(1, gt=0)
    hang_seconds: float = Field(3600.0, gt=0)
    heartbeat_seconds: int = Field(30, ge=30)          # Prefect's minimum heartbeat period
    max_attempts: int = Field(3, gt=0)
    retry_backoff: float = Field(60.0, ge=0)
    public_receiver_url: str | None = Field(None, validation_alias=AliasChoices("public_receiver_url",
                                                                                "FIGAN_RECEIVER_URL"))
    explain_deployment: str = "explain-model-version/figan"
    work_pool: str = "figan"
    pass_alias: str | None = None
    audit_key: str | None = Field(None, repr=False)      # a secret: never in a repr or log
    # the explanation service (services/), ServiceSettings
    service_api_key: str | None = Field(None, repr=False)
    service_auth: bool = True
    service_public_read: bool = False
    service_cache: Path | None = None
    service_listing_ttl: float = Field(5.0, gt=0)
    service_max_upload: int = Field(2 * MiB, gt=0)
    service_gen_concurrency: int = Field(1, gt=0)
    service_gen_queue: int = Field(16, gt=0)
    service_torch_threads: int = Field(1, gt=0)
    service_model_cache_bytes: int = Field(2 * GiB, gt=0)
    service_file_cache_bytes: int = Field(128 * MiB, gt=0)
    service_disk_cache_bytes: int = Field(10 * GiB, gt=0)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings, file_secret_settings,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        file = settings_file()
        return (init_settings, env_settings) + ((YamlConfigSettingsSource(settings_cls, yaml_file=file),)
                                                if file else ())

    @model_validator(mode="before")
    @classmethod
    def _paths_under_home(cls, values: dict) -> dict:
        """Unset paths live under ``home``; every path is absolute."""
        values = dict(values)
        home = Path(values.get("home") or cls.model_fields["home"].default).absolute()
        values["home"] = home
        for name, default in (("data_store", home / "data-store"), ("work_dir", home / "work"),
                              ("service_cache", home / "service-cache")):
            values[name] = Path(values.get(name) or default).absolute()
        values["dvc_remote"] = str(values.get("dvc_remote") or home / "dvc-remote")
        return values

    @field_validator("model_allowlist", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return tuple(m.strip() for m in value.split(",") if m.strip()) if isinstance(value, str) else value

    @field_validator("pass_alias")
    @classmethod
    def _an_mlflow_alias(cls, value: str | None) -> str | None:
        if value is not None and not (_ALIAS_RE.match(value) and not _RESERVED_ALIAS_RE.match(value)):
            raise ValueError("must be an MLflow alias (a letter or _, then letters, digits, _ or -; not 'latest' or "
                             "v<number>)")
        return value

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be auto, cpu or cuda[:N]")
        return value

    @classmethod
    def load(cls, **overrides) -> Settings:
        """The settings from the environment and the settings file (``overrides`` given here win). Refuses, naming
        them, placeholders left from the deploy examples and invalid values (``ValueError``)."""
        refuse_placeholders(os.environ)
        try:
            settings = cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            raise ValueError("settings: " + "; ".join(_described(err) for err in e.errors())) from None
        refuse_placeholders({}, {name: getattr(settings, name) for name in cls.model_fields})
        return settings

    # -- derived places
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

    def mlflow_uri(self) -> str | None:
        """The MLflow URI every part uses: ``tracking_uri`` when set, else the embedded server's started by
        `figan up` in ``home`` (None when it is not running)."""
        if self.tracking_uri:
            return self.tracking_uri
        from .mlflow_server import find_server
        server = find_server(self.mlflow_home)
        return server.uri if server else None

    def explain_cfg(self) -> ExplainConfig:
        d = {}
        if self.explain_config:
            p = Path(self.explain_config)
            if not p.is_file():
                raise ValueError(f"settings: explain_config {p} does not exist")
            d = yaml.safe_load(p.read_text()) or {}
        d.setdefault("device", self.device)
        return ExplainConfig.from_dict(d)


def _described(error: dict) -> str:
    """``FIGAN_RECEIVER_PORT (receiver_port): Input should be less than or equal to 65535`` for one pydantic error."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    field = Settings.model_fields.get(loc)
    names = {ENV_PREFIX + loc.upper()}
    if field is not None and isinstance(field.validation_alias, AliasChoices):
        names = {c for c in field.validation_alias.choices if isinstance(c, str) and c.isupper()} or names
    if error.get("type") == "extra_forbidden":
        return f"unknown setting {loc!r} (settings file)"
    return f"{' / '.join(sorted(names))} ({loc}): {error.get('msg', 'invalid')}"


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
