"""The imaging dataset format, read in batches from disk.

A dataset is a folder::

    dataset.yaml   name, target (column or list of columns), task (regression | classification),
                   class_names (classification), optional factors {driving: [...], nuisance: [...],
                   shortcut: [...]} (manifest columns), optional description, dicom {window: {center, width}},
                   nifti {axis, every, slices, window}, phi (allowed | refused, the default: see
                   models.dataset_audit); every field is checked (``FIELD_CHECKS``) and an unknown one is an error
    manifest.csv   path (relative to the folder), the target column(s), optional split (train/val/test),
                   optional mask (path of a segmentation PNG, or a NIfTI label volume, integer labels),
                   optional frame (multi-frame DICOM) and slice (NIfTI), any extra columns
    images/        PNG/JPEG/TIFF (8/16-bit greyscale or RGB), DICOM files, NIfTI volumes (.nii, .nii.gz)
    masks/         optional

`read_image` is the single entry point for pixels: it reads PNG, JPEG and TIFF with PIL and dispatches DICOM
(``.dcm``/``.dicom`` or the ``DICM`` preamble) and NIfTI (``.nii``/``.nii.gz``) to ``models.medical_images``, whose
docstring says how grey levels are windowed, how multi-frame files map to rows (``frame`` column) and how volumes
become slices. A manifest row naming a NIfTI volume without a ``slice`` is expanded when the dataset is opened, into
one row per selected slice (so ``len(dataset)`` counts images, not files); opening then reads those volumes'
headers (and, with ``slices: mask``, their mask volumes) but no other pixels.

Images come out as float32 arrays in [0, 1], shape (N, C, H, W). Reading streams: only one batch of images is
in memory at a time (`iter_batches`), so a 20 000-image 256² set never needs all of its pixels at once.

Resize policy: every image must have the size of the first one. Mixed sizes are an error that names the first
offending file, unless the caller asks for a fixed ``size=(H, W)``, in which case every image is resized to it
(bilinear, antialiased; masks nearest).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import yaml
from PIL import Image, UnidentifiedImageError

from models.medical_images import (NIFTI_SUFFIXES, DicomOptions, ImageHeader, MedicalImageError, NiftiOptions,
                                   dicom_header, is_dicom, is_nifti, nifti_header, nifti_slices, read_dicom,
                                   read_nifti, read_nifti_mask, write_dicom)

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


def _check_mapping(example: str) -> Callable[[Any], str | None]:
    """dicom / nifti: a mapping here; its keys are checked where it is parsed (``models.medical_images``)."""
    return lambda v: None if isinstance(v, dict) else f"must be a mapping, e.g. {example}"


def _check_phi(v: Any) -> str | None:
    return None if v in ("allowed", "refused") else ("must be 'allowed' or 'refused' (the default: DICOM files "
                                                     "carrying patient-identifying tags are refused)")


# Every field dataset.yaml may hold → its check (None when the value is fine, else what is wrong). A field not in
# this table is an error; a new field is one line here plus its DatasetMeta attribute.
FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": _check_name,
    "target": _check_target,
    "task": _check_task,
    "class_names": _check_class_names,
    "factors": _check_factors,
    "description": _check_description,
    "dicom": _check_mapping("{window: {center: 40, width: 400}}"),
    "nifti": _check_mapping("{axis: 2, every: 4, slices: mask}"),
    "phi": _check_phi,
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
    dicom: DicomOptions | None = None            # how DICOM grey levels are windowed
    nifti: NiftiOptions | None = None            # which slices of a NIfTI volume are images, and their window
    phi: Literal["allowed", "refused"] | None = None   # DICOM files with patient-identifying tags: refused by default

    @property
    def target_columns(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)

    @property
    def dicom_options(self) -> DicomOptions:
        return self.dicom or DicomOptions()

    @property
    def nifti_options(self) -> NiftiOptions:
        return self.nifti or NiftiOptions()

    @property
    def phi_allowed(self) -> bool:
        return self.phi == "allowed"

    @property
    def factor_columns(self) -> list[str]:
        return [c for group in (self.factors or {}).values() for c in group]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v not in (None, "")}
        for key in ("dicom", "nifti"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key).to_dict()
        return d

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
        fields_ = {k: v for k, v in d.items() if v is not None}
        with _as_dataset_error():
            if "dicom" in fields_:
                fields_["dicom"] = DicomOptions.from_dict(d["dicom"], f"{where}: dicom")
            if "nifti" in fields_:
                fields_["nifti"] = NiftiOptions.from_dict(d["nifti"], f"{where}: nifti")
        return cls(**fields_)


@contextlib.contextmanager
def _as_dataset_error():
    """``models.medical_images`` names the file or field that is wrong; callers of this module catch DatasetError."""
    try:
        yield
    except MedicalImageError as e:
        raise DatasetError(str(e)) from None


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


IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")      # what PIL may decode (an upload too); PIL tries no other decoder
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
Kind = Literal["pil", "dicom", "nifti"]


def image_kind(path) -> Kind:
    """Which reader a file goes to: NIfTI by name (``.nii``/``.nii.gz``), DICOM by name (``.dcm``/``.dicom``) or by
    its ``DICM`` preamble, PIL otherwise (PNG/JPEG/TIFF by content; a file-like object always goes to PIL)."""
    if not isinstance(path, (str, os.PathLike)):
        return "pil"
    if is_nifti(path):
        return "nifti"
    if not str(path).lower().endswith(PIL_SUFFIXES) and is_dicom(path):
        return "dicom"
    return "pil"


def _check_index_kind(kind: Kind, name: str, frame: int | None, slice_index: int | None) -> None:
    if frame is not None and kind != "dicom":
        raise DatasetError(f"image {name!r}: a 'frame' ({frame}) applies to multi-frame DICOM files only")
    if slice_index is not None and kind != "nifti":
        raise DatasetError(f"image {name!r}: a 'slice' ({slice_index}) applies to NIfTI volumes only")
    if kind == "nifti" and slice_index is None:
        raise DatasetError(f"image {name!r} is a NIfTI volume: it is read one slice at a time (a 'slice' is needed)")


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) floats resized to size=(H, W) bilinearly (antialiased), (H, W) labels by nearest neighbour."""
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr.astype(np.int32), mode="I").resize((size[1], size[0]), Image.NEAREST),
                          dtype=np.int64)
    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((size[1], size[0]),
                                                                                       Image.BILINEAR),
                                dtype=np.float32) for c in arr]).clip(0.0, 1.0)


