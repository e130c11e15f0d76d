"""The FIGAN explanation service (BentoML 1.4): published explanations by (model, version | alias), sequences on
demand, uploaded images placed on the components, and the viewer page.

    bentoml serve services.explanations:Explanations --host 127.0.0.1 --port 3000

HTTP interface (JSON errors ``{"error": "<field>: <what is wrong>", "field": "<field>", ...}``; every bad input
is a 4xx naming its field; a version never published is a 409 carrying its status; while a newer explanation of a
published version is queued, running or failed, its last published run is served and the answer says so: JSON
``serving_run``, ``latest_status``, ``pending``, ``notice``; headers ``X-Figan-Serving-Run``,
``X-Figan-Latest-Status``; a full generation queue is a 503 with ``Retry-After``):

=====================================================================  ===========================================
``GET  /v1/models``                                                    versions with an explanation: status,
                                                                       verdict + failing gates, aliases,
                                                                       headline metrics
``GET  /v1/resolve/{name@version|name@alias}``                         the version a reference points to
``GET  /v1/models/{m}/versions/{v}``                                   one explanation: verdict (pass | fail)
                                                                       + failing gates, components (% variance,
                                                                       faithfulness, conditioning), FID, URLs
``GET  /v1/models/{m}/versions/{v}/metrics.json | fid_trace.png``      the published metrics / FID trace figure
``GET  /v1/models/{m}/versions/{v}/components/{c}/sequence.gif|png|json``  the published sequence (local cache)
``GET  /v1/models/{m}/versions/{v}/components/{c}/eigen.png|deviation.png|attribution.png|real_cases.png``
``POST /v1/generate``                                                  a sweep on demand (API key)
``POST /v1/models/{m}/versions/{v}/explain-image``                     an uploaded image's scores + sweeps centred
                                                                       on them (multipart ``image``; API key)
``GET  /viewer/``                                                      the viewer page (static, offline; a
                                                                       PASS/FAIL banner tops each version)
``GET  /healthz``, ``/readyz``, ``/metrics``                           BentoML: alive; ready = MLflow reachable;
                                                                       Prometheus metrics
=====================================================================  ===========================================

Design choices:

* **Routes live in a FastAPI app mounted on the BentoML service** (``bentoml.asgi_app``), not in
  ``@bentoml.api`` methods: the resources are GETs with path parameters and binary bodies that need their own
  status codes (304, 404, 409). More importantly, BentoML's file inputs download any URL a client sends in place
  of a file (``MultipartSerde.ensure_file``), which would let a request make the service fetch from outside MLflow
  and its cache; the upload here is parsed by Starlette with a Content-Length limit instead. BentoML still runs the
  process (``bentoml serve``, workers), the probes (``/readyz`` calls ``__is_ready__``), Prometheus metrics,
  tracing, access logs, the traffic timeout and max concurrency.
* **Published files in memory are answered ahead of the HTTP stack** (:mod:`services.memory_first`): a plain
  ASGI layer in front of BentoML's middleware answers a file whose bytes are already in memory, for a request
  that may read, from the same code as its route (:func:`answer_from_memory`); everything else goes down the
  normal path, which answers it in full, errors included. The stack costs ~0.7 ms of CPU per request, the answer
  ~0.2 ms (wrk, cached GIF at 32 connections on two cores: p99 103 → 15 ms). Prometheus counts those answers
  (``figan_memory_first_responses_total``); BentoML's per-request metrics and traces never see them.
* **No thread hop on the way**: routes are module-level ``async`` functions (a FastAPI class view resolves
  ``self`` through a synchronous dependency, i.e. one thread-pool hop per request). Whatever may wait for MLflow
  or the CPU (listing, first download, generation, uploads) runs in the thread pool.
* **No adaptive batching.** A request already is one batched generator call (all frames of all its components).
  Merging requests would not make images cheaper: on CPU the generator costs the same per 64² image at batch 16
  (one 16-frame request) as at batch 64 (four merged), 1.6-2.5 ms either way over six benchmark runs, so
  batching would only add its waiting time to every request. Generation and uploads run on their own bounded
  queue (:mod:`services.work_queue`: ``FIGAN_SERVICE_GEN_CONCURRENCY`` workers with a fixed number of torch
  threads, ``FIGAN_SERVICE_GEN_QUEUE`` waiting), so concurrent requests neither oversubscribe the cores nor pile
  up in request threads: beyond the queue they get 503 + ``Retry-After`` at once. Their input is checked before
  they are queued. Revisit on a GPU, where larger batches do pay.
* **Keys**: generation and upload always need the API key unless ``FIGAN_SERVICE_AUTH=off``; reads need it too
  unless ``FIGAN_SERVICE_PUBLIC_READ=true`` (see :class:`services.store.ServiceConfig`).
* **Logs** are JSON lines (BentoML's handlers get a JSON formatter in the worker). The access log covers the API
  but not the published files, whose per-request line cost half of their CPU (:mod:`services.access_log`;
  ``FIGAN_SERVICE_ACCESS_LOG=api|all|off``; ``all`` logs every request, so no answers ahead of the stack).
* **The module stays light**: torch, MLflow and the store are imported in the worker only (``__init__``), so
  `bentoml serve`'s process manager, which imports this module for its configuration, stays ~90 MB.
"""
from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from pythonjsonlogger.json import JsonFormatter
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles

from models import layout

from .access_log import ApiAccessLog, access_log_mode
from .memory_first import memory_first_service
from .contract import (FRAMES_MAX, FRAMES_MIN, MAX_COMPONENTS, MEDIA_TYPES, PUBLISHED_FILE, SWEEP_LIMIT, ServiceError,
                       check_component, check_name, check_ref, check_within_published, public_row)

if TYPE_CHECKING:                     # the store (torch, MLflow) is imported by the worker only, in __init__
    from .store import Explanation

log = logging.getLogger("figan.service")
# MLflow calls fail fast instead of retrying for minutes (readiness reports an unreachable MLflow), and artifact
# downloads print no progress bars into the JSON logs (defaults, set when the service starts).
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
STATIC = Path(__file__).parent / "static"
API_PATH = "/v1"                                      # where the API app is mounted
OPTIONAL_FIGURES = ("attribution", "real_cases")      # per-component PNGs an explanation may publish
COMPONENT_IMAGES = ("eigen", "deviation", *OPTIONAL_FIGURES)
PUBLISHED_PATH = re.compile(API_PATH + PUBLISHED_FILE.pattern)      # a published file's path as served
SweepValue = Annotated[float, Field(ge=-SWEEP_LIMIT, le=SWEEP_LIMIT, allow_inf_nan=False)]
api = FastAPI(title="FIGAN explanations", version="1", docs_url=None, redoc_url=None)   # no CDN-hosted doc pages
ACCESS_LOG = access_log_mode()
if ACCESS_LOG == "api":
    api.add_middleware(ApiAccessLog)


# --------------------------------------------------------------------------------------------- request models

