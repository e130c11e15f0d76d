"""Start the team stack of deploy/compose.yaml for real under podman and drive one explanation through it.

On a Debian machine with rootful podman and no Docker engine or container registry (run it with the project's
Python, which registers the CNN from the host):

    .venv/bin/python scripts/compose_smoke.py [--restart-worker] [--keep] [--rebuild] [--timeout 7200]

1. images: the FIGAN worker and service images (scripts/podman_build.sh), Postgres from Debian's package and moto's
   S3 server in place of MinIO (deploy/smoke/, scripts/podman_build.sh smoke), each built only when missing;
2. up: `podman-compose -f deploy/compose.yaml -f deploy/compose.smoke.yaml up -d`, one depends_on level at a
   time, each level healthy (or, for minio-init, exited 0) before the next starts: podman < 4.6 has no
   `podman wait --condition=healthy` (podman-compose then ignores service_healthy) and, without systemd, no timer
   runs health checks, so this script runs them (`podman healthcheck run`);
3. guard: `figan worker` in the worker container refuses a CHANGE-ME secret by name before anything starts;
4. data: a small phantom written and versioned inside the prefect-worker container (DVC → s3://figan/dvc; the
   worker, which shares the volume, has no S3 credentials);
5. register: a CNN trained on the host on that phantom, logged with the plain MLflow client (pt2) to the published
   MLflow port, contract tags on the version: MLflow calls the worker's webhook inside the network, the worker
   submits a flow run of the explain deployment, the prefect-worker runs it;
6. explain: waits for figan.status=done (with --restart-worker, restarts the prefect-worker container once the GAN
   has checkpointed: its flow run's heartbeats stop, Prefect's automation crashes it after 3 × 30 s (or, alive but
   stuck, the worker cancels it after FIGAN_HANG_SECONDS, 240 s here), the worker counts it and submits attempt 2,
   which must resume from the checkpoint kept in the volume);
7. gif: fetches a component's sequence.gif from the service's published port;
8. down: `podman-compose … down -v`, also on failure, timeout, Ctrl-C or SIGTERM (--keep leaves the stack up).

On PASS the figures go to benchmarks/results/compose_smoke.json (compose_smoke_restart.json with --restart-worker).

Each step prints its time; the last line is the verdict. Peak RSS: the process trees of the stack's containers,
sampled every few seconds. Podman runs with runc, cgroupfs, the vfs storage driver and file events (a
containers.conf and storage.conf written to the work folder and named by CONTAINERS_CONF /
CONTAINERS_STORAGE_CONF), the setup scripts/podman_build.sh documents. podman-compose is installed into a venv
in the work folder when it is not on PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = (DEPLOY / "compose.yaml", DEPLOY / "compose.smoke.yaml")
PROJECT = "figan-smoke"                       # its own containers and volumes: `down -v` never touches a team's
PODMAN_COMPOSE = "podman-compose==1.6.0"
IMAGES = {                                    # image → scripts/podman_build.sh target
    "localhost/figan-worker:dev": "worker",
    "localhost/figan-service:dev": "service",
    "localhost/figan-postgres:smoke": "postgres",
    "localhost/figan-s3:smoke": "s3",
}
MODEL = "smoke-cnn"
RESULTS = {False: ROOT / "benchmarks" / "results" / "compose_smoke.json",           # written on PASS
           True: ROOT / "benchmarks" / "results" / "compose_smoke_restart.json"}  # with --restart-worker
EXPLAIN_CONFIGS = {False: "/etc/figan/explain/tiny.yaml", True: "/etc/figan/explain/cgan-resume.yaml"}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # published ports: never via a proxy


class SmokeError(RuntimeError):
    """A step failed; the message says which and why."""


class Deadline(BaseException):
    """The overall timeout or a signal: unwinds to the clean-up like Ctrl-C does."""


# --------------------------------------------------------------------------------------------- running things

@dataclass
class Run:
    """How every command runs: podman's configuration in the environment, output logged, a time limit each."""
    work: Path
    env: dict[str, str]
    compose: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def sh(self, cmd: list[str], timeout: float, check: bool = True, input: str | None = None,
           quiet: bool = False) -> subprocess.CompletedProcess:
        """Run ``cmd`` in its own process group (killed whole on timeout or interruption); its output is
        appended to <work>/commands.log and returned."""
        with open(self.work / "commands.log", "a") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise SmokeError(f"{' '.join(cmd[:6])} … did not finish within {timeout:g} s") from None
        except BaseException:                 # the overall deadline, a signal, Ctrl-C: no orphans left behind
            _kill_group(proc)
            raise
        with open(self.work / "commands.log", "a") as log:
            log.write(out)
        if check and proc.returncode != 0:
            raise SmokeError(f"{' '.join(cmd[:8])} … exited {proc.returncode}:\n{out[-3000:]}")
        if not quiet and out.strip() and os.environ.get("FIGAN_SMOKE_VERBOSE"):
            print(out.rstrip())
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")

    def podman(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh(["podman", *args], timeout, check)

    def compose_cmd(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh([*self.compose, *args], timeout, check)

    def step(self, name: str):
        return _Step(self, name)


class _Step:
    """Prints ``[ elapsed] name … time`` around a block; records the time in ``TIMES``."""

    def __init__(self, run: Run, name: str):
        self.run, self.name = run, name

    def __enter__(self):
        self.t = time.monotonic()
        print(f"[{self.t - self.run.t0:7.1f} s] {self.name} …", flush=True)
        return self

    def __exit__(self, kind, exc, tb):
        took = time.monotonic() - self.t
        TIMES[self.name] = round(took, 1)
        print(f"[{time.monotonic() - self.run.t0:7.1f} s] {self.name}: {'ok' if kind is None else 'FAILED'} "
              f"in {took:.1f} s", flush=True)
        return False


TIMES: dict[str, float] = {}


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _DIRECT.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------------------------- setup

def podman_config(work: Path) -> dict[str, str]:
    """The environment every podman call runs in: runc, cgroupfs, vfs, file events and ulimits within this
    machine's hard limits (the defaults ask for more open files than an unprivileged sandbox allows)."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    (work / "containers.conf").write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=8192:8192"]\n'
        "[engine]\n"
        'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    (work / "storage.conf").write_text(
        '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\n'
        'graphroot = "/var/lib/containers/storage"\n')
    return {**os.environ, "CONTAINERS_CONF": str(work / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def podman_compose_bin(work: Path, given: str | None) -> str:
    """podman-compose: the one given, the one on PATH, or a pinned one installed into <work>/podman-compose."""
    if given:
        return given
    if shutil.which("podman-compose"):
        return shutil.which("podman-compose")
    venv = work / "podman-compose"
    exe = venv / "bin" / "podman-compose"
    if not exe.is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", PODMAN_COMPOSE], check=True, timeout=600)
    return str(exe)


def write_env(work: Path, restart: bool) -> tuple[Path, dict[str, str]]:
    """deploy/env.example with every CHANGE-ME replaced by a fresh secret, free loopback ports for what the stack
    publishes, and the smoke's explain config; mode 0600 in the work folder (deploy/.env is left alone)."""
    from cryptography.fernet import Fernet

    values = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.lstrip().startswith("#"):
            values[key.strip()] = value.strip()
    for key, value in values.items():
        if "CHANGE-ME" in value:
            values[key] = "figan:" + secrets.token_urlsafe(24) if key == "PREFECT_API_AUTH_STRING" \
                else secrets.token_urlsafe(24)
    values["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = Fernet.generate_key().decode()
    for name in ("FIGAN_MLFLOW_PORT", "FIGAN_PREFECT_PORT", "FIGAN_SERVICE_PORT", "FIGAN_MINIO_CONSOLE_PORT"):
        values[name] = str(_free_port())
    values["FIGAN_EXPLAIN_CONFIG"] = EXPLAIN_CONFIGS[restart]
    if restart:                     # the killed flow run counted within minutes, attempt 2 submitted soon after
        values.update({"FIGAN_HANG_SECONDS": "240", "FIGAN_RECONCILE_SECONDS": "60"})
    values["FIGAN_IMAGE_TAG"] = "dev"
    path = work / "smoke.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
    return path, values


class _ComposeLoader(yaml.SafeLoader):
    """YAML with the Compose Specification's merge tags (!reset, !override) read as their plain values."""


_ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: (
    loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else
    loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)))


def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)      # noqa: S506 — a SafeLoader subclass


