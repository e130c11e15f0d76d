"""explain-image on an explanation made with the patient generator: the upload itself, edited (real MLflow and
`bentoml serve`). A dataset image registers within the calibrated threshold and its sweeps stay inside the
published ranges with its own score marked; an image of another kind is flagged, not hidden."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from models.explain import ExplainConfig
from service_platform import API_KEY, MODEL, Platform

KEY = {"X-API-Key": API_KEY}
PATIENT = ExplainConfig(fid_samples=32, fid_extractor="randconv", frames=5, seeds=(0, 1), n_components=2,
                        check_seeds=8, reader_epochs=2, register_iters=30)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    platform = Platform.start(tmp_path_factory.mktemp("patient-platform"), cfg=PATIENT,
                              serve=({"FIGAN_SERVICE_PUBLIC_READ": "true"},))
    served = platform.served[0].wait_ready()
    try:
        with httpx.Client(base_url=served.url, trust_env=False, timeout=120) as client:
            client.platform = platform
            yield client
    finally:
        served.stop()
        platform.stop()


def test_an_upload_is_explained_around_itself(http):
    platform = http.platform
    row = pd.read_csv(platform.artifacts / "scores.csv").iloc[5]
    image = (platform.home / "discs" / row["path"]).read_bytes()
    url = f"/v1/models/{MODEL}/versions/1/explain-image"
    resp = http.post(url, headers=KEY, files={"image": ("x.png", image, "image/png")},
                     data={"frames": "5", "span": "1.0", "seed": "0"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["patient_centred"] and out["placement"]["trusted"] and "warning" not in out
    lo_hi = [(lo, hi) for lo, hi in zip(platform.metrics["sweep"]["lo"], platform.metrics["sweep"]["hi"])]
    for comp, (lo, hi), score in zip(out["components"], lo_hi, out["scores"]):
        assert lo - 1e-6 <= min(comp["values"]) and max(comp["values"]) <= hi + 1e-6      # never wider than published
        assert abs(comp["values"][comp["own_score_frame"]] - np.clip(score, lo, hi)) < 0.5
    noise = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise, "L").save(buf, format="PNG")
    flagged = http.post(url, headers=KEY, files={"image": ("noise.png", buf.getvalue(), "image/png")},
                        data={"frames": "5", "span": "1.0", "seed": "0"}).json()
    assert flagged["patient_centred"] and not flagged["placement"]["trusted"]
    assert "registers poorly" in flagged["warning"]
