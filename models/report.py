"""The auditor's report: ONE self-contained HTML page per explained model version.

:func:`build_report` reads an explanation's artifacts folder (``config.json``, ``metrics.json``, the PNG/GIF files
of ``models.explain``), optionally a lineage dict, a drift summary and an explanation diff, and writes
``report.html`` into the folder. The page is built for the MLflow UI's artifact viewer and for e-mailing:

* **self-contained** — every image is inlined as a base64 ``data:`` URI, the CSS is in a ``<style>`` element, and
  there is no script, font or link to fetch; it opens offline, from a file or inside an iframe;
* **the verdict first**: a banner (id ``verdict``) at the very top, green "Explanation checks: PASS" or red
  "Explanation checks: FAIL — failing gates: ..." (:func:`models.verdict.verdict_of`);
* **sections** (each an element with a stable id): ``cautions``, ``lineage``, ``variance``, ``components``,
  ``fid``, ``checks`` (faithfulness, conditioning, ground truth, gates), ``drift``, ``diff``;
* **plain-language cautions** first: components explaining < 5 % of the target variance, faithfulness below its
  threshold, FID far above the real-vs-real floor, every failed gate, detected drift, and a new top component
  that matches none of the previous version's top components.

Rendering uses jinja2 (autoescaped template below); the numbers come from ``metrics.json`` (schema
``figan.metrics/1``), the drift summary of ``flows.drift`` and the diff of ``models.diff`` (schema
``figan.diff/1``); any of the optional parts may be missing, and the page says so.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined

from . import layout
from .attribution import CAPTION as ATTRIBUTION_CAPTION
from .checks import Thresholds
from .verdict import verdict_of, verdict_text

MIN_VARIANCE_PCT = 5.0                       # components below this get a caution
_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

__all__ = ["MIN_VARIANCE_PCT", "data_uri", "cautions", "build_report"]


# --------------------------------------------------------------------------------------------- helpers

def data_uri(path: str | Path) -> str | None:
    """``data:<mime>;base64,...`` of an image file, or None when the file does not exist."""
    p = Path(path)
    if not p.is_file():
        return None
    mime = _MIME.get(p.suffix.lower())
    if mime is None:
        raise ValueError(f"{p}: not an image type the report inlines ({sorted(_MIME)})")
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v: Any, digits: int = 3) -> str:
    """Numbers rounded for tables; None/NaN as an em dash; lists comma-separated; anything else as text."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x, digits)}" for k, x in v.items())
    return str(v)


# --------------------------------------------------------------------------------------------- cautions

def cautions(metrics: dict, drift: dict | None = None, diff: dict | None = None,
             thresholds: Thresholds = Thresholds(), min_variance_pct: float = MIN_VARIANCE_PCT) -> list[dict]:
    """Plain-language warnings for the auditor, most important first: ``[{"kind": ..., "text": ...}]``.

    kinds: ``gate`` (a failed gate), ``faithfulness``, ``fid``, ``variance``, ``drift``, ``diff``."""
    out: list[dict] = []
    gates = metrics.get("gates") or {}
    for name, g in gates.items():
        if isinstance(g, dict) and not g.get("pass", True):
            detail = {k: v for k, v in g.items() if k not in ("pass",)}
            out.append({"kind": "gate", "text": f"The {name.replace('_', ' ')} check failed "
                                                f"({_fmt(detail)}). Treat the explanation with care until it "
                                                f"passes."})
    th_faith = (gates.get("faithfulness") or {}).get("threshold", thresholds.faithfulness)
    for c in metrics.get("components") or []:
        rho = (c.get("faithfulness") or {}).get("rho_mean")
        if rho is not None and rho < th_faith:
            out.append({"kind": "faithfulness",
                        "text": f"Component {c['component']}: the CNN's output does not reliably follow this sweep "
                                f"(Spearman ρ = {rho:.2f}, below {th_faith}). The images may show changes the "
                                f"CNN does not act on."})
    fid = metrics.get("fid") or {}
    ratio_th = (gates.get("fid") or {}).get("threshold_ratio", thresholds.fid_ratio)
    if fid.get("best") is not None and fid.get("floor"):
        ratio = fid["best"] / fid["floor"]
        if ratio > ratio_th:
            out.append({"kind": "fid",
                        "text": f"Generated images are still far from real ones: best FID {fid['best']:.1f} is "
                                f"{ratio:.1f}× the real-vs-real floor {fid['floor']:.1f} (extractor: "
                                f"{fid.get('extractor')}). Sweeps may contain GAN artefacts; judge shapes, not "
                                f"textures."})
    for c in metrics.get("components") or []:
        pct = c.get("pct_target_variance")
        if pct is not None and pct < min_variance_pct:
            out.append({"kind": "variance",
                        "text": f"Component {c['component']} explains only {pct:.1f} % of the target variance "
                                f"(< {min_variance_pct:g} %): what its sweep shows matters little to the CNN's "
                                f"prediction."})
    for part, what in (("data", "the data"), ("features", "the learned features")):
        d = (drift or {}).get(part) or {}
        if d.get("drifted"):
            out.append({"kind": "drift", "text": f"Drift detected in {what} against the previous version — "
                                                 f"{d.get('headline', '')}. Compare the explanations with the "
                                                 f"diff below before reusing conclusions from the previous "
                                                 f"release."})
        if d.get("status") == "error":
            out.append({"kind": "drift", "text": f"The {part} drift check could not run: {d.get('error')}"})
    if diff and (diff.get("flags") or {}).get("new_top_component_unmatched"):
        top = diff["top"]
        out.append({"kind": "diff",
                    "text": f"The top component of {diff['current']['label']} matches none of the top "
                            f"{top['top_n']} components of {diff['previous']['label']} (best |r| = "
                            f"{top['abs_r']:.2f} < {top['threshold']}): this CNN version ranks images by "
                            f"something new first."})
    return out