def start_levels() -> list[list[str]]:
    """The services in start order: level n holds those whose depends_on (over both compose files) all lie in
    levels < n."""
    deps: dict[str, set[str]] = {}
    for path in COMPOSE_FILES:
        for name, svc in (_load(path).get("services") or {}).items():
            deps.setdefault(name, set()).update(svc.get("depends_on") or {})
    levels, placed = [], set()
    while len(placed) < len(deps):
        level = sorted(n for n, d in deps.items() if n not in placed and d <= placed)
        if not level:
            raise SmokeError(f"depends_on has a cycle among {sorted(set(deps) - placed)}")
        levels.append(level)
        placed.update(level)
    return levels


def one_shot_services() -> set[str]:
    """Services others wait on with condition service_completed_successfully (minio-init)."""
    out = set()
    for svc in _load(COMPOSE_FILES[0])["services"].values():
        for dep, cond in (svc.get("depends_on") or {}).items():
            if cond.get("condition") == "service_completed_successfully":
                out.add(dep)
    return out


# --------------------------------------------------------------------------------------------- the stack

class Stack:
    def __init__(self, run: Run):
        self.run = run

    def container(self, service: str) -> str:
        out = self.run.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                              "--filter", f"label=com.docker.compose.service={service}", "--format",
                              "{{.Names}}").stdout.split()
        if not out:
            raise SmokeError(f"no container for service {service}")
        return out[0]

    def containers(self) -> list[str]:
        return self.run.podman("ps", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format",
                               "{{.Names}}").stdout.split()

    def state(self, name: str) -> tuple[str, int]:
        out = self.run.podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.split()
        return out[0], int(out[1])

    def logs(self, service: str, lines: int = 40) -> str:
        try:
            return self.run.podman("logs", "--tail", str(lines), self.container(service), check=False).stdout
        except SmokeError as e:
            return str(e)

    def wait_healthy(self, service: str, timeout: float) -> float:
        """Run the container's health check until it passes; fails at once when the container exits."""
        name, t0 = self.container(service), time.monotonic()
        while True:
            status, code = self.state(name)
            if status in ("exited", "stopped"):
                raise SmokeError(f"{service} exited ({code}) before it was healthy:\n{self.logs(service)}")
            if self.run.podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise SmokeError(f"{service} not healthy within {timeout:g} s:\n{self.logs(service)}")
            time.sleep(2)

    def wait_exited_ok(self, service: str, timeout: float) -> float:
        name, t0 = self.container(service), time.monotonic()
        while True:
            status, code = self.state(name)
            if status in ("exited", "stopped"):
                if code != 0:
                    raise SmokeError(f"{service} exited {code}:\n{self.logs(service)}")
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise SmokeError(f"{service} still running after {timeout:g} s:\n{self.logs(service)}")
            time.sleep(1)

    def exec(self, service: str, *cmd: str, timeout: float = 300) -> str:
        return self.run.podman("exec", self.container(service), *cmd, timeout=timeout).stdout

    def anonymous_volumes(self) -> set[str]:
        """Volumes the images' VOLUME lines gave containers that mount nothing there (the MLflow and Prefect
        servers' /data): `podman-compose down -v` removes only the named ones."""
        names = self.run.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format",
                                "{{.Names}}").stdout.split()
        if not names:
            return set()
        out = self.run.podman("inspect", "--format", "{{range .Mounts}}{{.Type}}={{.Name}} {{end}}", *names).stdout
        return {m.split("=", 1)[1] for m in out.split() if m.startswith("volume=")
                and not m.split("=", 1)[1].startswith(f"{PROJECT}_")}

    def down(self, timeout: float) -> None:
        """`down -v`, then the anonymous volumes it leaves. With vfs each container's removal deletes a full copy
        of its image: minutes, not seconds."""
        anonymous = self.anonymous_volumes()
        self.run.compose_cmd("down", "-v", timeout=timeout)
        if anonymous:
            self.run.podman("volume", "rm", "-f", *sorted(anonymous), timeout=120, check=False)


