"""DICOM files and NIfTI volumes as dataset images: pixels as float32 (C, H, W) in [0, 1], headers without pixels,
the dataset.yaml options that steer both, and a DICOM writer (the phantom's DICOM twin).

``models.data.read_image`` is the one entry point the rest of the code calls; it dispatches here by file name or
content (:func:`is_dicom`, :func:`is_nifti`). Errors are :class:`MedicalImageError` naming the file; ``models.data``
turns them into its ``DatasetError``.

**DICOM** (pydicom). One manifest row is one 2-D image:

* decoded only from the transfer syntaxes pydicom decodes by itself — uncompressed (implicit/explicit VR, little or
  big endian), deflated and RLE Lossless (:data:`DECODABLE_TRANSFER_SYNTAXES`). JPEG, JPEG-LS, JPEG 2000 and the
  others are refused with an error naming the file and the transfer syntax (name and UID), from the header alone,
  so a dataset never depends on which optional codec a machine happens to have;
* grey levels: the Modality LUT first (Rescale Slope/Intercept or a Modality LUT Sequence,
  ``pydicom.pixels.apply_modality_lut``), then the window, then [0, 1]:

  - a window given in dataset.yaml (``dicom: {window: {center: 40, width: 400}}``, in modality units, e.g. HU)
    maps [center − width/2, center + width/2] linearly onto [0, 1] (DICOM's LINEAR_EXACT), whatever the file says;
  - otherwise the file's own VOI LUT Sequence or Window Center/Width (its first one; its VOI LUT Function),
    applied by ``pydicom.pixels.apply_voi_lut``, its output range mapped onto [0, 1];
  - otherwise the full range the stored bits can hold (Bits Stored, Pixel Representation) through the Modality
    LUT, mapped onto [0, 1]: a 16-bit unsigned image without rescale reads as value / 65535, exactly like a
    16-bit PNG. The range does not depend on the image's content, so every image of a dataset is scaled alike;

* MONOCHROME1 (minimum = white) is inverted after the window, so bright always means high attenuation/signal;
  RGB and YBR_FULL(_422) come out as RGB (value / (2^BitsStored − 1), no window);
* **multi-frame** files: a row names its frame in the manifest's ``frame`` column (0-based); a multi-frame file
  without a frame on its row is an error naming the file and its frame count (so one row per frame, each with
  its own target); a frame on a single-frame file must be 0 or empty;
* pixel spacing: Pixel Spacing, else Imager Pixel Spacing (projection radiographs), as (row, column) mm;
* a frame of more than twice PIL's ``MAX_IMAGE_PIXELS`` is refused as a decompression bomb, as a PNG would be.

**NIfTI** (nibabel, ``.nii`` / ``.nii.gz``). A volume is sliced into 2-D images:

* the volume is first put in its closest canonical orientation (RAS+, ``nibabel.orientations.io_orientation``),
  so ``nifti: {axis: ...}`` means the same anatomy for every file: 0 = sagittal slices, 1 = coronal, 2 = axial
  (default). A slice is shown with the first remaining axis along the columns (increasing to the right) and the
  second along the rows (increasing upwards);
* manifest rows reference slices in one of two ways: a row with a ``slice`` value (0-based, along the axis) is
  that one slice; a row without one stands for the whole volume and ``models.data.ImageDataset`` expands it at
  open into one row per selected slice (every column copied, ``slice`` filled in): every ``every``-th slice
  (default 1) of all slices, or with ``slices: mask`` of the slices the row's mask volume (its ``mask`` column,
  also NIfTI) covers (any non-zero voxel);
* intensity: a window from dataset.yaml (``nifti: {window: {center, width}}``: [center − width/2, center +
  width/2] onto [0, 1]) or else the volume's robust range: its 0.5th to 99.5th percentile over all voxels, the
  same for every slice of that volume (clipped outside);
* pixel spacing: the canonical voxel sizes of the two in-plane axes, as (row, column) mm.
  2-D files are one-slice volumes; 4-D files are refused unless their fourth dimension is 1.

**Patient-identifying tags.** :func:`identifying_tags` lists the :data:`IDENTIFYING_TAGS` a DICOM header carries
with a non-empty value (the patient-identification attributes of the DICOM basic confidentiality profile, PS3.15
Annex E, plus Accession Number) and ``BurnedInAnnotation`` when it says YES. It returns tag keywords only, never
their values. Sex, age, size and weight are not listed: PS3.15's Retain Patient Characteristics option keeps them.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")
NIFTI_AXES = {0: "sagittal", 1: "coronal", 2: "axial"}
ROBUST_PERCENTILES = (0.5, 99.5)

# patient identification (PS3.15 Annex E, basic profile) and the record number that leads back to it
IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "PatientMotherBirthName", "MedicalRecordLocator",
    "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference", "Occupation", "MilitaryRank",
    "BranchOfService", "EthnicGroup", "PatientComments", "ResponsiblePerson", "AdditionalPatientHistory",
    "AccessionNumber",
)


class MedicalImageError(ValueError):
    """A DICOM file, a NIfTI volume or a dataset.yaml option for them is not usable; the message names it."""


# --------------------------------------------------------------------------------------------- options

def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MedicalImageError(f"{where} must be a finite number, got {v!r}")
    return float(v)


def _mapping(d: Any, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise MedicalImageError(f"{where} must be a mapping, got {type(d).__name__} {d!r}")
    unknown = sorted(set(map(str, d)) - set(allowed))
    if unknown:
        raise MedicalImageError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    return d


@dataclass(frozen=True)
class Window:
    """A linear intensity window: [center − width/2, center + width/2] maps onto [0, 1]."""

    center: float
    width: float

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Window":
        d = _mapping(d, where, ("center", "width"))
        missing = [k for k in ("center", "width") if k not in d]
        if missing:
            raise MedicalImageError(f"{where}: missing key(s) {missing}")
        width = _number(d["width"], f"{where}.width")
        if width <= 0:
            raise MedicalImageError(f"{where}.width must be > 0, got {d['width']!r}")
        return cls(center=_number(d["center"], f"{where}.center"), width=width)

    def to_dict(self) -> dict:
        return {"center": self.center, "width": self.width}

    def apply(self, values: np.ndarray) -> np.ndarray:
        lo = self.center - self.width / 2
        return np.clip((values - lo) / self.width, 0.0, 1.0)


@dataclass(frozen=True)
class DicomOptions:
    """dataset.yaml ``dicom:``: an optional window (modality units) that overrides the files' own."""

    window: Window | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "dicom") -> "DicomOptions":
        d = _mapping({} if d is None else d, where, ("window",))
        w = d.get("window")
        return cls(window=None if w is None else Window.from_dict(w, f"{where}.window"))

    def to_dict(self) -> dict:
        return {} if self.window is None else {"window": self.window.to_dict()}


