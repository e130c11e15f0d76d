"""Band-limited similarity warps (models/warp.py): exact where they must be, faithful to grid_sample on smooth
images, and keeping the pixel noise — at fractional offsets too, where interpolation would smooth it."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.warp import apply_similarity, compose, invert, similarity_matrix


def _laplacian_sd(x: torch.Tensor) -> float:
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    return float(F.conv2d(x, k)[..., 8:-8, 8:-8].std())


def test_integer_translation_is_exact():
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    moved = apply_similarity(x, torch.tensor([[0.0, 0.0, 4 / 16, -2 / 16]]).repeat(2, 1))      # +4 px x, −2 px y
    assert torch.allclose(moved[:, :, 0:28, 4:32], x[:, :, 2:30, 0:28], atol=1e-4)


@pytest.mark.parametrize("shift_px", [0.25, 0.5, 0.75])
def test_fractional_shifts_keep_the_finest_noise(shift_px):
    """White noise keeps its Laplacian (highest-frequency) SD under a fractional shift; bilinear loses much of it."""
    noise = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    t = shift_px / 32                                       # pixels → normalised units of a 64-px image
    moved = apply_similarity(noise, torch.tensor([[0.0, 0.0, t, t]]).repeat(4, 1))
    assert _laplacian_sd(moved) == pytest.approx(_laplacian_sd(noise), rel=0.03)
    grid = F.affine_grid(similarity_matrix(invert(torch.tensor([[0.0, 0.0, t, t]])))[:, :2].repeat(4, 1, 1),
                         [4, 1, 64, 64], align_corners=False)
    bilinear = F.grid_sample(noise, grid, mode="bilinear", align_corners=False)
    assert _laplacian_sd(bilinear) < 0.9 * _laplacian_sd(noise)


def test_similarity_matches_grid_sample_on_a_smooth_image():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    blob = torch.exp(-((xx - 0.1) ** 2 + (yy + 0.15) ** 2 * 2) / 0.08)[None, None]
    pose = torch.tensor([[math.log(1.08), 0.15, 0.06, -0.04]])
    ours = apply_similarity(blob, pose)
    grid = F.affine_grid(similarity_matrix(invert(pose))[:, :2], [1, 1, 48, 48], align_corners=False)
    ref = F.grid_sample(blob, grid, mode="bicubic", padding_mode="border", align_corners=False)
    assert (ours - ref)[..., 6:-6, 6:-6].abs().max() < 0.02


def test_compose_and_invert():
    a, b = torch.tensor([[0.1, 0.2, 0.05, -0.1]]), torch.tensor([[-0.05, -0.3, 0.02, 0.07]])
    assert torch.allclose(compose(a, invert(a)), torch.zeros(1, 4), atol=1e-6)
    assert torch.allclose(similarity_matrix(compose(a, b)), similarity_matrix(a) @ similarity_matrix(b), atol=1e-6)
