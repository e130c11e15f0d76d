"""The service's contract, independent of HTTP and of the heavy libraries: request limits, name patterns, the
error every bad request becomes, and the validators that name the offending field.

Kept light (no torch, MLflow or models import) so that `bentoml serve`'s process manager, which imports the
service module to read its configuration, stays small; the store and the generator load only in the worker.
"""
from __future__ import annotations

import re
from typing import Any

FRAMES_MIN, FRAMES_MAX = 2, 64          # frames of an on-demand sweep
SWEEP_LIMIT = 6.0                       # |sweep value| and |base score| in SD units
MAX_COMPONENTS = 8                      # components per on-demand request
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")     # registered model name
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# The immutable files of a published explanation, as a path ends (with or without the API's mount): a component's
# sequence / images, or the version's metrics and FID trace (for the access log, tracing and memory-first answers).
PUBLISHED_FILE = re.compile(r"/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)/"
                            r"(?:components/(?P<component>[^/]+)/(?P<file>[a-z_]+\.(?:gif|png|json))|"
                            r"(?P<version_file>metrics\.json|fid_trace\.png))$")
MEDIA_TYPES = {"gif": "image/gif", "png": "image/png", "json": "application/json"}


class ServiceError(Exception):
    """A request the service answers with HTTP ``code`` and ``{"error": message, "field": field, **extra}``, plus
    response ``headers`` (e.g. ``Retry-After``)."""

    def __init__(self, code: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(message)
        self.code, self.message, self.field, self.extra = code, message, field, extra
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, **({"field": self.field} if self.field else {}), **self.extra}


_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\")]+")
_PATH_RE = re.compile(r"(?<![\w.:])/(?:[\w.@+-]+/)+[\w.@+-]*(?:\?\S*)?")
_HOST_RE = re.compile(r"\bhost='[^']*'")


def public_detail(detail: str, limit: int = 300) -> str:
    """An upstream error's text as a client may see it: URLs and absolute paths (servers, buckets, cache folders)
    replaced, cut to ``limit`` characters. The full text goes to the service log."""
    return _HOST_RE.sub("host='<host>'", _PATH_RE.sub("<path>", _URL_RE.sub("<url>", str(detail))))[:limit]


def check_name(model: str) -> str:
    if not isinstance(model, str) or not NAME_RE.match(model):
        raise ServiceError(400, f"model: {str(model)[:80]!r} is not a model name (letters, digits, '.', '_', '-'; "
                                f"at most 128 characters)", "model")
    return model


def check_ref(ref: str) -> str:
    if not isinstance(ref, str) or not (VERSION_RE.match(ref) or ALIAS_RE.match(ref)):
        raise ServiceError(400, f"version: {str(ref)[:80]!r} is neither a version number nor an alias", "version")
    return ref


def check_component(component: Any, k: int, field: str = "component") -> int:
    """1-based component number (int or digit string) in 1..k → 0-based index; an integer out of range is an
    unknown component (404), anything else a bad request (400)."""
    if isinstance(component, str) and component.isdigit():
        component = int(component)
    if isinstance(component, bool) or not isinstance(component, int) or not 1 <= component <= k:
        raise ServiceError(404 if isinstance(component, int) and not isinstance(component, bool) else 400,
                           f"{field}: must be an integer in 1..{k} (this explanation has {k} components), "
                           f"got {str(component)[:40]!r}", field)
    return component - 1


RANGE_TOL = 1e-6          # published ranges are rounded to 4 decimals in metrics.json


def check_within_published(lo, hi, components: list[int], ranges, field: str | None = None) -> None:
    """A sweep may narrow the published range of a component, never widen it: the generator was fitted and checked
    only there. ``lo``/``hi``: one end per entry of 0-based ``components``; ``ranges``: (lo, hi) per component.
    422 naming ``lo``/``hi`` (or ``field``) and the range otherwise."""
    for name, ends, side in (("lo", lo, 0), ("hi", hi, 1)):
        for value, j in zip(ends, components, strict=True):
            r_lo, r_hi = float(ranges[j][0]), float(ranges[j][1])
            if float(value) < r_lo - RANGE_TOL or float(value) > r_hi + RANGE_TOL:
                raise ServiceError(422, f"{field or name}: {float(value):g} is outside the published range of "
                                        f"component {j + 1} ({r_lo:+.3g} to {r_hi:+.3g} SD), the range its "
                                        f"generator was fitted and checked on; ask for values inside it",
                                   field or name)


def public_row(row: dict) -> dict[str, Any]:
    """A listing row (``flows.registry.list_versions``) as the API shows it."""
    keys = ("name", "version", "aliases", "status", "verdict", "failing_gates", "error", "updated", "fid_best",
            "fid_extractor", "faithfulness", "pct_variance", "manifest_sha256")
    return {k: row.get(k) for k in keys}