@dataclass(frozen=True)
class NiftiOptions:
    """dataset.yaml ``nifti:``: which slices of each volume are images, and the intensity window."""

    axis: int = 2
    every: int = 1
    slices: Literal["all", "mask"] = "all"
    window: Window | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "nifti") -> "NiftiOptions":
        d = _mapping({} if d is None else d, where, ("axis", "every", "slices", "window"))
        axis, every, slices = d.get("axis", 2), d.get("every", 1), d.get("slices", "all")
        if isinstance(axis, bool) or axis not in NIFTI_AXES:
            named = ", ".join(f"{k} = {v}" for k, v in NIFTI_AXES.items())
            raise MedicalImageError(f"{where}.axis must be 0, 1 or 2 ({named} slices of the RAS+ volume), got "
                                    f"{axis!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise MedicalImageError(f"{where}.every must be an integer >= 1, got {every!r}")
        if slices not in ("all", "mask"):
            raise MedicalImageError(f"{where}.slices must be 'all' or 'mask' (the slices the row's mask volume "
                                    f"covers), got {slices!r}")
        w = d.get("window")
        return cls(axis=int(axis), every=int(every), slices=slices,
                   window=None if w is None else Window.from_dict(w, f"{where}.window"))

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"axis": self.axis, "every": self.every, "slices": self.slices}
        return d if self.window is None else {**d, "window": self.window.to_dict()}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    format: str                                   # PNG, JPEG, TIFF, DICOM or NIfTI
    height: int
    width: int
    channels: int
    pixel_spacing: tuple[float, float] | None = None     # (row, column) mm
    n_frames: int = 1                             # DICOM frames, or NIfTI slices along the chosen axis
    identifying_tags: tuple[str, ...] = ()        # DICOM only: tag keywords, never values


