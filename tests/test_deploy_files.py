"""deploy/: the compose file against the Compose Specification's JSON schema, the Kubernetes manifests against the
Kubernetes OpenAPI schemas (kubernetes-validate, offline, strict), the Prefect work pool's Job template rendered
and validated as a Job, and the cross-references between files (services, volumes, secrets, commands, images)
checked against the code they start. No container engine or cluster is needed."""
from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
K8S_VERSION = "1.32.0"


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

def test_compose_matches_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor",
                                 reason="check-jsonschema (which ships the Compose Specification schema) is absent")
    schema = json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # the schema is strict enough to catch a typo in a condition
    bad = {"services": {"a": {"image": "x", "depends_on": {"b": {"condition": "service_helthy"}}}}}
    assert list(cls(schema).iter_errors(bad))


def test_compose_references_and_health():
    c = _compose()
    services, volumes = c["services"], set(c["volumes"])
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker", "service"} <= set(services)
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
        assert "CHANGE-ME" in example[k] or k in ("POSTGRES_USER", "MINIO_ROOT_USER"), f"{k} has a real value"
    assert "deploy/.env" in text and ".env" in (DEPLOY / ".gitignore").read_text().split()
    # with the example's values every ${...} resolves, and the URLs the services are handed are well formed
    c = _interpolate(_compose(), example)
    ml = c["services"]["mlflow"]["environment"]
    assert re.fullmatch(r"postgresql\+psycopg2://figan:CHANGE-ME@postgres:5432/mlflow", ml["MLFLOW_BACKEND_STORE_URI"])
    assert ml["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert ml["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https" and ml["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert ml["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == "CHANGE-ME"
    assert "s3://figan/mlflow" in c["services"]["mlflow"]["command"]
    assert "mlflow:5000" in ml["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    pf = c["services"]["prefect-server"]["environment"]
    assert pf["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://figan:CHANGE-ME@postgres:5432/")
    w = c["services"]["worker"]["environment"]
    assert w["FIGAN_TRACKING_URI"] == "http://mlflow:5000" and w["FIGAN_DVC_REMOTE"] == "s3://figan/dvc"
    assert w["AWS_ENDPOINT_URL"] == "http://minio:9000" and w["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert w["FIGAN_RECEIVER_HOST"] == "0.0.0.0" and w["FIGAN_RECEIVER_PORT"] == "5081"
    assert "5081" in w["FIGAN_RECEIVER_URL"] and "5081/health" in " ".join(c["services"]["worker"]["healthcheck"]["test"])
    init = c["services"]["minio-init"]["command"][0]
    assert "mc mb --ignore-existing" in init and "$MINIO_ROOT_USER" in init


def test_compose_commands_exist_in_the_code():
    """The commands the containers run name a real CLI subcommand and a real BentoML service class."""
    from flows.cli import build_parser

    c = _compose()
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert c["services"]["worker"]["command"] == ["figan", "worker"] and "worker" in sub.choices
    svc = c["services"]["service"]["command"]
    assert svc[:2] == ["bentoml", "serve"]
    path, cls = _python_module_attr(svc[2])
    assert path.is_file() and _defines(path, cls), svc[2]
    assert (ROOT / "deploy" / "postgres" / "init-databases.sql").read_text().count("CREATE DATABASE prefect") == 1


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

def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for f in _kustomization()["resources"]:
        for d in yaml.safe_load_all((K8S / f).read_text()):
            if d:
                docs.append((f, d))
    return docs


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    return []


def _containers(doc: dict) -> list[dict]:
    return [c for p in _pod_specs(doc) for c in p.get("containers", [])]


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
    secret_keys = set(_env_example(K8S / "secrets.env.example"))
    assert k["secretGenerator"][0]["envs"] == ["secrets.env"] and "k8s/secrets.env" in (DEPLOY / ".gitignore").read_text()
    config_maps = {d["metadata"]["name"] for _, d in docs if d["kind"] == "ConfigMap"} | \
                  {g["name"] for g in k["configMapGenerator"]}
    secrets = {g["name"] for g in k["secretGenerator"]}
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
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets and ref["key"] in secret_keys, (f, ref)
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, (f, c["name"], probe)
        if d["kind"] == "Service":
            sel = d["spec"]["selector"]
            assert any(sel.items() <= labels.items() for labels in pod_labels), (f, sel)
    by_name = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    worker = _containers(by_name[("Deployment", "figan-worker")])[0]
    assert worker["command"] == ["figan", "worker"]
    svc = _containers(by_name[("Deployment", "figan-service")])[0]["command"]
    path, cls = _python_module_attr(svc[2])
    assert _defines(path, cls)
    ml_env = {e["name"]: e.get("value") for e in _containers(by_name[("Deployment", "mlflow")])[0]["env"]}
    assert ml_env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true" and ml_env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"]


# --------------------------------------------------------------------------------------------- Prefect work pool

def _template() -> dict:
    return json.loads((K8S / "prefect" / "base-job-template.json").read_text())


def _render(values: dict) -> dict:
    """What the Kubernetes worker does with the pool's template (prefect.workers.base.from_template_and_values,
    without the API round trips), then the env dict → list conversion it does before creating the Job."""
    from prefect.utilities.templating import apply_values

    t = _template()
    props = t["variables"]["properties"]
    variables = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    variables.update(values)
    cfg = apply_values(template=copy.deepcopy(t["job_configuration"]), values=variables)
    try:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
    except ImportError:
        manifest = cfg["job_manifest"]
    else:
        manifest = KubernetesWorkerJobConfiguration(**cfg).job_manifest    # pydantic validation of the config
    manifest = copy.deepcopy(manifest)
    # prefect-kubernetes insists on parallelism/completions in the *pod* spec (its _get_base_job_manifest), where
    # the API server drops them as unknown fields (Job defaults are 1 and 1 anyway); strict validation would not
    pod = manifest["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    container = pod["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in (container.get("env") or {}).items()]
    container["args"] = ["prefect", "flow-run", "execute"]
    manifest["metadata"]["generateName"] = "explain-model-version-"
    return manifest


def test_work_pool_template_renders_a_valid_job_with_gpus():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (offline k8s schemas) is absent")
    cpu = _render({})
    gpu = _render({"gpu_count": 2, "image": "registry.example/figan-worker:1", "env": {"FIGAN_DEVICE": "cuda"},
                   "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}})
    for m in (cpu, gpu):
        kv.validate(m, K8S_VERSION, strict=True)
        pod = m["spec"]["template"]["spec"]
        assert m["kind"] == "Job" and pod["restartPolicy"] == "Never" and m["spec"]["backoffLimit"] == 0
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "figan-data"
        assert {e["configMapRef"]["name"] for e in pod["containers"][0]["envFrom"] if "configMapRef" in e} == \
            {"figan-config"}
    assert cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0
    c = gpu["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["image"] == "registry.example/figan-worker:1"
    assert {"name": "FIGAN_DEVICE", "value": "cuda"} in c["env"]
    assert gpu["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_prefect_deployments_point_at_the_flow_and_the_pool():
    t = _template()
    props = t["variables"]["properties"]
    doc = yaml.safe_load((K8S / "prefect" / "prefect.yaml").read_text())
    worker_docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _k8s_docs()}
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


def test_team_configuration_refuses_pickled_cnns_everywhere_a_cnn_is_loaded():
    """The worker (explain + drift) and the service (explain-image) load CNNs: both run the team pickle policy."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in ("worker", "service"):
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
