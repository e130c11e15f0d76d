"""Feature-layer selection by FID, as in FIGAN (Hasenstab et al. 2023): the authors fitted the generator on three
to five candidate feature maps of each CNN and kept the one whose generator reached the lowest FID.

Each candidate layer gets its own features, PLS and generator, fitted exactly as the explanation would fit them
(the cGAN for a fixed fraction of its step budget, so every candidate is judged at equal steps; the patient
generator completely, it has no steps), and the FID of its single-component sweep frames against the same held-out
real images (the explanation's protocol, :func:`models.explain.sweep_frame_samples`). The candidate with the lowest
FID is chosen; the explanation then runs on it. Candidates are independent, so the Prefect flow fans them out; the
registration of the images (the patient generator's slow part) does not depend on the layer and is shared.

Candidates are named as ``named_modules()`` names them; ``final`` (or null) is the input of the final Linear, the
default; ``auto`` is that plus the outputs of the last two convolutions (global-average pooled).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Callable

import torch.nn as nn

from .layout import REGISTRATION
from .data import ImageDataset
from .explain import (ExplainConfig, _log, prepare, stage_features, stage_pls, stage_train, sweep_frame_samples,
                      use_kept_generator)
from .features import FeatureError

AUTO = "auto"
FINAL = "final"                 # the input of the final Linear (ExplainConfig.layer = None)
SELECTION_FRACTION = 0.25       # of the cGAN's step budget, per candidate


def candidate_layers(model: nn.Module, spec: str | list | tuple) -> list[str | None]:
    """The candidates as ExplainConfig.layer values (None = final Linear input): ``auto`` or a list of names.
    A name the model does not have is an error naming it and listing the valid ones."""
    if spec == AUTO:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        return [None, *convs[-2:]]
    if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(s, str) or s is None for s in spec):
        raise FeatureError(f"layers must be 'auto' or a non-empty list of layer names, got {spec!r}")
    names = {n for n, _ in model.named_modules() if n}
    out: list[str | None] = []
    for s in spec:
        layer = None if s in (None, FINAL) else s
        if layer is not None and layer not in names:
            close = difflib.get_close_matches(layer, sorted(names), n=5, cutoff=0.4)
            shown = close + [n for n in sorted(names) if n not in close][:max(0, 15 - len(close))]
            more = f" (and {len(names) - len(shown)} more)" if len(names) > len(shown) else ""
            raise FeatureError(f"layers: {layer!r} is not a layer of the CNN; valid names: {shown}{more}, or "
                               f"{FINAL!r}")
        if layer not in out:
            out.append(layer)
    return out


def candidate_fid(run, n: int, seed: int) -> float:
    """FID of the candidate's single-component sweep frames against the held-out real images."""
    return float(run.scorer.score(sweep_frame_samples(run, n, seed)))


def evaluate_candidate(ds: ImageDataset, model: nn.Module, layer: str | None, out_dir: Path, cfg: ExplainConfig,
                       task: str | None, input_shape, pose_cache: Path | None, cnn_name: str = "cnn") -> dict:
    """Features, PLS and generator of one candidate in ``out_dir``; its % variance and FID."""
    steps = max(1, int(round(cfg.steps * SELECTION_FRACTION))) if cfg.generator != "patient" else cfg.steps
    ccfg = dataclasses.replace(cfg, layer=layer, layers=None, steps=steps)
    run = prepare(ds, model, out_dir, ccfg, task, input_shape, cnn_name=cnn_name)
    stage_features(run)
    stage_pls(run)
    stage_train(run, progress=False, pose_cache=pose_cache)
    use_kept_generator(run)
    n = min(cfg.fid_samples, len(run.real_a))
    fid = candidate_fid(run, n, cfg.seed + 13)
    result = {"layer": layer or FINAL, "n_features": int(run.features.shape[1]),
              "pct_target_variance": round(float(sum(run.pct)), 3), "n_components": len(run.pct),
              "fid": round(fid, 3), "fid_samples": n, "steps": steps, "extractor": run.scorer.label}
    _log(f"layer selection: {result['layer']}: {result['n_features']} features, "
         f"{result['pct_target_variance']:.1f} % of target variance, FID {fid:.2f}")
    return result


def choose(results: list[dict]) -> dict:
    """The candidate with the lowest FID (the first of equals) and every candidate's figures."""
    best = min(range(len(results)), key=lambda i: (results[i]["fid"], i))
    return {"candidates": results, "chosen": results[best]["layer"],
            "rule": "lowest FID of single-component sweep frames against held-out real images, at equal steps"}


def one_after_another(evaluate: Callable[[int, str | None], dict], candidates: list[tuple[int, str | None]]
                      ) -> list[dict]:
    """The default way to evaluate the remaining candidates: in turn, in this process."""
    return [evaluate(i, layer) for i, layer in candidates]


def select_layer(ds: ImageDataset, model: nn.Module, candidates: list[str | None], out_dir: str | Path,
                 cfg: ExplainConfig, task: str | None = None, input_shape=None, cnn_name: str = "cnn",
                 pose_cache: Path | None = None, fan_out=one_after_another,
                 evaluate: Callable[..., dict] = evaluate_candidate) -> dict:
    """Evaluate every candidate (in ``out_dir/candidate-<i>``) and choose; the choice and the table are also
    written to ``out_dir/layer_selection.json``. The first candidate runs alone: it computes the registration
    the others share (``pose_cache``, default ``out_dir/pose.pt``). ``fan_out(evaluate, [(i, layer), ...])``
    evaluates the rest, e.g. as concurrent Prefect tasks."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pose_cache = pose_cache or out / REGISTRATION

    def evaluate_one(i: int, layer: str | None) -> dict:
        return evaluate(ds, model, layer, out / f"candidate-{i}", cfg, task, input_shape, pose_cache, cnn_name)

    results = [evaluate_one(0, candidates[0]), *fan_out(evaluate_one, list(enumerate(candidates))[1:])]
    selection = choose(results)
    (out / "layer_selection.json").write_text(json.dumps(selection, indent=2))
    return selection


def chosen_layer(selection: dict) -> str | None:
    """The ExplainConfig.layer value of the choice."""
    return None if selection["chosen"] == FINAL else selection["chosen"]