class RssSampler(threading.Thread):
    """Sums the RSS of every process of the stack's containers every ``period`` seconds; keeps the peak of the
    sum and of each container."""

    def __init__(self, run: Run, period: float = 5.0):
        super().__init__(daemon=True, name="rss")
        self.runner, self.period = run, period
        self.peak_total, self.peak_by = 0, {}
        self._stop = threading.Event()

    def sample(self) -> None:
        import psutil
        out = subprocess.run(["podman", "ps", "--filter", f"label=io.podman.compose.project={PROJECT}",
                              "--format", "{{.Names}} {{.Pid}}"], env=self.runner.env, capture_output=True, text=True,
                             timeout=30).stdout.splitlines()
        total = 0
        for line in out:
            name, _, pid = line.partition(" ")
            try:
                root = psutil.Process(int(pid))
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except (ValueError, psutil.Error):
                continue
            service = name.removeprefix(f"{PROJECT}_").rsplit("_", 1)[0]
            self.peak_by[service] = max(self.peak_by.get(service, 0), rss)
            total += rss
        self.peak_total = max(self.peak_total, total)

    def run(self) -> None:  # noqa: D401 — threading.Thread's entry point
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 — a container going away mid-sample
                pass
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------------------- the steps

def build_images(run: Run, rebuild: bool, timeout: float) -> dict[str, str]:
    sizes = {}
    for image, target in IMAGES.items():
        exists = run.podman("image", "exists", image, check=False).returncode == 0
        with run.step(f"image {image}" + ("" if rebuild or not exists else " (present)")):
            if rebuild or not exists:
                run.sh([str(ROOT / "scripts" / "podman_build.sh"), target], timeout)
        sizes[image] = run.podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()
    return sizes


