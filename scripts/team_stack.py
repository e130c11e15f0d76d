"""The FIGAN "team" configuration on one machine, without containers: the same parts as deploy/compose.yaml.

    Postgres      MLflow backend store (Debian's PostgreSQL: a throwaway cluster, loopback, trust auth)
    S3 server     moto's S3 server (`moto_server`, loopback): MLflow artifacts under s3://BUCKET/mlflow and
                  the DVC remote under s3://BUCKET/dvc
    MLflow        `mlflow server` on Postgres (+psycopg2) with --artifacts-destination on S3, webhooks allowed
                  to local receivers (the settings flows/mlflow_server.py gives the embedded server)
    Prefect       optional (--prefect): `prefect server start` on the same Postgres (+asyncpg)

Usage (prints the environment a client exports to use the stack, then the stack keeps running):

    .venv/bin/python scripts/team_stack.py up   [--dir runs/team] [--prefect]
    eval "$(.venv/bin/python scripts/team_stack.py env --dir runs/team)"
    .venv/bin/figan version-data --src data/phantom   # → DVC objects in s3://figan/dvc
    .venv/bin/python scripts/team_stack.py down [--dir runs/team]

Tests use :func:`start_stack` / :meth:`TeamStack.stop` (tests/test_team_config.py). Postgres refuses to run as
root: as root the cluster runs as the ``postgres`` system user (Debian's package creates it) in a data folder
under /tmp owned by that user. Every process started here is stopped by ``stop`` (pg_ctl stop; SIGTERM then
SIGKILL to the other process groups) and the Postgres data folder is removed.
"""
from __future__ import annotations

import argparse
import base64
import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUCKET = "figan"
ACCESS_KEY, SECRET_KEY, REGION = "figan-local", "figan-local-secret", "us-east-1"
PG_USER = "figan"
STATE_FILE = "stack.json"

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: never via a proxy


class StackError(RuntimeError):
    """A part of the team stack could not be started; the message carries its log tail."""


# --------------------------------------------------------------------------------------------- helpers

def pg_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL bin folder (/usr/lib/postgresql/N/bin), $FIGAN_PG_BIN, or `initdb` on PATH."""
    if os.environ.get("FIGAN_PG_BIN"):
        return Path(os.environ["FIGAN_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.is_file() else name


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def _wait_http(url: str, proc: subprocess.Popen | None, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; log tail ({log}):\n{_tail(log)}")
        try:
            with _DIRECT.open(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer {url} within {timeout:g} s; log tail ({log}):\n{_tail(log)}")
        time.sleep(0.3)


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n".encode())
        f.flush()
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_group(pid: int, timeout: float = 10) -> None:
    """SIGTERM the process group ``pid`` (started with start_new_session), SIGKILL it after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)             # reap the leader when it is our child
            except ChildProcessError:
                pass
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

# --------------------------------------------------------------------------------------------- the stack