def read_image(path: Path, size: tuple[int, int] | None = None, name: str | None = None, *,
               frame: int | None = None, slice_index: int | None = None, dicom: DicomOptions | None = None,
               nifti: NiftiOptions | None = None) -> np.ndarray:
    """Read one image as float32 (C, H, W) in [0, 1]: PNG, JPEG or TIFF, a DICOM file (``frame`` of a multi-frame
    one) or one slice of a NIfTI volume (``slice_index``; ``dicom``/``nifti`` are the dataset.yaml options). A clear
    DatasetError names an unreadable file, another format, a decompression bomb (more pixels than PIL's
    ``MAX_IMAGE_PIXELS`` guard allows) or a DICOM transfer syntax that is not decoded."""
    name = name or str(path)
    kind = image_kind(path)
    _check_index_kind(kind, name, frame, slice_index)
    if kind != "pil":
        with _as_dataset_error():
            arr = read_dicom(path, name, frame, dicom or DicomOptions()) if kind == "dicom" else \
                read_nifti(path, name, slice_index, nifti or NiftiOptions())  # type: ignore[arg-type]
        return arr if size is None or arr.shape[1:] == tuple(size) else _resize(arr, size)
    with _pil_errors(name), Image.open(path, formats=IMAGE_FORMATS) as img:
        img.load()
        if size is not None and img.size != (size[1], size[0]):
            if img.mode.startswith("I"):
                img = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F")
                arr = np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
                return np.clip(arr / 65535.0, 0, 1)[None]
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return _to_float(img, name)


def read_header(path: Path, name: str | None = None, *, frame: int | None = None, slice_index: int | None = None,
                nifti: NiftiOptions | None = None) -> ImageHeader:
    """What one image's header says (format, size, channels, pixel spacing, DICOM identifying tags) without decoding
    its pixels; the same checks and errors as :func:`read_image` where a header can tell."""
    name = name or str(path)
    kind = image_kind(path)
    _check_index_kind(kind, name, frame, slice_index)
    if kind != "pil":
        with _as_dataset_error():
            return dicom_header(path, name, frame) if kind == "dicom" else \
                nifti_header(path, name, slice_index, nifti or NiftiOptions())
    with _pil_errors(name), Image.open(path, formats=IMAGE_FORMATS) as img:
        channels = 1 if img.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1") else 3
        return ImageHeader(format=str(img.format), height=img.size[1], width=img.size[0], channels=channels)


