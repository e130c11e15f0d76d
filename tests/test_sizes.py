"""Saved models are rebuilt only within bounds (models/sizes.py): a tampered generator.json or pls.json that asks
for a huge size, a model whose tensors would exceed the byte budget, an oversized tensor file or an npz that
unpacks to gigabytes are refused with a message naming what was asked, at once, and without allocating it."""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from models.cgan import CGANConfig, Generator, load_generator
from models.patient_generator import PatientGenerator, save_patient_generator
from models.pls import fit_pls, load_pls, save_pls
from models.sizes import MAX_MODEL_BYTES, SizeError


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.fixture
def cgan_dir(tmp_path) -> Path:
    cfg = CGANConfig(resolution=16, ngf=8, z_dim=8, k=2)
    d = tmp_path / "best"
    d.mkdir()
    torch.save(Generator(cfg).state_dict(), d / "generator.pt")
    (d / "generator.json").write_text(json.dumps({"config": cfg.to_dict(), "step": 0}))
    return d


def _tamper(path: Path, section: str | None, **fields) -> None:
    meta = json.loads(path.read_text())
    (meta[section] if section else meta).update(fields)
    path.write_text(json.dumps(meta))


def _refused(load, match: str) -> None:
    """``load()`` raises a SizeError matching ``match`` within a second, resident memory growing < 50 MB."""
    before, t0 = _rss(), time.monotonic()
    with pytest.raises(SizeError, match=match):
        load()
    assert time.monotonic() - t0 < 1.0 and _rss() - before < 50 * 2 ** 20


def test_a_generator_within_bounds_loads(cgan_dir):
    G, cfg, _ = load_generator(cgan_dir)
    assert cfg.ngf == 8 and isinstance(G, Generator)


@pytest.mark.parametrize("field, value, match", [
    ("ngf", 10 ** 7, r"generator.json config: ngf=10000000 exceeds the maximum of 1024"),
    ("z_dim", 10 ** 9, r"z_dim=1000000000 exceeds the maximum of 4096"),
    ("k", -3, r"k=-3 is not a non-negative integer"),
    ("resolution", "huge", r"resolution='huge' is not a non-negative integer"),
])
def test_a_tampered_generator_json_is_refused_before_anything_is_built(cgan_dir, field, value, match):
    _tamper(cgan_dir / "generator.json", "config", **{field: value})
    _refused(lambda: load_generator(cgan_dir), match)


def test_sizes_within_bounds_that_add_up_to_too_many_bytes_are_refused(cgan_dir):
    _tamper(cgan_dir / "generator.json", "config", resolution=1024, ngf=1024)     # ~10 GiB of parameters
    _refused(lambda: load_generator(cgan_dir), rf"holds \d+ bytes of parameters and buffers, more than the maximum "
                                               rf"of {MAX_MODEL_BYTES}")
    _refused(lambda: load_generator(cgan_dir, max_bytes=10_000), "more than the maximum of 10000")


def test_a_tensor_file_larger_than_its_metadata_says_is_refused(cgan_dir):
    with open(cgan_dir / "generator.pt", "ab") as f:
        f.write(b"\0" * (2 << 20))
    _refused(lambda: load_generator(cgan_dir), "generator.pt: .* more than the .* bytes of tensors")


def test_a_tampered_patient_generator_is_refused(tmp_path):
    d = tmp_path / "patient"
    save_patient_generator(PatientGenerator(2, (1, 16, 16), 10), d, CGANConfig(resolution=16, k=2).to_dict())
    assert load_generator(d)[0].pool_images.shape == (10, 1, 16, 16)
    _tamper(d / "generator.json", "patient", n_pool=10 ** 9)
    _refused(lambda: load_generator(d), r"generator.json patient: n_pool=1000000000 exceeds the maximum of 1000000")
    _tamper(d / "generator.json", "patient", n_pool=900_000, image_shape=[1, 4096, 4096])     # ~14 TB of pool
    _refused(lambda: load_generator(d), "holds .* bytes of parameters and buffers")
    _tamper(d / "generator.json", "patient", n_pool=10, image_shape=[1, 10 ** 6, 16])
    _refused(lambda: load_generator(d), r"image_shape: image_side=1000000 exceeds the maximum of 4096")


@pytest.fixture
def pls_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    state, _ = fit_pls(x, x[:, 0] + 0.1 * rng.normal(size=60), "regression", n_components=2)
    return save_pls(state, tmp_path / "pls")


def test_a_tampered_pls_json_is_refused(pls_dir):
    assert load_pls(pls_dir).n_features == 6
    _tamper(pls_dir / "pls.json", None, n_features=10 ** 9)
    _refused(lambda: load_pls(pls_dir), r"pls.json: n_features=1000000000 exceeds the maximum of 1048576")


def test_an_npz_that_unpacks_to_far_more_than_its_arrays_is_refused(pls_dir):
    npz = pls_dir / "pls.npz"
    with zipfile.ZipFile(npz, "a", zipfile.ZIP_DEFLATED) as z, z.open("bomb.npy", "w", force_zip64=True) as f:
        for _ in range(256):                                    # 256 MiB of zeros, ~0.25 MiB on disk
            f.write(bytes(1 << 20))
    assert npz.stat().st_size < 2 << 20
    _refused(lambda: load_pls(pls_dir), r"pls.npz: unpacks to \d+ bytes, more than the \d+ bytes of arrays")


def test_an_oversized_metadata_file_is_refused_unread(cgan_dir):
    meta = json.loads((cgan_dir / "generator.json").read_text())
    meta["padding"] = "x" * (17 << 20)
    (cgan_dir / "generator.json").write_text(json.dumps(meta))
    _refused(lambda: load_generator(cgan_dir), r"generator.json: \d+ bytes, more than the \d+ a metadata file")
