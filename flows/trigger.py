"""Every registration explained, none lost: the webhook receiver, the reconciler and the worker (`figan worker`).

One worker process holds three parts that all feed one queue of *candidates* (model name, version):

* **Receiver** (HTTP, loopback by default): MLflow's ``model_version.created`` webhook, and
  ``model_version_tag.set`` for the contract tags (so fixing a tag or opting in re-triggers). A delivery counts only
  when MLflow's signature checks out — ``X-MLflow-Signature: v1,<base64 HMAC-SHA256 of
  "delivery_id.timestamp.payload">`` with the shared secret — its ``X-MLflow-Timestamp`` is within
  ``window`` seconds of now (stale otherwise) and its ``X-MLflow-Delivery-Id`` was not seen before (replay; seen
  ids are kept in SQLite so a restart does not forget them). Bodies are capped at 64 KiB and must be JSON
  objects. ``POST /reconcile`` (with the secret) asks for a reconcile pass now (e.g. after a new data version).
* **Reconciler** (level-triggered): every ``reconcile_seconds`` it lists every version once, with its tags, and
  queues each opted-in one (tag ``figan.explain=true`` on the version or its model, or a model on the allowlist)
  that is not ``done`` under the key it would get now. It recovers whatever a dead receiver, a crashed worker or a
  restarted server missed, and notices a new data version or explainer config (they change a version's key). A
  pass reads the listing's pages and nothing per settled version (:class:`PassKeys`).
* **Dispatcher**: for each candidate, :func:`decide` compares the version's current key (model, version, CNN
  identity, dataset md5, config hash) with its status tags and with the key's flow runs on Prefect; what needs work
  is submitted as a flow run of the explain deployment (``FIGAN_EXPLAIN_DEPLOYMENT``; the embedded default is
  ``explain-model-version/figan`` on the process work pool that ``figan up`` creates, whose ``prefect worker``
  runs each flow run in its own process, at most ``FIGAN_MAX_CONCURRENT`` at once; a team names its own
  deployment, e.g. on a Kubernetes pool). The dispatcher never runs or waits for an explanation itself.

**Exactly once per key is Prefect's guarantee** (:mod:`flows.runs`): every submission carries the idempotency key
``<key>:<attempt>``, and Prefect's server creates one flow run per idempotency key of a flow, returning that same
run to every later submission. So the webhook, the reconciler and any number of workers submitting the same
attempt at the same moment get one flow run; the flow itself publishes only when no run of its key is published
yet (the publishing gate in :func:`flows.explain.explain_version`).

**Crashes and hangs are counted.** Before deciding, the worker reads the key's flow runs (tag ``figan-key:<key>``)
from Prefect: a run that ended CRASHED (its process killed, out of memory; or its whole worker gone, crashed by
Prefect's automation once its heartbeats stop: :func:`flows.runs.ensure_silent_run_automation`), CANCELLED or in
any final state without publishing, and was not yet counted on the version, is recorded as failed attempt *n*
(its idempotency key's attempt) with the stage and GAN step it had reached (``figan.progress``, written by the
flow); a RUNNING run whose progress is older than ``FIGAN_HANG_SECONDS`` is cancelled through Prefect
(``Cancelling``) and counted the same way. The next attempt, after the backoff, is a new flow run
(``<key>:<n+1>``) that resumes the GAN from the previous run's checkpoint.

**Failures** (kinds: :mod:`flows.failures`). A transient failure (I/O, connection, MLflow 5xx) or a crash of a key
is retried after ``retry_backoff`` × 2^(attempts−1) seconds, up to ``max_attempts``, then left failed with its
message; a contract error is not retried until the version's contract tags change; a programming error
(TypeError, KeyError, ...: the same code on the same inputs fails the same way) not until the code, the explain
config or the contract tags change.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from . import registry as R
from . import runs
from .failures import CRASH, PROGRAM, program_fingerprint
from .settings import Settings

log = logging.getLogger("figan.worker")

SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
WEBHOOK_NAME = "figan-explain"
WEBHOOK_PATH = "/webhooks/mlflow"
MAX_WEBHOOK_BYTES = 64 * 1024       # an MLflow registry event is well under 2 KiB
MAX_PENDING = 10_000                # distinct versions waiting for a decision; beyond, the reconciler catches up
EVENTS = ("model_version.created", "model_version_tag.set")


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
    attempt: int = 0            # with ``run``: the attempt number to submit (part of the idempotency key)
    run_key: str | None = None  # what the flow run is submitted under (:func:`run_key`); set by the worker


def decide(status: dict, key: str | None, error: Exception | None, fingerprint: str | None, max_attempts: int,
           now: float | None = None, program_hash: str | None = None, live_run: str | None = None) -> Decision:
    """Whether a version needs an explain run now, from its status tags, its current key and the key's live flow
    run on Prefect (``live_run`` names it; None when none is scheduled, pending or running).

    ``key`` is None when the version cannot be resolved (``error`` says why; ``fingerprint`` is its contract's hash
    then). ``program_hash`` is :func:`flows.failures.program_fingerprint` as things are now (needed when the
    version failed with a programming error). Pure, so the reconciler's policy is tested without any server."""
    now = time.time() if now is None else now
    if live_run is not None:
        return Decision(False, f"being explained by flow run {live_run}")
    attempt = status.get("attempts", 0) + 1 if status.get("key") == key else 1
    failed = status.get("status") == "failed"
    if error is not None and isinstance(error, R.ContractError):
        if failed and status.get("error_kind") == "contract" and status.get("contract_hash") == fingerprint:
            return Decision(False, "contract error; waiting for the contract tags to change")
        return Decision(True, f"contract error to record: {error}", attempt)
    if status.get("status") == "done" and status.get("key") == key:
        return Decision(False, "done")
    if failed and status.get("key") == key and status.get("error_kind") == PROGRAM:
        if status.get("program_hash") == program_hash:
            return Decision(False, "programming error; waiting for the code, the explain config or the contract "
                                   "tags to change")
        return Decision(True, "programming error, and the code, the explain config or the contract tags changed",
                        attempt)
    if failed and status.get("key") == key:
        if status.get("attempts", 0) >= max_attempts:
            return Decision(False, f"failed {status['attempts']} times; left failed")
        if (status.get("retry_after") or 0) > now:
            return Decision(False, f"failed; retry in {status['retry_after'] - now:.0f} s")
        return Decision(True, f"retry {attempt} of {max_attempts}", attempt)
    if status.get("status") == "running" and status.get("key") == key:
        return Decision(True, "running with no live flow run (a run outside the deployment died): resume", attempt)
    return Decision(True, "new key" if status.get("key") not in (None, key) else "not explained yet", attempt)


