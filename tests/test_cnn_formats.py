"""CNNs registered the ways teams register them, loaded through a real MLflow server (flows.registry):

* the same trained CNN as a state dict (register_cnn), a torch.export program (pt2) with a dynamic and with a
  fixed batch size, and a pickled eager model gives the same features (1e-5), hence the same PLS components;
* TorchScript is refused with a contract error saying what to register instead;
* a pickled model is loaded only under the pickle policy (and the version is tagged figan.trust=pickle); under
  the team policy a malicious pickle is refused and the code it carries never runs, and a model naming its own
  module as the pickle module is refused even where pickle is allowed.
"""
from __future__ import annotations

import textwrap

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from flows import registry as R
from flows.mlflow_server import start_server, stop_server
from models.cnn import TrainConfig, train_cnn
from models.explain import ExplainConfig, explain
from models.features import extract_features, model_output
from models.phantom import PhantomConfig, write_phantom
from models.pls import fit_pls

MD5 = "0123456789abcdef0123456789abcdef.dir"
TINY = ExplainConfig(fid_samples=24, fid_extractor="randconv", frames=4, seeds=(0,), n_components=2, check_seeds=4,
                     reader_epochs=1, register_iters=20)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-formats")
    srv = start_server(home)
    yield MlflowClient(tracking_uri=srv.uri)
    stop_server(home)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ds = write_phantom(tmp_path_factory.mktemp("data") / "phantom", PhantomConfig(n=96, size=16))
    model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda _: None)
    return ds, model.eval(), spec


def _log(client: MlflowClient, name: str, model, **kwargs) -> str:
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="cnn", registered_model_name=name, **kwargs)
    return str(info.registered_model_version)


def _pt2(client, name, model, batch: int) -> str:
    example = torch.rand(batch, 1, 16, 16)
    sig = infer_signature(example.numpy(), model(example).detach().numpy())
    return _log(client, name, model, serialization_format="pt2", input_example=example.numpy(), signature=sig)


def test_every_supported_format_gives_the_eager_features(client, trained, tmp_path):
    ds, model, spec = trained
    x = torch.from_numpy(ds.load(np.arange(len(ds))))
    want, want_out = extract_features(model, x), model_output(model, x)
    versions = {
        "state-dict": ("sd", R.register_cnn(model, spec, "sd", "phantom", MD5, tracking_uri=client.tracking_uri).version),
        "pt2": ("pt2-dynamic", _pt2(client, "pt2-dynamic", model, batch=2)),
        "pt2 fixed batch": ("pt2-fixed", _pt2(client, "pt2-fixed", model, batch=1)),
        "pickle": ("pickled", _log(client, "pickled", model, serialization_format="pickle")),
    }
    for label, (name, version) in versions.items():
        loaded, _ = R.load_cnn_version(client, name, version)
        got = extract_features(loaded, x, batch_size=40)
        assert np.abs(got - want).max() < 1e-5, label
        assert np.abs(model_output(loaded, x, batch_size=40) - want_out).max() < 1e-5, label
        (_, scores_w), (_, scores_g) = (fit_pls(f, ds.targets(), spec.task, n_components=2) for f in (want, got))
        assert np.allclose(scores_w, scores_g, atol=1e-4), label                  # the same PLS components
        assert loaded.figan_format == label.split()[0]
    tags = client.get_model_version("pickled", versions["pickle"][1]).tags
    assert tags.get(R.TAG_TRUST) == "pickle"
    assert R.TAG_TRUST not in client.get_model_version("pt2-dynamic", versions["pt2"][1]).tags
    exported, _ = R.load_cnn_version(client, "pt2-fixed", versions["pt2 fixed batch"][1])
    with pytest.raises(ValueError, match="offers only the input of its final Linear"):
        extract_features(exported, x[:2], layer="head")
    # explained end to end: the same first sweep frame as the eager CNN's explanation
    frames = []
    for cnn, out in ((model, tmp_path / "eager"), (exported, tmp_path / "pt2")):
        explain(ds, cnn, out, TINY, task=spec.task, input_shape=tuple(spec.input_shape))
        with np.load(out / "sequences" / "component_1.npz") as z:
            frames.append(z["frames_seed0"][0])
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).max() <= 1