def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` name, or the DICOM preamble's ``DICM`` at byte 128."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_nifti(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _stamp(path: Path) -> tuple[str, int, int]:
    """A cache key that changes when the file does."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_mtime_ns, st.st_size


# --------------------------------------------------------------------------------------------- DICOM

DECODABLE_TRANSFER_SYNTAXES = {          # what pydicom decodes without any optional codec
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}


def _dcmread(path: Path, name: str, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise MedicalImageError(f"image {name!r} listed in the manifest does not exist") from None
    except InvalidDicomError:
        raise MedicalImageError(f"image {name!r} is not a DICOM file (no 'DICM' preamble / file meta)") from None
    except Exception as e:          # pydicom raises many types on truncated or malformed files
        raise MedicalImageError(f"image {name!r} is an unreadable or corrupt DICOM file: {e}") from None


def _check_dicom(ds, name: str, frame: int | None) -> int:
    """Raise unless FIGAN can decode this DICOM image (syntax, photometric, frame); return its frame count."""
    from pydicom.uid import UID
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        raise MedicalImageError(f"image {name!r}: DICOM file without a Transfer Syntax UID in its file meta")
    if ts not in DECODABLE_TRANSFER_SYNTAXES:
        raise MedicalImageError(f"image {name!r} uses the transfer syntax {UID(ts).name} ({ts}), which is not "
                                f"decoded here: only uncompressed, deflated or RLE Lossless DICOM is read (what "
                                f"pydicom decodes without extra codecs); decompress it first, e.g. `gdcmconv --raw "
                                f"in.dcm out.dcm`")
    if "Rows" not in ds or "Columns" not in ds:
        raise MedicalImageError(f"image {name!r}: DICOM file without an image (no Rows/Columns)")
    if int(ds.Rows) * int(ds.Columns) > 2 * Image.MAX_IMAGE_PIXELS:         # PIL's rule for PNG/JPEG/TIFF
        raise MedicalImageError(f"image {name!r} is refused as a decompression bomb: {ds.Rows}x{ds.Columns} pixels "
                                f"per frame, more than twice PIL's MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in MONOCHROME + COLOUR:
        raise MedicalImageError(f"image {name!r}: DICOM Photometric Interpretation {pi!r} is not supported "
                                f"(use one of {list(MONOCHROME + COLOUR)})")
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise MedicalImageError(f"image {name!r}: Number of Frames {ds.get('NumberOfFrames')!r} is not a "
                                f"number") from None
    if frame is None and n_frames > 1:
        raise MedicalImageError(f"image {name!r} is a multi-frame DICOM with {n_frames} frames: give its row a "
                                f"'frame' (0..{n_frames - 1}) in manifest.csv, one row per frame")
    if frame is not None and not 0 <= frame < n_frames:
        raise MedicalImageError(f"image {name!r}: frame {frame} is out of range (the file has {n_frames} "
                                f"frame{'s' if n_frames > 1 else ''}, 0..{n_frames - 1})")
    return n_frames


def _value_is_present(value: Any) -> bool:
    """Whether a tag's value says anything: an empty string, "^^^^" (an empty person name), an empty sequence or a
    list of such is absent."""
    from pydicom.dataset import Dataset
    from pydicom.valuerep import PersonName

    if value is None:
        return False
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, Dataset):                                  # a sequence item
        return len(value) > 0
    if not isinstance(value, (str, PersonName)) and isinstance(value, Iterable):   # multi-valued, a sequence
        return any(_value_is_present(v) for v in value)
    return bool(str(value).replace("^", "").replace("=", "").strip())


