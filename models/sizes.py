"""Upper bounds on what a saved model's metadata may ask for, checked before anything is built or read.

A generator or PLS state is rebuilt from small JSON files (``generator.json``, ``pls.json``) written next to its
tensors. A tampered or corrupt file could ask for a network a million channels wide, a pool of a billion patients
or a multi-gigabyte JSON document; building that first and failing later would exhaust memory. So every size
field is checked against a sane maximum, the module's total parameter + buffer bytes are counted on PyTorch's
``meta`` device (shapes only, nothing allocated) against a byte budget, and tensor files larger than what that
module holds are refused, all before a byte of the model is allocated. Errors name the file, the field, its value
and the bound.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

# size fields of generator.json (config and patient sections) and pls.json, and their maxima
LIMITS: dict[str, int] = {
    "resolution": 1024, "image_channels": 4, "mask_channels": 16, "k": 64, "z_dim": 4096, "ngf": 1024,
    "ndf": 1024, "regressor_width": 1024, "batch_size": 1 << 16, "n_pool": 1_000_000, "register_size": 1024,
    "image_side": 4096, "n_components": 64, "n_features": 1 << 20, "n_targets": 4096, "n_samples": 1 << 30,
}
MAX_MODEL_BYTES = 4 << 30           # parameters + buffers of one rebuilt model
MAX_JSON_BYTES = 16 << 20           # any metadata JSON read from a saved model or a published run
FILE_SLACK_BYTES = 1 << 20          # a tensor file's container overhead beyond the tensors themselves


class SizeError(ValueError):
    """Saved metadata asks for more than the bounds allow; the message names the file, field, value and bound."""


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file no larger than ``max_bytes`` (checked before it is read)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise SizeError(f"{path.name}: {size} bytes, more than the {max_bytes} a metadata file may have")
    return json.loads(path.read_text())


def check_sizes(values: Mapping[str, Any], where: str, limits: Mapping[str, int] = LIMITS) -> None:
    """Every field of ``values`` that ``limits`` names is an integer in 0..its bound."""
    for name, bound in limits.items():
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SizeError(f"{where}: {name}={value!r} is not a non-negative integer")
        if value > bound:
            raise SizeError(f"{where}: {name}={value} exceeds the maximum of {bound}")


def module_bytes_on_meta(build: Callable[[], nn.Module]) -> int:
    """Bytes of the parameters and buffers ``build()`` would allocate, counted on the meta device (shapes only)."""
    with torch.device("meta"):
        module = build()
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def check_model_bytes(nbytes: int, where: str, max_bytes: int = MAX_MODEL_BYTES) -> None:
    if nbytes > max_bytes:
        raise SizeError(f"{where}: the model it describes holds {nbytes} bytes of parameters and buffers, more "
                        f"than the maximum of {max_bytes}")


def check_file_fits(path: str | Path, nbytes: int, slack: int = FILE_SLACK_BYTES) -> None:
    """A tensor file no larger than the ``nbytes`` of tensors it should hold (plus its container's overhead)."""
    path = Path(path)
    size = path.stat().st_size
    if size > nbytes + slack:
        raise SizeError(f"{path.name}: {size} bytes, more than the {nbytes} bytes of tensors its metadata "
                        f"describes (+ {slack} overhead)")


def check_npz_fits(path: str | Path, nbytes: int, slack: int = FILE_SLACK_BYTES) -> None:
    """An ``.npz`` whose members, uncompressed (as its zip directory declares them), fit ``nbytes`` (+ slack):
    a small compressed file cannot unpack into gigabytes."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(info.file_size for info in z.infolist())
    except zipfile.BadZipFile as e:
        raise SizeError(f"{path.name}: not a readable npz ({e})") from None
    if declared > nbytes + slack:
        raise SizeError(f"{path.name}: unpacks to {declared} bytes, more than the {nbytes} bytes of arrays its "
                        f"metadata describes (+ {slack} overhead)")
