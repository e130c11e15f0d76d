"""What every benchmark writes beside its figures: the machine and the date, then ``results/<script>.json``."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch


def provenance() -> dict:
    """{"machine": cpu, cores, torch threads and version, load average (1, 5, 15 min: timings on a busy machine
    are slower); "date": now in UTC} for a results file."""
    return {"machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "load_average": [round(x, 2) for x in os.getloadavg()]},
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_results(path: Path, doc: dict) -> Path:
    """Print the figures (one per line) and write the whole document as JSON."""
    for k, v in doc.get("figures", {}).items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"written {path}")
    return path