@dataclass
class TeamStack:
    """Where the parts run and how to stop them (also written to <dir>/stack.json)."""
    dir: str
    pg_bin: str
    pg_data: str
    pg_port: int
    pg_as: str | None            # the user Postgres runs as (None: the current user)
    s3_port: int
    s3_pid: int
    mlflow_port: int
    mlflow_pid: int
    prefect_port: int | None = None
    prefect_pid: int | None = None
    bucket: str = BUCKET
    timings: dict = field(default_factory=dict)

    # -- addresses
    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def db_uri(self, db: str = "mlflow", driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{PG_USER}@127.0.0.1:{self.pg_port}/{db}"

    @property
    def dvc_remote(self) -> str:
        return f"s3://{self.bucket}/dvc"

    def client_env(self) -> dict[str, str]:
        """What a FIGAN client (CLI, worker, tests) sets to use this stack. DVC's S3 remote (s3fs/botocore)
        reads the endpoint from AWS_ENDPOINT_URL; MLflow clients never touch S3 (artifacts go through the
        server as mlflow-artifacts:)."""
        env = {"FIGAN_TRACKING_URI": self.tracking_uri, "FIGAN_DVC_REMOTE": self.dvc_remote,
               "AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}
        if self.prefect_port:
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{self.prefect_port}/api"
        return env

    def s3(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def psql(self, sql: str, db: str = "mlflow") -> list[tuple]:
        import psycopg2
        with psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname=db) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()

    # -- lifecycle
    def save(self) -> None:
        Path(self.dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    def stop(self) -> None:
        """Stop every part (reverse order) and remove the Postgres data folder."""
        for pid in (self.prefect_pid, self.mlflow_pid, self.s3_pid):
            if pid:
                _kill_group(pid)
        stop_postgres(Path(self.pg_bin), self.pg_data, self.pg_as)
        Path(self.dir, STATE_FILE).unlink(missing_ok=True)


def _pg_user() -> str | None:
    """Postgres will not run as root: then run it as the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root and there is no `postgres` user to run PostgreSQL as "
                         "(apt-get install postgresql creates it)") from None
    return "postgres"


def _run_pg(stack_or_bin, args: list[str], check: bool = True, as_user: str | None = None, **kw):
    pg_bin = stack_or_bin.pg_bin if isinstance(stack_or_bin, TeamStack) else stack_or_bin
    as_user = stack_or_bin.pg_as if isinstance(stack_or_bin, TeamStack) else as_user
    cmd = [str(Path(pg_bin) / args[0]), *args[1:]]
    if as_user:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    if check and res.returncode != 0:
        raise StackError(f"{shlex.join(cmd)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res


def start_postgres(pg_bin: Path, databases: list[str], host_auth: str = "trust") -> tuple[str, int, str | None]:
    """A throwaway cluster on 127.0.0.1 (superuser ``PG_USER``, trusted on its Unix socket, the folder above the
    returned data folder; ``host_auth`` for TCP, e.g. ``scram-sha-256`` to check passwords) with ``databases``
    created; returns (data folder, port, the user it runs as). Stop it with :func:`stop_postgres`."""
    as_user = _pg_user()
    data = Path(tempfile.mkdtemp(prefix="figan-pg-"))       # /tmp/..., not under a 0700 pytest folder
    if as_user:
        pw = pwd.getpwnam(as_user)
        os.chown(data, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    try:
        _run_pg(pg_bin, ["initdb", "-D", str(data / "db"), "-U", PG_USER, "--auth-local=trust",
                         f"--auth-host={host_auth}", "-E", "UTF8",
                         "--locale=C", "--no-sync"], as_user=as_user)
        opts = f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off -c full_page_writes=off -c max_connections=100"
        _run_pg(pg_bin, ["pg_ctl", "-D", str(data / "db"), "-l", str(data / "postgres.log"), "-o", opts, "-w",
                         "-t", "60", "start"], as_user=as_user)
        for db in databases:
            _run_pg(pg_bin, ["createdb", "-h", str(data), "-p", str(port), "-U", PG_USER, db], as_user=as_user)
    except BaseException:
        if (data / "db" / "postmaster.pid").exists():
            _run_pg(pg_bin, ["pg_ctl", "-D", str(data / "db"), "-m", "immediate", "-w", "stop"], check=False,
                    as_user=as_user)
        shutil.rmtree(data, ignore_errors=True)
        raise
    return str(data / "db"), port, as_user


def stop_postgres(pg_bin: Path, pg_data: str, as_user: str | None) -> None:
    """Stop a cluster of :func:`start_postgres` and remove its folder."""
    if Path(pg_data, "postmaster.pid").exists():
        _run_pg(pg_bin, ["pg_ctl", "-D", pg_data, "-m", "fast", "-w", "-t", "30", "stop"], check=False,
                as_user=as_user)
    root = Path(pg_data).parent                            # the mkdtemp folder holding db/, log and socket
    shutil.rmtree(root if root.name.startswith("figan-pg-") else pg_data, ignore_errors=True)


def _start_s3(home: Path) -> tuple[int, int]:
    port = _free_port()
    proc = _spawn([_venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], home / "s3.log",
                  dict(os.environ), home)
    _wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, home / "s3.log", 60, "moto S3 server")
    return port, proc.pid


def mlflow_server_env(s3_endpoint: str, webhook_key: str) -> dict[str, str]:
    """The MLflow server's environment: S3 artifacts, lean process tree, webhooks to local receivers."""
    env = dict(os.environ)
    env.update({
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": webhook_key,
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
    })
    return env


def _webhook_key(home: Path) -> str:
    path = home / "webhook.key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n")
    return path.read_text().strip()


def start_stack(home: str | Path, prefect: bool = False, timeout: float = 120) -> TeamStack:
    """Start Postgres, the S3 server (+ bucket), the MLflow server (and Prefect server); stop all on failure."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if (home / STATE_FILE).exists():
        raise StackError(f"{home / STATE_FILE} exists: a stack may be running there; `down` it first")
    pg_bin = pg_bin_dir()
    if pg_bin is None:
        raise StackError("no PostgreSQL binaries (apt-get install postgresql; or set FIGAN_PG_BIN)")
    t = {}
    t0 = time.monotonic()
    pg_data, pg_port, pg_as = start_postgres(pg_bin, ["mlflow", "prefect"] if prefect else ["mlflow"])
    stack = TeamStack(dir=str(home), pg_bin=str(pg_bin), pg_data=pg_data, pg_port=pg_port, pg_as=pg_as,
                      s3_port=0, s3_pid=0, mlflow_port=0, mlflow_pid=0, timings=t)
    t["postgres_s"] = round(time.monotonic() - t0, 1)
    try:
        t0 = time.monotonic()
        stack.s3_port, stack.s3_pid = _start_s3(home)
        stack.s3().create_bucket(Bucket=stack.bucket)
        t["s3_s"] = round(time.monotonic() - t0, 1)
        stack.save()

        t0 = time.monotonic()
        stack.mlflow_port = _free_port()
        cmd = [_venv_bin("mlflow"), "server", "--backend-store-uri", stack.db_uri("mlflow"),
               "--artifacts-destination", f"s3://{stack.bucket}/mlflow",
               "--host", "127.0.0.1", "--port", str(stack.mlflow_port), "--workers", "1"]
        proc = _spawn(cmd, home / "mlflow.log", mlflow_server_env(stack.s3_endpoint, _webhook_key(home)), home)
        stack.mlflow_pid = proc.pid
        stack.save()
        _wait_http(f"{stack.tracking_uri}/health", proc, home / "mlflow.log", timeout, "MLflow server")
        t["mlflow_s"] = round(time.monotonic() - t0, 1)

        if prefect:
            t0 = time.monotonic()
            stack.prefect_port = _free_port()
            env = dict(os.environ, PREFECT_HOME=str(home / "prefect"),
                       PREFECT_API_DATABASE_CONNECTION_URL=stack.db_uri("prefect", "asyncpg"),
                       PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
            proc = _spawn([_venv_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                           str(stack.prefect_port), "--no-services"], home / "prefect.log", env, home)
            stack.prefect_pid = proc.pid
            stack.save()
            _wait_http(f"http://127.0.0.1:{stack.prefect_port}/api/health", proc, home / "prefect.log", timeout,
                       "Prefect server")
            t["prefect_s"] = round(time.monotonic() - t0, 1)
        stack.save()
    except BaseException:
        stack.stop()
        raise
    return stack


def load_stack(home: str | Path) -> TeamStack | None:
    path = Path(home).resolve() / STATE_FILE
    if not path.is_file():
        return None
    return TeamStack(**json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cmd", choices=["up", "down", "env"])
    p.add_argument("--dir", default="runs/team", help="where logs and stack.json go (default runs/team)")
    p.add_argument("--prefect", action="store_true", help="also start a Prefect server on the same Postgres")
    a = p.parse_args(argv)
    if a.cmd == "up":
        stack = start_stack(a.dir, prefect=a.prefect)
        print(f"# team stack up in {stack.timings}; stop with: {sys.argv[0]} down --dir {a.dir}", file=sys.stderr)
        for k, v in stack.client_env().items():
            print(f"export {k}={shlex.quote(v)}")
        return 0
    stack = load_stack(a.dir)
    if stack is None:
        print(f"no team stack recorded in {a.dir}", file=sys.stderr)
        return 1 if a.cmd == "env" else 0
    if a.cmd == "env":
        for k, v in stack.client_env().items():
            print(f"export {k}={shlex.quote(v)}")
    else:
        stack.stop()
        print("team stack stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