def run_key(name: str, version: str, key: str | None, status: dict, fingerprint: str | None) -> str:
    """What the flow runs of a version are submitted under: its explanation key, or while it has none (the
    contract does not resolve) a key of the version, its contract and its last status write, so each new state of
    an unresolvable version gets one run and concurrent triggers of that state still share it."""
    if key is not None:
        return key
    blob = f"{name}|{version}|{fingerprint}|{status.get('updated')}"
    return "unresolved-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_fate(run, progress: dict | None) -> str:
    """What happened to a flow run that ended without publishing, in words for the version's ``figan.error``: its
    state, Prefect's message and the stage and GAN step it had reached."""
    state = run.state
    kind = state.type.value if state is not None else "UNKNOWN"
    message = (state.message or "").strip() if state is not None else ""
    what = {"CRASHED": "crashed" if message else "crashed (its process died: killed, out of memory?)",
            "CANCELLED": "cancelled", "CANCELLING": "cancelled", "FAILED": "failed",
            "COMPLETED": "ended without publishing"}.get(kind, kind.lower())
    where = reached(run, progress)
    if len(message) > 300:
        message = message[:299] + "…"
    return f"flow run {run.name} {what}{where}" + (f": {message}" if message else "")


def reached(run, progress: dict | None) -> str:
    """Where the flow run last said it was, as words to append (``" at stage train-gan, step 640"``); empty when it
    reported nothing."""
    if not (progress and progress.get("flow_run") == str(run.id)):
        return ""
    return f" at stage {progress.get('stage')}" + (f", step {progress['step']}" if progress.get("step") is not None
                                                   else "")


