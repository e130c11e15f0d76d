"""What a dataset must pass before it is versioned, read from every image's header (never its pixels), and the
summary the version records.

:func:`audit_dataset` reads the header of every manifest row (``ImageDataset.header``: PIL for PNG/JPEG/TIFF,
pydicom without pixel data for DICOM, nibabel's header for NIfTI) and refuses, with a DatasetError naming the file:

* a file that is missing, unreadable, of another format, a DICOM transfer syntax that is not decoded, a
  multi-frame DICOM without a frame, a frame or slice out of range;
* mixed image sizes (the same error as reading them), unless the dataset is opened with a fixed ``size``;
* **patient-identifying DICOM tags**: files whose headers fill any of
  ``models.medical_images.IDENTIFYING_TAGS`` (or say BurnedInAnnotation YES) are refused with the list of those
  tags, how many files carry each, and one example file — unless dataset.yaml says ``phi: allowed``. The message
  and the summary carry tag keywords and counts only, never a tag's value.

The returned :class:`DatasetAudit` summarises the formats, the image size and the pixel spacing (DICOM Pixel
Spacing / NIfTI voxel sizes), which the data store writes into the version's metadata.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from models.data import DatasetError, ImageDataset, mixed_size_message


@dataclass(frozen=True)
class DatasetAudit:
    n_images: int
    image_size: tuple[int, int]                       # (H, W) of every image (the first one's)
    formats: dict[str, int]                           # PNG / JPEG / TIFF / DICOM / NIfTI -> images
    spacing_rows: tuple[float, ...] = ()              # (row, column) mm of every image that records one
    spacing_cols: tuple[float, ...] = ()
    identifying_tags: dict[str, int] = field(default_factory=dict)   # tag keyword -> files (only with phi: allowed)

    def pixel_spacing_summary(self) -> dict | None:
        """{images, row_mm: [min, median, max], col_mm: [...]} over the images that record a spacing."""
        if not self.spacing_rows:
            return None

        def spread(v: tuple[float, ...]) -> list[float]:
            a = np.asarray(v, dtype=np.float64)
            return [round(float(a.min()), 6), round(float(np.median(a)), 6), round(float(a.max()), 6)]

        return {"images": len(self.spacing_rows), "row_mm": spread(self.spacing_rows),
                "col_mm": spread(self.spacing_cols)}

    def summary(self) -> dict:
        """JSON-ready facts for the version's metadata (no tag values, no file names)."""
        out: dict = {"formats": dict(sorted(self.formats.items())), "image_size": list(self.image_size),
                     "pixel_spacing": self.pixel_spacing_summary()}
        if self.identifying_tags:
            out["phi"] = {"allowed": True, "tags": dict(sorted(self.identifying_tags.items()))}
        return out


def _phi_message(tags: Counter, n_files: int, example: str) -> str:
    listed = ", ".join(f"{tag} ({n} file{'s' if n > 1 else ''})" for tag, n in tags.most_common())
    return (f"{n_files} DICOM file{'s' if n_files > 1 else ''} carry patient-identifying tags: {listed}; e.g. "
            f"{example!r}. De-identify the files (DICOM PS3.15 basic confidentiality profile), or set "
            f"'phi: allowed' in dataset.yaml if this data may be stored and explained with identifying data")


def audit_dataset(ds: ImageDataset) -> DatasetAudit:
    """Read every image's header; raise DatasetError on the first problem (see the module docstring)."""
    formats: Counter = Counter()
    tags: Counter = Counter()
    phi_files: list[str] = []
    seen_files: set[str] = set()
    rows, cols = [], []
    size: tuple[int, int] | None = None
    paths = ds.manifest["path"].astype(str).tolist()
    for i, rel in enumerate(paths):
        h = ds.header(i)
        formats[h.format] += 1
        if size is None:
            size = (h.height, h.width)
        elif ds.size is None and (h.height, h.width) != size:
            raise DatasetError(mixed_size_message(rel, (h.height, h.width), size))
        spacing = ds.pixel_spacing(i, header=h)
        if spacing is not None:
            rows.append(spacing[0])
            cols.append(spacing[1])
        if h.identifying_tags and rel not in seen_files:
            tags.update(h.identifying_tags)
            phi_files.append(rel)
        seen_files.add(rel)
    if tags and not ds.meta.phi_allowed:
        raise DatasetError(_phi_message(tags, len(phi_files), phi_files[0]))
    assert size is not None                                   # an ImageDataset has at least one row
    return DatasetAudit(n_images=len(paths), image_size=ds.size or size, formats=dict(formats),
                        spacing_rows=tuple(rows), spacing_cols=tuple(cols), identifying_tags=dict(tags))
