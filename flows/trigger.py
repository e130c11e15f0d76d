"""Every registration explained, none lost: the webhook receiver, the reconciler and the worker (`figan worker`).

One worker process holds three parts that all feed one queue of *candidates* (model name, version):

* **Receiver** (HTTP, loopback by default): MLflow's ``model_version.created`` webhook, and
  ``model_version_tag.set`` for the contract tags (so fixing a tag or opting in re-triggers). A delivery counts only
  when MLflow's signature checks out — ``X-MLflow-Signature: v1,<base64 HMAC-SHA256 of
  "delivery_id.timestamp.payload">`` with the shared secret — its ``X-MLflow-Timestamp`` is within
  ``window`` seconds of now (stale otherwise) and its ``X-MLflow-Delivery-Id`` was not seen before (replay; seen
  ids are kept in SQLite so a restart does not forget them). Bodies are capped at 64 KiB and must be JSON
  objects. ``POST /reconcile`` (with the secret) asks for a reconcile pass now (e.g. after a new data version).
* **Reconciler** (level-triggered): every ``reconcile_seconds`` it lists every opted-in version (tag
  ``figan.explain=true`` on the version or its model, or a model on the allowlist) and queues them all. It
  recovers whatever a dead receiver, a crashed worker or a restarted server missed, and notices a new data version
  or explainer config (they change a version's key).
* **Dispatcher**: for each candidate, :func:`decide` compares the version's current key (model, version, dataset
  md5, config hash) with its status tags; what needs work runs as a separate ``figan explain-version`` process
  (a crash there cannot take the worker down, and memory goes back when it ends), at most ``max_concurrent``
  at a time (default 1 on a laptop), logs under ``<home>/logs/``. With ``FIGAN_EXPLAIN_DEPLOYMENT`` set (a team's
  Prefect server and work pool, e.g. one Kubernetes Job per explanation) it submits a run of that deployment
  instead and waits for its end.

**One run per key.** The worker never queues a version twice, and the flow itself takes the version's run lease
(an owner + expiry tag in MLflow, see :func:`flows.registry.acquire_lease`) before working, so a webhook, the
reconciler and a person running ``figan explain-version`` at the same moment give exactly one run, across
processes and machines and across restarts. Why a lease in MLflow rather than Prefect concurrency limits: the
embedded default has no Prefect server (each process runs its own ephemeral API), and the registry is the one
store every trigger already shares; the lease is visible to auditors on the version and expires when its holder
dies (at once on the holder's host, where its pid is gone).

**Failures** (kinds: :mod:`flows.failures`). A transient failure (I/O, connection, MLflow 5xx) of a key is retried
after ``retry_backoff`` × 2^(attempts−1) seconds, up to ``max_attempts``, then left failed with its message; a
contract error is not retried until the version's contract tags change; a programming error (TypeError, KeyError,
...: the same code on the same inputs fails the same way) not until the code, the explain config or the contract
tags change.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from . import registry as R
from .failures import PROGRAM, program_fingerprint
from .settings import Settings

log = logging.getLogger("figan.worker")

SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
WEBHOOK_NAME = "figan-explain"
WEBHOOK_PATH = "/webhooks/mlflow"
MAX_WEBHOOK_BYTES = 64 * 1024       # an MLflow registry event is well under 2 KiB
MAX_PENDING = 10_000                # distinct versions waiting for a decision; beyond, the reconciler catches up
EVENTS = ("model_version.created", "model_version_tag.set")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# --------------------------------------------------------------------------------------------- signatures

class Rejected(Exception):
    """A webhook delivery that must not trigger anything; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def sign(secret: str, delivery_id: str, timestamp: str, payload: str) -> str:
    """MLflow's webhook signature (``mlflow.webhooks.delivery``): v1,<base64 HMAC-SHA256>."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{payload}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Verifier:
    """Checks signature, freshness and uniqueness of deliveries; seen delivery ids persist in SQLite."""

    def __init__(self, secret: str, db: Path, window: float = 300.0):
        self.secret, self.window = secret, window
        db.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, seen REAL NOT NULL)")
        self._lock = threading.Lock()

    def verify(self, headers, body: bytes, now: float | None = None) -> dict:
        """The parsed payload of a genuine, fresh, first-seen delivery; :class:`Rejected` otherwise."""
        now = time.time() if now is None else now
        sig, ts, delivery = (headers.get(h) for h in (SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER))
        missing = [h for h, v in ((SIGNATURE_HEADER, sig), (TIMESTAMP_HEADER, ts), (DELIVERY_HEADER, delivery))
                   if not v]
        if missing:
            raise Rejected(401, f"unsigned delivery: missing header(s) {', '.join(missing)}")
        try:
            payload_text = body.decode()
        except UnicodeDecodeError:
            raise Rejected(400, "payload is not UTF-8") from None
        if not hmac.compare_digest(sig.encode(), sign(self.secret, delivery, ts, payload_text).encode()):
            raise Rejected(401, f"bad {SIGNATURE_HEADER}: not signed with this receiver's secret")
        try:
            age = now - int(ts)
        except ValueError:
            raise Rejected(400, f"{TIMESTAMP_HEADER} must be unix seconds, got {ts!r}") from None
        if abs(age) > self.window:
            raise Rejected(401, f"stale delivery: {TIMESTAMP_HEADER} is {age:.0f} s from now (window "
                                f"±{self.window:g} s)")
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE seen < ?", (now - 2 * self.window,))
            try:
                self._db.execute("INSERT INTO deliveries VALUES (?, ?)", (delivery, now))
            except sqlite3.IntegrityError:
                raise Rejected(409, f"replayed delivery {delivery}") from None
        try:
            event = json.loads(payload_text)
        except json.JSONDecodeError:
            raise Rejected(400, "payload is not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("data", {}), dict):
            raise Rejected(400, "payload must be a JSON object whose 'data' is an object")
        return event


# --------------------------------------------------------------------------------------------- decisions

@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str


def decide(status: dict, key: str | None, error: Exception | None, fingerprint: str | None, max_attempts: int,
           now: float | None = None, program_hash: str | None = None) -> Decision:
    """Whether a version needs an explain run now, from its status tags and its current key.

    ``key`` is None when the version cannot be resolved (``error`` says why; ``fingerprint`` is its contract's hash
    then). ``program_hash`` is :func:`flows.failures.program_fingerprint` as things are now (needed when the
    version failed with a programming error). Pure, so the reconciler's policy is tested without any server."""
    now = time.time() if now is None else now
    try:
        lease = R.Lease(**status["lease"]) if status.get("lease") else None
    except TypeError:
        lease = None
    if lease is not None and lease.live(now):
        return Decision(False, f"being explained by {lease.owner}")
    failed = status.get("status") == "failed"
    if error is not None and isinstance(error, R.ContractError):
        if failed and status.get("error_kind") == "contract" and status.get("contract_hash") == fingerprint:
            return Decision(False, "contract error; waiting for the contract tags to change")
        return Decision(True, f"contract error to record: {error}")
    if status.get("status") == "done" and status.get("key") == key:
        return Decision(False, "done")
    if failed and status.get("key") == key and status.get("error_kind") == PROGRAM:
        if status.get("program_hash") == program_hash:
            return Decision(False, "programming error; waiting for the code, the explain config or the contract "
                                   "tags to change")
        return Decision(True, "programming error, and the code, the explain config or the contract tags changed")
    if failed and status.get("key") == key:
        if status.get("attempts", 0) >= max_attempts:
            return Decision(False, f"failed {status['attempts']} times; left failed")
        if (status.get("retry_after") or 0) > now:
            return Decision(False, f"failed; retry in {status['retry_after'] - now:.0f} s")
        return Decision(True, f"retry {status.get('attempts', 0) + 1} of {max_attempts}")
    if status.get("status") == "running" and status.get("key") == key:
        return Decision(True, "running without a live lease (its worker died): resume")
    return Decision(True, "new key" if status.get("key") not in (None, key) else "not explained yet")