def hung_for(run, progress: dict | None, now: float) -> float:
    """Seconds since a RUNNING flow run last reported progress (since it started, before its first report)."""
    if progress and progress.get("flow_run") == str(run.id) and progress.get("at"):
        return now - float(progress["at"])
    started = run.start_time or (run.state.timestamp if run.state else None)
    return now - started.timestamp() if started is not None else 0.0


class PassKeys:
    """The key each listed version would be explained under now (:func:`flows.explain.resolve_job`'s, from the
    listing's contract), for one reconcile pass: the data store is listed once per dataset and the explain config
    hashed once per layer choice. None when it cannot be told without the dispatcher (a contract error, no data
    version yet)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._md5: dict[str, str | None] = {}
        self._config_hash: dict[tuple, str] = {}

    def of(self, row: dict) -> str | None:
        from .explain import explanation_key, job_config, latest_dataset_md5
        contract = row["contract"]
        if isinstance(contract, Exception):
            return None
        md5 = contract.dataset_md5
        if md5 is None:
            if contract.dataset not in self._md5:
                try:
                    self._md5[contract.dataset] = latest_dataset_md5(self.settings, contract)
                except Exception:  # noqa: BLE001 — no version yet, store unreachable: the dispatcher records it
                    self._md5[contract.dataset] = None
            md5 = self._md5[contract.dataset]
        if md5 is None:
            return None
        layers = (contract.layer, contract.layers)
        if layers not in self._config_hash:
            self._config_hash[layers] = job_config(self.settings, contract).config_hash()
        return explanation_key(contract.name, contract.version, contract.cnn_id, md5.removesuffix(".dir"),
                               self._config_hash[layers])


# --------------------------------------------------------------------------------------------- the worker

class Worker:
    """Candidates in, flow runs of the explain deployment out; see the module docstring."""

    def __init__(self, settings: Settings, tracking_uri: str):
        self.settings, self.tracking_uri = settings, tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.candidates: queue.Queue[tuple[str, str, str]] = queue.Queue(MAX_PENDING)
        self.pending: set[tuple[str, str]] = set()       # queued, not yet decided: a version is queued once
        self.dropped = 0
        self.inflight: dict[tuple[str, str], str] = {}   # live flow runs, as last seen
        self.history: list[dict] = []
        self.last_reconcile: float | None = None
        self._poke = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()

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
        """Queue every opted-in version that is not explained as things stand now; returns how many were queued.

        One listing of every version (with its tags) is the whole read: a version whose status is ``done`` under
        the key it would get now (:class:`PassKeys`: its contract, the data version, the config) is settled by
        its row alone, so a steady pass costs the listing's pages, not calls per version. Everything else goes to
        the dispatcher, which decides on fresh reads."""
        keys = PassKeys(self.settings)
        queued = 0
        for r in R.list_versions(self.client, with_contract=True):
            if not self.opted_in(r):
                continue
            if r["status"] == "done" and r["key"] is not None and r["key"] == keys.of(r):
                self._ended(r["name"], r["version"], r)
                continue
            self.submit(r["name"], r["version"], "reconciler")
            queued += 1
        self.last_reconcile = time.time()
        return queued

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
            try:
                self.handle(name, version, reason)
            except Exception as e:  # noqa: BLE001 — MLflow or Prefect unreachable: the reconciler offers it again
                log.warning("%s/%s: cannot decide or submit (%s: %s); the reconciler will retry", name, version,
                            type(e).__name__, e)

    def handle(self, name: str, version: str, reason: str) -> Decision:
        """Decide for one version and, when it needs work, submit its flow run (the same one to every concurrent
        caller for the same attempt)."""
        decision = self._decide(name, version)
        if decision.run:
            run = runs.submit(self.settings.explain_deployment, name, version, decision.run_key, decision.attempt)
            with self._lock:
                self.inflight[(name, version)] = f"flow run {run.name} ({reason}: {decision.reason})"
            self.history.append({"name": name, "version": version, "reason": reason, "decision": decision.reason,
                                 "flow_run": str(run.id), "attempt": decision.attempt, "at": round(time.time(), 1)})
            del self.history[:-50]
            log.info("%s/%s: flow run %s (attempt %d) for %s (%s)", name, version, run.name, decision.attempt,
                     reason, decision.reason)
        return decision

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
        live = None
        if key is not None and not (status.get("status") == "done" and status.get("key") == key):
            live, status = self.watch(name, version, key)               # what watch() counted, included
        if live is not None:
            with self._lock:
                self.inflight[(name, version)] = f"flow run {live}"
        else:
            self._ended(name, version, status)
        program_hash = (program_fingerprint(self.client, self.settings, name, version)
                        if status.get("error_kind") == PROGRAM else None)
        decision = decide(status, key, error, fingerprint, self.settings.max_attempts, program_hash=program_hash,
                          live_run=live)
        return dataclasses.replace(decision, run_key=run_key(name, version, key, status, fingerprint))

    def _ended(self, name: str, version: str, status: dict) -> None:
        """Forget the version's flow run as in flight; the log says how each run it submitted or saw ended."""
        with self._lock:
            ended = self.inflight.pop((name, version), None)
        if ended is not None:
            outcome = (f"run {status.get('run_id')}" if status.get("status") == "done"
                       else f"error: {status.get('error')}" if status.get("status") == "failed" else "")
            log.info("%s/%s: %s has ended; version %s%s", name, version, ended, status.get("status"),
                     f" ({outcome})" if outcome else "")

    def watch(self, name: str, version: str, key: str) -> tuple[str | None, dict]:
        """The key's flow runs on Prefect (called while the key is not published): count the latest attempt when it
        ended without publishing and without recording its failure (crashed, cancelled) or hangs (cancelled here).
        Returns the name and state of a live run (None when there is none) and the version's status as it is now,
        with whatever was counted."""
        key_runs = runs.key_runs(key)
        # the version's status read after the flow runs: a run publishes before it ends, so one seen ended here is
        # seen published here (a status read before could still say running)
        status = R.get_status(self.client, name, version)
        if status.get("status") == "done" and status.get("key") == key:
            return None, status
        now = time.time()
        progress = status.get("progress")
        counted = status.get("attempts", 0) if status.get("key") == key else 0
        live = [r for r in key_runs if r.state is not None and not r.state.is_final()
                and r.state.type.value != "CANCELLING"]
        for run in live:
            if run.state.type.value == "RUNNING" and hung_for(run, progress, now) > self.settings.hang_seconds:
                why = (f"flow run {run.name} hung: no progress for {hung_for(run, progress, now):.0f} s "
                       f"(FIGAN_HANG_SECONDS={self.settings.hang_seconds:g}){reached(run, progress)}")
                log.warning("%s/%s: %s; cancelling it", name, version, why)
                runs.cancel(run.id, why)
                self.count(name, version, key, runs.attempt_of(run), f"{why}; cancelled")
                return None, R.get_status(self.client, name, version)
        if live:
            return f"{live[-1].name} ({live[-1].state.type.value})", status
        ended = [r for r in key_runs if runs.attempt_of(r) > counted]     # final, not yet counted on the version
        if ended:
            self.count(name, version, key, runs.attempt_of(ended[-1]), run_fate(ended[-1], progress))
            return None, R.get_status(self.client, name, version)
        return None, status

    def count(self, name: str, version: str, key: str, attempt: int, error: str) -> None:
        """Record attempt ``attempt`` of ``key`` as failed (a crash: retried after the backoff)."""
        log.warning("%s/%s: attempt %d counted as failed: %s", name, version, attempt, error)
        R.set_status(self.client, name, version, "failed", error=error, key=key, error_kind=CRASH, attempts=attempt,
                     retry_after=round(time.time() + self.settings.retry_backoff * 2 ** (attempt - 1), 1))

    def health(self) -> dict:
        with self._lock:
            inflight = {f"{n}/{v}": s for (n, v), s in self.inflight.items()}
        return {"ok": True, "inflight": inflight, "queued_candidates": self.candidates.qsize(),
                "deployment": self.settings.explain_deployment, "last_reconcile": self.last_reconcile,
                "pending": len(self.pending), "dropped": self.dropped,
                "reconcile_seconds": self.settings.reconcile_seconds, "runs": self.history[-20:]}


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
    runs.ensure_silent_run_automation(settings.heartbeat_seconds)     # before any run: dead workers' runs crash
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