# --------------------------------------------------------------------------------------------- view model

def _sweep_label(metrics: dict, cfg: dict) -> str:
    """What range the sweeps show: from metrics.json (per-component quantile ranges) or the config's SD range."""
    sweep = metrics.get("sweep") or {}
    if sweep.get("range"):
        return f"over {sweep['range']}"
    lo, hi = cfg.get("sweep_lo"), cfg.get("sweep_hi")
    return f"from {float(-2.0 if lo is None else lo):.2f} to {float(2.0 if hi is None else hi):.2f} SD"


def _component_view(art: Path, c: dict, th_faith: float, th_cond: float, min_pct: float) -> dict:
    j = c["component"]
    faith, cond = c.get("faithfulness") or {}, c.get("conditioning") or {}
    gt = sorted((c.get("ground_truth") or {}).items(), key=lambda kv: -abs(kv[1].get("effect_sd") or 0))
    cases = (_read_json(layout.component_file(art, j, "real_cases_json")) or {}).get("cases") or []
    return {
        "real_cases": data_uri(layout.component_file(art, j, "real_cases")), "n_cases": len(cases),
        "attribution": data_uri(layout.component_file(art, j, "attribution")),
        "poor_cases": sum(not case.get("trusted", True) for case in cases),
        "n": j, "pct": c.get("pct_target_variance"),
        **{kind: data_uri(layout.component_file(art, j, kind)) for kind in ("gif", "strip", "eigen", "deviation")},
        "faith": faith, "cond": cond, "gt": gt, "reader": c.get("reader") or {},
        "range": c.get("sweep") or {},
        "faith_ok": faith.get("rho_mean") is not None and faith["rho_mean"] >= th_faith,
        "cond_ok": cond.get("r_pooled") is not None and cond["r_pooled"] >= th_cond,
        "small": c.get("pct_target_variance") is not None and c["pct_target_variance"] < min_pct,
    }


def _drift_rows(part: dict | None) -> list[tuple[str, str]]:
    """Key/value rows of a drift summary part, per-column details left out (they are in the Evidently page)."""
    if not part:
        return []
    skip = {"columns", "headline"}
    return [(k.replace("_", " "), _fmt(v)) for k, v in part.items() if k not in skip]


