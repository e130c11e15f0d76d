"""The status table of registered versions (`figan status`, the demo): status, verdict, headline metrics, error."""
from __future__ import annotations

from mlflow import MlflowClient

from .explain import tracking_uri
from .registry import list_versions, verdict_tag
from .settings import Settings


def verdict_cell(row: dict) -> str:
    """The status table's verdict: ``pass`` or ``fail: fid, diversity`` for a published (done) explanation, ``-``
    otherwise (a running or failed version's verdict tag belongs to its previous explanation)."""
    if row.get("status") != "done" or not row.get("verdict"):
        return "-"
    return verdict_tag({"verdict": row["verdict"], "failing": row.get("failing_gates") or []})


def status_table(name: str | None = None) -> str:
    """One line per registered version (of ``name``, or of every opted-in model)."""
    rows = list_versions(MlflowClient(tracking_uri(Settings.load())), name)
    head = (f"{'model':<20} {'ver':>3} {'status':<8} {'verdict':<28} {'FID best':>9} {'% var (c1, c2, …)':<24} "
            f"{'faithfulness':<22} error")
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = ", ".join(f"{p:.1f}" for p in (r.get("pct_variance") or []))
        faith = ", ".join(f"{f:.2f}" for f in (r.get("faithfulness") or []))
        fid = r.get("fid_best")
        verdict = verdict_cell(r)
        lines.append(f"{r['name']:<20} {r['version']:>3} {str(r.get('status') or '-'):<8} {verdict:<28} "
                     f"{(f'{fid:.1f}' if isinstance(fid, (int, float)) else '-'):>9} {pct:<24} {faith:<22} "
                     f"{(r.get('error') or '')[:60]}")
    return "\n".join(lines)