@functools.cache
def _identifying_tag_numbers() -> tuple[tuple[str, int], ...]:
    from pydicom.datadict import tag_for_keyword
    return tuple((kw, tag_for_keyword(kw)) for kw in IDENTIFYING_TAGS)


def identifying_tags(ds) -> tuple[str, ...]:
    """Keywords of the patient-identifying tags this DICOM header fills (never their values)."""
    found = [kw for kw, tag in _identifying_tag_numbers() if tag in ds and _value_is_present(ds[tag].value)]
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        found.append("BurnedInAnnotation")
    return tuple(found)


def _dicom_spacing(ds) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        if v is not None:
            try:
                row, col = (float(x) for x in v)
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return row, col
    return None


def dicom_header(path: Path, name: str, frame: int | None = None) -> ImageHeader:
    """The header of a DICOM image (no pixel decoding), checked as :func:`read_dicom` would."""
    ds = _dcmread(path, name, pixels=False)
    n_frames = _check_dicom(ds, name, frame)
    return ImageHeader(format="DICOM", height=int(ds.Rows), width=int(ds.Columns),
                       channels=1 if str(ds.PhotometricInterpretation) in MONOCHROME else 3,
                       pixel_spacing=_dicom_spacing(ds), n_frames=n_frames, identifying_tags=identifying_tags(ds))


def _stored_range(ds) -> np.ndarray:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return np.array([0, 2 ** bits - 1], dtype=np.int64)
    return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)


def _grey_to_unit(arr: np.ndarray, ds, options: DicomOptions) -> np.ndarray:
    """Modality LUT, window, [0, 1] of a MONOCHROME frame (before any MONOCHROME1 inversion)."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    if options.window is not None:                                  # LINEAR_EXACT, whatever the file says
        return options.window.apply(np.asarray(values, dtype=np.float64))
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        first, n = int(descriptor[1]), int(descriptor[0]) or 2 ** 16
        table = apply_voi(np.arange(first, first + n, dtype=np.int64), ds)      # the LUT's own output range
        lo, hi = float(table.min()), float(table.max())
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds).astype(np.float64)
    elif has_window:
        with np.errstate(over="ignore"):                                        # SIGMOID at ±1e12
            lo, hi = (float(v) for v in apply_windowing(np.array([-1e12, 1e12]), ds))
        out = apply_windowing(values, ds)
    else:
        lo, hi = (float(v) for v in apply_modality_lut(_stored_range(ds), ds))
        out = np.asarray(values, dtype=np.float64)
    if hi == lo:
        return np.zeros(out.shape, np.float64)
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(path: Path, name: str, frame: int | None = None,
               options: DicomOptions = DicomOptions()) -> np.ndarray:
    """One DICOM image (or frame) as float32 (C, H, W) in [0, 1]: Modality LUT, window, MONOCHROME1 inverted."""
    from pydicom.pixels import pixel_array

    ds = _dcmread(path, name, pixels=True)
    n_frames = _check_dicom(ds, name, frame)
    if "PixelData" not in ds:
        raise MedicalImageError(f"image {name!r}: DICOM file without Pixel Data")
    try:
        arr = pixel_array(ds, index=frame if n_frames > 1 else None)
    except Exception as e:          # truncated or inconsistent pixel data
        raise MedicalImageError(f"image {name!r}: DICOM pixel data cannot be decoded: {e}") from None
    pi = str(ds.PhotometricInterpretation)
    try:
        if pi in MONOCHROME:
            unit = _grey_to_unit(arr, ds, options)
            if pi == "MONOCHROME1":
                unit = 1.0 - unit
            return unit.astype(np.float32)[None]
        rgb = arr.astype(np.float64) / (2 ** int(ds.BitsStored) - 1)
        return np.clip(rgb, 0, 1).astype(np.float32).transpose(2, 0, 1)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError) as e:
        raise MedicalImageError(f"image {name!r}: DICOM grey-level transform failed (Modality LUT / window): "
                                f"{e}") from None


def write_dicom(path: Path, image: np.ndarray, uid_seed: str,
                pixel_spacing: tuple[float, float] | None = None) -> None:
    """Write a greyscale image (float (H, W) or (1, H, W) in [0, 1]) as a 16-bit MONOCHROME2 Secondary Capture
    DICOM, stored value = round(value × 65535) exactly as a 16-bit PNG stores it. UIDs derive from ``uid_seed``,
    so the same image and seed give the same bytes (the dataset's DVC md5 stays put). No patient data is written:
    the type-2 patient attributes are present and empty."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise MedicalImageError(f"write_dicom writes greyscale (H, W) or (1, H, W) images, got shape {a.shape}")
    stored = (np.clip(a, 0.0, 1.0) * 65535 + 0.5).astype(np.uint16)
    sop = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality, ds.ConversionType = "OT", "SYN"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "", "", ""
    ds.SeriesNumber, ds.InstanceNumber = None, None
    ds.BurnedInAnnotation = "NO"
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=16,
                      generate_instance_uid=False)
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------- NIfTI