def build_report(artifacts_dir: str | Path, lineage: dict | None = None, drift: dict | None = None,
                 diff: dict | None = None, diff_image: str | Path | None = None, title: str | None = None,
                 thresholds: Thresholds = Thresholds(), min_variance_pct: float = MIN_VARIANCE_PCT,
                 out: str | Path | None = None) -> Path:
    """Write the self-contained ``report.html`` of an explanation artifacts folder; returns its path.

    ``lineage``: dataset, dataset_md5, dataset_created, cnn_name, cnn_version, cnn_model_id, cnn_format,
    cnn_digest, code_version, config_hash, key, libraries (whatever is known; ``config.json`` fills the rest). The
    page itself is one of the files the run's signed manifest covers, so it names where that manifest is and how
    to check it rather than its digest. ``drift``: the summary dict of ``flows.drift`` (parts ``data``,
    ``features``, ``previous``). ``diff``: a ``models.diff.explanation_diff`` dict; ``diff_image`` its picture
    (default ``diff/matched_components.png`` in the folder when present). ``out`` defaults to
    ``<artifacts_dir>/report.html``."""
    art = Path(artifacts_dir)
    metrics = _read_json(art / layout.METRICS)
    if metrics is None:
        raise FileNotFoundError(f"{art}: no {layout.METRICS}; the report is built after the checks stage")
    config = _read_json(art / layout.CONFIG) or {}
    lineage = dict(lineage or {})
    gates = metrics.get("gates") or {}
    th_faith = (gates.get("faithfulness") or {}).get("threshold", thresholds.faithfulness)
    th_cond = (gates.get("conditioning") or {}).get("threshold", thresholds.conditioning)
    cnn = metrics.get("cnn") or {}
    ds = metrics.get("dataset") or {}
    lineage_rows = [
        ("model", lineage.get("cnn_name") or config.get("cnn") or cnn.get("name")),
        ("model version", lineage.get("cnn_version")),
        ("CNN format", {"pickle": "pickle — unpickled, so its registrant's code ran (trusted by policy)",
                        "pt2": "torch.export program (pickle-free)",
                        "state-dict": "architecture + state dict (pickle-free)"}.get(lineage.get("cnn_format"),
                                                                                       lineage.get("cnn_format"))),
        ("dataset", lineage.get("dataset") or config.get("dataset") or ds.get("name")),
        ("dataset version (DVC md5)", lineage.get("dataset_md5")),
        ("dataset version date", lineage.get("dataset_created")),
        ("images / task / target", f"{ds.get('n_images')} / {ds.get('task')} / {ds.get('target')}"),
        ("explained layer", f"{cnn.get('layer')} ({cnn.get('n_features')} features)"),
        ("CNN files (sha256)", lineage.get("cnn_digest")),
        ("CNN LoggedModel (MLflow)", lineage.get("cnn_model_id")),
        ("code version", lineage.get("code_version")),
        ("libraries", {k: v for k, v in (lineage.get("libraries") or {}).items() if v} or None),
        ("explain config hash", lineage.get("config_hash") or config.get("config_hash")
         or metrics.get("config_hash")),
        ("explanation key", lineage.get("key")),
    ]
    cfg = lineage.get("config") or config.get("config") or {}
    fid = dict(metrics.get("fid") or {})
    if fid.get("best") is not None and fid.get("floor"):
        fid["ratio"] = fid["best"] / fid["floor"]
    if diff_image is None and (art / layout.DIFF_IMAGE).is_file():
        diff_image = art / layout.DIFF_IMAGE
    pls = metrics.get("pls") or {}
    verdict = verdict_of(metrics)
    view = {
        "title": title or f"FIGAN explanation — {lineage_rows[0][1]} {('v' + str(lineage['cnn_version'])) if lineage.get('cnn_version') else ''}".strip(),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": (verdict or {}).get("verdict"), "verdict_text": verdict_text(verdict),
        "cautions": cautions(metrics, drift, diff, thresholds, min_variance_pct),
        "lineage": [(k, _fmt(v)) for k, v in lineage_rows if v is not None],
        "verify_target": f"{lineage.get('cnn_name') or 'MODEL'} {lineage.get('cnn_version') or 'VERSION'}",
        "attribution_caption": ATTRIBUTION_CAPTION, "manifest_path": layout.MANIFEST,
        "layer_selection": metrics.get("layer_selection"),
        "config": [(k, _fmt(v)) for k, v in sorted(cfg.items())],
        "variance_png": data_uri(art / layout.PLS_VARIANCE_PNG),
        "pct": pls.get("pct_target_variance") or [c.get("pct_target_variance") for c in metrics["components"]],
        "cum_pct": pls.get("cumulative_pct"),
        "components": [_component_view(art, c, th_faith, th_cond, min_variance_pct) for c in metrics["components"]],
        "fid": fid, "fid_png": data_uri(art / layout.FID_TRACE_PNG),
        "diversity": metrics.get("diversity"), "training": metrics.get("training") or {},
        "th": asdict(thresholds) | {"faithfulness": th_faith, "conditioning": th_cond},
        "min_pct": min_variance_pct,
        "sweep_label": _sweep_label(metrics, cfg),
        "gates": [(k, g) for k, g in gates.items() if isinstance(g, dict)],
        "drift": drift, "drift_data": _drift_rows((drift or {}).get("data")),
        "drift_features": _drift_rows((drift or {}).get("features")),
        "drift_previous": _drift_rows((drift or {}).get("previous")),
        "diff": diff, "diff_png": data_uri(diff_image) if diff_image else None,
        "fmt": _fmt,
    }
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    page = env.from_string(_TEMPLATE).render(**view)
    target = Path(out) if out is not None else art / layout.REPORT
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target


