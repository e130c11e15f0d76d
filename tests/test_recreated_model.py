"""A registered model deleted and re-created restarts at version 1: the new version 1 is another CNN and must get
its own explanation. On real components: an MLflow server (SQLite, loopback), a real tiny published explanation
(tests/service_platform.py, no `bentoml serve`), the worker's decision (`resolve_job` + `decide`) and the service's
store in-process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flows import registry as R
from flows.explain import resolve_job
from flows.settings import Settings
from flows.trigger import decide
from models.cnn import TrainConfig, train_cnn
from models.data import ImageDataset
from service_platform import MODEL, Platform
from services.store import ExplanationStore, ServiceConfig, ServiceError

MD5 = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    p = Platform.start(tmp_path_factory.mktemp("recreated"), serve=())
    yield p
    p.stop()


def test_recreated_model_is_explained_afresh_and_never_served_the_old_explanation(platform, monkeypatch):
    p, client = platform, platform.client
    monkeypatch.setenv("FIGAN_HOME", str(p.home))            # the in-process store checks manifests with its key
    settings = Settings(home=p.home)
    client.set_model_version_tag(MODEL, "1", R.TAG_DATASET_MD5, MD5)          # pinned: no data store needed
    old = resolve_job(client, settings, MODEL, "1")
    old_run = R.publish_explanation(client, MODEL, "1", p.artifacts, p.metrics, {"dataset": "discs"}, old.key,
                                    cnn_id=old.contract.cnn_id, signing_key=p.signing_key)
    assert resolve_job(client, settings, MODEL, "1").existing_run == old_run
    store = ExplanationStore(ServiceConfig(tracking_uri=p.server.uri, cache_dir=p.home / "service-cache"))
    served = store.explanation(MODEL, "1")
    old_cnn, _ = store.cnn(served)
    assert served.run_id == old_run and store.cached(MODEL, "1") is served

    # delete the registered model, train another CNN and register it under the same name: version 1 again
    client.delete_registered_model(MODEL)
    model, spec = train_cnn(ImageDataset(p.home / "discs"), TrainConfig(epochs=1, width=6, seed=1),
                            progress=False, log=lambda s: None)
    assert R.register_cnn(model, spec, MODEL, "discs", MD5, tracking_uri=p.server.uri).version == "1"

    new = resolve_job(client, settings, MODEL, "1")
    assert new.contract.cnn_id != old.contract.cnn_id and new.key != old.key
    assert new.existing_run is None                   # the old run is not this key's explanation
    assert decide(R.get_status(client, MODEL, "1"), new.key, None, None, 3).run
    with pytest.raises(R.VersionReplacedError, match="deleted and re-created"):
        # an explanation of the old CNN finishing late
        R.publish_explanation(client, MODEL, "1", p.artifacts, p.metrics, {"dataset": "discs"}, old.key,
                              cnn_id=old.contract.cnn_id, signing_key=p.signing_key)

    # the new version's tags pointing at the old run (what a flow keyed without the identity wrote): refused,
    # although the service checked and cached that run for "version 1" before
    R.set_status(client, MODEL, "1", "done", run_id=old_run, key=old.key)
    store.listing(max_age=0)
    assert store.cached(MODEL, "1") is None
    with pytest.raises(ServiceError, match=r"not an explanation of this version \(cnn differ") as refused:
        store.explanation(MODEL, "1")
    assert refused.value.code == 502

    # its own explanation is served, with its own CNN
    new_run = R.publish_explanation(client, MODEL, "1", p.artifacts, p.metrics, {"dataset": "discs"}, new.key,
                                    cnn_id=new.contract.cnn_id, signing_key=p.signing_key)
    store.listing(max_age=0)
    expl = store.explanation(MODEL, "1")
    assert expl.run_id == new_run != old_run
    new_cnn, _ = store.cnn(expl)
    assert new_cnn is not old_cnn
    x = torch.from_numpy(ImageDataset(p.home / "discs").load(np.arange(4)))
    with torch.no_grad():
        torch.testing.assert_close(new_cnn(x), model.eval()(x))
