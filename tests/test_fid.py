"""Offline FID: the seeded randconv extractor for the figures, the shipped Inception-v3 for loading/shape checks."""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from models import fid


def _blobs(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Greyscale images of 1-3 soft blobs at random places: a small 'real' distribution."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = torch.full((n, 1, size, size), 0.1)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = 3 + 6 * float(torch.rand(1, generator=g))
            out[i, 0] += 0.6 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return out.clamp(0, 1)


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return _blobs(64, seed=0)


@pytest.fixture(scope="module")
def randconv():
    return fid.get_extractor("randconv")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_randconv_deterministic(real):
    a, b = fid.get_extractor("randconv"), fid.get_extractor("randconv")
    fa, fb = a(real[:4]), b(real[:4])
    assert fa.shape == (4, 256) and a.num_features == 256 and torch.equal(fa, fb)
    assert "seeded random CNN" in a.label and "NOT comparable" in a.label
    rgb = real[:4].expand(-1, 3, -1, -1)
    assert torch.allclose(a(rgb), fa)  # greyscale is repeated to 3 channels


def test_fid_identical_zero_shifted_large(real, randconv):
    scorer = fid.FIDScorer(real, extractor=randconv, batch_size=16)
    scale = float(np.var(scorer.features(real), axis=0, ddof=1).sum())  # trace of the real covariance
    same = scorer.score(real)
    shifted = scorer.score((real + 0.25).clamp(0, 1))
    assert 0.0 <= same < 1e-3 * scale
    assert shifted > 0.05 * scale and shifted > 1000 * max(same, 1e-6)
    # iterable of batches == one array; mask channels dropped with image_channels
    assert math.isclose(scorer.score([real[:10], real[10:30].numpy(), real[30:]]), same, abs_tol=1e-3 * scale)
    with_mask = torch.cat([real, torch.rand_like(real)], 1)
    assert math.isclose(scorer.score(with_mask, image_channels=1), same, abs_tol=1e-3 * scale)
    assert scorer.n_real == 64 and scorer.label == randconv.label
    # real stats are kept across calls
    assert math.isclose(scorer.score((real + 0.25).clamp(0, 1)), shifted, rel_tol=1e-4)


def test_fid_bad_inputs(real, randconv):
    with pytest.raises(ValueError, match="real_images"):
        fid.FIDScorer(real[:1], extractor=randconv)
    scorer = fid.FIDScorer(real[:8], extractor=randconv)
    with pytest.raises(ValueError, match="fake_images"):
        scorer.score(real[:1])
    with pytest.raises(ValueError, match="fake_images"):
        scorer.score(torch.cat([real[:4], real[:4]], 1))  # 2 channels without image_channels
    with pytest.raises(ValueError, match="fake_images"):
        scorer.score((real[:4] * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="extractor"):
        fid.get_extractor("vgg")
    with pytest.raises(ValueError, match="batch_size"):
        fid.FIDScorer(real, extractor=randconv, batch_size=0)


def test_real_floor(real, randconv):
    floor = fid.real_floor(real, extractor=randconv, seed=0)
    assert math.isfinite(floor) and floor >= 0
    scorer = fid.FIDScorer(real, extractor=randconv)
    assert floor < scorer.score((real + 0.25).clamp(0, 1))
    assert fid.real_floor(real, extractor=randconv, seed=0) == floor  # seeded split
    with pytest.raises(ValueError, match="real_images"):
        fid.real_floor(real[:3], extractor=randconv)


def test_diversity_ratio(real, randconv):
    r = fid.diversity_ratio(real[:32], real[32:], extractor=randconv)
    assert 0.75 < r < 1.33
    copies = real[:1].expand(8, -1, -1, -1)
    assert fid.diversity_ratio(copies, real, extractor=randconv) < 0.01
    # a sweep (S, F, C, H, W): seeds collapsed at every frame
    sweep = real[:4][None].expand(5, -1, -1, -1, -1)
    assert fid.diversity_ratio(sweep, real, extractor=randconv) < 0.01
    with pytest.raises(ValueError, match="fake"):
        fid.diversity_ratio(real[:1], real, extractor=randconv)


def test_inception_offline_sha1_shape_deterministic(no_network, tmp_path):
    path = fid.inception_path()
    assert path.name == "default_1.pt"
    assert fid.verify_sha1(path) == fid.INCEPTION_SHA1
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="SHA-1"):
        fid.verify_sha1(bad)
    ext = fid.get_extractor("inception_v3_pool3")
    assert ext.num_features == 2048 and "299² input" in ext.label and "Inception-v3 pool3" in ext.label
    x = _blobs(2, seed=1, size=64)
    f1, f2 = ext(x), ext(x)
    assert f1.shape == (2, 2048) and torch.equal(f1, f2) and torch.isfinite(f1).all() and (f1 >= 0).all()
    small = fid.get_extractor("inception_v3_pool3", input_size=128)
    assert "128² input" in small.label and small(x).shape == (2, 2048)
    with pytest.raises(ValueError, match="input_size"):
        fid.get_extractor("inception_v3_pool3", input_size=64)


def test_plot_fid_trace(tmp_path):
    trace = [{"step": s, "fid": f, "path": f"ckpt_{s}.pt"} for s, f in [(0, 300.0), (250, 120.0), (500, 80.5),
                                                                        (750, 95.0)]]
    p = fid.plot_fid_trace(trace, tmp_path / "fid.png", floor=12.0, label="randconv (test)", best_step=500)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 200
    assert fid.plot_fid_trace(trace, tmp_path / "fid2.png").is_file()  # best = argmin, no floor
    with pytest.raises(ValueError, match="trace"):
        fid.plot_fid_trace([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="best_step"):
        fid.plot_fid_trace(trace, tmp_path / "x.png", best_step=123)