# --------------------------------------------------------------------------------------------- template

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:1rem 1.5rem;color:#1b1f24;line-height:1.45}
h1{font-size:1.6rem;margin:.2rem 0}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
h3{margin:1.2rem 0 .4rem}table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .55rem;text-align:left;vertical-align:top}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.pass{color:#1a7f37;font-weight:600}
.fail{color:#cf222e;font-weight:600}.muted{color:#57606a;font-size:.88rem}
.caution{background:#fff8c5;border-left:4px solid #bf8700;padding:.4rem .7rem;margin:.35rem 0}
.caution b{text-transform:uppercase;font-size:.75rem;letter-spacing:.04em;margin-right:.4rem}
.ok{background:#dafbe1;border-left:4px solid #1a7f37;padding:.4rem .7rem}
.verdict{font-weight:600;font-size:1.05rem;padding:.55rem .9rem;margin:.2rem 0 .6rem;border-radius:4px;
border-left:6px solid}.verdict.pass{background:#dafbe1;color:#116329;border-color:#1a7f37}
.verdict.fail{background:#ffebe9;color:#a40e26;border-color:#cf222e}
.verdict.unknown{background:#eaeef2;color:#424a53;border-color:#8c959f}
.comp{border:1px solid #d0d7de;border-radius:6px;padding:.6rem .9rem;margin:1rem 0}
.imgs{display:flex;flex-wrap:wrap;gap:.8rem;align-items:flex-start}.imgs figure{margin:0}
figcaption{font-size:.8rem;color:#57606a}img{max-width:100%;height:auto}img.gif{image-rendering:pixelated;width:192px}
nav a{margin-right:.8rem}
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>""" + _CSS + """</style>
</head>
<body>
<div id="verdict" class="verdict {{ verdict or 'unknown' }}" role="status" data-verdict="{{ verdict or 'unknown' }}">Explanation checks: {{ verdict_text }}</div>
<h1>{{ title }}</h1>
<p class="muted">Generated {{ generated }} by the FIGAN platform. All gates:
{% if verdict is none %}not evaluated{% elif verdict == 'pass' %}<span class="pass">PASS</span>{% else %}<span class="fail">FAIL</span>{% endif %}.
Self-contained page: every figure is embedded; nothing is fetched.</p>
<nav><a href="#cautions">Cautions</a><a href="#lineage">Lineage</a><a href="#variance">PLS variance</a>
<a href="#components">Components</a><a href="#fid">FID</a><a href="#checks">Checks</a><a href="#drift">Drift</a>
<a href="#diff">Diff to previous version</a></nav>

<section id="cautions">
<h2>Cautions</h2>
{% if cautions %}
{% for c in cautions %}<div class="caution" data-kind="{{ c.kind }}"><b>{{ c.kind }}</b>{{ c.text }}</div>
{% endfor %}
{% else %}<div class="ok">No caution: every gate passed, every component explains at least {{ min_pct }} % of the
target variance, and no drift or unmatched top component was found.</div>{% endif %}
</section>

<section id="lineage">
<h2>Lineage</h2>
<table>{% for k, v in lineage %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<p id="audit"><b>Tamper evidence.</b> This page and every other file of the explanation are listed with their
sha256, next to the inputs above, in the signed manifest <code>{{ manifest_path }}</code> of the same MLflow run;
its own sha256 is the run's and the model version's tag <code>figan.manifest_sha256</code>.
<code>figan verify {{ verify_target }}</code> downloads the run and checks every file, the signature and the tag.</p>
{% if config %}<details><summary>Explain configuration ({{ config|length }} settings)</summary>
<table>{% for k, v in config %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table></details>{% endif %}
</section>

<section id="variance">
<h2>PLS components: share of the target variance</h2>
<p>The CNN's learned features are reduced with PLS against its target; each component is one direction of feature
space, ranked by the share of the (standardised) target variance it explains. Together:
<b>{{ fmt(cum_pct) }} %</b>.</p>
{% if variance_png %}<img src="{{ variance_png }}" alt="% target variance per PLS component">{% endif %}
<table><tr><th>component</th>{% for p in pct %}<th>c{{ loop.index }}</th>{% endfor %}</tr>
<tr><th>% target variance</th>{% for p in pct %}<td class="num">{{ fmt(p) }}</td>{% endfor %}</tr></table>
{% if layer_selection %}<h3>Which features: candidate layers chosen by FID</h3>
<p>As in FIGAN, the generator was fitted on each candidate layer's PLS scores and the layer whose sweep frames
reached the lowest FID against held-out real images was explained ({{ layer_selection.rule }}).</p>
<table class="layer-selection"><tr><th>layer</th><th>features</th><th>components</th><th>% target variance</th>
<th>FID</th><th></th></tr>
{% for c in layer_selection.candidates %}<tr><td>{{ c.layer }}</td><td class="num">{{ c.n_features }}</td>
<td class="num">{{ c.n_components }}</td><td class="num">{{ fmt(c.pct_target_variance) }}</td>
<td class="num">{{ fmt(c.fid) }}</td><td>{{ 'chosen' if c.layer == layer_selection.chosen else '' }}</td></tr>
{% endfor %}</table>{% endif %}
</section>

<section id="components">
<h2>Components</h2>
<p class="muted">Each sweep moves one component {{ sweep_label }} (values in SD of the component's scores) with the
other components and the seed fixed. Eigen image: the leading pattern of pixel change along the sweep (red = brighter as
the component increases). Deviation images: each frame minus the frame at 0 SD.</p>
{% for c in components %}
<div class="comp" id="component-{{ c.n }}">
<h3>Component {{ c.n }} — {{ fmt(c.pct) }} % of target variance{% if c.small %} <span class="fail">(&lt; {{ min_pct }} %)</span>{% endif %}</h3>
<p>Faithfulness ρ = {{ fmt(c.faith.get('rho_mean')) }}
<span class="{{ 'pass' if c.faith_ok else 'fail' }}">{{ 'ok' if c.faith_ok else 'below ' ~ th.faithfulness }}</span>;
conditioning r = {{ fmt(c.cond.get('r_pooled')) }}
<span class="{{ 'pass' if c.cond_ok else 'fail' }}">{{ 'ok' if c.cond_ok else 'below ' ~ th.conditioning }}</span>{% if c.reader %};
independent reader ρ = {{ fmt(c.reader.get('rho_mean')) }}{% endif %}{% if c.range %}; sweep {{ fmt(c.range.get('lo')) }} →
{{ fmt(c.range.get('hi')) }} SD, checks on {{ c.range.get('n_seeds') }} seeds{% endif %}.</p>
<div class="imgs">
{% if c.gif %}<figure><img class="gif" src="{{ c.gif }}" alt="component {{ c.n }} sweep (animated)"><figcaption>sweep, seed 0</figcaption></figure>{% endif %}
{% if c.eigen %}<figure><img src="{{ c.eigen }}" alt="component {{ c.n }} eigen image" width="360"><figcaption>eigen image</figcaption></figure>{% endif %}
</div>
<div class="imgs">
{% if c.strip %}<figure><img src="{{ c.strip }}" alt="component {{ c.n }} strip"><figcaption>strip: rows = noise seeds</figcaption></figure>{% endif %}
{% if c.deviation %}<figure><img src="{{ c.deviation }}" alt="component {{ c.n }} deviation images"><figcaption>deviation images</figcaption></figure>{% endif %}
</div>
{% if c.attribution %}<div class="imgs attribution">
<figure><img src="{{ c.attribution }}" alt="component {{ c.n }} attribution maps"><figcaption>{{ attribution_caption }}</figcaption></figure>
</div>{% endif %}
{% if c.real_cases %}<div class="imgs real-cases">
<figure><img src="{{ c.real_cases }}" alt="component {{ c.n }} real cases"><figcaption>real cases: {{ c.n_cases }}
real images held out from the generator's seeds, picked low → high on this component, each swept around itself
(red outline: the image at its own score){% if c.poor_cases %}; <span class="fail">{{ c.poor_cases }} registered
poorly to the template</span>{% endif %}</figcaption></figure>
</div>{% endif %}
</div>
{% endfor %}
</section>

<section id="fid">
<h2>Image quality: FID</h2>
{% if fid.get('best') is not none %}
<p>FID <b>{{ fmt(fid.best) }}</b>{% if fid.get('best_step') is not none %} (cGAN checkpoint of step {{ fid.get('best_step') }}){% endif %}{% if fid.get('protocol') %} on {{ fid.protocol }}{% endif %}; real-vs-real floor
<b>{{ fmt(fid.get('floor')) }}</b>{% if fid.get('ratio') %} (ratio {{ fmt(fid.ratio) }}×){% endif %};
{{ fid.get('n_samples') }} images per side. Feature extractor: <b>{{ fid.get('extractor') }}</b>.
FID values are only comparable with the same extractor and sample size.</p>
{% else %}<p>No FID was computed.</p>{% endif %}
{% if fid_png %}<img src="{{ fid_png }}" alt="FID trace with real-vs-real floor">{% endif %}
{% if diversity %}<p>Diversity across seeds at a fixed c: pixel distance {{ fmt(diversity.get('pixel_ratio', diversity.get('ratio'))) }}×
that between real images{% if diversity.get('factor_ratio') %}; per measured nuisance (spread across seeds / spread of
real images at the same c): {% for k, v in diversity.factor_ratio.items() %}{{ k }} {{ fmt(v) }}{% if not loop.last %}, {% endif %}{% endfor %}{% endif %}.</p>{% endif %}
<p class="muted">Generator: {{ training.get('generator', 'cgan') }}, {{ training.get('resolution') }}² px, device
{{ training.get('device') }}{% if training.get('patient_pool') %}, {{ training.patient_pool }} real patients as seeds{% endif %}.</p>
</section>

<section id="checks">
<h2>Checks</h2>
<h3 id="faithfulness">Faithfulness: does the CNN's output follow the sweep?</h3>
<table><tr><th>component</th><th>% variance</th><th>ρ mean</th><th>ρ min</th><th>ρ per seed</th><th>≥ {{ th.faithfulness }}</th></tr>
{% for c in components %}<tr><td>c{{ c.n }}</td><td class="num">{{ fmt(c.pct) }}</td><td class="num">{{ fmt(c.faith.get('rho_mean')) }}</td>
<td class="num">{{ fmt(c.faith.get('rho_min')) }}</td><td>{{ fmt(c.faith.get('rho_per_seed')) }}</td>
<td class="{{ 'pass' if c.faith_ok else 'fail' }}">{{ 'yes' if c.faith_ok else 'no' }}</td></tr>{% endfor %}
</table>
<p class="muted">Components under {{ th.min_variance_pct }} % of the target variance are reported but not gated.</p>
<h3 id="conditioning">Conditioning fidelity: do generated images carry the requested scores?</h3>
<table><tr><th>component</th><th>r along sweep</th><th>slope</th><th>r (random conditions)</th><th>≥ {{ th.conditioning }}</th></tr>
{% for c in components %}<tr><td>c{{ c.n }}</td><td class="num">{{ fmt(c.cond.get('r_pooled')) }}</td><td class="num">{{ fmt(c.cond.get('slope')) }}</td>
<td class="num">{{ fmt(c.cond.get('r_random')) }}</td><td class="{{ 'pass' if c.cond_ok else 'fail' }}">{{ 'yes' if c.cond_ok else 'no' }}</td></tr>{% endfor %}
</table>
<h3 id="ground-truth">Ground truth: which known factor does each sweep move?</h3>
{% if components and components[0].gt %}
<table><tr><th>component</th><th>factor</th><th>ρ along sweep</th><th>effect (SD) [95 % CI]</th><th>expected effect (SD) [95 % CI]</th></tr>
{% for c in components %}{% for name, g in c.gt %}<tr><td>c{{ c.n }}</td><td>{{ name }}</td><td class="num">{{ fmt(g.get('rho')) }}</td>
<td class="num">{{ fmt(g.get('effect_sd')) }}{% if g.get('ci95') %} [{{ fmt(g.ci95[0]) }}, {{ fmt(g.ci95[1]) }}]{% endif %}</td>
<td class="num">{{ fmt(g.get('expected_effect_sd')) }}{% if g.get('expected_ci95') %} [{{ fmt(g.expected_ci95[0]) }}, {{ fmt(g.expected_ci95[1]) }}]{% endif %}</td></tr>{% endfor %}{% endfor %}
</table>
{% else %}<p>No ground truth: the dataset declares no measurable factors (only phantoms have a ruler).</p>{% endif %}
<h3 id="gates">Gates</h3>
<table><tr><th>gate</th><th>result</th><th>details</th></tr>
{% for name, g in gates %}<tr><td>{{ name }}</td><td class="{{ 'pass' if g.get('pass') else 'fail' }}">{{ 'PASS' if g.get('pass') else 'FAIL' }}</td>
<td>{% for k, v in g.items() if k != 'pass' %}{{ k }}: {{ fmt(v) }}{% if not loop.last %}; {% endif %}{% endfor %}</td></tr>{% endfor %}
</table>
</section>

<section id="drift">
<h2>Drift against the previous version</h2>
{% if not drift %}<p>No drift comparison: there is no earlier explained version of this model, or drift was not run.</p>
{% else %}
{% if drift_previous %}<table>{% for k, v in drift_previous %}<tr><th>previous {{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>{% endif %}
<h3>Data drift (dataset version → dataset version)</h3>
{% if drift.get('data') and drift.data.get('headline') %}<p><b>{{ drift.data.headline }}</b></p>{% endif %}
{% if drift_data %}<table>{% for k, v in drift_data %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>{% else %}<p>Not computed.</p>{% endif %}
{% if drift.get('data') and drift.data.get('columns') %}
<table><tr><th>image statistic</th><th>method</th><th>score</th><th>drifted</th></tr>
{% for name, col in drift.data.columns.items() %}<tr><td>{{ name }}</td><td>{{ col.get('method') }}</td><td class="num">{{ fmt(col.get('score')) }}</td>
<td class="{{ 'fail' if col.get('drifted') else 'pass' }}">{{ 'yes' if col.get('drifted') else 'no' }}</td></tr>{% endfor %}</table>{% endif %}
<h3>Learned-feature drift (CNN version → CNN version, same images)</h3>
{% if drift.get('features') and drift.features.get('headline') %}<p><b>{{ drift.features.headline }}</b></p>{% endif %}
{% if drift_features %}<table>{% for k, v in drift_features %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>{% else %}<p>Not computed.</p>{% endif %}
<p class="muted">The interactive Evidently reports are stored next to this page in the run's artifacts
(drift/*.html).</p>
{% endif %}
</section>

<section id="diff">
<h2>Diff to the previous version</h2>
{% if not diff %}<p>No previous explained version to compare with.</p>
{% else %}
<p>{{ diff.current.label }} vs {{ diff.previous.label }} on {{ diff.n_images }} shared images (both CNNs and their
PLS applied to the same images; components compared through their scores). {{ diff.n_matched }} of
{{ diff.current.n_components }} components matched at |r| ≥ {{ diff.config.min_abs_corr }}.
Top component: {% if diff.flags.new_top_component_unmatched %}<span class="fail">matches none of the previous top {{ diff.top.top_n }}</span>
{% else %}<span class="pass">matches previous c{{ diff.top.best_previous }}</span>{% endif %} (r = {{ fmt(diff.top.r) }}).</p>
<table><tr><th>{{ diff.current.label }}</th><th>{{ diff.previous.label }}</th><th>r</th><th>angle</th><th>% variance now</th><th>% variance before</th><th>change (pp)</th><th>matched</th></tr>
{% for p in diff.pairs %}<tr><td>c{{ p.current }}</td><td>c{{ p.previous }}</td><td class="num">{{ fmt(p.r) }}</td><td class="num">{{ fmt(p.angle_deg) }}°</td>
<td class="num">{{ fmt(p.get('pct_current')) }}</td><td class="num">{{ fmt(p.get('pct_previous')) }}</td><td class="num">{{ fmt(p.get('delta_pct')) }}</td>
<td class="{{ 'pass' if p.matched else 'fail' }}">{{ 'yes' if p.matched else 'no' }}</td></tr>{% endfor %}
</table>
<p>Principal angles between the two versions' score subspaces: {{ fmt(diff.principal_angles_deg) }}°
(canonical correlations {{ fmt(diff.canonical_correlations) }}).</p>
{% if diff_png %}<img src="{{ diff_png }}" alt="matched components side by side">{% endif %}
{% endif %}
</section>
</body>
</html>
"""
