"""The verdict of an explanation: whether its checks passed, and which gates failed.

``metrics.json`` carries it as ``"verdict": {"verdict": "pass" | "fail", "failing": [gate names]}`` (empty list on
pass) next to ``"gates"`` (``{name: {"pass": bool, ...}, "all_pass": bool}``). :func:`verdict_of` reads it, and
derives it from the gates for a ``metrics.json`` written before the key existed; every surface (registry tag,
status table, service, viewer, report) goes through it, so they cannot disagree.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PASS", "FAIL", "verdict_of", "verdict_text"]

PASS, FAIL = "pass", "fail"


def verdict_of(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """``{"verdict": "pass" | "fail", "failing": [...]}`` of an explanation's metrics, or None when the metrics
    carry neither a verdict nor gates (the checks were not evaluated).

    A stored ``verdict`` wins; otherwise ``gates.all_pass`` decides (when absent: pass iff no gate failed) and
    ``failing`` lists, in the gates' order, the gates whose ``pass`` is false."""
    stored = metrics.get("verdict")
    if isinstance(stored, dict) and stored.get("verdict") in (PASS, FAIL):
        failing = [str(g) for g in stored.get("failing") or []]
        return {"verdict": stored["verdict"], "failing": [] if stored["verdict"] == PASS else failing}
    gates = metrics.get("gates")
    if not isinstance(gates, dict) or not gates:
        return None
    failing = [str(name) for name, g in gates.items() if isinstance(g, dict) and not g.get("pass", False)]
    all_pass = gates.get("all_pass")
    passed = bool(all_pass) if isinstance(all_pass, bool) else not failing
    return {"verdict": PASS if passed else FAIL, "failing": [] if passed else failing}


def verdict_text(verdict: dict[str, Any] | None) -> str:
    """One line for people: ``PASS``, ``FAIL — failing gates: fid, diversity`` or ``not evaluated``."""
    if not verdict:
        return "not evaluated"
    if verdict["verdict"] == PASS:
        return "PASS"
    failing = verdict.get("failing") or []
    return "FAIL — failing gates: " + ", ".join(failing) if failing else "FAIL"
