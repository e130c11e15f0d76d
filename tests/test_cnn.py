"""Demo CNNs: they learn the target, and a saved CNN loads without the training code's state."""
import pytest
import torch

from models.cnn import TrainConfig, load_cnn, save_cnn, train_cnn, CNNSpec, build_cnn
from models.features import extract_features


@pytest.mark.parametrize("arch", ["smallcnn", "tinyresnet"])
def test_train_save_load(disc_dataset, tmp_path, arch):
    model, spec = train_cnn(disc_dataset, TrainConfig(arch=arch, epochs=6, width=8, batch_size=16, lr=5e-3),
                            progress=False, log=lambda s: None)
    assert spec.metrics["test_r2"] > 0.6, spec.metrics
    save_cnn(model, spec, tmp_path / "cnn")
    loaded, spec2 = load_cnn(tmp_path / "cnn")
    x = torch.from_numpy(disc_dataset.load(range(8)))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert spec2.input_shape == [1, 16, 16] and spec2.task == "regression"
    assert extract_features(loaded, x.numpy()).shape == (8, 64)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown CNN architecture 'vgg99'"):
        build_cnn(CNNSpec(arch="vgg99", kwargs={}, task="regression", input_shape=[1, 8, 8]))


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved CNN"):
        load_cnn(tmp_path)
