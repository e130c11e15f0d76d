"""What the explanation service knows: its configuration and a local cache of published explanations.

The store is plain Python (no BentoML, no HTTP), so the service's endpoints are thin and every rule is testable
here. Everything it reads comes from MLflow through :mod:`flows.registry` (the one module that knows tag names and
the artifact layout) or from its own cache folder:

* **Listing** (:meth:`ExplanationStore.listing`): ``registry.list_versions``, refreshed in the background once it
  is older than ``listing_ttl`` seconds (requests never wait for it), so an explanation published after the
  service started shows up within the TTL without a restart. When MLflow is unreachable the last good listing
  keeps serving (readiness reports it). A version or alias that is not in the listing forces one synchronous
  refresh (at most once a second), so a just-published version is found at once.
* **Resolution**: ``(model, "3")`` or ``(model, "champion")`` → one listing row. Names are checked against strict
  patterns before anything else, so no request can name a path or an MLflow filter of its choosing.
* **Serving**: a ``done`` version's run; while a newer explanation of it is queued, running or failed, its last
  published run (``registry``'s last-good tags), either only if the run's own tags name this version and key.
* **Cache folder** ``<cache>/<run_id>/``: ``registry.download_explanation`` of a served run, downloaded once
  into a temporary folder and renamed into place (atomic, safe with several workers). Run ids are 32 hex digits
  and every file name is built here from a validated component number, so reads never leave the cache.
  Published runs never change, so cached files are reused as they are; the folders are kept under a disk budget
  (least recently used out, never one in use) and their bytes memoised under a memory budget
  (:mod:`services.caches`).
* **Signed**: a run is served only when the cached files match its signed manifest and the manifest's digest is
  the version's ``figan.manifest_sha256`` (:func:`flows.audit.verify_served`), checked once per run when it is
  loaded (also when the cache folder was left by an earlier process); otherwise 502, and the folder is dropped.
* **Models in memory**: the published generator and PLS state per run, the CNN (+ contract) per version and CNN
  identity, each loaded once and kept under a byte budget (least recently used out); generation and uploads run on
  a bounded queue (:mod:`services.work_queue`), so CPU-bound requests cannot pile up threads.
"""
from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image, UnidentifiedImageError

from flows import audit, registry
from flows.settings import Settings
from models import layout
from models.cgan import CGANConfig, Generator, load_generator, read_generator_meta
from models.data import IMAGE_FORMATS, read_image
from models.explain import cnn_input
from models.features import extract_features, model_output
from models.fid import plot_fid_trace
from models.patient_generator import PatientGenerator
from models.pls import PLSError, PLSState, load_pls
from models.sequences import sweep_values
from models.sizes import SizeError, read_json
from models.verdict import verdict_of

from . import render
from .caches import SIZES_FILE, ByteLRU, DiskCache, is_whole, record_sizes, tensor_bytes
from .work_queue import GenerationQueue
from .contract import (RUN_ID_RE, SWEEP_LIMIT, VERSION_RE, ServiceError, check_name, check_ref,
                       check_within_published, public_detail, public_row)

log = logging.getLogger("figan.service")


