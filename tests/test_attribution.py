"""Attribution maps (models/attribution.py, Captum): shaped like the image, non-zero only where a hand-made
CNN's weights look, and published beside every sweep."""
import numpy as np
import torch
import torch.nn as nn

from models.attribution import attribute, end_indices, last_conv, output_target


class TopLeftCNN(nn.Module):
    """Sees only the top-left quadrant: everything else is zeroed before a bias-free conv, pooled, one output."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2, : size // 2] = 1
        self.register_buffer("mask", mask)
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x * self.mask))
        return self.fc(h.mean((2, 3)))


def test_maps_have_the_image_shape_and_light_up_only_where_the_cnn_looks():
    torch.manual_seed(0)
    model = TopLeftCNN()
    with torch.no_grad():
        model.conv.weight.abs_()                         # positive responses to positive pixels
        model.fc.weight.fill_(1.0)                       # every channel counts positively: Grad-CAM non-zero
    x = torch.rand(6, 1, 16, 16)
    maps = attribute(model, x, last_conv(model))
    assert set(maps) == {"gradient", "gradcam"}
    for kind, m in maps.items():
        assert m.shape == (6, 16, 16), kind
        inside = m[:, :7, :7]                            # the quadrant is rows/columns 0-7; the conv spills 1 px
        outside = np.concatenate([m[:, 10:, :].ravel(), m[:, :, 10:].ravel()])
        assert inside.mean() > 0 and np.abs(outside).max() < 1e-6 * max(inside.max(), 1e-12), kind


def test_targets_and_ends():
    assert output_target(torch.zeros(3, 1)) == 0 and output_target(torch.zeros(3, 2)) == 1
    assert output_target(torch.tensor([[0.0, 2, 1], [3, 0, 1]])).tolist() == [1, 0]
    lo, hi = end_indices(np.array([5.0, 1, 3, 0, 4, 2]), 2)
    assert sorted(lo.tolist()) == [1, 3] and sorted(hi.tolist()) == [0, 4]
    assert last_conv(nn.Sequential(nn.Linear(2, 2))) is None
