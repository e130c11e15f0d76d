"""`figan` command line for the FIGAN core (offline, no MLOps services needed).

    figan data phantom --out data/phantom --n 3000 --size 64
    figan data fashion --out data/fashion --task shirt_vs_tshirt
    figan train-cnn --data data/phantom --out runs/cnn
    figan components --data data/phantom --cnn runs/cnn --out runs/components
    figan explain --data data/phantom --cnn runs/cnn --out runs/explain [--steps 1500] [--config cfg.yaml]
    figan ablate --data data/phantom --cnn runs/cnn --out runs/ablation --sizes 500,2000 --resolutions 32,64
    figan demo-offline [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from . import layout
from .data import DatasetError, ImageDataset


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


_TYPES = {"int": int, "float": float, "str": str, "bool": _bool}


def _add_explain_args(p: argparse.ArgumentParser) -> None:
    """One --option per ExplainConfig field (types read from the dataclass), plus --config FILE."""
    from .explain import ExplainConfig
    p.add_argument("--config", type=Path, help="YAML/JSON file with ExplainConfig fields")
    for f in fields(ExplainConfig):
        if f.name == "seeds":
            typ = lambda s: tuple(int(x) for x in s.split(","))
        elif f.name == "sweep_quantiles":
            typ = lambda s: tuple(float(x) for x in s.split(","))
        elif f.name == "layers":                  # "auto" or comma-separated layer names
            typ = lambda s: s if s == "auto" else tuple(x for x in s.split(",") if x)
        else:
            typ = _TYPES[str(f.type).replace(" | None", "")]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=None,
                       help=f"default {f.default!r}")


def explain_config_from_args(args):
    from .explain import ExplainConfig
    d: dict = {}
    if getattr(args, "config", None):
        d.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for f in fields(ExplainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            d[f.name] = v
    return ExplainConfig.from_dict(d)


def cmd_data(args) -> int:
    if args.kind == "phantom":
        from .phantom import PhantomConfig, write_phantom
        cfg = PhantomConfig(n=args.n or 3000, size=args.size or 64, seed=args.seed, task=args.task or "regression",
                            shortcut=args.shortcut, masks=args.masks, name=args.name or "phantom")
        ds = write_phantom(args.out, cfg, overwrite=args.overwrite, image_format=args.image_format,
                           bits=16 if args.image_format == "dicom" else args.bits)
    else:
        from .fashion import write_fashion_mnist
        ds = write_fashion_mnist(args.out, task=args.task or "shirt_vs_tshirt", n=args.n, size=args.size or 28,
                                 seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {ds.name}: {len(ds)} images {ds.image_shape} → {ds.root}")
    return 0


def cmd_train_cnn(args) -> int:
    from .cnn import TrainConfig, save_cnn, train_cnn
    ds = ImageDataset(args.data)
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, width=args.width, seed=args.seed, lr=args.lr)
    model, spec = train_cnn(ds, cfg)
    save_cnn(model, spec, args.out)
    metrics = {k: v for k, v in spec.metrics.items() if k != "history"}
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


def cmd_components(args) -> int:
    """CNN → features → PLS on a dataset: scores, variance table and chart."""
    from .cnn import load_cnn
    from .explain import ExplainConfig, compute_features, fit_components
    from .pls import plot_variance, save_pls
    import pandas as pd
    ds = ImageDataset(args.data)
    model, spec = load_cnn(args.cnn)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    feats = compute_features(model, ds, args.layer)
    state, scores = fit_components(feats, ds, ExplainConfig(layer=args.layer, n_components=args.n_components))
    save_pls(state, out / layout.PLS_DIR, overwrite=True)
    pd.DataFrame(scores, columns=[f"c{j + 1}" for j in range(scores.shape[1])]).assign(
        path=ds.manifest["path"].values).to_csv(out / layout.SCORES, index=False)
    tab = state.variance_table()
    tab.to_csv(out / layout.PLS_VARIANCE_CSV, index=False)
    plot_variance(state, out / layout.PLS_VARIANCE_PNG, title=f"{spec.arch} on {ds.name}")
    print(tab.to_string(index=False))
    return 0


def cmd_explain(args) -> int:
    from .cnn import load_cnn
    from .explain import explain
    ds = ImageDataset(args.data)
    model, spec = load_cnn(args.cnn)
    cfg = explain_config_from_args(args)
    m = explain(ds, model, args.out, cfg, task=spec.task, input_shape=tuple(spec.input_shape),
                cnn_name=f"{spec.arch}@{Path(args.cnn).name}")
    print((Path(args.out) / layout.SUMMARY).read_text())
    return 0 if m.get("status") != "interrupted" else 3


def cmd_ablate(args) -> int:
    from .ablation import run_grid
    base = explain_config_from_args(args)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [None]
    res = [int(s) for s in args.resolutions.split(",")] if args.resolutions else [None]
    masks = [m == "on" for m in args.masks.split(",")] if args.masks else [base.use_masks]
    table = run_grid(args.data, args.cnn, args.out, base, sizes, res, masks)
    print(table.to_string(index=False))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(Path(args.workdir), quick=args.quick)


def add_core_commands(sub) -> None:
    """The offline core's subcommands; `flows.cli` adds the platform's on top of them."""

    d = sub.add_parser("data", help="write a dataset folder (phantom or Fashion-MNIST)")
    d.add_argument("kind", choices=["phantom", "fashion"])
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--n", type=int)
    d.add_argument("--size", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--task", help="phantom: regression|classification; fashion: shirt_vs_tshirt|10class")
    d.add_argument("--name")
    d.add_argument("--shortcut", action="store_true", help="phantom: plant a marker correlated with the label")
    d.add_argument("--masks", action="store_true", help="phantom: write heart/lung masks")
    d.add_argument("--image-format", choices=["png", "dicom"], default="png",
                   help="phantom: PNG files, or 16-bit DICOM files (the same stored values as 16-bit PNGs)")
    d.add_argument("--bits", type=int, choices=[8, 16], default=8, help="phantom: PNG bit depth")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(fn=cmd_data)

    t = sub.add_parser("train-cnn", help="train a demo CNN on a dataset")
    t.add_argument("--data", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--arch", default="smallcnn")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--width", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_train_cnn)

    c = sub.add_parser("components", help="CNN features → PLS: scores, variance table, chart")
    c.add_argument("--data", required=True, type=Path)
    c.add_argument("--cnn", required=True, type=Path)
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--layer")
    c.add_argument("--n-components", type=int)
    c.set_defaults(fn=cmd_components)

    e = sub.add_parser("explain", help="full FIGAN explanation into an artifacts folder")
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--cnn", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path)
    _add_explain_args(e)
    e.set_defaults(fn=cmd_explain)

    a = sub.add_parser("ablate", help="the paper's experiments as a grid: sample size x resolution x masks")
    a.add_argument("--data", required=True, type=Path)
    a.add_argument("--cnn", required=True, type=Path)
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--sizes", help="comma-separated training sample sizes")
    a.add_argument("--resolutions", help="comma-separated GAN resolutions")
    a.add_argument("--masks", help="on,off")
    _add_explain_args(a)
    a.set_defaults(fn=cmd_ablate)

    m = sub.add_parser("demo-offline", help="the core alone: phantom → CNN → explanation folder (no MLOps services)")
    m.add_argument("--workdir", default="runs/demo-offline")
    m.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for smoke tests")
    m.set_defaults(fn=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="figan", description="FIGAN explanation platform: core commands")
    add_core_commands(p.add_subparsers(dest="cmd", required=True))
    return p


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    try:
        return args.fn(args)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        print(f"figan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