def check_guard(run: Run, stack: Stack) -> None:
    """`figan worker` in the running worker container, handed a CHANGE-ME secret, exits naming it (never its
    value) before it starts anything. Inside the running container: with vfs a new container copies the image."""
    res = run.podman("exec", "-e", "PREFECT_API_AUTH_STRING=figan:CHANGE-ME", stack.container("worker"),
                     "figan", "worker", timeout=120, check=False)
    if res.returncode == 0 or "PREFECT_API_AUTH_STRING" not in res.stdout or "figan:CHANGE-ME" in res.stdout:
        raise SmokeError(f"the worker did not refuse a CHANGE-ME secret by name (rc {res.returncode}):\n"
                         f"{res.stdout[-2000:]}")


def start_stack(run: Run, stack: Stack, timeout: float) -> None:
    one_shot = one_shot_services()
    for level in start_levels():
        with run.step(f"up {', '.join(level)}"):
            run.compose_cmd("up", "-d", "--no-build", "--no-deps", *level, timeout=timeout)
            for service in level:
                took = (stack.wait_exited_ok if service in one_shot else stack.wait_healthy)(service, timeout)
                print(f"           {service}: {'exited 0' if service in one_shot else 'healthy'} after {took:.1f} s")


def version_data(stack: Stack, n: int, size: int) -> dict:
    stack.exec("prefect-worker", "figan", "data", "phantom", "--out", "/data/src/phantom", "--n", str(n),
               "--size", str(size))
    out = stack.exec("prefect-worker", "figan", "version-data", "--src", "/data/src/phantom", timeout=600)
    return json.loads(out[out.index("{"):])


