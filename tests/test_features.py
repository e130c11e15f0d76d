"""models.features: default layer, named layers, streaming, determinism, side effects, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.features import FeatureError, extract_features, find_final_linear, model_output


class ToyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flat(self.pool(self.conv(x))))))


@pytest.fixture
def model() -> ToyCNN:
    torch.manual_seed(0)
    return ToyCNN()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)


def test_default_is_input_of_final_linear(model, images):
    assert find_final_linear(model) == "fc2"
    f = extract_features(model, images, batch_size=4)
    assert f.shape == (10, 8) and f.dtype == np.float32
    with torch.no_grad():
        ref = model.act(model.fc1(model.flat(model.pool(model.conv(torch.from_numpy(images))))))
    np.testing.assert_allclose(f, ref.numpy(), atol=1e-6)
    assert (f >= 0).all()  # after the ReLU


def test_named_conv_layer_is_pooled(model, images):
    f = extract_features(model, torch.from_numpy(images), layer="conv", batch_size=3)
    with torch.no_grad():
        ref = model.conv(torch.from_numpy(images)).mean(dim=(2, 3))
    assert f.shape == (10, 4)
    np.testing.assert_allclose(f, ref.numpy(), atol=1e-6)


def test_streaming_equals_in_memory_and_deterministic(model, images):
    full = extract_features(model, images, batch_size=256)
    stream = extract_features(model, ((np.arange(s, s + 3), images[s:s + 3]) for s in range(0, 10, 3)))
    np.testing.assert_allclose(stream, full, atol=1e-6)
    plain = extract_features(model, [images[:5], torch.from_numpy(images[5:])], progress="feat")
    np.testing.assert_allclose(plain, full, atol=1e-6)
    assert np.array_equal(extract_features(model, images, batch_size=4), extract_features(model, images, batch_size=4))


def test_model_output_and_transform(model, images):
    out = model_output(model, images, batch_size=4, device="cpu")
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    assert out.shape == (10, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    shifted = model_output(model, images, batch_size=4, device="cpu", transform=lambda x: (x - 0.5) / 0.25)
    with torch.no_grad():
        ref2 = model((torch.from_numpy(images) - 0.5) / 0.25).numpy()
    np.testing.assert_allclose(shifted, ref2, atol=1e-5)


def test_training_flag_restored_and_hooks_removed(model, images):
    model.train()
    extract_features(model, images)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    extract_features(model, images, layer="conv")
    assert not model.training
    for m in model.modules():
        assert len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0


def test_hooks_removed_after_error(model):
    model.train()
    with pytest.raises(FeatureError, match=r"rejected input of shape \(2, 3, 8, 8\)"):
        extract_features(model, np.zeros((2, 3, 8, 8), np.float32))
    assert model.training
    for m in model.modules():
        assert len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0


def test_no_linear_layer():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(FeatureError, match="Sequential has no nn.Linear layer; name a layer with layer="):
        extract_features(net, np.zeros((2, 1, 8, 8), np.float32))
    assert extract_features(net, np.zeros((2, 1, 8, 8), np.float32), layer="0").shape == (2, 2)


def test_unknown_layer_names_close_matches(model, images):
    with pytest.raises(FeatureError, match=r"no layer named 'fc3'.*close matches: \['fc\d', 'fc\d'\]"):
        extract_features(model, images, layer="fc3")


def test_bad_inputs(model):
    with pytest.raises(FeatureError, match="empty"):
        extract_features(model, np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(FeatureError, match="iterable of batches"):
        extract_features(model, 3)  # type: ignore[arg-type]