@contextlib.contextmanager
def _pil_errors(name: str):
    """PIL's errors on opening or decoding image ``name`` as the :class:`DatasetError` that names the file."""
    try:
        yield
    except FileNotFoundError:
        raise DatasetError(f"image {name!r} listed in the manifest does not exist") from None
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {name!r} is refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise DatasetError(f"image {name!r} is not a {'/'.join(IMAGE_FORMATS)} image (or is corrupt)") from None
    except (OSError, SyntaxError) as e:
        raise DatasetError(f"image {name!r} is unreadable or corrupt: {e}") from None


def read_mask(path: Path, size: tuple[int, int] | None = None, name: str | None = None, *,
              slice_index: int | None = None, nifti: NiftiOptions | None = None) -> np.ndarray:
    """Read a label mask as int64 (H, W): a PNG/TIFF, or one slice of a NIfTI label volume."""
    name = name or str(path)
    if image_kind(path) == "nifti":
        if slice_index is None:
            raise DatasetError(f"mask {name!r} is a NIfTI volume: it is read one slice at a time (a 'slice' is "
                               f"needed)")
        with _as_dataset_error():
            m = read_nifti_mask(path, name, slice_index, nifti or NiftiOptions())
        return m if size is None or m.shape == tuple(size) else _resize(m, size)
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

def mixed_size_message(rel: str, got_hw: Sequence[int], want_hw: Sequence[int]) -> str:
    """The one wording of the mixed-size error (reading, and the audit before versioning)."""
    return (f"image {rel!r} is {got_hw[1]}x{got_hw[0]} but the dataset's images are {want_hw[1]}x{want_hw[0]}; "
            f"mixed sizes are not resized silently: pass size=(H, W) to resize every image to one size")


INDEX_COLUMNS = ("frame", "slice")     # a multi-frame DICOM's frame, a NIfTI volume's slice (0-based)


