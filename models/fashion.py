"""Fashion-MNIST (real images) converted to the platform's dataset folder format (see models/data.py).

Where the data come from: the Debian package ``dataset-fashion-mnist`` installs the four original IDX files
(gzip) under /usr/share/datasets/fashion-mnist. ``find_source`` looks, in order, at an explicit ``source``
folder, the ``FIGAN_FASHION_MNIST_DIR`` environment variable, the package's own file list (``dpkg -L``) and
the package's usual folder; an explicit folder (argument or variable) is never silently replaced by another.
The IDX format is read with numpy alone (big-endian header: magic, dimensions, then raw uint8).

What is written: a classification dataset, target column ``label`` holding the class index into
``class_names`` (plus ``class_name`` for people, and ``source_split`` / ``source_index`` / ``source_label``
for provenance). Tasks:

* ``shirt_vs_tshirt``: source classes 0 (T-shirt/top) and 6 (Shirt) as ["t-shirt", "shirt"], a hard binary
  problem with real texture/shape cues;
* ``10class``: all ten classes, names in ``FASHION_CLASSES``.

Splits: the source test set is ``test``; 10 % of the source training set (stratified by class, seeded) is
``val``; the rest is ``train``. ``n`` subsamples stratified by (split, class), so split proportions and class
balance are kept. ``size`` != 28 resizes with PIL bilinear (antialiased when shrinking). Pixels are streamed
to PNG one image at a time, so only the source uint8 arrays are ever in memory.
"""
from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from models.data import DatasetError, DatasetMeta, ImageDataset, write_dataset

DEBIAN_PACKAGE = "dataset-fashion-mnist"
ENV_VAR = "FIGAN_FASHION_MNIST_DIR"
DEFAULT_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES: list[str] = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                              "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TASKS: dict[str, tuple[list[int], list[str]]] = {
    "shirt_vs_tshirt": ([0, 6], ["t-shirt", "shirt"]),
    "10class": (list(range(10)), list(FASHION_CLASSES)),
}
VAL_FRACTION = 0.10
_FILES = {  # (source split, what) -> file stem
    ("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_INSTALL_HINT = f"install it with `apt-get install {DEBIAN_PACKAGE}` or set {ENV_VAR} to a folder holding the " \
                f"four Fashion-MNIST IDX files ({', '.join(s + '.gz' for s in _FILES.values())})"


# --------------------------------------------------------------------------------------------- locating

def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing_files(folder: Path) -> list[str]:
    return [stem for stem in _FILES.values() if _file_in(folder, stem) is None]


def _dpkg_dirs() -> list[Path]:
    """Folders holding the package's IDX files according to dpkg (empty when dpkg or the package is absent)."""
    if shutil.which("dpkg") is None:
        return []
    try:
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    stem = _FILES[("train", "images")]
    return [Path(line.strip()).parent for line in out.stdout.splitlines() if Path(line.strip()).name.startswith(stem)]


def find_source(source: str | Path | None = None) -> Path:
    """The folder with the four Fashion-MNIST IDX files; DatasetError (with the install hint) when absent."""
    explicit = source if source is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        folder = Path(explicit)
        where = "source" if source is not None else f"${ENV_VAR}"
        if not folder.is_dir():
            raise DatasetError(f"Fashion-MNIST {where} folder {str(folder)!r} does not exist; {_INSTALL_HINT}")
        missing = _missing_files(folder)
        if missing:
            raise DatasetError(f"Fashion-MNIST {where} folder {str(folder)!r} lacks {missing}; {_INSTALL_HINT}")
        return folder
    candidates = [*_dpkg_dirs(), *map(Path, DEFAULT_DIRS)]
    for folder in candidates:
        if folder.is_dir() and not _missing_files(folder):
            return folder
    raise DatasetError(f"Fashion-MNIST not found (looked in {[str(c) for c in dict.fromkeys(candidates)]}); "
                       f"{_INSTALL_HINT}")


# --------------------------------------------------------------------------------------------- IDX

def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) of unsigned bytes into a uint8 array of its declared shape."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:  # type: ignore[operator]
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"IDX file {str(path)!r} is unreadable: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"IDX file {str(path)!r}: bad magic number {data[:4].hex()!r}")
    if data[2] != 0x08:
        raise DatasetError(f"IDX file {str(path)!r}: element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DatasetError(f"IDX file {str(path)!r}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(data) - 4 - 4 * ndim != size:
        raise DatasetError(f"IDX file {str(path)!r}: header declares shape {shape} ({size} bytes) but the body has "
                           f"{len(data) - 4 - 4 * ndim} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def _load(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    f = Path(folder)
    images = read_idx(_file_in(f, _FILES[(split, "images")]))  # type: ignore[arg-type]
    labels = read_idx(_file_in(f, _FILES[(split, "labels")]))  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST {split} files in {folder!r}: images {images.shape} and labels "
                           f"{labels.shape} do not match")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"Fashion-MNIST {split} labels in {folder!r} go up to {labels.max()} (expected 0..9)")
    return images, labels


def load_fashion_mnist(source: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images uint8 (60000,28,28), labels uint8), "test": (...)} from the located source folder."""
    folder = str(find_source(source))
    return {split: _load(folder, split) for split in ("train", "test")}


# --------------------------------------------------------------------------------------------- selection

def _stratified_take(groups: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of k rows drawn without replacement, each group contributing in proportion to its size
    (largest remainder), so group shares are kept."""
    keys, counts = np.unique(groups, return_counts=True)
    exact = counts / counts.sum() * k
    take = np.floor(exact).astype(int)
    rest = k - take.sum()
    if rest:
        take[np.argsort(-(exact - take), kind="stable")[:rest]] += 1
    chosen = [rng.choice(np.flatnonzero(groups == g), size=t, replace=False) for g, t in zip(keys, take) if t]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def select_rows(labels: dict[str, np.ndarray], task: str, n: int | None, seed: int) -> pd.DataFrame:
    """The manifest rows (without pixels): source_split, source_index, source_label, label, class_name, split."""
    source_classes, names = TASKS[task]
    lut = {c: i for i, c in enumerate(source_classes)}
    rng = np.random.default_rng(seed)
    parts = []
    for src in ("train", "test"):
        idx = np.flatnonzero(np.isin(labels[src], source_classes))
        y = labels[src][idx]
        split = np.full(len(idx), "test" if src == "test" else "train", dtype=object)
        if src == "train":
            val = _stratified_take(y, int(round(VAL_FRACTION * len(idx))), rng)
            split[val] = "val"
        parts.append(pd.DataFrame({"source_split": src, "source_index": idx, "source_label": y.astype(np.int64),
                                   "split": split}))
    rows = pd.concat(parts, ignore_index=True)
    if n is not None:
        strata = rows["split"].astype(str) + ":" + rows["source_label"].astype(str)
        rows = rows.iloc[_stratified_take(strata.to_numpy(), n, rng)].reset_index(drop=True)
    rows["label"] = rows["source_label"].map(lut).astype(np.int64)
    rows["class_name"] = rows["label"].map(dict(enumerate(names)))
    order = {"train": 0, "val": 1, "test": 2}
    rows = rows.sort_values(["split", "source_split", "source_index"], key=lambda c: c.map(order) if c.name == "split"
                            else c, kind="stable").reset_index(drop=True)
    return rows[["label", "class_name", "split", "source_split", "source_index", "source_label"]]