# --------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ServiceConfig:
    """What the service takes from the platform's settings (:class:`flows.settings.Settings`, its ``service_*``
    fields, read from ``FIGAN_SERVICE_*``):

    ``FIGAN_SERVICE_API_KEY`` the key for generation/upload (and reads unless public); ``FIGAN_SERVICE_AUTH=off``
    disables keys (embedded demo only; default on: without a key, protected endpoints answer 401);
    ``FIGAN_SERVICE_PUBLIC_READ=true`` lets listing, sequences, images and metrics be read without a key (default:
    reads need the key too);
    ``FIGAN_SERVICE_CACHE`` (default ``<home>/service-cache``); ``FIGAN_SERVICE_LISTING_TTL`` seconds (default 5);
    ``FIGAN_SERVICE_MAX_UPLOAD`` bytes (default 2 MiB); ``FIGAN_SERVICE_GEN_CONCURRENCY`` (default 1) generations
    at once, each with ``FIGAN_SERVICE_TORCH_THREADS`` (default 1) torch threads: more threads help on dedicated
    cores, but on shared or oversubscribed ones OpenMP's spinning made a 16-frame request 5x slower (measured);
    ``FIGAN_SERVICE_GEN_QUEUE`` (default 16) generations and uploads waiting for one beyond those (then 503 with
    Retry-After); memory and disk budgets in bytes, least recently used out first: loaded generators, PLS states
    and CNNs ``FIGAN_SERVICE_MODEL_CACHE_BYTES`` (2 GiB, their tensors), published files' bytes
    ``FIGAN_SERVICE_FILE_CACHE_BYTES`` (128 MiB), downloaded explanation folders ``FIGAN_SERVICE_DISK_CACHE_BYTES``
    (10 GiB, never one in use). ``settings`` resolves the MLflow URI when ``tracking_uri`` is not given."""
    tracking_uri: str | None
    cache_dir: Path
    api_key: str | None = None
    auth: bool = True
    public_read: bool = False
    listing_ttl: float = 5.0
    max_upload_bytes: int = 2 * 1024 * 1024
    gen_concurrency: int = 1
    gen_queue: int = 16
    model_cache_bytes: int = 2 * 1024 ** 3
    file_cache_bytes: int = 128 * 1024 ** 2
    disk_cache_bytes: int = 10 * 1024 ** 3
    torch_threads: int = 1
    model_allowlist: tuple[str, ...] = ()
    settings: Settings | None = field(default=None, repr=False)

    @classmethod
    def load(cls) -> ServiceConfig:
        """From :meth:`Settings.load` (environment and settings file; ``ValueError`` naming a bad variable)."""
        s = Settings.load()
        return cls(tracking_uri=s.tracking_uri, cache_dir=s.service_cache, api_key=s.service_api_key,
                   auth=s.service_auth, public_read=s.service_public_read, listing_ttl=s.service_listing_ttl,
                   max_upload_bytes=s.service_max_upload, gen_concurrency=s.service_gen_concurrency,
                   gen_queue=s.service_gen_queue, model_cache_bytes=s.service_model_cache_bytes,
                   file_cache_bytes=s.service_file_cache_bytes, disk_cache_bytes=s.service_disk_cache_bytes,
                   torch_threads=s.service_torch_threads, model_allowlist=s.model_allowlist, settings=s)


# --------------------------------------------------------------------------------------------- one explanation

@dataclass
class Explanation:
    """A published explanation in the cache folder, with what the endpoints need from its metadata. ``run_id`` is
    the run served; ``row`` the version's listing row as it is now (its status may be newer than the run)."""
    name: str
    version: str
    run_id: str
    row: dict
    dir: Path
    metrics: dict
    config: dict
    gen_cfg: CGANConfig
    lineage: dict = field(default_factory=dict)     # from the verified manifest

    @property
    def k(self) -> int:
        return self.gen_cfg.k

    def sweep_range(self, component: int) -> tuple[float, float]:
        """The published sweep range (SD) of a 0-based component: per component in metrics.json, else the
        config's SD range, else ±2 SD."""
        sweep = self.metrics.get("sweep") or {}
        if sweep.get("lo") and component < len(sweep["lo"]):
            return float(sweep["lo"][component]), float(sweep["hi"][component])
        lo, hi = self.config.get("sweep_lo"), self.config.get("sweep_hi")
        return (-2.0 if lo is None else float(lo)), (2.0 if hi is None else float(hi))

    @property
    def sweep_ranges(self) -> np.ndarray:
        """(k, 2) published (lo, hi) of every component: what a request may narrow and never widen."""
        return np.array([self.sweep_range(j) for j in range(self.k)])

    def component_file(self, component: int, kind: str) -> Path:
        """Published file of a 0-based component (``kind``: one of :data:`models.layout.COMPONENT_SUFFIXES`)."""
        return layout.component_file(self.dir, component + 1, kind)

    def serving(self) -> dict[str, Any]:
        """What is served against what the version's status is now: ``serving_run`` (the run answered from),
        ``latest_status`` (queued | running | done | failed), ``pending`` (a newer explanation is queued or running)
        and, while the served run is not the version's newest state, a ``notice`` that says so."""
        latest = self.row["status"]
        out = {"serving_run": self.run_id, "latest_status": latest, "pending": latest in ("queued", "running")}
        if latest != "done":
            newer = ("failed" + (f" ({self.row['error']})" if self.row.get("error") else "") if latest == "failed"
                     else f"{latest}")
            out["notice"] = (f"a newer explanation of {self.name} version {self.version} is {newer}; serving the "
                             f"last published one (run {self.run_id})")
        return out

    def summary(self) -> dict[str, Any]:
        """The version row plus components (with % variance, faithfulness, conditioning) and sweep settings; the
        verdict (pass | fail) and failing gates come from the published metrics.json itself."""
        sweep = {k: self.config.get(k) for k in ("sweep_lo", "sweep_hi", "frames", "seeds")}
        sweep.update(self.metrics.get("sweep") or {})      # per-component ranges and what they are
        comps = []
        for j, c in enumerate(self.metrics.get("components") or []):
            comps.append({"component": j + 1, "pct_target_variance": c.get("pct_target_variance"),
                          "faithfulness": c.get("faithfulness"), "conditioning": c.get("conditioning"),
                          "ground_truth": c.get("ground_truth")})
        fid = {k: v for k, v in (self.metrics.get("fid") or {}).items() if k != "trace"}
        row = {**public_row(self.row), "status": "done", **self.serving()}     # the served run is published
        verdict = verdict_of(self.metrics)
        if verdict is not None:
            row.update(verdict=verdict["verdict"], failing_gates=verdict["failing"])
        return {**row, "k": self.k, "resolution": self.gen_cfg.resolution,
                "image_channels": self.gen_cfg.image_channels, "sweep": sweep, "fid": fid,
                "diversity": self.metrics.get("diversity"), "gates": self.metrics.get("gates"),
                "dataset": self.metrics.get("dataset"), "cnn": self.metrics.get("cnn"), "components": comps,
                "layer_selection": self.metrics.get("layer_selection"), "lineage": self.lineage}