def register_from_host(run: Run, stack: Stack, tracking_uri: str, data: dict) -> str:
    """Train a small CNN on the host on the versioned phantom (copied out of the volume) and register it the
    plain MLflow way: a pt2 model logged with registered_model_name, the FIGAN contract as version tags."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    sys.path.insert(0, str(ROOT))
    from models.cnn import TrainConfig, train_cnn
    from models.data import open_dataset

    local = run.work / "phantom"
    shutil.rmtree(local, ignore_errors=True)
    run.podman("cp", f"{stack.container('prefect-worker')}:/data/src/phantom", str(local), timeout=120)
    ds = open_dataset(local)
    model, spec = train_cnn(ds, TrainConfig(epochs=2, width=8), progress=False, log=lambda _: None)
    model.eval()
    example = torch.from_numpy(ds.load(np.arange(2)))
    signature = infer_signature(example.numpy(), model(example).detach().numpy())
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_name="compose-smoke-cnn"):
        info = mlflow.pytorch.log_model(model, name="cnn", registered_model_name=MODEL, serialization_format="pt2",
                                        input_example=example.numpy(), signature=signature)
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    contract = {"figan.dataset": data["name"], "figan.dataset_md5": data["md5"], "figan.task": spec.task,
                "figan.target": spec.target if isinstance(spec.target, str) else json.dumps(spec.target),
                "figan.input_shape": json.dumps(list(spec.input_shape))}
    if spec.class_names:
        contract["figan.class_names"] = json.dumps(spec.class_names)
    for key, value in contract.items():
        client.set_model_version_tag(MODEL, version, key, value)
    client.set_model_version_tag(MODEL, version, "figan.explain", "true")      # opt in last: the contract is set
    return version


def trigger_of(stack: Stack, version: str) -> str:
    """What submitted the explanation's first flow run, from the worker's log (`<model>/<version>: flow run <name>
    (attempt 1) for <reason> (…)`)."""
    found = re.findall(rf"{re.escape(MODEL)}/{version}: flow run \S+ \(attempt 1\) for ([^(\"]+) \(",
                       stack.logs("worker", 2000))
    if not found:
        raise SmokeError(f"the worker's log does not say what queued {MODEL}/{version}")
    return found[0].strip()


def wait_explained(run: Run, stack: Stack, tracking_uri: str, version: str, timeout: float,
                   restart_worker: bool) -> dict:
    """Poll the version's figan.status until done (printing each change); optionally restart the prefect-worker
    container once the GAN's first checkpoint is in the volume (a crash counted on the version is waited through:
    the worker submits the next attempt)."""
    from mlflow import MlflowClient
    sys.path.insert(0, str(ROOT))
    from models import layout
    client = MlflowClient(tracking_uri)
    t0, seen, restarted = time.monotonic(), None, None
    while True:
        tags = client.get_model_version(MODEL, version).tags or {}
        status = tags.get("figan.status")
        if status != seen:
            print(f"           figan.status={status} after {time.monotonic() - t0:.1f} s", flush=True)
            seen = status
        if status == "done":
            return {"tags": tags, "restarted_at": restarted, "took": time.monotonic() - t0}
        if status == "failed" and not (restarted and tags.get("figan.error_kind") == "crash"):
            raise SmokeError(f"explanation failed: {tags.get('figan.error')}\n{explain_logs(stack)}")
        if restart_worker and restarted is None and status == "running" and tags.get("figan.key"):
            ckpts = f"/data/work/{MODEL}-v{version}-{tags['figan.key']}/*/{layout.CHECKPOINT}"  # one folder per run
            if run.podman("exec", stack.container("prefect-worker"), "sh", "-c", f"ls {ckpts}",
                          check=False).returncode == 0:
                restarted = round(time.monotonic() - t0, 1)
                with run.step("restart prefect-worker mid-explanation"):
                    run.podman("restart", stack.container("prefect-worker"), timeout=120)
                    stack.wait_healthy("prefect-worker", 180)
        if time.monotonic() - t0 > timeout:
            raise SmokeError(f"not done within {timeout:g} s (figan.status={status})\n{explain_logs(stack)}")
        time.sleep(3)


def explain_logs(stack: Stack) -> str:
    """The tails of the two containers an explanation passes through: who submitted it, and its flow run."""
    return f"worker:\n{stack.logs('worker', 40)}\nprefect-worker:\n{stack.logs('prefect-worker', 60)}"


def check_resumed(tracking_uri: str, run_id: str, work: Path) -> int:
    import mlflow
    sys.path.insert(0, str(ROOT))
    from models import layout
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=layout.METRICS,
                                               dst_path=str(work / "metrics"), tracking_uri=tracking_uri)
    step = int(json.loads(Path(path).read_text())["training"].get("resumed_from_step") or 0)
    if step <= 0:
        raise SmokeError("the prefect-worker was restarted mid-training but the explanation did not resume from its "
                         "checkpoint (metrics.json training.resumed_from_step is 0)")
    return step


def fetch_gif(service_url: str, api_key: str, version: str, out: Path, timeout: float) -> int:
    url = f"{service_url}/v1/models/{MODEL}/versions/{version}/components/1/sequence.gif"
    deadline = time.monotonic() + timeout
    while True:
        code, body = _http(url, {"X-API-Key": api_key}, timeout=60)
        if code == 200 and body[:6] in (b"GIF87a", b"GIF89a"):
            out.write_bytes(body)
            return len(body)
        if time.monotonic() > deadline:
            raise SmokeError(f"GET {url} → {code}: {body[:300]!r}")
        time.sleep(2)                      # the service's listing refreshes every few seconds


def results_document(facts: dict, a: argparse.Namespace) -> dict:
    """benchmarks/results/compose_smoke[_restart].json: provenance (machine, load average, date), the run's configuration,
    the headline figures, and every step's time."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.results_file import provenance

    builds = {k.removeprefix("image "): v for k, v in TIMES.items()            # the images this run built
              if k.startswith("image ") and not k.endswith("(present)")}
    figures = {**{f"build {image} s": s for image, s in builds.items()},
               "start-up to healthy s": facts["start-up to healthy s"],
               "registration → done s": facts["registration → done s"],
               "gif s": facts["gif s"], "gif bytes": facts["gif bytes"],
               "down -v s": TIMES.get("down -v"),
               "peak RSS MiB (sum of containers)": facts["peak RSS MiB (sum of containers)"]}
    if "resumed from step" in facts:
        figures["resumed from step"] = facts["resumed from step"]
    return {**provenance(),
            "config": {"engine": "rootful podman (runc, cgroupfs, vfs) + podman-compose",
                       "compose files": [str(f.relative_to(ROOT)) for f in COMPOSE_FILES],
                       "phantom": a.phantom, "explain config": EXPLAIN_CONFIGS[a.restart_worker],
                       "restart worker": a.restart_worker},
            "figures": figures,
            "explanation verdict": facts.get("verdict tag"), "queued by": facts.get("queued by"),
            "peak RSS MiB by service": facts["peak RSS MiB by service"], "image sizes": facts["image sizes"],
            "step times s": facts["step times s"]}


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/figan-compose-smoke"),
                   help="logs, the generated env file (0600), podman's configuration, the fetched GIF")
    p.add_argument("--timeout", type=float, default=7200, help="overall limit in seconds (image builds included)")
    p.add_argument("--build-timeout", type=float, default=3600, help="per image")
    p.add_argument("--step-timeout", type=float, default=900,
                   help="per start-up level (with vfs each container copies its image), data step, GIF fetch")
    p.add_argument("--explain-timeout", type=float, default=1800)
    p.add_argument("--down-timeout", type=float, default=1800, help="down -v (vfs deletes a full copy per container)")
    p.add_argument("--rebuild", action="store_true", help="build every image even if present")
    p.add_argument("--restart-worker", action="store_true",
                   help="restart the prefect-worker container mid-explanation (pixel cGAN config) and check the "
                        "next attempt resumed")
    p.add_argument("--keep", action="store_true", help="leave the stack running (stop it with down -v yourself)")
    p.add_argument("--podman-compose", help="podman-compose executable (default: PATH, else installed pinned)")
    p.add_argument("--phantom", default="160x32", help="N x size of the demo phantom (default 160x32)")
    a = p.parse_args(argv)
    n, size = (int(v) for v in a.phantom.split("x"))

    if shutil.which("podman") is None:
        print("compose smoke: FAIL — podman is not installed (apt-get install podman runc)", file=sys.stderr)
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    run = Run(a.work, podman_config(a.work))

    def interrupted(signum, frame):
        raise Deadline(f"signal {signal.Signals(signum).name}" if signum != signal.SIGALRM
                       else f"overall timeout of {a.timeout:g} s")
    for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    signal.alarm(int(a.timeout))

    sampler = RssSampler(run)
    stack = Stack(run)
    verdict, facts, started = "FAIL", {}, False
    try:
        env_file, env = write_env(a.work, a.restart_worker)
        run.compose = [podman_compose_bin(a.work, a.podman_compose), "-p", PROJECT,
                       *(x for f in COMPOSE_FILES for x in ("-f", str(f))), "--env-file", str(env_file)]
        facts["image sizes"] = build_images(run, a.rebuild, a.build_timeout)
        stack.down(a.down_timeout)                                         # a previous run's leftovers
        started = True
        sampler.start()
        t_up = time.monotonic()
        start_stack(run, stack, a.step_timeout)
        facts["start-up to healthy s"] = round(time.monotonic() - t_up, 1)
        with run.step("guard: a CHANGE-ME secret refused by name"):
            check_guard(run, stack)
        tracking = f"http://127.0.0.1:{env['FIGAN_MLFLOW_PORT']}"
        with run.step("data: phantom versioned into s3://figan/dvc"):
            data = version_data(stack, n, size)
            print(f"           dataset {data['name']} md5 {data['md5']}")
        with run.step("register from the host (plain MLflow client)"):
            version = register_from_host(run, stack, tracking, data)
            print(f"           {MODEL} version {version}")
        with run.step("registration → figan.status=done"):
            done = wait_explained(run, stack, tracking, version, a.explain_timeout, a.restart_worker)
            facts["registration → done s"] = round(done["took"], 1)
            facts["verdict tag"] = done["tags"].get("figan.verdict")
            facts["queued by"] = trigger_of(stack, version)
            if not facts["queued by"].startswith("webhook"):
                raise SmokeError(f"{MODEL}/{version} was queued by the {facts['queued by']}, not by MLflow's "
                                 f"webhook: MLflow could not reach the worker's receiver (FIGAN_RECEIVER_URL)")
        if a.restart_worker:
            facts["resumed from step"] = check_resumed(tracking, done["tags"]["figan.run_id"], a.work)
        with run.step("gif from the service"):
            url = f"http://127.0.0.1:{env['FIGAN_SERVICE_PORT']}"
            t = time.monotonic()
            facts["gif bytes"] = fetch_gif(url, env["FIGAN_SERVICE_API_KEY"], version, a.work / "c1.gif",
                                           a.step_timeout)
            facts["gif s"] = round(time.monotonic() - t, 1)
        sampler.sample()
        verdict = "PASS"
    except (Exception, Deadline, KeyboardInterrupt) as e:       # noqa: BLE001 — every failure gets its verdict
        facts["error"] = f"{type(e).__name__}: {e}"
        print(f"\nFAILED: {e}", file=sys.stderr)
    finally:
        signal.alarm(0)
        sampler.stop()
        if started and not a.keep:
            try:
                with run.step("down -v"):
                    stack.down(a.down_timeout)
            except BaseException as e:                # noqa: BLE001 — say so, keep the verdict line
                facts["down error"] = f"{type(e).__name__}: {e}"
                verdict = "FAIL"
    facts["peak RSS MiB (sum of containers)"] = round(sampler.peak_total / 2**20)
    facts["peak RSS MiB by service"] = {k: round(v / 2**20) for k, v in sorted(sampler.peak_by.items())}
    facts["step times s"] = TIMES
    (a.work / "result.json").write_text(json.dumps(facts, indent=2))
    print(json.dumps(facts, indent=2))
    if verdict == "PASS":
        from benchmarks.results_file import write_results
        write_results(RESULTS[a.restart_worker], results_document(facts, a))
    head = (f"healthy in {facts.get('start-up to healthy s', '-')} s, registration → done in "
            f"{facts.get('registration → done s', '-')} s, GIF {facts.get('gif bytes', '-')} B, peak RSS "
            f"{facts['peak RSS MiB (sum of containers)']} MiB")
    print(f"compose smoke: {verdict} — {head}" + (f" — {facts['error'].splitlines()[0]}" if "error" in facts else ""))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
