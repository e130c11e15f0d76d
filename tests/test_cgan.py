"""Conditional GAN: learns, resumes exactly after a kill, handles masks, rejects bad input."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.cgan import CGAN, CGANConfig, images_to_u8, load_generator
from tests.conftest import disc_images

TINY = dict(resolution=16, k=1, z_dim=8, ngf=8, ndf=8, batch_size=16)


def disc_data(n=256, seed=0):
    r = np.random.default_rng(seed).uniform(2, 6, n)
    return images_to_u8(disc_images(r, 16)), torch.tensor((r - 4) / 1.15, dtype=torch.float32)[:, None]


@pytest.mark.slow
def test_training_improves_conditioning(tmp_path):
    data, cond = disc_data()
    gan = CGAN(CGANConfig(**TINY, steps=300, ckpt_every=300, lr_g=1e-3, lr_d=1e-3))
    res = gan.train(data, cond, tmp_path, progress=False, log_every=10)
    cond_loss = [r["cond_g"] for r in res.losses]
    assert np.mean(cond_loss[-5:]) < 0.5 * np.mean(cond_loss[:3])      # G's images carry the requested score
    assert res.regressor_r2[0] > 0.8                                    # R learned radius from real discs
    # the generated disc area grows with c (a learned, monotone condition)
    c = torch.linspace(-1.5, 1.5, 7)[:, None].repeat_interleave(8, 0)
    area = gan.generate(torch.randn(len(c), 8, generator=torch.Generator().manual_seed(0)), c).mean(dim=(1, 2, 3))
    area = area.view(7, 8).mean(1)
    assert area[-1] > area[0] and res.img_per_s > 0
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best" / "generator.pt").exists()
    G, cfg, step = load_generator(tmp_path / "best")
    assert step == 300 and cfg.k == 1


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    data, cond = disc_data(64)
    cfg = CGANConfig(**TINY, steps=20, ckpt_every=10)
    full = CGAN(cfg)
    full.train(data, cond, tmp_path / "a", progress=False)
    part = CGAN(cfg)
    r = part.train(data, cond, tmp_path / "b", progress=False, stop_after=10)
    assert r.step == 10
    resumed = CGAN(cfg)                                  # a fresh process would start like this
    r2 = resumed.train(data, cond, tmp_path / "b", progress=False)
    assert r2.step == 20
    for a, b in zip(full.state_dict()["G"].values(), resumed.state_dict()["G"].values()):
        assert torch.equal(a, b)
    for a, b in zip(full.state_dict()["G_ema"].values(), resumed.state_dict()["G_ema"].values()):
        assert torch.equal(a, b)


SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    sys.path.insert(0, {root!r})
    from tests.test_cgan import disc_data, TINY
    from models.cgan import CGAN, CGANConfig
    data, cond = disc_data(64)
    CGAN(CGANConfig(**TINY, steps=100000, ckpt_every=5)).train(data, cond, {out!r}, progress=False)
""")


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    """SIGKILL a training process after a checkpoint; a new process resumes exactly where it was."""
    out = tmp_path / "run"
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=root, out=str(out))])
    try:
        deadline = time.time() + 300            # the child imports torch first: slow on 2 busy cores
        while not (out / "last.pt").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (out / "last.pt").exists(), "the training process wrote no checkpoint before it was killed"
    killed_at = torch.load(out / "last.pt", weights_only=False)["step"]
    assert killed_at >= 5 and killed_at % 5 == 0
    data, cond = disc_data(64)
    cfg = CGANConfig(**TINY, steps=killed_at + 10, ckpt_every=5)
    resumed = CGAN(cfg).train(data, cond, out, progress=False)
    ref = CGAN(cfg)
    ref.train(data, cond, tmp_path / "ref", progress=False)
    assert resumed.step == ref.step == killed_at + 10
    got = torch.load(out / "last.pt", weights_only=False)["G"]
    for k, v in ref.state_dict()["G"].items():
        assert torch.equal(v, got[k]), k


@pytest.mark.slow
def test_masks_and_rgb_shapes(tmp_path):
    r = np.random.default_rng(1).uniform(2, 6, 32)
    imgs = np.repeat(disc_images(r, 32), 3, axis=1)
    masks = (imgs[:, 0] > 0.5).astype(np.int64)
    data = images_to_u8(imgs, masks, 1)
    assert data.shape == (32, 4, 32, 32)
    gan = CGAN(CGANConfig(resolution=32, image_channels=3, mask_channels=1, k=2, z_dim=8, ngf=8, ndf=8,
                          batch_size=8, steps=2, ckpt_every=2))
    gan.train(data, torch.randn(32, 2), progress=False)
    assert gan.generate(torch.randn(3, 8), torch.zeros(3, 2)).shape == (3, 4, 32, 32)


@pytest.mark.parametrize("kw,msg", [(dict(k=0), "k \\(number of conditioning"),
                                    (dict(resolution=48), "power of two"),
                                    (dict(diffaugment="zoom"), "unknown policy")])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CGAN(CGANConfig(**{**TINY, **kw}))


def test_mismatched_condition_size():
    data, cond = disc_data(32)
    gan = CGAN(CGANConfig(**TINY, steps=1))
    with pytest.raises(ValueError, match="conditions must be \\(32, k=1\\)"):
        gan.train(data, torch.zeros(32, 3), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        gan.train(data, torch.full((32, 1), float("nan")), progress=False)
