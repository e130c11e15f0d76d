"""The imaging dataset format, read in batches from disk.

A dataset is a folder::

    dataset.yaml   name, target (column or list of columns), task (regression | classification),
                   class_names (classification), optional factors {driving: [...], nuisance: [...],
                   shortcut: [...]} (manifest columns), optional description; every field is checked
                   (``FIELD_CHECKS``) and an unknown one is an error
    manifest.csv   path (relative to the folder), the target column(s), optional split (train/val/test),
                   optional mask (path of a segmentation PNG, integer labels), any extra columns
    images/        PNG, 8/16-bit greyscale or RGB
    masks/         optional

Images come out as float32 arrays in [0, 1], shape (N, C, H, W). Reading streams: only one batch of images is
in memory at a time (`iter_batches`), so a 20 000-image 256² set never needs all of its pixels at once.

Resize policy: every image must have the size of the first one. Mixed sizes are an error that names the first
offending file, unless the caller asks for a fixed ``size=(H, W)``, in which case every image is resized to it
(bilinear, antialiased; masks nearest).
"""
from __future__ import annotations

import copy
import dataclasses

import math
import shutil
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import yaml
from PIL import Image, UnidentifiedImageError

Task = Literal["regression", "classification"]
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset folder, its manifest or one of its images is not usable; the message names what and where."""


TASKS = ("regression", "classification")
FACTOR_GROUPS = ("driving", "nuisance", "shortcut")     # ground truth: what sets the target, what must not matter


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _text_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_text(x) for x in v)


def _check_name(v: Any) -> str | None:
    return None if _is_text(v) else "must be a non-empty string"


def _check_target(v: Any) -> str | None:
    return None if _is_text(v) or _text_list(v) else "must be a column name or a non-empty list of column names"


def _check_task(v: Any) -> str | None:
    return None if v in TASKS else f"must be {' or '.join(repr(t) for t in TASKS)}"


def _check_class_names(v: Any) -> str | None:
    if not _text_list(v):
        return "must be a non-empty list of class names (strings)"
    return None if len(set(v)) == len(v) else "must not repeat a class name"


def _check_factors(v: Any) -> str | None:
    example = "{driving: [heart_size], nuisance: [shift_x]}"
    if not isinstance(v, dict):
        return f"must be a mapping of {'/'.join(FACTOR_GROUPS)} to lists of manifest columns, e.g. {example}"
    unknown = [k for k in v if k not in FACTOR_GROUPS]
    if unknown:
        return f"has unknown group(s) {unknown} (groups: {', '.join(FACTOR_GROUPS)})"
    bad = [k for k, cols in v.items() if not _text_list(cols)]
    return f"group(s) {bad} must be non-empty lists of manifest columns, e.g. {example}" if bad else None


def _check_description(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


# Every field dataset.yaml may hold → its check (None when the value is fine, else what is wrong). A field not in
# this table is an error; a new field is one line here plus its DatasetMeta attribute.
FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": _check_name,
    "target": _check_target,
    "task": _check_task,
    "class_names": _check_class_names,
    "factors": _check_factors,
    "description": _check_description,
}
REQUIRED_FIELDS = ("name", "target", "task")


@dataclass
class DatasetMeta:
    name: str
    target: str | list[str]
    task: Task
    class_names: list[str] | None = None
    factors: dict[str, list[str]] | None = None  # ground-truth columns in the manifest (phantoms)
    description: str = ""

    @property
    def target_columns(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)

    @property
    def factor_columns(self) -> list[str]:
        return [c for group in (self.factors or {}).values() for c in group]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, d: dict, where: str = "dataset.yaml") -> "DatasetMeta":
        """The metadata of a dataset.yaml mapping, every field checked (:data:`FIELD_CHECKS`): a missing, unknown
        or mistyped field is a :class:`DatasetError` naming it. An optional field may be null (= absent)."""
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected a mapping, got {type(d).__name__}")
        unknown = [k for k in d if k not in FIELD_CHECKS]
        if unknown:
            raise DatasetError(f"{where}: unknown field(s) {unknown}; dataset.yaml has {list(FIELD_CHECKS)}")
        missing = [k for k in REQUIRED_FIELDS if d.get(k) is None]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {missing}")
        for field, check in FIELD_CHECKS.items():
            if d.get(field) is not None and (problem := check(d[field])) is not None:
                raise DatasetError(f"{where}: {field} {problem}, got {d[field]!r}")
        return cls(**{k: v for k, v in d.items() if v is not None})


# --------------------------------------------------------------------------------------------- pixels

def _to_float(img: Image.Image, path: str) -> np.ndarray:
    """PIL image -> float32 (C, H, W) in [0, 1]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = (a / scale)[None]
    elif img.mode == "L":
        a = np.asarray(img, dtype=np.float32)[None] / 255.0
    elif img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
        a = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    else:
        raise DatasetError(f"image {path!r}: unsupported PNG mode {img.mode!r}")
    return np.clip(a, 0.0, 1.0)


IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")      # what a dataset (and an upload) may hold; PIL tries no other decoder


def read_image(path: Path, size: tuple[int, int] | None = None, name: str | None = None) -> np.ndarray:
    """Read one image (PNG, JPEG or TIFF) as float32 (C, H, W) in [0, 1]; a clear DatasetError names an unreadable
    file, another format, or a decompression bomb (more pixels than PIL's ``MAX_IMAGE_PIXELS`` guard allows)."""
    name = name or str(path)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            img.load()
            if size is not None and img.size != (size[1], size[0]):
                if img.mode.startswith("I"):
                    img = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F")
                    arr = np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
                    return np.clip(arr / 65535.0, 0, 1)[None]
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return _to_float(img, name)
    except FileNotFoundError:
        raise DatasetError(f"image {name!r} listed in the manifest does not exist") from None
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {name!r} is refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise DatasetError(f"image {name!r} is not a {'/'.join(IMAGE_FORMATS)} image (or is corrupt)") from None
    except (OSError, SyntaxError) as e:
        raise DatasetError(f"image {name!r} is unreadable or corrupt: {e}") from None


def read_mask(path: Path, size: tuple[int, int] | None = None, name: str | None = None) -> np.ndarray:
    """Read a label mask as int64 (H, W)."""
    name = name or str(path)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            img.load()
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.NEAREST)
            return np.asarray(img.convert("L") if img.mode not in ("L", "I", "I;16") else img).astype(np.int64)
    except FileNotFoundError:
        raise DatasetError(f"mask {name!r} listed in the manifest does not exist") from None
    except Image.DecompressionBombError as e:
        raise DatasetError(f"mask {name!r} is refused as a decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"mask {name!r} is unreadable or corrupt: {e}") from None


def to_png(arr: np.ndarray, bits: int = 8) -> Image.Image:
    """float (C,H,W) or (H,W) in [0,1] -> PIL image (L, RGB or 16-bit greyscale)."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    a = np.clip(a, 0.0, 1.0)
    if a.ndim == 2:
        if bits == 16:
            return Image.fromarray((a * 65535 + 0.5).astype(np.uint16))
        return Image.fromarray((a * 255 + 0.5).astype(np.uint8), mode="L")
    if a.ndim == 3 and a.shape[0] == 3:
        return Image.fromarray((a.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8), mode="RGB")
    raise ValueError(f"cannot save an image of shape {a.shape} (expected (H,W), (1,H,W) or (3,H,W))")


# --------------------------------------------------------------------------------------------- dataset

class ImageDataset:
    """A validated dataset folder. Opening reads only dataset.yaml and manifest.csv, never pixels."""

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {str(self.root)!r} does not exist")
        meta_path, man_path = self.root / "dataset.yaml", self.root / "manifest.csv"
        if not meta_path.is_file():
            raise DatasetError(f"{self.root}: no dataset.yaml")
        if not man_path.is_file():
            raise DatasetError(f"{self.root}: no manifest.csv")
        try:
            self.meta = DatasetMeta.from_dict(yaml.safe_load(meta_path.read_text()), str(meta_path))
        except yaml.YAMLError as e:
            raise DatasetError(f"{meta_path}: not valid YAML: {e}") from None
        try:
            self.manifest = pd.read_csv(man_path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
            raise DatasetError(f"{man_path}: cannot parse: {e}") from None
        self._validate_manifest(man_path)
        self.size = size
        self._shape: tuple[int, int, int] | None = None

    # -- validation -------------------------------------------------------------------------------
    def _validate_manifest(self, man_path: Path) -> None:
        m, meta = self.manifest, self.meta
        need = ["path", *meta.target_columns]
        missing = [c for c in need if c not in m.columns]
        if missing:
            raise DatasetError(f"{man_path}: missing column(s) {missing} (has {list(m.columns)})")
        if len(m) == 0:
            raise DatasetError(f"{man_path}: the dataset is empty (no rows)")
        if m["path"].isna().any():
            raise DatasetError(f"{man_path}: empty 'path' in row(s) {list(np.flatnonzero(m['path'].isna())[:5])}")
        for col in ("path", "mask"):
            for p in (m[col].dropna().astype(str) if col in m.columns else ()):
                if Path(p).is_absolute() or ".." in Path(p).parts:
                    raise DatasetError(f"{man_path}: {col} {p!r} must be relative and inside the dataset folder")
        absent = [c for c in meta.factor_columns if c not in m.columns]
        if absent:
            raise DatasetError(f"{man_path}: factors name column(s) {absent} that the manifest lacks (has "
                               f"{list(m.columns)})")
        for c in meta.factor_columns:
            if not np.isfinite(pd.to_numeric(m[c], errors="coerce").to_numpy(dtype=np.float64)).all():
                raise DatasetError(f"{man_path}: factor column {c!r} must hold finite numbers (the checks regress "
                                   f"the ground truth on it)")
        if "split" in m.columns:
            bad = sorted(set(m["split"].dropna().astype(str)) - set(SPLITS))
            if bad:
                raise DatasetError(f"{man_path}: unknown split value(s) {bad}; use {list(SPLITS)}")
        if meta.task == "regression":
            for c in meta.target_columns:
                v = pd.to_numeric(m[c], errors="coerce").to_numpy(dtype=np.float64)
                bad = np.flatnonzero(~np.isfinite(v))
                if len(bad):
                    raise DatasetError(f"{man_path}: target column {c!r} has NaN/inf/non-numeric values "
                                       f"in {len(bad)} row(s), first at row {bad[0]} ({m['path'].iloc[bad[0]]})")
        else:
            if len(meta.target_columns) != 1:
                raise DatasetError(f"{man_path}: a classification dataset has exactly one target column")
            y = self._class_index(man_path)
            if len(np.unique(y)) < 2:
                raise DatasetError(f"{man_path}: classification target {meta.target!r} has a single class "
                                   f"({self.class_names[int(y[0])]!r}); at least two are needed")

    def _class_index(self, where) -> np.ndarray:
        col = self.manifest[self.meta.target_columns[0]]
        names = self.meta.class_names
        if col.isna().any():
            bad = np.flatnonzero(col.isna())
            raise DatasetError(f"{where}: target {self.meta.target!r} is empty in row {bad[0]}")
        if pd.api.types.is_numeric_dtype(col):
            y = col.to_numpy()
            if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
                raise DatasetError(f"{where}: class target {self.meta.target!r} must hold integer class indices")
            y = y.astype(np.int64)
            n = len(names) if names else int(y.max()) + 1
            if y.min() < 0 or y.max() >= n:
                raise DatasetError(f"{where}: class index out of range 0..{n - 1} in {self.meta.target!r}")
            return y
        if not names:
            raise DatasetError(f"{where}: string class labels need class_names in dataset.yaml")
        lut = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(col.astype(str)) - set(lut))
        if unknown:
            raise DatasetError(f"{where}: class label(s) {unknown[:5]} are not in class_names {names}")
        return col.astype(str).map(lut).to_numpy(np.int64)

    def with_target(self, target: str | list[str], task: str) -> "ImageDataset":
        """This dataset read against another target column (or columns) and task — e.g. the ones a registered CNN's
        contract names, which need not be the dataset.yaml default. Validated like the default target (a missing
        column or a non-class column names itself); the folder is not touched."""
        target = target[0] if isinstance(target, (list, tuple)) and len(target) == 1 else target
        if target == self.meta.target and task == self.meta.task:
            return self
        if task not in ("regression", "classification"):
            raise DatasetError(f"task must be 'regression' or 'classification', got {task!r}")
        same = task == "classification" and self.meta.task == "classification" and target == self.meta.target
        view = copy.copy(self)
        view.meta = dataclasses.replace(self.meta, target=list(target) if isinstance(target, (list, tuple)) else target,
                                        task=task, class_names=self.meta.class_names if same else None)
        view._validate_manifest(self.root / "manifest.csv")
        return view

    # -- properties -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def class_names(self) -> list[str]:
        if self.meta.class_names:
            return list(self.meta.class_names)
        return [str(i) for i in range(int(self.manifest[self.meta.target_columns[0]].max()) + 1)]

    @property
    def has_masks(self) -> bool:
        return "mask" in self.manifest.columns and self.manifest["mask"].notna().all()

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of a split (all rows when split is None, or when the manifest has no split column)."""
        if split is None or "split" not in self.manifest.columns:
            return np.arange(len(self))
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {list(SPLITS)}")
        return np.flatnonzero(self.manifest["split"].astype(str).to_numpy() == split)

    def targets(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """float64 (N, T) for regression; int64 (N,) class indices for classification."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        if self.meta.task == "classification":
            return self._class_index("manifest.csv")[idx]
        cols = self.meta.target_columns
        return self.manifest[cols].to_numpy(dtype=np.float64)[idx]

    def factors(self, indices: Sequence[int] | None = None) -> pd.DataFrame:
        """Ground-truth factor columns (phantoms), empty frame when the dataset has none."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        return self.manifest[self.meta.factor_columns].iloc[idx].reset_index(drop=True)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) every image is read at: the first image's, or (C, *size) when a size was asked for."""
        if self._shape is None:
            first = self.read(0)
            self._shape = tuple(first.shape)  # type: ignore[assignment]
        return self._shape

    # -- pixels -----------------------------------------------------------------------------------
    def _inside(self, rel: str) -> Path:
        """The file of a manifest entry; a symlink that leads out of the dataset folder is refused."""
        path = self.root / rel
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise DatasetError(f"{rel!r} leads outside the dataset folder {self.root} (a symlink); refused")
        return path

    def read(self, i: int) -> np.ndarray:
        rel = str(self.manifest["path"].iloc[i])
        img = read_image(self._inside(rel), self.size, name=rel)
        if self._shape is not None and img.shape != self._shape:
            if img.shape[1:] != self._shape[1:]:
                raise DatasetError(
                    f"image {rel!r} is {img.shape[2]}x{img.shape[1]} but the dataset's images are "
                    f"{self._shape[2]}x{self._shape[1]}; mixed sizes are not resized silently: pass "
                    f"size=(H, W) to resize every image to one size")
            if img.shape[0] == 1 and self._shape[0] == 3:
                img = np.repeat(img, 3, axis=0)
            elif img.shape[0] == 3 and self._shape[0] == 1:
                img = img.mean(axis=0, keepdims=True)
        return img

    def read_mask(self, i: int) -> np.ndarray:
        if "mask" not in self.manifest.columns:
            raise DatasetError(f"{self.root}: the manifest has no 'mask' column")
        rel = str(self.manifest["mask"].iloc[i])
        shape = self.image_shape
        return read_mask(self._inside(rel), shape[1:], name=rel)

    def load(self, indices: Sequence[int], masks: bool = False):
        """Images of the given rows as one float32 array (N, C, H, W) (and int64 masks (N, H, W))."""
        _ = self.image_shape
        imgs = np.stack([self.read(int(i)) for i in indices]) if len(indices) else \
            np.zeros((0, *self.image_shape), np.float32)
        if not masks:
            return imgs
        return imgs, np.stack([self.read_mask(int(i)) for i in indices])

    def iter_batches(self, batch_size: int = 256, indices: Sequence[int] | None = None,
                     masks: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (row indices, images float32 (B,C,H,W)[, masks]) reading one batch from disk at a time."""
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            out = self.load(b, masks=masks)
            yield (b, *out) if masks else (b, out)

    def n_batches(self, batch_size: int, indices: Sequence[int] | None = None) -> int:
        n = len(self) if indices is None else len(indices)
        return math.ceil(n / batch_size)


def open_dataset(root: str | Path, size: tuple[int, int] | None = None) -> ImageDataset:
    return ImageDataset(root, size=size)


def write_dataset(root: str | Path, meta: DatasetMeta, images: Iterable[np.ndarray], rows: pd.DataFrame | Sequence[dict],
                  masks: Iterable[np.ndarray] | None = None, bits: int = 8, overwrite: bool = False) -> ImageDataset:
    """Write a dataset folder. ``images`` yields float (C,H,W)/(H,W) arrays in [0,1], one per row of ``rows``
    (in order; streamed, so a generator keeps memory flat); ``masks`` yields integer (H,W) label maps.

    The folder is written beside the target and moved into place at the end, so a failure never leaves a half
    dataset, and an existing dataset is only replaced with ``overwrite=True``.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise DatasetError(f"{root} already exists and is not empty; pass overwrite=True to replace it")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    table = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows.reset_index(drop=True).copy()
    paths, mask_paths = [], []
    mask_iter = iter(masks) if masks is not None else None
    if mask_iter is not None:
        (tmp / "masks").mkdir()
    n = 0
    for i, img in enumerate(images):
        rel = f"images/{i:06d}.png"
        to_png(img, bits=bits).save(tmp / rel, optimize=False, compress_level=1)
        paths.append(rel)
        if mask_iter is not None:
            m = next(mask_iter)
            mrel = f"masks/{i:06d}.png"
            Image.fromarray(np.asarray(m, dtype=np.uint8), mode="L").save(tmp / mrel, compress_level=1)
            mask_paths.append(mrel)
        n += 1
    if n != len(table):
        shutil.rmtree(tmp)
        raise DatasetError(f"write_dataset: got {n} images for {len(table)} manifest rows")
    table.insert(0, "path", paths)
    if mask_iter is not None:
        table.insert(1, "mask", mask_paths)
    table.to_csv(tmp / "manifest.csv", index=False)
    (tmp / "dataset.yaml").write_text(yaml.safe_dump(meta.to_dict(), sort_keys=False))
    ImageDataset(tmp)  # validate before it replaces anything
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return ImageDataset(root)


def assign_splits(n: int, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> np.ndarray:
    """A reproducible train/val/test split column for n rows."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    cut1 = int(round(fractions[0] * n))
    cut2 = cut1 + int(round(fractions[1] * n))
    split = np.empty(n, dtype=object)
    split[order[:cut1]], split[order[cut1:cut2]], split[order[cut2:]] = "train", "val", "test"
    return split