class GenerateRequest(BaseModel):
    """An on-demand sweep: components (1-based; default all) from ``lo`` to ``hi`` SD (default: each component's
    published range) in ``frames`` steps, noise ``seed``, the other components at ``base`` (default 0 = the mean
    score). A request may narrow the published range, never widen it: the generator was fitted and checked only
    there (422 otherwise)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    version: str | StrictInt
    components: list[StrictInt] | None = Field(None, min_length=1, max_length=MAX_COMPONENTS)
    lo: SweepValue | None = None
    hi: SweepValue | None = None
    frames: StrictInt = Field(9, ge=FRAMES_MIN, le=FRAMES_MAX)
    seed: StrictInt = Field(0, ge=0, le=2 ** 32 - 1)
    base: list[SweepValue] | None = Field(None, max_length=256)
    format: Literal["gif", "png", "json"] = "gif"

    @field_validator("hi")
    @classmethod
    def _hi_above_lo(cls, hi: float, info) -> float:
        if hi is not None and info.data.get("lo") is not None and not hi > info.data["lo"]:
            raise ValueError(f"must be greater than lo ({info.data['lo']})")
        return hi


class ImageRequest(BaseModel):
    """Form fields next to an uploaded image: frames per sweep, noise seed, and the sweep: each component's
    published range by default, ``lo``/``hi`` to narrow it (422 beyond it), or ``span``: the image's own score
    ± span SD, cut to the published range."""
    model_config = ConfigDict(extra="forbid")
    frames: int = Field(9, ge=FRAMES_MIN, le=FRAMES_MAX)
    span: float | None = Field(None, gt=0, le=SWEEP_LIMIT, allow_inf_nan=False)
    lo: SweepValue | None = None
    hi: SweepValue | None = None
    seed: int = Field(0, ge=0, le=2 ** 32 - 1)

    @field_validator("lo", "hi")
    @classmethod
    def _one_way_to_choose_the_sweep(cls, value: float | None, info) -> float | None:
        if value is not None and info.data.get("span") is not None:
            raise ValueError("give either span or lo/hi, not both")
        lo = info.data.get("lo")
        if info.field_name == "hi" and value is not None and lo is not None and not value > lo:
            raise ValueError(f"must be greater than lo ({lo})")
        return value


# --------------------------------------------------------------------------------------------- errors

@api.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    if exc.code >= 500 and exc.code != 503:         # 503: a full generation queue, already in the access log
        log.error("request failed", extra={"status": exc.code, "error": exc.message})
    return JSONResponse(exc.to_json(), status_code=exc.code, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", extra={"path": request.url.path})
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500)


def _validation_response(errors: list[dict]) -> JSONResponse:
    """400 naming the offending field(s): ``{"error": "frames: Input should be ...", "field": "frames"}``."""
    fields, parts = [], []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        loc = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
        name = ".".join(str(p) for p in loc) or "body"
        fields.append(name)
        parts.append(f"{name}: {e.get('msg', 'invalid')}")
    return JSONResponse({"error": "; ".join(parts), "field": fields[0], "fields": fields}, status_code=400)


@api.exception_handler(RequestValidationError)
async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_response(list(exc.errors()))


@api.exception_handler(ValidationError)
async def _model_invalid(_: Request, exc: ValidationError) -> JSONResponse:
    return _validation_response(exc.errors(include_url=False))


# --------------------------------------------------------------------------------------------- helpers

def configure_json_logging(level: int = logging.INFO) -> None:
    """JSON lines from the handlers BentoML's server installed (its one stdout handler serves the root, bentoml,
    access-log and uvicorn loggers) and INFO for ``figan.*``. Outside a BentoML worker nothing changes."""
    fmt = JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                        reserved_attrs=[*JsonFormatter().reserved_attrs, "levelname_bracketed", "trace_msg"])
    for handler in logging.getLogger("bentoml").handlers:
        handler.setFormatter(fmt)
    logging.getLogger("figan").setLevel(level)


def _serving_headers(expl: Explanation) -> dict[str, str]:
    """The run a binary answer comes from and the version's status now (a newer explanation may be queued,
    running or failed while the last published one is served)."""
    return {"X-Figan-Serving-Run": expl.run_id, "X-Figan-Latest-Status": str(expl.row["status"])}


def _binary(headers: Headers, data: bytes, media_type: str, etag: str, expl: Explanation) -> Response:
    """Bytes of an immutable published file of ``expl`` for a request with these headers; ETag revalidation (an
    alias may move to another version)."""
    answer_headers = {"ETag": etag, "Cache-Control": "no-cache", **_serving_headers(expl)}
    if headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=answer_headers)
    return Response(data, media_type=media_type, headers=answer_headers)


def _published(store, expl: Explanation, component: str | None, file: str,
               memory_only: bool = False) -> tuple[bytes | None, str, str]:
    """Bytes, media type and ETag of the published ``file`` of ``expl``: the version's ``metrics.json`` or
    ``fid_trace.png`` (``component`` None), or a component's ``sequence.gif|png|json`` or ``<image>.png``
    (:data:`COMPONENT_IMAGES`). With ``memory_only`` the bytes are None unless already in memory.
    A name that is not published is a :class:`ServiceError` (400 / 404)."""
    stem, _, ext = file.rpartition(".")
    if component is None:
        if file == "metrics.json":
            return store.file(expl, expl.dir / layout.METRICS, memory_only), "application/json", \
                f'"{expl.run_id}-metrics"'
        if file == "fid_trace.png":
            return store.file(expl, store.fid_trace_png(expl), memory_only), "image/png", f'"{expl.run_id}-fid"'
        raise ServiceError(404, f"file: {file[:40]!r} is not published for a version")
    j = check_component(component, expl.k)
    if stem == "sequence":
        etag = f'"{expl.run_id}-c{j + 1}-{ext}"'
        if ext == "json":
            return store.frames_json(expl, j, memory_only), "application/json", etag
        if ext in ("gif", "png"):
            kind = "gif" if ext == "gif" else "strip"
            return store.file(expl, expl.component_file(j, kind), memory_only), MEDIA_TYPES[ext], etag
        raise ServiceError(400, f"format: {ext[:20]!r} is not one of gif, png, json", "format")
    if ext != "png" or stem not in COMPONENT_IMAGES:
        raise ServiceError(404, f"image: {stem[:20]!r} is not one of {', '.join(COMPONENT_IMAGES)}", "image")
    return store.file(expl, expl.component_file(j, stem), memory_only), "image/png", \
        f'"{expl.run_id}-c{j + 1}-{stem}"'


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def answer_from_memory(scope: dict) -> Response | None:
    """A published file answered ahead of the HTTP stack (:mod:`services.memory_first`) when the request may
    read, the explanation is cached and checked, and the file's bytes are in memory; else None: the request goes
    down the normal path, which answers it in full (and every error)."""
    match = PUBLISHED_PATH.fullmatch(scope["path"])
    if match is None:
        return None
    headers = Headers(scope=scope)
    try:
        svc = _svc()
        svc.authorize(headers, write=False)
        expl = svc.store.cached(match["model"], match["version"])
        if expl is None:
            return None
        file = match["file"] or match["version_file"]
        data, media_type, etag = _published(svc.store, expl, match["component"], file, memory_only=True)
    except (ServiceError, bentoml.exceptions.BentoMLException):    # refused, or the service not started yet
        return None
    return None if data is None else _binary(headers, data, media_type, etag, expl)


# --------------------------------------------------------------------------------------------- the service

# Published files are immutable bytes answered from memory; an OpenTelemetry server span per request cost them more
# CPU than everything else they do (also with the default sample rate 0, which records nothing): measured with wrk
# on the cached GIF, 2.5-3.1 → 1.5-2.0 ms of CPU per request. The API's JSON and generation routes stay traced.
UNTRACED_URLS = [PUBLISHED_PATH.pattern, r"/viewer/"]


@bentoml.asgi_app(StaticFiles(directory=STATIC, html=True), path="/viewer", name="viewer")
@bentoml.asgi_app(api, path=API_PATH, name="api")
# traffic timeout: 30 s covers the slowest cold request (first download + CNN load, a few seconds). Keep it short:
# BentoML 1.4.40's TimeoutMiddleware schedules a timer per request that is never cancelled, so every request's
# context stays alive for the whole timeout (measured: 20 objects per request; at 120 s and ~800 req/s the
# collector's full passes grew to 250 ms and stalled every request in flight).
@bentoml.service(name="figan-explanations", workers=1, traffic={"timeout": 30, "max_concurrency": 256},
                 logging={"access": {"enabled": ACCESS_LOG == "all",
                                     "request_content_type": False, "response_content_type": True}},
                 tracing={"excluded_urls": UNTRACED_URLS},
                 # BentoML's access log for every request (``all``) means no answers ahead of it
                 service_class=bentoml.Service if ACCESS_LOG == "all" else memory_first_service(answer_from_memory))
class Explanations:
    """Serves the explanations published in MLflow (see the module docstring for the HTTP interface)."""

    def __init__(self) -> None:
        import torch

        from .store import ExplanationStore, ServiceConfig

        configure_json_logging()
        for var, value in MLFLOW_ENV.items():
            os.environ.setdefault(var, value)
        self.cfg = ServiceConfig.load()
        torch.set_num_threads(self.cfg.torch_threads)
        self.store = ExplanationStore(self.cfg)
        if self.cfg.auth and not self.cfg.api_key:
            log.warning("no FIGAN_SERVICE_API_KEY: generation and upload answer 401 (FIGAN_SERVICE_AUTH=off "
                        "disables keys for a local demo)")
        # Everything imported so far (torch, MLflow, pandas, ...) lives as long as the process: keep it out of the
        # collector, whose full collections otherwise stalled every request in flight for 300-450 ms under load
        # (measured p99 at 32 clients: 330 ms → 120-140 ms).
        gc.collect()
        gc.freeze()
        log.info("service started", extra={"cache": str(self.store.cache), "auth": self.cfg.auth,
                                           "public_read": self.cfg.public_read, "ttl_s": self.cfg.listing_ttl})

    def __is_ready__(self) -> bool:
        """Ready when MLflow answers (cached sequences would still be served while it does not)."""
        return self.store.mlflow_reachable()

    # -- plain helpers shared by the routes (never call one route from another)
    def authorize(self, headers: Headers, write: bool) -> None:
        """401 unless a request with these headers may read (public reads) or write (generation, upload)."""
        cfg = self.cfg
        if not cfg.auth or (not write and cfg.public_read):
            return
        if not cfg.api_key:
            raise ServiceError(401, "api_key: this service has no API key configured (set FIGAN_SERVICE_API_KEY, "
                                    "or FIGAN_SERVICE_AUTH=off for a local demo)", "api_key")
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if not given or not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise ServiceError(401, "api_key: missing or wrong API key (send it in the X-API-Key header)",
                               "api_key")

    def sweep_request(self, body: GenerateRequest) -> tuple[Explanation, dict]:
        """The explanation an on-demand sweep asks for and the checked arguments of
        :meth:`~services.store.ExplanationStore.generate` (blocking: MLflow on first use)."""
        expl = self.store.explanation(check_name(body.model), check_ref(str(body.version)))
        comps = [check_component(c, expl.k, "components") for c in (body.components or range(1, expl.k + 1))]
        base = np.zeros(expl.k) if body.base is None else np.asarray(body.base, np.float64)
        if base.shape != (expl.k,):
            raise ServiceError(400, f"base: must have one value per component (k={expl.k}), got {len(base)}",
                               "base")
        ranges = expl.sweep_ranges
        lo = ranges[comps, 0] if body.lo is None else np.full(len(comps), body.lo)
        hi = ranges[comps, 1] if body.hi is None else np.full(len(comps), body.hi)
        if body.lo is not None and body.hi is None and np.any(lo >= hi):
            raise ServiceError(400, "lo: must be below hi (the published upper end when hi is not given)", "lo")
        if body.hi is not None and body.lo is None and np.any(hi <= lo):
            raise ServiceError(400, "hi: must be above lo (the published lower end when lo is not given)", "hi")
        check_within_published(lo, hi, comps, ranges)
        if body.base is not None:
            check_within_published(base, base, list(range(expl.k)), ranges, field="base")
        return expl, {"components": comps, "lo": lo, "hi": hi, "frames": body.frames, "seed": body.seed,
                      "base": base, "fmt": body.format}



# --------------------------------------------------------------------------------------------- routes
# Module-level async routes (not FastAPI class views): a class view resolves ``self`` through a synchronous
# dependency, which costs a thread-pool hop on every request. The hot path (a published file of an explanation
# already in the cache) runs on the event loop without any thread hop; anything that may wait for MLflow or the
# CPU runs in the thread pool.

def _svc() -> Explanations:
    return bentoml.get_current_service()


async def _explanation(request: Request, model: str, version: str) -> tuple[Explanations, Explanation]:
    svc = _svc()
    svc.authorize(request.headers, write=False)
    expl = svc.store.cached(model, version)
    return svc, expl or await run_in_threadpool(svc.store.explanation, model, version)


def _urls(request: Request, expl: Explanation) -> dict:
    base = f"{request.scope.get('root_path', '')}/models/{expl.name}/versions/{expl.version}"
    comp = lambda j, f: f"{base}/components/{j}/{f}"   # noqa: E731
    has_trace = bool((expl.metrics.get("fid") or {}).get("trace"))      # only a cGAN has a training trace
    figures = expl.metrics.get("figures") or {}                         # optional figures that were published
    return {"metrics": f"{base}/metrics.json", "fid_trace": f"{base}/fid_trace.png" if has_trace else None,
            "components": [{"gif": comp(j, "sequence.gif"), "strip": comp(j, "sequence.png"),
                            "frames": comp(j, "sequence.json"), "eigen": comp(j, "eigen.png"),
                            "deviation": comp(j, "deviation.png"),
                            **{kind: comp(j, f"{kind}.png") for kind in OPTIONAL_FIGURES
                               if j in figures.get(kind, ())}}
                           for j in range(1, expl.k + 1)]}


@api.get("/models")
async def models(request: Request) -> dict:
    """Every model version that has an explanation, with status, verdict, aliases and headline metrics."""
    svc = _svc()
    svc.authorize(request.headers, write=False)
    return {"models": await run_in_threadpool(svc.store.models), "listing_ttl_s": svc.cfg.listing_ttl}


@api.get("/resolve/{ref}")
async def resolve(request: Request, ref: str) -> dict:
    """``name@3`` or ``name@champion`` → the version row it points to."""
    svc = _svc()
    svc.authorize(request.headers, write=False)
    name, sep, version = ref.rpartition("@")
    if not sep:
        raise ServiceError(400, f"ref: {ref[:80]!r} must be name@version or name@alias", "ref")
    return public_row(await run_in_threadpool(svc.store.resolve, name, version))


@api.get("/models/{model}/versions/{version}")
async def version(request: Request, model: str, version: str) -> dict:
    """One explanation: status, verdict + failing gates, headline metrics, components (% variance, faithfulness,
    conditioning), URLs."""
    _, expl = await _explanation(request, model, version)
    return {**expl.summary(), "urls": _urls(request, expl)}


@api.get("/models/{model}/versions/{version}/metrics.json")
async def metrics(request: Request, model: str, version: str) -> Response:
    return await _published_response(request, model, version, None, "metrics.json")


@api.get("/models/{model}/versions/{version}/fid_trace.png")
async def fid_trace(request: Request, model: str, version: str) -> Response:
    return await _published_response(request, model, version, None, "fid_trace.png")


@api.get("/models/{model}/versions/{version}/components/{component}/sequence.{fmt}")
async def sequence(request: Request, model: str, version: str, component: str, fmt: str) -> Response:
    """The published sequence of a component: ``gif`` (animated), ``png`` (strip) or ``json`` (frames)."""
    return await _published_response(request, model, version, component, f"sequence.{fmt}")


@api.get("/models/{model}/versions/{version}/components/{component}/{image}.png")
async def component_image(request: Request, model: str, version: str, component: str, image: str) -> Response:
    """The published eigen image, deviation images, attribution maps or real cases of a component."""
    return await _published_response(request, model, version, component, f"{image}.png")


async def _published_response(request: Request, model: str, version: str, component: str | None,
                              file: str) -> Response:
    """A published file through the whole stack: what :func:`answer_from_memory` passed on (the first request of
    an explanation or a file, refusals, errors)."""
    svc, expl = await _explanation(request, model, version)
    data, media_type, etag = _published(svc.store, expl, component, file)
    return _binary(request.headers, data, media_type, etag, expl)


@api.post("/generate")
async def generate(request: Request, body: GenerateRequest) -> Response:
    """A sweep generated now with the published generator; deterministic per seed (API key)."""
    svc = _svc()
    svc.authorize(request.headers, write=True)
    expl, args = await run_in_threadpool(svc.sweep_request, body)
    out = await svc.store.generation.run(svc.store.generate, expl, **args)
    if body.format == "json":
        return Response(_json_bytes(out), media_type="application/json")
    return Response(out, media_type=MEDIA_TYPES[body.format], headers=_serving_headers(expl))


@api.post("/models/{model}/versions/{version}/explain-image")
async def explain_image(request: Request, model: str, version: str) -> Response:
    """Multipart upload ``image`` (+ optional ``frames``, ``lo``/``hi`` or ``span``, ``seed``): the image's PLS
    scores, its position on each component and a sweep per component around its own scores (API key)."""
    svc = _svc()
    svc.authorize(request.headers, write=True)
    limit = svc.cfg.max_upload_bytes
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ServiceError(411, "image: send the upload with a Content-Length header", "image")
    if int(length) > limit + 64 * 1024:                       # multipart framing + the small form fields
        raise ServiceError(413, f"image: the upload has {length} bytes, the limit is {limit}", "image")
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ServiceError(400, "image: send the image as the multipart file field 'image'", "image")
        data = await upload.read(limit + 1)
        fields = {k: v for k, v in form.items() if k != "image"}
    if len(data) > limit:
        raise ServiceError(413, f"image: the file is larger than the limit of {limit} bytes", "image")
    params = ImageRequest.model_validate(fields)
    expl = await run_in_threadpool(svc.store.explanation, model, version)
    upload = await run_in_threadpool(svc.store.read_upload, expl, data, lo=params.lo, hi=params.hi,
                                     span=params.span)
    out = await svc.store.generation.run(svc.store.explain_image, expl, upload, params.frames, params.seed)
    return Response(_json_bytes(out), media_type="application/json")