class ImageDataset:
    """A validated dataset folder. Opening reads dataset.yaml and manifest.csv (and the headers of NIfTI volumes
    whose rows it expands into slices), never pixels."""

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
        self._validate_paths(man_path)
        self._validate_index_columns(man_path)
        self.manifest = self._expand_volumes()
        self._validate_manifest(man_path)
        self.size = size
        self._shape: tuple[int, int, int] | None = None

    # -- validation -------------------------------------------------------------------------------
    def _validate_paths(self, man_path: Path) -> None:
        m = self.manifest
        if "path" not in m.columns:
            raise DatasetError(f"{man_path}: missing column(s) ['path'] (has {list(m.columns)})")
        if m["path"].isna().any():
            raise DatasetError(f"{man_path}: empty 'path' in row(s) {list(np.flatnonzero(m['path'].isna())[:5])}")
        for col in ("path", "mask"):
            for p in (m[col].dropna().astype(str) if col in m.columns else ()):
                if Path(p).is_absolute() or ".." in Path(p).parts:
                    raise DatasetError(f"{man_path}: {col} {p!r} must be relative and inside the dataset folder")

    def _validate_index_columns(self, man_path: Path) -> None:
        """``frame`` and ``slice`` hold non-negative integers or nothing."""
        for col in INDEX_COLUMNS:
            if col not in self.manifest.columns:
                continue
            raw = self.manifest[col]
            v = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
            bad = np.flatnonzero((raw.notna().to_numpy() & ~np.isfinite(v))
                                 | (np.isfinite(v) & ((v < 0) | (v != np.round(v)))))
            if len(bad):
                raise DatasetError(f"{man_path}: column {col!r} must hold integers >= 0 (0-based) or nothing; row "
                                   f"{bad[0]} ({self.manifest['path'].iloc[bad[0]]}) has {raw.iloc[bad[0]]!r}")
            self.manifest[col] = pd.array([None if np.isnan(x) else int(x) for x in v], dtype="Int64")

    def _expand_volumes(self) -> pd.DataFrame:
        """One row per selected slice for each row that names a NIfTI volume without a ``slice``."""
        m = self.manifest
        rels = m["path"].astype(str).tolist()
        given = m["slice"] if "slice" in m.columns else pd.Series(pd.NA, index=m.index, dtype="Int64")
        whole = [rel.lower().endswith(NIFTI_SUFFIXES) and pd.isna(given.iloc[i]) for i, rel in enumerate(rels)]
        if not any(whole):
            return m
        opts = self.meta.nifti_options
        masks = m["mask"] if "mask" in m.columns else pd.Series(None, index=m.index, dtype=object)
        take: list[int] = []
        slices: list[int | None] = []
        for i, rel in enumerate(rels):
            if not whole[i]:
                take.append(i)
                slices.append(None if pd.isna(given.iloc[i]) else int(given.iloc[i]))
                continue
            mask_rel = None if pd.isna(masks.iloc[i]) else str(masks.iloc[i])
            with _as_dataset_error():
                picked = nifti_slices(self._inside(rel), rel, opts,
                                      mask=self._inside(mask_rel) if mask_rel else None, mask_name=mask_rel)
            take += [i] * len(picked)
            slices += picked
        out = m.iloc[take].reset_index(drop=True)
        out["slice"] = pd.array(slices, dtype="Int64")
        return out

    def _validate_manifest(self, man_path: Path) -> None:
        m, meta = self.manifest, self.meta
        need = ["path", *meta.target_columns]
        missing = [c for c in need if c not in m.columns]
        if missing:
            raise DatasetError(f"{man_path}: missing column(s) {missing} (has {list(m.columns)})")
        if len(m) == 0:
            raise DatasetError(f"{man_path}: the dataset is empty (no rows"
                               + (", or no selected NIfTI slices)" if "slice" in m.columns else ")"))
        self._validate_paths(man_path)
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

    def _index(self, i: int, col: str) -> int | None:
        """Row i's frame or slice (0-based), None when the manifest gives none."""
        if col not in self.manifest.columns:
            return None
        v = self.manifest[col].iloc[i]
        return None if pd.isna(v) else int(v)

    def header(self, i: int) -> ImageHeader:
        """Row i's image header (format, size, channels, pixel spacing, DICOM identifying tags); no pixels."""
        rel = str(self.manifest["path"].iloc[i])
        return read_header(self._inside(rel), rel, frame=self._index(i, "frame"), slice_index=self._index(i, "slice"),
                           nifti=self.meta.nifti_options)

    def pixel_spacing(self, i: int, header: ImageHeader | None = None) -> tuple[float, float] | None:
        """Row i's (row, column) pixel spacing in mm as read (scaled when the dataset resizes to ``size``);
        None when the file records none (PNG/JPEG/TIFF, DICOM without Pixel Spacing). ``header``: row i's, if
        already read."""
        h = header or self.header(i)
        if h.pixel_spacing is None or self.size is None:
            return h.pixel_spacing
        return h.pixel_spacing[0] * h.height / self.size[0], h.pixel_spacing[1] * h.width / self.size[1]

    def read(self, i: int) -> np.ndarray:
        rel = str(self.manifest["path"].iloc[i])
        img = read_image(self._inside(rel), self.size, name=rel, frame=self._index(i, "frame"),
                         slice_index=self._index(i, "slice"), dicom=self.meta.dicom_options,
                         nifti=self.meta.nifti_options)
        if self._shape is not None and img.shape != self._shape:
            if img.shape[1:] != self._shape[1:]:
                raise DatasetError(mixed_size_message(rel, img.shape[1:], self._shape[1:]))
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
        return read_mask(self._inside(rel), shape[1:], name=rel, slice_index=self._index(i, "slice"),
                         nifti=self.meta.nifti_options)

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


WRITE_FORMATS = ("png", "dicom")


def write_dataset(root: str | Path, meta: DatasetMeta, images: Iterable[np.ndarray], rows: pd.DataFrame | Sequence[dict],
                  masks: Iterable[np.ndarray] | None = None, bits: int = 8, overwrite: bool = False,
                  image_format: Literal["png", "dicom"] = "png") -> ImageDataset:
    """Write a dataset folder. ``images`` yields float (C,H,W)/(H,W) arrays in [0,1], one per row of ``rows``
    (in order; streamed, so a generator keeps memory flat); ``masks`` yields integer (H,W) label maps.
    ``image_format`` "png" writes ``bits``-bit PNGs; "dicom" writes 16-bit greyscale DICOM files
    (``models.medical_images.write_dicom``: the same stored values as a 16-bit PNG, deterministic UIDs, no patient
    data). Masks are PNGs either way.

    The folder is written beside the target and moved into place at the end, so a failure never leaves a half
    dataset, and an existing dataset is only replaced with ``overwrite=True``.
    """
    root = Path(root)
    if image_format not in WRITE_FORMATS:
        raise DatasetError(f"write_dataset: image_format must be one of {list(WRITE_FORMATS)}, got {image_format!r}")
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
        if image_format == "dicom":
            rel = f"images/{i:06d}.dcm"
            with _as_dataset_error():
                write_dicom(tmp / rel, img, uid_seed=f"{meta.name}/{i}")
        else:
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