def test_torchscript_is_refused_with_what_to_register_instead(client, trained):
    _, model, _ = trained
    version = _log(client, "scripted", torch.jit.trace(model, torch.rand(2, 1, 16, 16)),
                   serialization_format="pickle")
    with pytest.raises(R.ContractError, match=r"TorchScript model.*serialization_format='pt2'"):
        R.load_cnn_version(client, "scripted", version)


EVIL = textwrap.dedent('''
    """A registrant's module whose objects run code when unpickled (and, imported, when named as pickle module)."""
    import os
    import torch

    MARKER = os.environ["FIGAN_TEST_MARKER"]
    if os.environ.get("FIGAN_TEST_MARK_ON_IMPORT"):
        open(MARKER + ".import", "w").close()


    def _mark(path):
        open(path, "w").close()
        return torch.nn.Linear(1, 1)


    class Evil(torch.nn.Module):
        def __reduce__(self):
            return (_mark, (MARKER,))

        def forward(self, x):
            return x
''')


@pytest.fixture()
def evil(tmp_path, monkeypatch):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "evil_cnn.py").write_text(EVIL)
    monkeypatch.setenv("FIGAN_TEST_MARKER", str(tmp_path / "marker"))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    import evil_cnn
    yield evil_cnn, tmp_path
    import sys
    sys.modules.pop("evil_cnn", None)


def test_team_policy_refuses_a_malicious_pickle_and_runs_none_of_its_code(client, evil, monkeypatch):
    evil_cnn, tmp = evil
    version = _log(client, "untrusted", evil_cnn.Evil(), serialization_format="pickle",
                   code_paths=[str(tmp / "code" / "evil_cnn.py")])
    (tmp / "marker").unlink(missing_ok=True)          # MLflow loads the model once while logging it
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv(R.PICKLE_ALLOWLIST_ENV, "trusted-*")
    assert not R.pickle_allowed("untrusted") and R.pickle_allowed("trusted-team-cnn")
    with pytest.raises(R.ContractError, match=r"pickled PyTorch model.*refused.*serialization_format='pt2'"):
        R.load_cnn_version(client, "untrusted", version)
    assert not (tmp / "marker").exists()
    assert R.TAG_TRUST not in client.get_model_version("untrusted", version).tags
    # the same artifact, trusted by name: it is unpickled (and its code runs: that is what trust means)
    monkeypatch.setenv(R.PICKLE_ALLOWLIST_ENV, "trusted-*,untrusted")
    R.load_cnn_version(client, "untrusted", version)
    assert (tmp / "marker").exists()


def test_a_pickle_module_other_than_the_standard_ones_is_never_imported(client, evil, monkeypatch, tmp_path):
    evil_cnn, tmp = evil
    saved = tmp_path / "sneaky"
    mlflow.pytorch.save_model(torch.nn.Linear(2, 1), str(saved), serialization_format="pickle",
                              code_paths=[str(tmp / "code" / "evil_cnn.py")])
    (saved / "data" / "pickle_module_info.txt").write_text("evil_cnn")   # MLflow would import it to unpickle
    run = client.create_run(client.create_experiment("sneaky"))
    client.log_artifacts(run.info.run_id, str(saved), "cnn")
    client.create_registered_model("sneaky")
    version = client.create_model_version("sneaky", f"{run.info.artifact_uri}/cnn", run_id=run.info.run_id).version
    monkeypatch.setenv("FIGAN_TEST_MARK_ON_IMPORT", "1")
    import sys
    sys.modules.pop("evil_cnn", None)
    with pytest.raises(R.ContractError, match="pickle_module_info.txt names 'evil_cnn'"):
        R.load_cnn_version(client, "sneaky", version)
    assert not (tmp / "marker.import").exists()