@dataclass(frozen=True)
class Upload:
    """An uploaded image checked against a version (:meth:`ExplanationStore.read_upload`): its pixels as the CNN
    takes them, (1, C, H, W) in [0, 1], and the sweep: per-component ends (k, 2), or None with ``span``."""
    x: torch.Tensor
    ends: np.ndarray | None
    span: float | None


# --------------------------------------------------------------------------------------------- the store

def _pairing(row: dict, run_id: str, key: str | None) -> tuple:
    """What a served run was checked against: the run and its key, and the version's model, number and CNN
    identity."""
    return run_id, row["name"], str(row["version"]), key, row.get("cnn_id")


class ExplanationStore:
    """Published explanations pulled from MLflow into a local cache; thread-safe."""

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.cache = cfg.cache_dir.resolve()
        self.cache.mkdir(parents=True, exist_ok=True)
        self._client: MlflowClient | None = None
        self._rows: list[dict] | None = None
        self._listed_at = -math.inf
        self._refreshing = False
        self._last_error = ""
        self._list_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._explanations: dict[str, Explanation] = {}
        self._verified: set[tuple] = set()              # (run id, model, version, key, cnn id) pairings checked
        self.loaded = ByteLRU(cfg.model_cache_bytes, tensor_bytes, "models")
        self.files = ByteLRU(cfg.file_cache_bytes, len, "files")
        self.disk = DiskCache(self.cache, cfg.disk_cache_bytes, names=lambda name: bool(RUN_ID_RE.match(name)))
        self.disk.collect()                     # folders an earlier process left count against the budget
        self.generation = GenerationQueue(cfg.gen_concurrency, cfg.gen_queue)

    # -- MLflow
    @property
    def tracking_uri(self) -> str:
        uri = self.cfg.tracking_uri or (self.cfg.settings.mlflow_uri() if self.cfg.settings else None)
        if uri is None:
            raise ServiceError(503, "no MLflow server: set FIGAN_TRACKING_URI or start the embedded one (`figan up`)")
        return uri

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def mlflow_reachable(self, timeout: float = 2.0) -> bool:
        """True when MLflow answers: ``GET /health`` for an HTTP tracking server, a registry query otherwise."""
        try:
            uri = self.tracking_uri
            if uri.startswith(("http://", "https://")):
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
                    return resp.status == 200
            self.client.search_registered_models(max_results=1)
            return True
        except (ServiceError, MlflowException, OSError) as e:
            log.warning("MLflow not reachable", extra={"error": str(e)[:300]})
            return False

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    # -- listing
    def listing(self, max_age: float | None = None) -> list[dict]:
        """Versions that have an explanation status (queued | running | done | failed).

        Stale-while-revalidate: a listing older than the TTL is returned as it is while one background thread
        refreshes it, so no request waits for MLflow; only the first listing and an explicit ``max_age`` (a
        miss in :meth:`resolve`) wait for a fresh one. MLflow errors keep the last good listing (503 when there
        is none)."""
        if self._rows is not None and max_age is None:
            if time.monotonic() - self._listed_at > self.cfg.listing_ttl and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, args=(self.cfg.listing_ttl,), daemon=True).start()
            return self._rows
        self._refresh(self.cfg.listing_ttl if max_age is None else max_age)
        if self._rows is None:
            raise ServiceError(503, f"MLflow is not reachable ({public_detail(self._last_error)})")
        return self._rows

    def _refresh(self, max_age: float) -> None:
        with self._list_lock:
            try:
                if time.monotonic() - self._listed_at <= max_age:
                    return                      # refreshed meanwhile by another thread
                t0 = time.monotonic()
                rows = registry.list_versions(self.client)
                allow = set(self.cfg.model_allowlist)
                self._rows = [r for r in rows if r.get("status") and (not allow or r["name"] in allow)]
                self._listed_at = time.monotonic()
                log.info("listing refreshed", extra={"versions": len(self._rows),
                                                     "ms": round(1000 * (time.monotonic() - t0), 1)})
            except (MlflowException, OSError, ServiceError) as e:
                self._last_error = str(e)[:300]
                self._listed_at = time.monotonic() - max(max_age, self.cfg.listing_ttl) + 1.0   # retry in 1 s
                log.warning("listing refresh failed; serving the last good listing",
                            extra={"error": self._last_error})
            finally:
                self._refreshing = False

    def models(self) -> list[dict]:
        """The listing grouped by model: ``[{name, aliases: {alias: version}, versions: [row, ...]}]``."""
        out: dict[str, dict] = {}
        for row in self.listing():
            m = out.setdefault(row["name"], {"name": row["name"], "aliases": {}, "versions": []})
            m["versions"].append(public_row(row))
            m["aliases"].update({a: row["version"] for a in row["aliases"]})
        return list(out.values())

    @staticmethod
    def _match(rows: list[dict], model: str, ref: str) -> dict | None:
        by_number = VERSION_RE.match(ref) is not None
        for r in rows:
            if r["name"] == model and (r["version"] == ref if by_number else ref in r["aliases"]):
                return r
        return None

    def resolve(self, model: str, ref: str) -> dict:
        """The listing row of ``model`` at version number or alias ``ref`` (404 naming what is unknown)."""
        check_name(model)
        check_ref(ref)
        for max_age in (None, 1.0):             # a miss forces one refresh (a new version / a moved alias)
            row = self._match(self.listing(max_age), model, ref)
            if row is not None:
                return row
        versions = [r for r in self.listing() if r["name"] == model]
        if not versions:
            raise ServiceError(404, f"model: no explanation of a model named {model!r}", "model")
        what = "version" if VERSION_RE.match(ref) else "alias"
        raise ServiceError(404, f"version: model {model!r} has no explained {what} {ref!r} (known: "
                                f"{sorted({r['version'] for r in versions}, key=int)}, aliases "
                                f"{sorted({a for r in versions for a in r['aliases']})})", "version")

    @staticmethod
    def _serving(row: dict) -> tuple[str, str | None] | None:
        """(run id, key) of the run to serve for a listing row: the version's explanation when it is done, else
        its last published one (kept while a newer explanation is queued or running, or after that one failed);
        None when the version has never been published."""
        if row["status"] == "done" and row.get("run_id"):
            return row["run_id"], row.get("key")
        if row.get("last_good_run_id"):
            return row["last_good_run_id"], row.get("last_good_key")
        return None

    def cached(self, model: str, ref: str) -> Explanation | None:
        """The explanation when answering needs no I/O at all (listed, served run checked and already in the
        cache), else None: the fast path of the file endpoints, safe to call on the event loop."""
        if self._rows is None:
            return None
        row = self._match(self.listing(), check_name(model), check_ref(ref))
        serving = row and self._serving(row)
        if not (serving and _pairing(row, *serving) in self._verified):
            return None                         # not checked yet for this version: the slow path checks it
        expl = self._explanations.get(serving[0])
        if expl is not None and expl.row is not row:
            expl.row = row                      # aliases and status current; the files never change
        return expl

    # -- explanations in the cache
    def explanation(self, model: str, ref: str) -> Explanation:
        """The published explanation of a version, downloaded into the cache on first use: its ``done`` run, or
        while a newer explanation is queued, running or failed the last published one (``Explanation.serving``
        says so).

        A version that was never published is a 409 carrying its status (and error)."""
        row = self.resolve(model, ref)
        serving = self._serving(row)
        if serving is None:
            raise ServiceError(409, f"version: the explanation of {model} version {row['version']} is "
                                    f"{row['status']}" + (f": {row['error']}" if row.get("error") else ""),
                               "version", status=row["status"], name=model, version=row["version"])
        run_id, key = serving
        if not RUN_ID_RE.match(run_id):
            raise ServiceError(502, f"version: {model}/{row['version']} names a malformed run id {run_id!r}")
        pairing = _pairing(row, run_id, key)
        if pairing not in self._verified:       # once per (run, version, key, CNN): one MLflow call
            self._check_run_is_the_explanation(row, run_id, key)
            self._verified.add(pairing)
        expl = self._explanations.get(run_id)
        if expl is None:
            with self._lock(run_id):
                expl = self._explanations.get(run_id) or self._load(row, run_id, key)
                self._explanations[run_id] = expl
        if expl.row is not row:                 # aliases and status current; the files never change
            expl.row = row
        return expl

    def _load(self, row: dict, run_id: str, key: str | None) -> Explanation:
        """The explanation's folder (downloaded now unless cached and whole), checked against its signed manifest,
        then the cache kept under its disk budget."""
        dest = self.cache / run_id
        with self.disk.in_use(run_id), self._refused(row, run_id):
            if dest.is_dir() and not is_whole(dest):
                log.warning("cached explanation is not whole; downloading it again", extra={"run_id": run_id})
                self._forget(run_id)
                self.disk.discard(run_id)
            if not dest.is_dir():
                self._download(row, run_id, dest)
                self.disk.collect(self._forget)
            lineage = self._check_manifest(row, run_id, key, dest)
            _, gen_cfg = read_generator_meta(dest / layout.GENERATOR_DIR)        # sizes bounded before any use
            config_path = dest / layout.CONFIG
            config = read_json(config_path).get("config", {}) if config_path.is_file() else {}
            metrics = read_json(dest / layout.METRICS)
        return Explanation(name=row["name"], version=row["version"], run_id=run_id, row=row, dir=dest,
                           metrics=metrics, config=config, gen_cfg=gen_cfg, lineage=lineage)

    def _check_manifest(self, row: dict, run_id: str, key: str | None, dest: Path) -> dict:
        """Serve only what the platform signed: the cached files of the run must match its signed manifest, whose
        digest is the version's ``figan.manifest_sha256``. Returns the lineage the version JSON shows (dataset,
        md5, version date, CNN digest, manifest digest); 502 naming what failed otherwise, and the cache folder is
        dropped so a repaired run is fetched anew."""
        where = f"{row['name']}/{row['version']}"
        try:
            result = audit.verify_served(dest, {**row, "run_id": run_id, "key": key},
                                         ignore=(layout.SERVICE_DIR, SIZES_FILE))
        except audit.AuditError as e:
            log.error("audit key unusable", extra={"error": str(e)})
            raise ServiceError(503, "version: this service has no usable audit key to check explanations with "
                                    "(FIGAN_AUDIT_KEY; see the service log)", "version") from e
        if not result.ok:
            log.warning("refused run: manifest does not verify",
                        extra={"model": row["name"], "version": row["version"], "run_id": run_id,
                               "problems": result.problems[:50]})
            shutil.rmtree(dest, ignore_errors=True)
            raise ServiceError(502, f"version: the explanation of {where} does not match its signed manifest "
                                    f"({result.headline()}); refused, check it with `figan verify {row['name']} "
                                    f"{row['version']}`", "version", audit="failed")
        i = result.inputs
        return {"dataset": i.get("dataset"), "dataset_md5": i.get("dataset_md5"),
                "dataset_created": i.get("dataset_created"), "cnn_digest": i.get("cnn_digest"),
                "cnn_model_id": i.get("cnn_model_id"), "code_version": i.get("code_version"),
                "manifest_sha256": result.manifest_sha256}

    @contextmanager
    def _refused(self, row: dict, run_id: str) -> Iterator[None]:
        """A published run whose metadata asks for more than the bounds allow (or is unreadable) is a 502 naming
        what it asks for; nothing was allocated for it."""
        try:
            yield
        except (SizeError, PLSError) as e:
            log.warning("refused explanation", extra={"run_id": run_id, "error": str(e)[:1000]})
            raise ServiceError(502, f"version: the explanation run {run_id} of {row['name']}/{row['version']} is "
                                    f"refused: {public_detail(e)}", "version") from None

    def _download(self, row: dict, run_id: str, dest: Path) -> None:
        """What the service needs of a run, into a temporary folder renamed into place (atomic, safe with several
        workers), with the FID trace figure rendered once."""
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}-", dir=self.cache))
        try:
            registry.download_explanation(self.client, run_id, tmp)
            metrics = read_json(tmp / layout.METRICS)
            fid = metrics.get("fid") or {}
            if fid.get("trace"):
                plot_fid_trace(fid["trace"], tmp / layout.SERVICE_FID_TRACE, floor=fid.get("floor"),
                               label=fid.get("extractor") or "", best_step=fid.get("best_step"))
            record_sizes(tmp)
            try:
                tmp.rename(dest)
            except OSError:                 # another worker got there first
                shutil.rmtree(tmp, ignore_errors=True)
        except SizeError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (MlflowException, OSError, ValueError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("explanation fetch failed", extra={"run_id": run_id, "error": str(e)[:1000]})
            raise ServiceError(502, f"version: explanation run {run_id} of {row['name']}/{row['version']} "
                                    f"could not be fetched from MLflow ({public_detail(e)})", "version") from e
        log.info("explanation cached", extra={"model": row["name"], "version": row["version"],
                                              "run_id": run_id, "ms": round(1000 * (time.monotonic() - t0))})

    def _check_run_is_the_explanation(self, row: dict, run_id: str, key: str | None) -> None:
        """Any MLflow user can write a version's ``figan.run_id`` (or last-good) tag: serve the run only if it
        lives in the explanations experiment and its own tags name this model, version and explanation ``key``."""
        try:
            run = self.client.get_run(run_id)
            exp = self.client.get_experiment(run.info.experiment_id)
        except MlflowException as e:
            raise ServiceError(502, f"version: the explanation run of {row['name']}/{row['version']} could not be "
                                    f"read from MLflow", "version") from e
        tags = run.data.tags
        mismatch = [what for what, ok in (
            ("experiment", exp.name == registry.EXPLANATIONS_EXPERIMENT),
            ("model", tags.get(registry.RUN_TAG_MODEL) == row["name"]),
            ("version", tags.get(registry.RUN_TAG_VERSION) == str(row["version"])),
            ("key", key is not None and tags.get(registry.RUN_TAG_KEY) == key),
            ("cnn", row.get("cnn_id") is not None and tags.get(registry.RUN_TAG_CNN_ID) == row.get("cnn_id")))
            if not ok]
        if mismatch:
            tag = registry.TAG_RUN_ID if row["status"] == "done" else registry.TAG_LAST_GOOD_RUN_ID
            log.warning("refused run", extra={"model": row["name"], "version": row["version"],
                                              "run_id": run_id, "tag": tag, "mismatch": mismatch})
            raise ServiceError(502, f"version: the run named by {row['name']}/{row['version']}'s {tag} tag "
                                    f"is not an explanation of this version ({', '.join(mismatch)} differ); "
                                    f"refused", "version")

    def _forget(self, run_id: str) -> None:
        """Drop what memory holds of a cached folder that is being deleted (the next request downloads it again);
        models already loaded from it stay valid and stay in their own cache."""
        self._explanations.pop(run_id, None)
        self.files.drop(lambda key: key[0] != run_id)

    @contextmanager
    def _on_disk(self, expl: Explanation) -> Iterator[None]:
        """Hold an explanation's folder while reading from it; a folder deleted meanwhile (another worker's disk
        budget) is a 503 to retry, and the next request downloads it again."""
        with self.disk.in_use(expl.run_id):
            if not expl.dir.is_dir():
                self._forget(expl.run_id)
                raise ServiceError(503, f"version: the cached explanation of {expl.name}/{expl.version} was just "
                                        f"evicted; retry", "version", headers={"Retry-After": "1"})
            yield

    def file(self, expl: Explanation, path: Path, memory_only: bool = False) -> bytes | None:
        """Bytes of a file of a cached explanation (404 when the run did not publish it), memoised within the file
        cache's byte budget (published runs never change); with ``memory_only``, None unless already memoised
        (never waits for the disk). Names are built by :class:`Explanation` from validated parts; the containment
        check is defence in depth."""
        key = (expl.run_id, str(path))
        data = self.files.get(key)
        if data is not None:
            self.disk.touch(expl.run_id)
            return data
        if memory_only:
            return None
        resolved = path.resolve()
        if not resolved.is_relative_to(expl.dir.resolve()):
            raise ServiceError(400, "path outside the explanation")
        with self._on_disk(expl):
            if not resolved.is_file():
                raise ServiceError(404, f"{path.name} was not published with this explanation")
            data = resolved.read_bytes()
        self.files.put(key, data)
        return data

    def frames_json(self, expl: Explanation, component: int, memory_only: bool = False) -> bytes | None:
        """Frames JSON of a published 0-based component (from its npz; memoised like the files; ``memory_only``
        as in :meth:`file`)."""
        key = (expl.run_id, f"frames:{component}")
        data = self.files.get(key)
        if data is None and memory_only:
            return None
        if data is None:
            npz = expl.component_file(component, "npz")
            self.file(expl, npz)                    # the same checks (and 404) as any published file
            with self._on_disk(expl):
                values, frames = render.published_frames(npz)
            data = json.dumps({"component": component + 1, **render.frames_json(values, frames)},
                              separators=(",", ":")).encode()
            self.files.put(key, data)
        return data

    def fid_trace_png(self, expl: Explanation) -> Path:
        return expl.dir / layout.SERVICE_FID_TRACE

    # -- models in memory (least recently used out beyond FIGAN_SERVICE_MODEL_CACHE_BYTES)
    def generator(self, expl: Explanation) -> tuple[Generator, CGANConfig]:
        def load() -> tuple[Generator, CGANConfig]:
            with self._on_disk(expl), self._refused(expl.row, expl.run_id):
                G, gcfg, _ = load_generator(expl.dir / layout.GENERATOR_DIR, "cpu", self.cfg.model_cache_bytes)
            return G.to(memory_format=torch.channels_last), gcfg        # ~25 % faster on CPU
        return self.loaded.get_or_load(("generator", expl.run_id), load)

    def pls(self, expl: Explanation) -> PLSState:
        def load() -> PLSState:
            with self._on_disk(expl), self._refused(expl.row, expl.run_id):
                return load_pls(expl.dir / layout.PLS_DIR)
        return self.loaded.get_or_load(("pls", expl.run_id), load)

    def cnn(self, expl: Explanation) -> tuple[torch.nn.Module, registry.Contract]:
        """The explained CNN version (eager module, eval mode) and its contract, loaded once per CNN identity."""
        def load() -> tuple[torch.nn.Module, registry.Contract]:
            try:
                model, _ = registry.load_cnn_version(self.client, expl.name, expl.version)
                return model, registry.read_contract(self.client, expl.name, expl.version)
            except (MlflowException, OSError, ValueError) as e:
                log.warning("CNN load failed", extra={"model": expl.name, "version": expl.version,
                                                      "error": str(e)[:1000]})
                raise ServiceError(502, f"version: the CNN {expl.name}/{expl.version} could not be "
                                        f"loaded ({public_detail(e)})", "version") from e
        return self.loaded.get_or_load(("cnn", expl.name, expl.version, expl.row.get("cnn_id")), load)

    # -- computing
    def generate(self, expl: Explanation, components: list[int], lo: np.ndarray, hi: np.ndarray, frames: int,
                 seed: int, base: np.ndarray, fmt: str) -> bytes | dict:
        """An on-demand sweep of 0-based ``components``, each from its ``lo`` to its ``hi`` in ``frames`` steps,
        as GIF/PNG bytes or a frames-JSON dict."""
        values = np.stack([sweep_values(float(a), float(b), frames) for a, b in zip(lo, hi, strict=True)])
        G, gcfg = self.generator(expl)
        t0 = time.monotonic()
        images = render.sweep_frames(G, gcfg, components, values, seed, base)
        out: bytes | dict
        if fmt == "gif":
            out = render.gif_bytes(images)
        elif fmt == "png":
            out = render.strip_png(images)
        else:
            out = {"name": expl.name, "version": expl.version, **expl.serving(), "seed": seed, "base": base.tolist(),
                   "components": [{"component": j + 1, **render.frames_json(v, u8)}
                                  for j, v, u8 in zip(components, values, render.to_u8(images), strict=True)]}
        log.info("generated", extra={"model": expl.name, "version": expl.version, "components": len(components),
                                     "frames": len(values), "format": fmt,
                                     "ms": round(1000 * (time.monotonic() - t0), 1)})
        return out

    def read_upload(self, expl: Explanation, data: bytes, lo: float | None = None, hi: float | None = None,
                    span: float | None = None) -> Upload:
        """An uploaded image checked against the version before any CNN or generator work: the sweep ends inside
        the published ranges (422 beyond them), a decodable PNG/JPEG/TIFF of the size the CNN takes (400
        otherwise). Loads the CNN once (its contract names the input shape)."""
        ranges = expl.sweep_ranges
        ends = None
        if span is None:
            ends = np.column_stack([ranges[:, 0] if lo is None else np.full(expl.k, lo),
                                    ranges[:, 1] if hi is None else np.full(expl.k, hi)])
            check_within_published(ends[:, 0], ends[:, 1], list(range(expl.k)), ranges)
            if np.any(ends[:, 0] >= ends[:, 1]):
                j = int(np.flatnonzero(ends[:, 0] >= ends[:, 1])[0])
                raise ServiceError(400, f"{'lo' if lo is not None else 'hi'}: leaves no range for component "
                                        f"{j + 1} (published {ranges[j, 0]:+.3g} to {ranges[j, 1]:+.3g} SD)",
                                   "lo" if lo is not None else "hi")
        _, contract = self.cnn(expl)
        c, h, w = contract.input_shape
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                size, fmt = img.size, img.format
        except Image.DecompressionBombError:
            raise ServiceError(400, "image: refused as a decompression bomb (far more pixels than its size "
                                    "suggests)", "image") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise ServiceError(400, f"image: the upload is not a decodable {'/'.join(IMAGE_FORMATS)} image",
                               "image") from None
        if size != (w, h):
            raise ServiceError(400, f"image: is {size[0]}x{size[1]} pixels, but {expl.name} version "
                                    f"{expl.version} takes {w}x{h} images", "image")
        try:
            x = torch.from_numpy(read_image(io.BytesIO(data), name=f"upload ({fmt})"))[None]
        except ValueError as e:
            raise ServiceError(400, f"image: {e}", "image") from None
        return Upload(x=cnn_input((c, h, w))(x), ends=ends, span=span)

    def explain_image(self, expl: Explanation, upload: Upload, frames: int, seed: int) -> dict:
        """PLS scores of an uploaded image (:meth:`read_upload`) through the explained CNN, and per component a
        sweep of ``frames`` values with the other components at the image's own scores: over the published range
        or the narrower ``lo``/``hi``, or over the image's own score ± ``span`` cut to the published range. With
        the patient generator the frames are the upload itself, edited; otherwise a generated patient (seed)."""
        model, _ = self.cnn(expl)
        x, ends, span, ranges = upload.x, upload.ends, upload.span, expl.sweep_ranges
        state = self.pls(expl)
        feats = extract_features(model, x, layer=expl.config.get("layer"))
        if feats.shape[1] != state.n_features:
            raise ServiceError(409, f"version: the CNN gives {feats.shape[1]} features but the published PLS "
                                    f"state has {state.n_features}", "version")
        scores = state.transform(feats)[0]
        prediction = state.predict(feats)[0]
        if state.task == "classification" and state.class_names:
            prediction = state.class_names[int(prediction)]
        base = np.clip(scores, -SWEEP_LIMIT, SWEEP_LIMIT)
        if span is None:
            values = np.stack([np.linspace(a, b, frames) for a, b in ends])                   # (k, F)
        else:
            ends = np.column_stack([np.clip(scores - span, ranges[:, 0], ranges[:, 1]),
                                    np.clip(scores + span, ranges[:, 0], ranges[:, 1])])
            far = ends[:, 0] >= ends[:, 1]                      # a score beyond the range by more than span
            ends[far] = ranges[far]
            values = np.stack([np.linspace(a, b, frames) for a, b in ends])                   # (k, F)
        G, gcfg = self.generator(expl)
        placement = None
        if isinstance(G, PatientGenerator):       # the upload itself, edited
            x_gen = cnn_input((gcfg.image_channels, gcfg.resolution, gcfg.resolution))(x)
            sweeps, placement = render.patient_sweeps(G, x_gen, scores, values)
        else:
            sweeps = render.sweep_frames(G, gcfg, list(range(expl.k)), values, seed, base)
        comps = []
        for j in range(expl.k):
            lo, hi = expl.sweep_range(j)
            s = float(scores[j])
            comps.append({"component": j + 1, "score": round(s, 4), "published_sweep": [lo, hi],
                          "position": "below" if s < lo else "above" if s > hi else "within",
                          "pct_target_variance": round(100 * float(state.explained_target_variance[j]), 3),
                          "values": [round(float(v), 4) for v in values[j]],
                          "own_score_frame": int(np.argmin(np.abs(values[j] - s))),
                          "gif": render.data_url(render.gif_bytes(sweeps[j:j + 1]), "image/gif")})
        centred = {"patient_centred": placement is not None}
        if placement is not None:
            centred["placement"] = placement
            if not placement["trusted"]:
                centred["warning"] = (f"the image registers poorly to this explanation's template (residual "
                                      f"{placement['registration_residual']:.4g} > {placement['threshold']:.4g}, "
                                      f"what 99 % of its real images reach): it is probably not of the kind the "
                                      f"CNN was explained on, and its sweeps are not a reliable explanation of it")
        return {**centred, "name": expl.name, "version": expl.version, "run_id": expl.run_id, **expl.serving(),
                "seed": seed,
                "scores": [round(float(v), 4) for v in scores],
                "pls_prediction": prediction.item() if hasattr(prediction, "item") else prediction,
                "cnn_output": [round(float(v), 4) for v in model_output(model, x)[0]], "components": comps}