def _pixels(rows: pd.DataFrame, data: dict[str, tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[np.ndarray]:
    """One float32 (1, size, size) image in [0, 1] per manifest row, resized bilinearly when size != 28."""
    for src, i in zip(rows["source_split"], rows["source_index"]):
        a = data[src][0][int(i)]
        if a.shape != (size, size):
            a = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
        yield (a.astype(np.float32) / 255.0)[None]


def _check_args(task: str, n: int | None, size: int, seed: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < len(TASKS[task][0])):
        raise ValueError(f"n must be None or an integer >= {len(TASKS[task][0])} (one per class) for task "
                         f"{task!r}, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 1024:
        raise ValueError(f"size must be an integer in 8..1024, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def write_fashion_mnist(root: str | Path, task: str = "shirt_vs_tshirt", n: int | None = None, size: int = 28,
                        seed: int = 0, overwrite: bool = False, *, source: str | Path | None = None,
                        name: str | None = None) -> ImageDataset:
    """Convert Fashion-MNIST into a dataset folder at ``root`` and return it opened (see the module docstring)."""
    _check_args(task, n, size, seed)
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:  # fail before reading 30 MB of source
        raise DatasetError(f"{root} already exists and is not empty; pass overwrite=True to replace it")
    data = load_fashion_mnist(source)
    labels = {k: v[1] for k, v in data.items()}
    available = int(sum(np.isin(v, TASKS[task][0]).sum() for v in labels.values()))
    if n is not None and n > available:
        raise ValueError(f"n={n} is more than the {available} Fashion-MNIST images of task {task!r}")
    rows = select_rows(labels, task, n, int(seed))
    meta = DatasetMeta(
        name=name or f"fashion-mnist-{task}", target="label", task="classification",
        class_names=list(TASKS[task][1]),
        description=(f"Fashion-MNIST ({DEBIAN_PACKAGE}), task {task}, {len(rows)} images at {size}x{size}, seed "
                     f"{seed}; split: source test -> test, {VAL_FRACTION:.0%} of source train -> val"),
    )
    return write_dataset(root, meta, _pixels(rows, data, int(size)), rows, overwrite=overwrite)
