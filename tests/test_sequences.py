"""FIGAN sequences on a hand-made generator whose output is known: a bright disc on a dark background.

c[:, 0] grows the disc's radius, c[:, 1] moves it horizontally, z adds a faint smooth texture; channel 1 is the
disc's mask (auxiliary segmentation), so the generator emits image + mask channels like the real cGAN.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.sequences import (SweepResult, component_caption, deviation_images, eigen_image, render_sweep,
                              save_deviation_png, save_eigen_png, save_gif, save_strip, sweep_values,
                              write_component)

H = W = 32
Z_DIM = 6
K = 3
R0, DR, DX = 8.0, 2.0, 3.0  # radius = R0 + DR * c0, centre x = 16 + DX * c1
BG, FG = 0.1, 0.8


def _grid():
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5,
                            torch.arange(W, dtype=torch.float32) + 0.5, indexing="ij")
    return yy, xx


def _texture(z: torch.Tensor) -> torch.Tensor:
    yy, xx = _grid()
    basis = torch.stack([torch.sin(xx * (i + 1) * 0.2 + i) * torch.cos(yy * (i % 3 + 1) * 0.25)
                         for i in range(Z_DIM)])  # (Z, H, W)
    return 0.015 * torch.einsum("nz,zhw->nhw", z, basis)


def disc_generate(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    yy, xx = _grid()
    r = (R0 + DR * c[:, 0])[:, None, None]
    cx = (W / 2 + DX * c[:, 1])[:, None, None]
    d = torch.sqrt((xx[None] - cx) ** 2 + (yy[None] - H / 2) ** 2)
    disc = torch.sigmoid((r - d) * 3.0)
    img = (BG + (FG - BG) * disc + _texture(z)).clamp(0, 1)
    return torch.stack([img, disc], 1)  # (N, 2, H, W): image + mask


def _dist():
    yy, xx = _grid()
    return torch.sqrt((xx - W / 2) ** 2 + (yy - H / 2) ** 2).numpy()


@pytest.fixture(scope="module")
def sweep0() -> SweepResult:
    return render_sweep(disc_generate, Z_DIM, K, 0, sweep_values(-1, 1, 5), seeds=(0, 1, 2), image_channels=1,
                        batch_size=4)


def test_sweep_values():
    v = sweep_values()
    assert v.shape == (9,) and v[0] == -2 and v[-1] == 2 and np.allclose(np.diff(v), 0.5)
    for kw, arg in [(dict(lo=1, hi=1), "lo"), (dict(frames=1), "frames"), (dict(frames=257), "frames"),
                    (dict(lo=float("nan")), "lo"), (dict(hi=float("inf")), "hi"), (dict(frames=3.0), "frames")]:
        with pytest.raises(ValueError, match=arg):
            sweep_values(**kw)


def test_render_sweep_shapes_and_same_noise(sweep0):
    r = sweep0
    assert r.frames.shape == (3, 5, 2, H, W) and r.frames.dtype == np.float32
    assert r.values.shape == (5,) and r.seeds == (0, 1, 2) and r.image_channels == 1 and r.component == 0
    assert r.images.shape == (3, 5, 1, H, W) and r.masks.shape == (3, 5, 1, H, W)
    # every frame is exactly generate(z_seed, c_frame) with z from torch.Generator().manual_seed(seed)
    for s_i, seed in enumerate(r.seeds):
        z = torch.randn(Z_DIM, generator=torch.Generator().manual_seed(seed))
        c = torch.zeros(5, K)
        c[:, 0] = torch.tensor(r.values, dtype=torch.float32)
        expect = disc_generate(z[None].expand(5, -1), c).numpy()
        np.testing.assert_allclose(r.frames[s_i], expect, atol=1e-6)
    # seeds differ (texture), but only faintly; the mask does not depend on z
    assert np.abs(r.frames[0, :, 0] - r.frames[1, :, 0]).max() > 1e-3
    np.testing.assert_allclose(r.frames[0, :, 1], r.frames[2, :, 1], atol=1e-6)


def test_render_sweep_records_z_and_c():
    seen = []

    def rec(z, c):
        seen.append((z.clone(), c.clone()))
        return torch.zeros(z.shape[0], 1, 4, 4)

    r = render_sweep(rec, 5, 2, 1, [-1.0, 0.0, 1.0], seeds=[7, 8], base=[0.5, 0.0], batch_size=4)
    z = torch.cat([s[0] for s in seen])
    c = torch.cat([s[1] for s in seen])
    assert len(seen) == 2 and z.shape == (6, 5)  # batched: 4 + 2
    for s_i, seed in enumerate((7, 8)):
        zs = z[3 * s_i:3 * s_i + 3]
        assert torch.equal(zs, torch.randn(5, generator=torch.Generator().manual_seed(seed))[None].expand(3, -1))
    assert torch.equal(c[:3, 1], torch.tensor([-1.0, 0.0, 1.0])) and torch.all(c[:, 0] == 0.5)
    assert r.frames.shape == (2, 3, 1, 4, 4) and r.image_channels == 1


def test_module_generator_eval_mode_restored():
    class G(torch.nn.Module):
        def forward(self, z, c):
            assert not self.training
            return torch.full((z.shape[0], 3, 2, 2), 0.5)

    g = G().train()
    r = render_sweep(g, 2, 1, 0, [0.0, 1.0], seeds=(0,))
    assert g.training and r.image_channels == 3


def test_other_component_moves_the_disc():
    r = render_sweep(disc_generate, Z_DIM, K, 1, sweep_values(-1, 1, 3), seeds=(0,), image_channels=1)
    mask = r.frames[0, :, 1]  # (F, H, W)
    xs = np.arange(W) + 0.5
    centroid_x = [(m.sum(0) * xs).sum() / m.sum() for m in mask]
    assert np.allclose(np.diff(centroid_x), DX, atol=0.2)
    areas = mask.sum(axis=(1, 2))
    assert np.allclose(areas, areas[0], rtol=1e-3)  # radius unchanged


@pytest.mark.parametrize("kw, arg", [
    (dict(k=0), "k"), (dict(component=3), "component"), (dict(component=-1), "component"),
    (dict(base=[0, 0]), "base"), (dict(base=[0, np.inf, 0]), "base"), (dict(values=[1.0]), "values"),
    (dict(values=[0, np.inf]), "values"), (dict(seeds=()), "seeds"), (dict(seeds=[0.5]), "seeds"),
    (dict(z_dim=0), "z_dim"), (dict(batch_size=0), "batch_size"), (dict(image_channels=3), "image_channels"),
    (dict(generate=None), "generate"),
])
def test_render_sweep_bad_inputs(kw, arg):
    args = dict(generate=disc_generate, z_dim=Z_DIM, k=K, component=0, values=[-1.0, 1.0], image_channels=1)
    args.update(kw)
    with pytest.raises(ValueError, match=arg):
        render_sweep(**args)


def test_image_channels_required_for_mask_output():
    with pytest.raises(ValueError, match="image_channels"):
        render_sweep(disc_generate, Z_DIM, K, 0, [-1.0, 1.0])


def test_eigen_image_on_rim_ring_and_positive(sweep0):
    e, ratio = eigen_image(sweep0.frames, 1)
    assert e.shape == (1, H, W) and abs(np.linalg.norm(e) - 1) < 1e-4
    d = _dist()
    ring = (d > R0 - DR - 1.5) & (d < R0 + DR + 1.5)
    energy = e[0] ** 2
    assert energy[ring].sum() / energy.sum() > 0.95
    assert e[0][ring].sum() > 0  # sign: projection grows with c0, the disc grows = brighter ring
    assert 0.8 < ratio <= 1.0
    # reversing the frame order flips the sign
    e_rev, _ = eigen_image(sweep0.frames[:, ::-1], 1)
    np.testing.assert_allclose(e_rev, -e, atol=1e-5)
    # explicit decreasing values restore it
    e_val, _ = eigen_image(sweep0.frames[:, ::-1], 1, values=sweep0.values[::-1])
    np.testing.assert_allclose(e_val, e, atol=1e-5)


def test_eigen_image_constant_and_bad_inputs():
    e, ratio = eigen_image(np.full((2, 3, 1, 4, 4), 0.3, np.float32), 1)
    assert ratio == 0.0 and not e.any()
    with pytest.raises(ValueError, match="image_channels"):
        eigen_image(np.zeros((2, 3, 1, 4, 4)), 2)
    with pytest.raises(ValueError, match="frames"):
        eigen_image(np.zeros((3, 1, 4, 4)), 1)


def test_deviation_images(sweep0):
    dev = deviation_images(sweep0.frames[:, :, :1], sweep0.values)
    assert dev.shape == (5, 1, H, W)
    b = int(np.argmin(np.abs(sweep0.values)))
    assert not dev[b].any()  # the base frame minus itself
    d = _dist()
    grown = (d > R0 + 0.5) & (d < R0 + DR - 0.5)  # outside the base disc, inside the largest one
    shrunk = (d > R0 - DR + 0.5) & (d < R0 - 0.5)  # inside the base disc, outside the smallest one
    assert grown.sum() > 20 and shrunk.sum() > 20
    assert dev[-1, 0][grown].min() > 0.2
    assert np.abs(dev[0, 0][grown]).max() < 0.2 and dev[0, 0][shrunk].max() < -0.2
    assert np.abs(dev[-1, 0][d < R0 - 2]).max() < 0.02  # inside the base disc nothing changes
    with pytest.raises(ValueError, match="values"):
        deviation_images(sweep0.frames, sweep0.values[:3])


def test_gif_frames(sweep0, tmp_path):
    frames = sweep0.frames[0, :, :1]
    p = save_gif(frames, tmp_path / "a.gif", fps=5, scale=3)
    with Image.open(p) as im:
        assert im.n_frames == 2 * 5 - 2 and im.size == (3 * W, 3 * H)
        im.seek(0)
        first = np.asarray(im.convert("L"), np.float32) / 255
    np.testing.assert_allclose(first[::3, ::3], frames[0, 0], atol=1 / 255 + 1e-6)
    with Image.open(save_gif(frames, tmp_path / "b.gif", boomerang=False)) as im:
        assert im.n_frames == 5 and im.size == (W, H)
    rgb = np.repeat(frames, 3, axis=1)
    with Image.open(save_gif(rgb, tmp_path / "c.gif")) as im:
        assert im.n_frames == 8
    with pytest.raises(ValueError, match="scale"):
        save_gif(frames, tmp_path / "d.gif", scale=0)
    with pytest.raises(ValueError, match="frames"):
        save_gif(sweep0.frames[0], tmp_path / "e.gif")  # 2 channels (image + mask)


def test_pngs_and_write_component(sweep0, tmp_path):
    cap = component_caption(0, 41.25)
    assert cap == "Component 1 — 41.2 % of target variance" or cap == "Component 1 — 41.3 % of target variance"
    p = save_strip(sweep0, tmp_path / "s.png", cap)
    e, ratio = eigen_image(sweep0.frames, 1)
    q = save_eigen_png(e, tmp_path / "e.png", cap, explained_ratio=ratio)
    dev = deviation_images(sweep0.images, sweep0.values)
    r = save_deviation_png(dev, sweep0.values, tmp_path / "d.png", cap, component=0)
    for f in (p, q, r):
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 100
    paths = write_component(tmp_path / "out", sweep0, 41.3)
    assert {k: v.name for k, v in paths.items()} == {
        "gif": "component_1.gif", "strip": "component_1_strip.png", "eigen": "component_1_eigen.png",
        "deviation": "component_1_deviation.png", "npz": "component_1.npz"}
    with np.load(paths["npz"]) as z:
        assert z["frames_seed0"].dtype == np.uint8 and z["frames_seed0"].shape == (5, 2, H, W)
        assert z["eigen"].shape == (1, H, W) and z["deviation"].shape == (5, 1, H, W)
        np.testing.assert_allclose(z["values"], sweep0.values)
    with Image.open(paths["gif"]) as im:
        assert im.n_frames == 8 and im.size == (128, 128)
    with pytest.raises(ValueError, match="pct_variance"):
        write_component(tmp_path / "out", sweep0, 141.0)