# --------------------------------------------------------------------------------------------- the worker

class Worker:
    """Candidates in, explain processes out; see the module docstring."""

    def __init__(self, settings: Settings, tracking_uri: str):
        self.settings, self.tracking_uri = settings, tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.candidates: queue.Queue[tuple[str, str, str]] = queue.Queue(MAX_PENDING)
        self.pending: set[tuple[str, str]] = set()       # queued, not yet decided: a version is queued once
        self.dropped = 0
        self.pool = ThreadPoolExecutor(settings.max_concurrent, thread_name_prefix="explain")
        self.inflight: dict[tuple[str, str], str] = {}
        self.history: list[dict] = []
        self.last_reconcile: float | None = None
        self._poke = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()

    # -- inputs
    def submit(self, name: str, version: str, reason: str) -> bool:
        """Queue a version for a decision unless it is already waiting; False when it was not queued (already
        pending, or the queue is full: the next reconcile pass offers it again)."""
        key = (name, str(version))
        with self._lock:
            if key in self.pending:
                return False
            try:
                self.candidates.put_nowait((name, str(version), reason))
            except queue.Full:
                self.dropped += 1
                return False
            self.pending.add(key)
        return True

    def opted_in(self, row: dict) -> bool:
        allow = self.settings.model_allowlist
        return row["explain"] or (bool(allow) and row["name"] in allow)

    def reconcile_once(self) -> int:
        """Queue every opted-in version; returns how many."""
        rows = [r for r in R.list_versions(self.client) if self.opted_in(r)]
        for r in rows:
            self.submit(r["name"], r["version"], "reconciler")
        self.last_reconcile = time.time()
        return len(rows)

    def reconcile_now(self) -> None:
        self._poke.set()

    # -- loops
    def start(self) -> "Worker":
        for target, name in ((self._dispatch_loop, "dispatcher"), (self._reconcile_loop, "reconciler")):
            threading.Thread(target=target, name=name, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for proc in self._procs:        # their leases end with them; a restarted worker resumes the work
                proc.terminate()

    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.reconcile_once()
                log.debug("reconcile: %d opted-in versions queued", n)
            except Exception as e:  # noqa: BLE001 — the MLflow server may be restarting; next period retries
                log.warning("reconcile failed: %s: %s", type(e).__name__, e)
            self._poke.wait(self.settings.reconcile_seconds)
            self._poke.clear()

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                name, version, reason = self.candidates.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                self.pending.discard((name, version))
                if (name, version) in self.inflight:
                    continue
            try:
                decision = self._decide(name, version)
            except Exception as e:  # noqa: BLE001
                log.warning("%s/%s: cannot decide (%s: %s); the reconciler will retry", name, version,
                            type(e).__name__, e)
                continue
            if not decision.run:
                continue
            with self._lock:
                if (name, version) in self.inflight:
                    continue
                self.inflight[(name, version)] = f"queued ({reason}: {decision.reason})"
            log.info("%s/%s: queued by %s (%s)", name, version, reason, decision.reason)
            self.pool.submit(self._run, name, version, reason)

    def _decide(self, name: str, version: str) -> Decision:
        from .explain import resolve_job
        try:
            status = R.version_row(self.client, name, version)      # two calls, whatever the model's size
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return Decision(False, "not registered")
        if not self.opted_in(status):
            return Decision(False, "not opted in")
        try:
            job, error, fingerprint = resolve_job(self.client, self.settings, name, version), None, None
            key = job.key
        except R.ContractError as e:
            key, error, fingerprint = None, e, R.contract_fingerprint(self.client, name, version)
        except Exception as e:  # noqa: BLE001 — e.g. no data version yet: the flow records it, with backoff
            key, error, fingerprint = None, e, None
        program_hash = (program_fingerprint(self.client, self.settings, name, version)
                        if status.get("error_kind") == PROGRAM else None)
        return decide(status, key, error, fingerprint, self.settings.max_attempts, program_hash=program_hash)

    def _run(self, name: str, version: str, reason: str) -> None:
        with self._lock:
            self.inflight[(name, version)] = f"running ({reason})"
        t0 = time.time()
        try:
            if self.settings.explain_deployment:
                outcome = self._run_deployment(name, version)
            else:
                outcome = self._run_process(name, version, reason)
            log.info("%s/%s: %s after %.0f s", name, version, outcome, time.time() - t0)
            self.history.append({"name": name, "version": version, "reason": reason, "outcome": outcome,
                                 "seconds": round(time.time() - t0, 1)})
        except Exception as e:  # noqa: BLE001 — the flow records its own failures; this is the launcher's
            log.warning("%s/%s: could not run the explain flow: %s: %s", name, version, type(e).__name__, e)
        finally:
            with self._lock:
                self.inflight.pop((name, version), None)
            self.submit(name, version, "after run")      # re-decide: e.g. a retry or a key that changed meanwhile

    def _run_process(self, name: str, version: str, reason: str) -> str:
        """The flow in a local ``figan explain-version`` process (the embedded default), output to its log."""
        path = self.settings.logs / f"explain-{_SAFE.sub('_', name)}-v{version}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "flows.cli", "explain-version", "--name", name, "--version", version]
        with open(path, "ab") as out:
            out.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {reason}: {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_child_env(self.tracking_uri))
            with self._lock:
                self._procs.add(proc)
            code = proc.wait()
            with self._lock:
                self._procs.discard(proc)
        return f"explain process exited {code} (log {path})"

    def _run_deployment(self, name: str, version: str) -> str:
        """The flow as a run of a Prefect deployment (a team's work pool, e.g. one Kubernetes Job per run);
        waits for its final state, so ``max_concurrent`` still bounds what this worker has in flight."""
        from prefect.deployments import run_deployment
        run = run_deployment(self.settings.explain_deployment, parameters={"name": name, "version": version},
                             timeout=None)
        return f"flow run {run.id} of {self.settings.explain_deployment}: {run.state and run.state.name}"

    def health(self) -> dict:
        with self._lock:
            inflight = {f"{n}/{v}": s for (n, v), s in self.inflight.items()}
        return {"ok": True, "inflight": inflight, "queued_candidates": self.candidates.qsize(),
                "max_concurrent": self.settings.max_concurrent, "last_reconcile": self.last_reconcile,
                "pending": len(self.pending), "dropped": self.dropped,
                "reconcile_seconds": self.settings.reconcile_seconds, "runs": self.history[-20:]}


def _child_env(tracking_uri: str) -> dict[str, str]:
    # without a Prefect server each explain process starts a temporary one; give it time on a busy laptop
    return {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **os.environ,
            "FIGAN_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------------------------- receiver app

def create_app(worker: Worker, verifier: Verifier | None, secret: str):
    """The worker's HTTP app: GET /health, POST /reconcile (``Authorization: Bearer <secret>``) and, with a
    verifier, the receiver POST /webhooks/mlflow. Bodies over :data:`MAX_WEBHOOK_BYTES` are refused before they
    are read (Content-Length) or as soon as the stream passes it."""
    app = FastAPI(title="FIGAN webhook receiver", docs_url=None, redoc_url=None)

    async def webhook(request: Request):
        try:
            body = await _capped_body(request, MAX_WEBHOOK_BYTES)
            event = verifier.verify(request.headers, body)
        except Rejected as r:
            log.warning("webhook rejected (%d): %s", r.status, r.reason)
            return JSONResponse({"accepted": False, "error": r.reason}, status_code=r.status)
        kind = f"{event.get('entity')}.{event.get('action')}"
        data = event.get("data") or {}
        relevant = kind == "model_version.created" or (
            kind == "model_version_tag.set" and data.get("key") in R.CONTRACT_TAGS)
        if not relevant or not data.get("name") or not data.get("version"):
            return JSONResponse({"accepted": False, "ignored": kind}, status_code=200)
        queued = worker.submit(str(data["name"]), str(data["version"]), f"webhook {kind}")
        return JSONResponse({"accepted": True, "name": data["name"], "version": str(data["version"]),
                             "queued": queued}, status_code=202)

    if verifier is not None:
        app.add_api_route(WEBHOOK_PATH, webhook, methods=["POST"])

    @app.post("/reconcile")
    async def reconcile(request: Request):
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), secret.encode()):
            return JSONResponse({"accepted": False, "error": "send the worker's secret as Authorization: Bearer "
                                                             "<secret> (the file webhook.secret in FIGAN_HOME)"},
                                status_code=401)
        worker.reconcile_now()
        return JSONResponse({"accepted": True}, status_code=202)

    @app.get("/health")
    async def health():
        return worker.health()

    return app


