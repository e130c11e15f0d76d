"""The auditor's report.html on a real (tiny) explanation: self-contained, every section, cautions when due, and
the verdict banner at the very top following the gates."""
import base64
import binascii
import io
import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from models.cnn import TrainConfig, train_cnn
from models.diff import explanation_diff
from models.explain import ExplainConfig, explain
from models.phantom import PhantomConfig, write_phantom
from models.report import build_report, cautions

TINY = dict(fid_samples=32, fid_extractor="randconv", frames=4, seeds=(0, 1), n_components=2, check_seeds=8,
            reader_epochs=2, register_iters=30)
SECTIONS = {"cautions", "lineage", "variance", "components", "fid", "checks", "drift", "diff"}
LINEAGE = {"cnn_name": "phantom-cnn", "cnn_version": "3", "dataset": "phantom", "dataset_md5": "d" * 32,
           "dataset_created": "2026-11-29T10:00:00+00:00", "cnn_digest": "c" * 64, "cnn_model_id": "m-" + "e" * 32,
           "code_version": "0123abcd" * 5, "key": "k" * 16, "libraries": {"torch": "2.13.0", "mlflow": "3.17.2"}}


class Page(HTMLParser):
    """Every tag with its attributes, element ids, caution kinds and the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.ids: set[str] = set()
        self.cautions: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        if "caution" in (a.get("class") or "").split():
            self.cautions.append(a.get("data-kind"))

    def handle_data(self, data):
        self.text.append(data)

    def images(self) -> list[str]:
        return [a.get("src", "") for t, a in self.tags if t == "img"]


def _decode(uri: str) -> Image.Image:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64"), head[:40]
    raw = base64.b64decode(payload, validate=True)
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def make_artifacts(root):
    """A real tiny explanation's artifacts folder (phantom 32², 96 images, 20 GAN steps; a few seconds)."""
    torch.manual_seed(0)
    ds = write_phantom(root / "phantom", PhantomConfig(n=96, size=32, seed=5))
    model, _ = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
    explain(ds, model, root / "art", ExplainConfig(**TINY), cnn_name="phantom-cnn v3")
    return root / "art"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("report"))