def _nib_load(path: Path, name: str):
    import nibabel as nib
    try:
        return nib.load(path)
    except FileNotFoundError:
        raise MedicalImageError(f"image {name!r} listed in the manifest does not exist") from None
    except nib.filebasedimages.ImageFileError as e:
        raise MedicalImageError(f"image {name!r} is not a NIfTI volume: {e}") from None
    except Exception as e:
        raise MedicalImageError(f"image {name!r} is an unreadable or corrupt NIfTI file: {e}") from None


def _shape3(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        return shape                                                    # type: ignore[return-value]
    if len(shape) >= 4 and all(s == 1 for s in shape[3:]):
        return shape[:3]                                                # type: ignore[return-value]
    raise MedicalImageError(f"image {name!r} is a NIfTI volume of shape {tuple(shape)}; one 3-D volume per file "
                            f"(a 4-D series must be split)")


@functools.lru_cache(maxsize=256)
def _geometry(stamp: tuple[str, int, int], name: str) -> tuple[np.ndarray, tuple[int, int, int], tuple[float, ...]]:
    """(orientation to RAS+, canonical shape, canonical voxel sizes) from the header alone."""
    from nibabel.orientations import io_orientation

    img = _nib_load(Path(stamp[0]), name)
    shape = _shape3(tuple(int(s) for s in img.shape), name)
    zooms = (tuple(round(float(z), 6) for z in img.header.get_zooms()) + (1.0, 1.0, 1.0))[:3]
    ornt = io_orientation(img.affine)
    order = np.argsort(ornt[:, 0])                     # canonical axis k comes from input axis order[k]
    return ornt, tuple(shape[i] for i in order), tuple(zooms[i] for i in order)  # type: ignore[return-value]


@functools.lru_cache(maxsize=2)
def _canonical_volume(stamp: tuple[str, int, int], name: str, labels: bool) -> np.ndarray:
    """The whole volume in RAS+ order (float32 intensities, or int64 labels), read-only; the last two are cached so
    reading a volume slice by slice decodes it once."""
    from nibabel.orientations import apply_orientation

    img = _nib_load(Path(stamp[0]), name)
    ornt, _, _ = _geometry(stamp, name)
    try:
        data = np.asanyarray(img.dataobj) if labels else img.get_fdata(dtype=np.float32)
    except Exception as e:
        raise MedicalImageError(f"image {name!r}: the NIfTI voxel data cannot be read: {e}") from None
    data = data.reshape(_shape3(tuple(data.shape), name))
    vol = np.ascontiguousarray(apply_orientation(data, ornt))
    vol = np.rint(vol).astype(np.int64) if labels else vol.astype(np.float32, copy=False)
    vol.setflags(write=False)
    return vol


@functools.lru_cache(maxsize=64)
def _robust_range(stamp: tuple[str, int, int], name: str) -> tuple[float, float]:
    lo, hi = np.percentile(_canonical_volume(stamp, name, False), ROBUST_PERCENTILES)
    return float(lo), float(hi)


def _slice(vol: np.ndarray, index: int, axis: int) -> np.ndarray:
    """The 2-D image of one slice: first remaining axis along the columns, second along the rows, upwards."""
    return np.ascontiguousarray(np.take(vol, index, axis=axis).T[::-1])


def _check_slice(n: int, index: int, name: str, options: NiftiOptions) -> None:
    if not 0 <= index < n:
        raise MedicalImageError(f"image {name!r}: slice {index} is out of range (the volume has {n} "
                                f"{NIFTI_AXES[options.axis]} slices along axis {options.axis}, 0..{n - 1})")


def nifti_header(path: Path, name: str, slice_index: int | None = None,
                 options: NiftiOptions = NiftiOptions()) -> ImageHeader:
    """The geometry of a NIfTI volume's slices along ``options.axis`` (header only); n_frames = slice count."""
    _, shape, zooms = _geometry(_stamp_or_missing(path, name), name)
    if slice_index is not None:
        _check_slice(shape[options.axis], slice_index, name, options)
    cols, rows = (k for k in range(3) if k != options.axis)
    return ImageHeader(format="NIfTI", height=shape[rows], width=shape[cols], channels=1,
                       pixel_spacing=(zooms[rows], zooms[cols]), n_frames=shape[options.axis])


def _stamp_or_missing(path: Path, name: str) -> tuple[str, int, int]:
    try:
        return _stamp(path)
    except FileNotFoundError:
        raise MedicalImageError(f"image {name!r} listed in the manifest does not exist") from None


def nifti_slices(path: Path, name: str, options: NiftiOptions, mask: Path | None = None,
                 mask_name: str | None = None) -> list[int]:
    """The slice indices a whole-volume row expands into: every ``options.every``-th of all slices, or of those
    the mask volume covers (``slices: mask``)."""
    stamp = _stamp_or_missing(path, name)
    n = _geometry(stamp, name)[1][options.axis]
    if options.slices == "all":
        return list(range(0, n, options.every))
    if mask is None:
        raise MedicalImageError(f"image {name!r}: nifti.slices is 'mask' but its row has no mask volume")
    mask_name = mask_name or str(mask)
    mstamp = _stamp_or_missing(mask, mask_name)
    if _geometry(mstamp, mask_name)[1] != _geometry(stamp, name)[1]:
        raise MedicalImageError(f"mask {mask_name!r} has the shape {_geometry(mstamp, mask_name)[1]} (RAS+) but its "
                                f"image {name!r} has {_geometry(stamp, name)[1]}")
    labels = _canonical_volume(mstamp, mask_name, True)
    others = tuple(k for k in range(3) if k != options.axis)
    covered = np.flatnonzero((labels != 0).any(axis=others))
    return [int(k) for k in covered[::options.every]]


def read_nifti(path: Path, name: str, slice_index: int, options: NiftiOptions = NiftiOptions()) -> np.ndarray:
    """One slice as float32 (1, H, W) in [0, 1]: the dataset.yaml window, else the volume's robust range."""
    stamp = _stamp_or_missing(path, name)
    vol = _canonical_volume(stamp, name, False)
    _check_slice(vol.shape[options.axis], slice_index, name, options)
    values = _slice(vol, slice_index, options.axis).astype(np.float64)
    if options.window is not None:
        unit = options.window.apply(values)
    else:
        lo, hi = _robust_range(stamp, name)
        unit = np.zeros_like(values) if hi <= lo else np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return unit.astype(np.float32)[None]


def read_nifti_mask(path: Path, name: str, slice_index: int, options: NiftiOptions = NiftiOptions()) -> np.ndarray:
    """One slice of a NIfTI label volume as int64 (H, W), oriented like :func:`read_nifti`."""
    stamp = _stamp_or_missing(path, name)
    vol = _canonical_volume(stamp, name, True)
    _check_slice(vol.shape[options.axis], slice_index, name, options)
    return _slice(vol, slice_index, options.axis)