async def _capped_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: by its Content-Length before reading a byte, or
    while streaming when it has none (chunked) or understates it."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise Rejected(413, f"body of {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------- setup

def webhook_secret(settings: Settings) -> str:
    """The shared secret of the MLflow → receiver webhook, generated once per home (mode 0600)."""
    path = settings.home / "webhook.secret"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def subscribe(client: MlflowClient, url: str, secret: str) -> str:
    """Create (or point at ``url`` with ``secret``) the platform's registry webhook; returns its id."""
    for hook in client.list_webhooks():
        if hook.name == WEBHOOK_NAME:
            client.update_webhook(hook.webhook_id, url=url, events=list(EVENTS), secret=secret, status="ACTIVE")
            return hook.webhook_id
    return client.create_webhook(name=WEBHOOK_NAME, url=url, events=list(EVENTS), secret=secret,
                                 description="FIGAN: explain every registered CNN version").webhook_id


def log_to_stderr() -> logging.Handler:
    """Send the worker's own lines (INFO and up, one JSON object each: what queued a version, how each run ended)
    to stderr, a container's log. Its own handler on the ``figan.worker`` logger: importing Prefect has already
    configured the root logger (its console handler, WARNING), which makes ``logging.basicConfig`` a no-op."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('{"t": "%(asctime)s", "level": "%(levelname)s", "part": "%(threadName)s", '
                                           '"msg": "%(message)s"}'))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def serve(settings: Settings, tracking_uri: str, receiver: bool = True) -> None:
    """Run the worker (dispatcher + reconciler + its HTTP app) until SIGTERM/SIGINT; with ``receiver`` the webhook
    route is served and the MLflow webhook (re)subscribed to it first."""
    import uvicorn
    log_to_stderr()
    worker = Worker(settings, tracking_uri).start()
    try:
        verifier, secret = None, webhook_secret(settings)
        if receiver:
            subscribe(worker.client, settings.receiver_url + WEBHOOK_PATH, secret)
            verifier = Verifier(secret, settings.home / "receiver.db")
        app = create_app(worker, verifier, secret)
        uvicorn.run(app, host=settings.receiver_host, port=settings.receiver_port, log_level="warning")
    finally:
        worker.stop()