def _copy(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        m = json.loads((dst / "metrics.json").read_text())
        edit(m)
        (dst / "metrics.json").write_text(json.dumps(m))
    return dst


def banner(html: str) -> tuple[str, str]:
    """(class, text) of the verdict banner, which must be the first element of the body."""
    match = re.search(r'<body>\s*<div id="verdict" class="([^"]+)"[^>]*>([^<]*)</div>', html)
    assert match, html[html.find("<body>"):][:300]
    return match.group(1), match.group(2)


def _all_good(m):
    m.pop("verdict", None)                   # as an older metrics.json: the verdict is derived from the gates
    for c in m["components"]:
        c["pct_target_variance"] = 40.0
        c["faithfulness"]["rho_mean"] = 0.97
        c["conditioning"]["r_pooled"] = 0.96
    m["fid"]["best"] = 1.5 * m["fid"]["floor"]
    for g in m["gates"].values():
        if isinstance(g, dict):
            g["pass"] = True
    m["gates"]["all_pass"] = True


@pytest.mark.slow
def test_report_is_self_contained_with_every_section(artifacts):
    path = build_report(artifacts, lineage=LINEAGE)
    assert path == artifacts / "report.html"
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    assert SECTIONS <= page.ids
    # nothing to fetch: no script, stylesheet link, frame or external URL anywhere
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed")]
    for t, a in page.tags:
        for attr in ("src", "href"):
            if attr in a:
                assert a[attr].startswith(("data:", "#")), (t, a[attr][:60])
    assert "http://" not in html and "https://" not in html
    imgs = page.images()
    metrics = json.loads((artifacts / "metrics.json").read_text())
    k = len(metrics["components"])
    assert len(imgs) == 1 + 6 * k  # variance chart; per component gif/eigen/strip/deviation/attribution/real cases
    formats = [_decode(src).format for src in imgs]
    assert formats.count("GIF") == k and formats.count("PNG") == len(imgs) - k
    text = " ".join(page.text)
    for needle in (LINEAGE["dataset_md5"], LINEAGE["dataset_created"], LINEAGE["cnn_digest"],
                   LINEAGE["cnn_model_id"], "torch: 2.13.0", "figan verify phantom-cnn 3", "audit/manifest.json",
                   LINEAGE["code_version"], metrics["config_hash"], "randconv",
                   "real-vs-real floor", "Faithfulness", "Conditioning fidelity", "Ground truth", "heart_size",
                   "real cases", "Where the CNN looks"):
        assert needle in text, needle
    assert f"{metrics['fid']['floor']:.3f}".rstrip("0")[:4] in text
    assert "No drift comparison" in text and "No previous explained version" in text


@pytest.mark.slow
def test_cautions_appear_when_their_conditions_hold(artifacts, tmp_path):
    def weak(m):
        _all_good(m)
        m["components"][1]["pct_target_variance"] = 2.0                 # < 5 %
        m["components"][0]["faithfulness"]["rho_mean"] = 0.31            # below the 0.9 threshold
        m["fid"]["best"] = 10 * m["fid"]["floor"]                        # far above the floor
        m["gates"]["conditioning"]["pass"] = False
        m["gates"]["all_pass"] = False
    art = _copy(artifacts, tmp_path / "weak", weak)
    z = np.random.default_rng(0).standard_normal((200, 3))
    diff = explanation_diff(z[:, :2], np.column_stack([z[:, 2], z[:, 0]]), [60, 20], [50, 30],
                            previous="v2", current="v3")
    drift = {"previous": {"version": "2"},
             "data": {"status": "done", "drifted": True, "share_drifted": 0.75,
                      "headline": "9 of 12 image statistics drifted", "columns": {
                          "intensity_mean": {"method": "K-S p_value", "score": 1e-9, "drifted": True}}},
             "features": {"status": "error", "error": "RuntimeError: boom"}}
    page = Page(build_report(art, lineage=LINEAGE, drift=drift, diff=diff).read_text())
    assert set(page.cautions) == {"variance", "faithfulness", "fid", "gate", "drift", "diff"}
    text = " ".join(page.text)
    assert "Component 2 explains only 2.0 %" in text
    assert "Spearman ρ = 0.31" in text
    assert "10.0× the real-vs-real floor" in text
    assert "conditioning check failed" in text
    assert "9 of 12 image statistics drifted" in text and "RuntimeError: boom" in text
    assert "matches none of the top 2 components of v2" in text
    assert "intensity_mean" in text
    html = (art / "report.html").read_text()
    assert banner(html) == ("verdict fail", "Explanation checks: FAIL — failing gates: conditioning")
    m = json.loads((art / "metrics.json").read_text())           # a stored verdict wins over the gates
    m["verdict"] = {"verdict": "fail", "failing": ["fid", "diversity"]}
    (art / "metrics.json").write_text(json.dumps(m))
    assert banner(build_report(art).read_text())[1] == "Explanation checks: FAIL — failing gates: fid, diversity"


@pytest.mark.slow
def test_no_caution_for_a_clean_explanation(artifacts, tmp_path):
    art = _copy(artifacts, tmp_path / "good", _all_good)
    metrics = json.loads((art / "metrics.json").read_text())
    assert cautions(metrics) == []
    z = np.random.default_rng(1).standard_normal((200, 2))
    diff = explanation_diff(z, z + 0.1, [40, 40], [40, 40], previous="v2", current="v3")
    page = Page(build_report(art, lineage=LINEAGE, diff=diff,
                             drift={"data": {"status": "skipped", "reason": "same dataset version"}}).read_text())
    assert page.cautions == []
    text = " ".join(page.text)
    assert "No caution" in text and "same dataset version" in text and "matches previous c1" in text
    assert banner((art / "report.html").read_text()) == ("verdict pass", "Explanation checks: PASS")


def test_report_needs_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        build_report(tmp_path)


def test_data_uri_rejects_non_images(tmp_path):
    from models.report import data_uri
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError):
        data_uri(tmp_path / "x.txt")
    assert data_uri(tmp_path / "missing.png") is None
    with pytest.raises(binascii.Error):
        base64.b64decode("not base64!", validate=True)
