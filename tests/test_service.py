"""The explanation service on real components: `bentoml serve services.explanations:Explanations` (subprocess,
loopback) against a real MLflow server holding a real tiny published explanation (tests/service_platform.py).

Happy path of every endpoint, every bad input → 4xx naming its field, status answers for failed/running
versions, API keys on and off, an explanation published after the start picked up without a restart, lineage in
the version JSON, and a run whose signed manifest does not verify refused."""
from __future__ import annotations

import base64
import gc
import io
import json
import re
import shutil
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows import registry as R
from service_platform import API_KEY, MODEL, log_records, shared_platform
from services.store import ExplanationStore, ServiceConfig, ServiceError

KEY = {"X-API-Key": API_KEY}
V = f"/v1/models/{MODEL}/versions"


@pytest.fixture(scope="module")
def platform(request, tmp_path_factory):
    return shared_platform(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def served(platform):
    served = platform.served[0].wait_ready()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, trust_env=False, timeout=60) as client:
        yield client


def frames_of(gif: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(gif)) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("L")))
        return out


def decode_data_url(url: str) -> bytes:
    assert url.startswith("data:")
    return base64.b64decode(url.split(",", 1)[1])


def assert_4xx(resp: httpx.Response, status: int, field: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert body["field"] == field and body["error"].startswith(f"{field}:"), body
    return body


# --------------------------------------------------------------------------------------------- probes, listing

def test_probes_and_json_logs(http, served):
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    assert http.get("/v1/models").status_code == 200
    assert http.get(f"{V}/1/components/1/sequence.gif").status_code == 200
    assert http.get(f"{V}/999").status_code == 404                           # our route, no such version

    def access_lines() -> list[str]:        # the worker's lines reach the log through the process manager
        return [r["message"] for r in log_records(served.log) if r.get("logger") == "figan.access"]

    access = _eventually(lambda: (lines := access_lines()) and "/999" in lines[-1] and lines, "the 404's line")
    records = log_records(served.log)
    assert any(r.get("logger") == "figan.service" and r.get("message") == "service started" for r in records)
    assert any("(method=GET,path=/v1/models)" in m and "status=200" in m for m in access), access
    assert any(f"path={V}/999)" in m and "status=404" in m for m in access), access
    assert not any("sequence.gif" in m for m in access), access      # published files: counted in metrics only
    assert not any(r.get("logger") == "bentoml.access" for r in records)
    assert "Downloading artifacts" not in served.log.read_text()


def test_listing_statuses_aliases_and_headline_metrics(http, platform):
    (model,) = [m for m in http.get("/v1/models").json()["models"] if m["name"] == MODEL]
    rows = {v["version"]: v for v in model["versions"]}
    assert {k: rows[k]["status"] for k in "1234"} == {"1": "done", "2": "done", "3": "failed", "4": "running"}
    assert model["aliases"]["champion"] == "1" and rows["1"]["aliases"] == ["champion"]
    assert rows["1"]["pct_variance"] == platform.metrics["pls"]["pct_target_variance"]
    assert rows["1"]["fid_best"] == pytest.approx(platform.metrics["fid"]["best"])
    assert "layer 'fc9'" in rows["3"]["error"]
    assert http.get(f"/v1/resolve/{MODEL}@champion").json()["version"] == "1"
    assert http.get(f"/v1/resolve/{MODEL}@2").json()["version"] == "2"
    by_alias, by_number = http.get(f"{V}/champion").json(), http.get(f"{V}/1").json()
    assert by_alias == by_number
    assert by_number["k"] == 2 and by_number["resolution"] == 16 and by_number["sweep"]["frames"] == 5
    assert [c["pct_target_variance"] for c in by_number["components"]] == \
        platform.metrics["pls"]["pct_target_variance"]
    assert by_number["components"][0]["faithfulness"] == platform.metrics["components"][0]["faithfulness"]
    assert by_number["urls"]["components"][1]["gif"] == f"{V}/1/components/2/sequence.gif"


def test_verdict_in_the_listing_and_the_version_json(http, platform):
    """Versions 1 and 2 are done with opposite verdicts (one passes, one fails named gates): the listing (from the
    figan.verdict tag) and the version JSON (from the published metrics.json) both say which."""
    verdicts = platform.verdicts
    assert sorted(v["verdict"] for v in verdicts.values()) == ["fail", "pass"]
    (model,) = [m for m in http.get("/v1/models").json()["models"] if m["name"] == MODEL]
    rows = {v["version"]: v for v in model["versions"]}
    for version, want in verdicts.items():
        assert (rows[version]["verdict"], rows[version]["failing_gates"]) == (want["verdict"], want["failing"])
        body = http.get(f"{V}/{version}").json()
        assert (body["status"], body["verdict"], body["failing_gates"]) == ("done", want["verdict"], want["failing"])
        if want["verdict"] == "fail":
            assert want["failing"] and all(not body["gates"][g]["pass"] for g in want["failing"])
    assert rows["3"]["verdict"] is None and rows["4"]["verdict"] is None        # never published: no verdict
    assert http.get(f"/v1/resolve/{MODEL}@champion").json()["verdict"] == verdicts["1"]["verdict"]


def test_published_files_are_served_from_the_cache(http, platform, served):
    seq = platform.artifacts / "sequences"
    for c in (1, 2):
        url = f"{V}/1/components/{c}"
        gif = http.get(f"{url}/sequence.gif")
        assert gif.headers["content-type"] == "image/gif"
        assert gif.content == (seq / f"component_{c}.gif").read_bytes()
        assert http.get(f"{url}/sequence.png").content == (seq / f"component_{c}_strip.png").read_bytes()
        assert http.get(f"{url}/eigen.png").content == (seq / f"component_{c}_eigen.png").read_bytes()
        assert http.get(f"{url}/deviation.png").content == (seq / f"component_{c}_deviation.png").read_bytes()
        frames = http.get(f"{url}/sequence.json").json()
        with np.load(seq / f"component_{c}.npz") as z:
            assert frames["values"] == pytest.approx(z["values"].tolist())
            for got, want in zip(frames["frames"], z["frames_seed0"], strict=True):
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(decode_data_url(got)))), want[0])
    assert http.get(f"{V}/1/metrics.json").json() == platform.metrics
    fid = http.get(f"{V}/1/fid_trace.png")
    assert fid.status_code == 200 and Image.open(io.BytesIO(fid.content)).size[0] > 100
    again = http.get(f"{V}/1/components/2/sequence.gif", headers={"If-None-Match": gif.headers["etag"]})
    assert again.status_code == 304 and not again.content
    run_id = platform.client.get_model_version(MODEL, "1").tags["figan.run_id"]
    assert (served.cache / run_id / "sequences" / "component_1.gif").is_file()


def memory_first_answers(client: httpx.Client, status: int) -> float:
    """figan_memory_first_responses_total{status} on the service's Prometheus endpoint."""
    metric = rf'^figan_memory_first_responses_total{{status="{status}"}} (\S+)$'
    found = re.search(metric, client.get("/metrics").text, re.M)
    return float(found[1]) if found else 0.0


def test_published_files_in_memory_are_answered_ahead_of_the_stack(http):
    """Once a published file is in memory, the layer ahead of BentoML's middleware and FastAPI answers it (counted
    in Prometheus), with the same bytes and headers as the full route, ETag revalidation included; what it cannot
    answer goes down the normal path."""
    url = f"{V}/1/components/1/sequence.gif"
    first = http.get(url)
    ok, not_modified = memory_first_answers(http, 200), memory_first_answers(http, 304)
    again = [http.get(url) for _ in range(5)]
    assert memory_first_answers(http, 200) == ok + 5
    for answer in again:
        assert answer.status_code == 200 and answer.content == first.content
        for header in ("content-type", "content-length", "etag", "cache-control", "x-figan-serving-run",
                       "x-figan-latest-status"):
            assert answer.headers[header] == first.headers[header], header
    revalidated = http.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert revalidated.status_code == 304 and not revalidated.content
    assert revalidated.headers["etag"] == first.headers["etag"]
    assert memory_first_answers(http, 304) == not_modified + 1
    assert_4xx(http.get(f"{V}/1/components/3/sequence.gif"), 404, "component")    # k = 2: the route answers
    assert memory_first_answers(http, 200) == ok + 5


def test_memory_first_answers_only_requests_that_may_read(platform):
    """Where reads need the API key, a file already in memory is still refused without it, by the route."""
    served = platform.served[1].wait_ready()
    url = f"{V}/1/components/2/sequence.png"
    with httpx.Client(base_url=served.url, trust_env=False, timeout=60) as client:
        assert client.get(url, headers=KEY).status_code == 200                  # now in memory
        answered = memory_first_answers(client, 200)
        for headers in ({}, {"X-API-Key": "wrong"}):
            assert_4xx(client.get(url, headers=headers), 401, "api_key")
        assert client.get(url, headers=KEY).status_code == 200
        assert memory_first_answers(client, 200) == answered + 1


# --------------------------------------------------------------------------------------------- bad requests

def test_a_run_id_tag_pointing_at_another_versions_run_is_refused(http, platform):
    """figan.run_id is writable by any MLflow user: the service serves a run only if it is this version's
    explanation (experiment, model, version and key tags of the run itself)."""
    v = platform.new_version()
    platform.publish(v)
    assert http.get(f"{V}/{v}", headers=KEY).status_code == 200
    first = platform.client.get_model_version(MODEL, "1").tags["figan.run_id"]
    platform.client.set_model_version_tag(MODEL, v, "figan.run_id", first)     # v1's genuine explanation
    resp = _eventually(lambda: (r := http.get(f"{V}/{v}", headers=KEY)).status_code == 502 and r,
                       "the refusal (once the listing has the new tag)")
    assert "is not an explanation of this version (version, key, cnn differ)" in resp.json()["error"]
    assert http.get(f"{V}/1", headers=KEY).status_code == 200                  # the genuine pairing still serves


def test_lineage_in_the_version_json(http, platform):
    """Dataset name, DVC md5 and version date, the CNN's digest and LoggedModel, and the manifest digest (the
    version's figan.manifest_sha256 tag) come with every explanation, from its verified manifest."""
    lineage = http.get(f"{V}/1").json()["lineage"]
    tags = platform.client.get_model_version(MODEL, "1").tags
    want = platform.lineage
    assert (lineage["dataset"], lineage["dataset_md5"], lineage["dataset_created"]) == \
        (want["dataset"], want["dataset_md5"], want["dataset_created"])
    assert len(want["dataset_md5"]) == 32 and len(want["cnn_digest"]) == 64
    assert lineage["cnn_digest"] == want["cnn_digest"] and lineage["cnn_model_id"].startswith("m-")
    assert lineage["manifest_sha256"] == tags["figan.manifest_sha256"] and lineage["code_version"]
    (row,) = [r for m in http.get("/v1/models").json()["models"] for r in m["versions"] if r["version"] == "1"]
    assert row["manifest_sha256"] == tags["figan.manifest_sha256"]


def test_a_run_that_does_not_match_its_signed_manifest_is_refused(http, platform):
    """One edited byte in the artifact store, or a run signed with another key: 502 naming what failed, with no
    internal path; once the artifact is restored, the run is fetched anew and served."""
    v = platform.new_version()
    run_id = platform.publish(v)
    gif = platform.stored_artifact(run_id, "sequences/component_2.gif")
    original = gif.read_bytes()
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 0x01
    gif.write_bytes(bytes(edited))
    resp = _eventually(lambda: (r := http.get(f"{V}/{v}")).status_code != 404 and r, "the new version")
    body = assert_4xx(resp, 502, "version")
    assert "does not match its signed manifest (1 changed: sequences/component_2.gif)" in body["error"], body
    assert f"figan verify {MODEL} {v}" in body["error"] and body["audit"] == "failed"
    assert str(platform.home) not in resp.text and "/tmp" not in resp.text
    assert assert_4xx(http.get(f"{V}/{v}/components/1/sequence.gif"), 502, "version")["audit"] == "failed"
    gif.write_bytes(original)
    assert http.get(f"{V}/{v}/components/2/sequence.gif").content == original

    other = platform.new_version()
    platform.publish(other, key=b"someone-elses-key-0123456789")
    resp = _eventually(lambda: (r := http.get(f"{V}/{other}")).status_code != 404 and r, "the other version")
    assert "(signature other key)" in assert_4xx(resp, 502, "version")["error"]


def test_a_published_run_asking_for_a_huge_generator_is_refused(http, platform, served):
    """A run whose generator.json asks for a huge network is refused with what it asks for, at once, and the
    service's memory does not grow by anything like the network's size (nothing was allocated for it)."""
    import psutil

    v = platform.new_version()
    tampered = platform.home / f"explanation-huge-v{v}"
    shutil.copytree(platform.artifacts, tampered)
    meta = json.loads((tampered / "gan" / "best" / "generator.json").read_text())
    meta["config"]["ngf"] = 10 ** 7                                   # ~10^15 parameters
    (tampered / "gan" / "best" / "generator.json").write_text(json.dumps(meta))
    R.publish_explanation(platform.client, MODEL, v, tampered, platform.metrics, {"dataset": "discs"}, key=f"key-{v}",
                          signing_key=platform.signing_key)
    service = [psutil.Process(served.proc.pid), *psutil.Process(served.proc.pid).children(recursive=True)]
    before, t0 = sum(p.memory_info().rss for p in service), time.monotonic()
    for path in (f"{V}/{v}", f"{V}/{v}/components/1/sequence.gif"):
        refused = assert_4xx(http.get(path), 502, "version")
        assert "refused: generator.json config: ngf=10000000 exceeds the maximum of 1024" in refused["error"]
    generated = http.post("/v1/generate", headers=KEY, json={"model": MODEL, "version": v})
    assert "ngf=10000000 exceeds" in assert_4xx(generated, 502, "version")["error"]
    assert time.monotonic() - t0 < 10
    assert sum(p.memory_info().rss for p in service) - before < 100 * 2 ** 20


def test_failed_and_running_versions_answer_with_their_status(http):
    failed = assert_4xx(http.get(f"{V}/3/components/1/sequence.gif"), 409, "version")
    assert failed["status"] == "failed" and "layer 'fc9'" in failed["error"]
    running = assert_4xx(http.get(f"{V}/4"), 409, "version")
    assert running["status"] == "running" and running["version"] == "4"
    assert http.post("/v1/generate", headers=KEY, json={"model": MODEL, "version": "3"}).json()["status"] == "failed"


@pytest.mark.parametrize("path, status, field", [
    ("/v1/models/nope/versions/1", 404, "model"),
    (f"{V}/99", 404, "version"),
    (f"{V}/staging", 404, "version"),
    ("/v1/models/bad%20name!/versions/1", 400, "model"),
    ("/v1/models/.hidden/versions/1", 400, "model"),
    (f"{V}/%2E%2E", 400, "version"),
    (f"{V}/1.0", 400, "version"),
    (f"{V}/1/components/3/sequence.gif", 404, "component"),
    (f"{V}/1/components/0/eigen.png", 404, "component"),
    (f"{V}/1/components/x/deviation.png", 400, "component"),
    (f"{V}/1/components/1/sequence.bmp", 400, "format"),
    ("/v1/resolve/no-at-sign", 400, "ref"),
])
def test_bad_reads_name_the_field(http, path, status, field):
    assert_4xx(http.get(path), status, field)


def test_no_path_reaches_outside_the_cache(http):
    for path in ("/v1/models/%2e%2e/versions/1", f"{V}/1/components/..%2F..%2Fmetrics.json/sequence.gif",
                 f"{V}/1/components/1%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd/eigen.png", "/viewer/..%2F..%2Fstore.py",
                 "/viewer/../services/store.py"):
        resp = http.get(path)
        assert 400 <= resp.status_code < 500 and b"root:" not in resp.content and b"import" not in resp.content


GOOD = {"model": MODEL, "version": "champion"}


@pytest.mark.parametrize("change, status, field", [
    ({"frames": 1}, 400, "frames"), ({"frames": 65}, 400, "frames"), ({"frames": "9"}, 400, "frames"),
    ({"lo": "nan"}, 400, "lo"), ({"lo": -6.5}, 400, "lo"), ({"hi": 1e9}, 400, "hi"), ({"hi": "inf"}, 400, "hi"),
    ({"lo": 1.0, "hi": 0.5}, 400, "hi"), ({"lo": -3.0}, 422, "lo"), ({"hi": 2.5}, 422, "hi"),
    ({"lo": 2.0}, 400, "lo"), ({"base": [0, 3]}, 422, "base"), ({"seed": 1.5}, 400, "seed"), ({"seed": "abc"}, 400, "seed"),
    ({"seed": -1}, 400, "seed"), ({"components": []}, 400, "components"),
    ({"components": [1] * 9}, 400, "components"), ({"components": [3]}, 404, "components"),
    ({"components": ["1"]}, 400, "components.0"), ({"base": [0.0]}, 400, "base"), ({"base": [0, 7]}, 400, "base.1"),
    ({"format": "bmp"}, 400, "format"), ({"model": "x/../y"}, 400, "model"), ({"model": "nope"}, 404, "model"),
    ({"version": "99"}, 404, "version"), ({"path": "/etc/passwd"}, 400, "path"),
])
def test_bad_generation_requests_name_the_field(http, change, status, field):
    assert_4xx(http.post("/v1/generate", headers=KEY, json={**GOOD, **change}), status, field)


# --------------------------------------------------------------------------------------------- generation

def test_generation_needs_the_key(http):
    assert_4xx(http.post("/v1/generate", json=GOOD), 401, "api_key")
    assert_4xx(http.post("/v1/generate", headers={"X-API-Key": "wrong"}, json=GOOD), 401, "api_key")
    ok = http.post("/v1/generate", headers={"Authorization": f"Bearer {API_KEY}"}, json=GOOD)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/gif"


def test_generation_is_deterministic_and_matches_the_published_sweep(http, platform):
    req = {**GOOD, "components": [1], "frames": 16, "lo": -2, "hi": 1.5, "seed": 7}
    a, b = (http.post("/v1/generate", headers=KEY, json=req) for _ in range(2))
    assert a.status_code == 200 and a.content == b.content
    assert http.post("/v1/generate", headers=KEY, json={**req, "seed": 8}).content != a.content
    gif = frames_of(a.content)
    assert len(gif) == 16 + 14 and gif[0].shape == (128, 128)           # boomerang, upscaled like the published
    # seed 0 over the published range, other components at 0: the published frames of seed 0
    cfg = json.loads((platform.artifacts / "config.json").read_text())["config"]
    same = {**GOOD, "format": "json", "seed": 0, "frames": cfg["frames"]}           # default: the published range
    out = http.post("/v1/generate", headers=KEY, json=same).json()
    assert [c["component"] for c in out["components"]] == [1, 2]
    for comp in out["components"]:
        with np.load(platform.artifacts / "sequences" / f"component_{comp['component']}.npz") as z:
            want = z["frames_seed0"][:, 0].astype(int)
        got = np.stack([np.asarray(Image.open(io.BytesIO(decode_data_url(f)))) for f in comp["frames"]])
        assert np.abs(got.astype(int) - want).max() <= 1
    # several components: side by side in the GIF, one row each in the PNG strip
    both = {**GOOD, "components": [1, 2], "frames": 4}
    assert frames_of(http.post("/v1/generate", headers=KEY, json=both).content)[0].shape == (128, 256)
    strip = http.post("/v1/generate", headers=KEY, json={**both, "format": "png"})
    assert strip.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(strip.content)).size == (4 * 128, 2 * 128)
    # base scores move the other components
    moved = http.post("/v1/generate", headers=KEY, json={**req, "base": [0, 1.5]}).content
    assert moved != a.content


# --------------------------------------------------------------------------------------------- uploads

def test_explain_image_places_a_dataset_image_on_its_published_scores(http, platform):
    scores = pd.read_csv(platform.artifacts / "scores.csv")
    row = scores.iloc[3]
    image = (platform.home / "discs" / row["path"]).read_bytes()
    resp = http.post(f"{V}/champion/explain-image", headers=KEY, files={"image": ("x.png", image, "image/png")},
                     data={"frames": "6", "span": "1.5", "seed": "3"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["version"] == "1" and out["scores"] == pytest.approx([row["c1"], row["c2"]], abs=1e-3)
    for comp, score in zip(out["components"], out["scores"], strict=True):
        assert comp["score"] == pytest.approx(score)
        assert comp["published_sweep"] == [-2.0, 2.0]
        lo, hi = np.clip([score - 1.5, score + 1.5], -2, 2)           # never wider than the published range
        assert comp["values"][0] == pytest.approx(lo, abs=1e-3) and comp["values"][-1] == pytest.approx(hi, abs=1e-3)
        assert len(frames_of(decode_data_url(comp["gif"]))) == 6 + 4
    assert isinstance(out["pls_prediction"], float) and len(out["cnn_output"]) == 1
    # by default each component sweeps its published range; lo/hi narrow it, and may not widen it
    whole = http.post(f"{V}/champion/explain-image", headers=KEY, files={"image": ("x.png", image, "image/png")},
                      data={"frames": "5", "hi": "1.0"}).json()
    assert [c["values"] for c in whole["components"]] == [[-2.0, -1.25, -0.5, 0.25, 1.0]] * 2


def test_bad_uploads_name_the_field(http, platform, tmp_path):
    url = f"{V}/1/explain-image"
    good = (platform.home / "discs" / "images" / "000000.png").read_bytes()
    buf = io.BytesIO()
    Image.new("L", (20, 16)).save(buf, format="PNG")
    assert_4xx(http.post(url, files={"image": ("x.png", good)}), 401, "api_key")
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", buf.getvalue())}), 400, "image")     # size
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", b"not an image")}), 400, "image")
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", b"\0" * (3 * 2 ** 20))}), 413, "image")
    url_not_file = {"image": (None, "http://127.0.0.1:9/x.png")}              # a URL is never fetched
    assert_4xx(http.post(url, headers=KEY, files=url_not_file), 400, "image")
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", good)}, data={"frames": "1"}), 400, "frames")
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", good)}, data={"span": "nan"}), 400, "span")
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", good)}, data={"lo": "-2.5"}), 422, "lo")
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", good)},
                         data={"span": "1", "hi": "1"}), 400, "hi")
    assert_4xx(http.post(url, headers=KEY, files={"image": ("x.png", good)}, data={"seed": "x"}), 400, "seed")
    assert_4xx(http.post(f"{V}/4/explain-image", headers=KEY, files={"image": ("x.png", good)}), 409, "version")
    chunked = http.post(url, headers=KEY, content=iter([b"--b\r\n"]))            # no Content-Length
    assert_4xx(chunked, 411, "image")


# --------------------------------------------------------------------------------------------- live updates

def _eventually(probe, what: str, timeout: float = 10.0):
    """Poll ``probe()`` until it returns something truthy (the service's listing TTL is 1 s in these tests)."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"{what} not seen within {timeout:g} s"
        time.sleep(0.2)
    return result


def test_new_explanation_is_picked_up_without_restart(http, platform):
    v = platform.new_version()
    assert_4xx(http.get(f"{V}/{v}"), 404, "version")
    platform.publish(v)
    fresh = _eventually(lambda: (r := http.get(f"{V}/{v}")).status_code == 200 and r, "the new version")
    assert fresh.json()["status"] == "done" and fresh.json()["version"] == v
    assert v in {r["version"] for m in http.get("/v1/models").json()["models"] for r in m["versions"]}
    platform.client.set_registered_model_alias(MODEL, "champion", v)
    _eventually(lambda: http.get(f"/v1/resolve/{MODEL}@champion").json()["version"] == v, "the moved alias")
    assert http.get(f"{V}/champion/components/1/sequence.gif").status_code == 200
    platform.client.set_registered_model_alias(MODEL, "champion", "1")


def test_a_version_being_re_explained_keeps_serving_its_last_published_run(http, platform):
    """While a newer explanation of a version is running, and after it failed, the service serves the version's
    last published run (checked like figan.run_id) and says so; a version never published stays a 409."""
    v = platform.new_version()
    published = platform.publish(v)
    done = _eventually(lambda: (r := http.get(f"{V}/{v}")).status_code == 200 and r.json(), "the published version")
    assert (done["serving_run"], done["latest_status"], done["pending"]) == (published, "done", False)
    assert "notice" not in done

    R.set_status(platform.client, MODEL, v, "running", key="key-next")       # what the flow writes on a re-run
    running = _eventually(lambda: (b := http.get(f"{V}/{v}").json()).get("latest_status") == "running" and b,
                          "the running status")
    assert (running["status"], running["serving_run"], running["pending"]) == ("done", published, True)
    assert "is running; serving the last published one" in running["notice"]
    gif = http.get(f"{V}/{v}/components/1/sequence.gif")
    assert gif.status_code == 200
    assert (gif.headers["x-figan-serving-run"], gif.headers["x-figan-latest-status"]) == (published, "running")
    made = http.post("/v1/generate", headers=KEY, json={"model": MODEL, "version": v, "format": "json", "frames": 2})
    assert made.status_code == 200 and (made.json()["serving_run"], made.json()["pending"]) == (published, True)

    R.set_status(platform.client, MODEL, v, "failed", error="train: out of memory", key="key-next")
    failed = _eventually(lambda: (b := http.get(f"{V}/{v}").json()).get("latest_status") == "failed" and b,
                         "the failed status")
    assert (failed["serving_run"], failed["pending"]) == (published, False)
    assert "is failed (train: out of memory)" in failed["notice"]

    first = platform.client.get_model_version(MODEL, "1").tags[R.TAG_RUN_ID]         # v1's genuine explanation
    platform.client.set_model_version_tag(MODEL, v, R.TAG_LAST_GOOD_RUN_ID, first)
    refused = _eventually(lambda: (r := http.get(f"{V}/{v}")).status_code == 502 and r, "the refusal")
    assert "figan.last_good_run_id tag is not an explanation of this version (version, key, cnn differ)" in \
        refused.json()["error"]


@pytest.fixture(scope="module")
def in_process(platform, tmp_path_factory):
    """The same ASGI app `bentoml serve` runs, in-process (cheaper than another server; one per process, BentoML
    registers its metrics globally), with keys off and a generation queue of one worker + one waiting:
    (test client, the service instance)."""
    import bentoml
    from starlette.testclient import TestClient

    from services.explanations import MLFLOW_ENV, Explanations

    env = {**MLFLOW_ENV, "FIGAN_HOME": str(tmp_path_factory.mktemp("in-process")),
           "FIGAN_TRACKING_URI": platform.server.uri, "FIGAN_SERVICE_AUTH": "off",
           "FIGAN_SERVICE_GEN_CONCURRENCY": "1", "FIGAN_SERVICE_GEN_QUEUE": "1",
           "FIGAN_AUDIT_KEY": platform.signing_key.decode()}                 # that home has no key file
    with pytest.MonkeyPatch.context() as mp:
        for var, value in env.items():
            mp.setenv(var, value)
        mp.delenv("FIGAN_SERVICE_API_KEY", raising=False)
        try:
            with TestClient(Explanations.to_asgi()) as client:
                yield client, bentoml.get_current_service()
        finally:
            gc.unfreeze()                   # the service froze the heap of this (test) process at its start


def test_auth_off_in_process(in_process):
    """With FIGAN_SERVICE_AUTH=off generation needs no key."""
    client, _ = in_process
    assert client.get("/readyz").status_code == 200
    resp = client.post("/v1/generate", json={**GOOD, "format": "json", "frames": 2})
    assert resp.status_code == 200 and len(resp.json()["components"]) == 2


def test_a_full_generation_queue_answers_503_with_retry_after(in_process, platform):
    """One generation at once and one waiting: while both places are taken (here by work that waits on a gate),
    generation and uploads are answered 503 with Retry-After at once, bad requests still 400; once the queue
    drains the same requests succeed."""
    client, svc = in_process
    image = (platform.home / "discs" / "images" / "000000.png").read_bytes()
    generate = lambda **change: client.post("/v1/generate", json={**GOOD, "frames": 2, **change})  # noqa: E731
    upload = lambda: client.post(f"{V}/1/explain-image", files={"image": ("x.png", image, "image/png")},  # noqa: E731
                                 data={"frames": "2"})
    assert generate().status_code == 200 and upload().status_code == 200        # warm: models loaded
    gate = threading.Event()
    held = [svc.store.generation.submit(gate.wait, 30) for _ in range(2)]     # the worker + the one waiting
    try:
        t0 = time.monotonic()
        for busy in (generate(), upload()):
            assert busy.status_code == 503, busy.text
            assert int(busy.headers["retry-after"]) >= 1 and busy.json()["field"] == "queue"
            assert busy.json()["retry_after_s"] == int(busy.headers["retry-after"])
        assert time.monotonic() - t0 < 5                                       # answered at once, not queued
        assert_4xx(generate(frames=1), 400, "frames")                        # checked before the queue
    finally:
        gate.set()
    for f in held:
        f.result(timeout=30)
    assert generate().status_code == 200 and upload().status_code == 200
    assert svc.store.generation.admitted == 0


def test_memory_and_disk_budgets_evict_the_least_recently_used(platform, tmp_path):
    """Budgets of 1.5 explanations: loading a second version's generator evicts the first one's from memory,
    downloading a second explanation deletes the first one's folder (unless in use), and the evicted one is
    loaded again when asked for."""
    from services.caches import folder_bytes, tensor_bytes

    measure = ExplanationStore(ServiceConfig(tracking_uri=platform.server.uri, cache_dir=tmp_path / "measure"))
    one = measure.explanation(MODEL, "1")
    gen_bytes, disk_bytes = tensor_bytes(measure.generator(one)), folder_bytes(one.dir)
    cfg = ServiceConfig(tracking_uri=platform.server.uri, cache_dir=tmp_path / "cache",
                        model_cache_bytes=int(1.5 * gen_bytes), disk_cache_bytes=int(1.5 * disk_bytes))
    store = ExplanationStore(cfg)
    a = store.explanation(MODEL, "1")
    store.generator(a)
    b = store.explanation(MODEL, "2")                                   # another run: a's folder goes
    assert a.run_id != b.run_id and b.dir.is_dir() and not a.dir.exists()
    assert folder_bytes(store.cache) <= cfg.disk_cache_bytes
    store.generator(b)
    assert store.loaded.keys() == [("generator", b.run_id)] and store.loaded.bytes <= cfg.model_cache_bytes
    with store.disk.in_use(b.run_id):                                   # in use: kept although over budget
        again = store.explanation(MODEL, "1")
        assert again.dir.is_dir() and b.dir.is_dir()
    assert store.file(again, again.dir / "metrics.json") == (platform.artifacts / "metrics.json").read_bytes()
    store.explanation(MODEL, "2")                                       # b's folder is still there: no download
    assert store.disk.collect() and folder_bytes(store.cache) <= cfg.disk_cache_bytes


def test_a_truncated_cached_file_is_downloaded_again_not_served(platform, tmp_path):
    """A cached explanation whose files no longer match what was downloaded (here: a GIF cut short, as a full
    disk or a killed copy leaves it) is fetched again by the next process instead of being served."""
    cfg = ServiceConfig(tracking_uri=platform.server.uri, cache_dir=tmp_path / "cache")
    expl = ExplanationStore(cfg).explanation(MODEL, "1")
    gif = expl.component_file(0, "gif")
    published = (platform.artifacts / "sequences" / "component_1.gif").read_bytes()
    gif.write_bytes(published[:len(published) // 2])
    restarted = ExplanationStore(cfg)
    again = restarted.explanation(MODEL, "1")
    assert restarted.file(again, again.component_file(0, "gif")) == published


def test_unreachable_mlflow_is_not_ready_and_503(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = ExplanationStore(ServiceConfig(tracking_uri="http://127.0.0.1:9", cache_dir=tmp_path))  # no listener
    assert store.mlflow_reachable() is False
    with pytest.raises(ServiceError, match="MLflow is not reachable") as err:
        store.models()
    assert err.value.code == 503 and "127.0.0.1" not in err.value.message        # no internal address


def test_published_files_are_left_out_of_tracing_and_the_api_is_not():
    """Immutable published files skip the per-request OpenTelemetry span (their largest CPU cost); the API's JSON,
    generation and upload routes keep it."""
    from services.explanations import Explanations

    untraced = re.compile("|".join(Explanations.config["tracing"]["excluded_urls"]))
    for path in (f"{V}/champion/components/1/sequence.gif", f"{V}/1/components/2/eigen.png", f"{V}/1/metrics.json",
                 f"{V}/1/components/1/sequence.json", f"{V}/1/fid_trace.png", "/viewer/viewer.js"):
        assert untraced.search(f"http://127.0.0.1:3000{path}"), path
    for path in ("/v1/models", f"{V}/1", "/v1/generate", f"{V}/1/explain-image", "/v1/resolve/m@1"):
        assert not untraced.search(f"http://127.0.0.1:3000{path}"), path


def test_access_log_mode_is_read_and_checked():
    from services.access_log import PUBLISHED_FILE, access_log_mode
    assert [access_log_mode(e) for e in ({}, {"FIGAN_SERVICE_ACCESS_LOG": "ALL"},
                                         {"FIGAN_SERVICE_ACCESS_LOG": "false"})] == ["api", "all", "off"]
    with pytest.raises(ValueError, match="FIGAN_SERVICE_ACCESS_LOG='loud'"):
        access_log_mode({"FIGAN_SERVICE_ACCESS_LOG": "loud"})
    assert PUBLISHED_FILE.search(f"{V}/champion/components/2/eigen.png")
    assert PUBLISHED_FILE.search("/models/m/versions/1/metrics.json")           # the path inside the /v1 mount
    assert not PUBLISHED_FILE.search(f"{V}/1") and not PUBLISHED_FILE.search(f"{V}/1/explain-image")


def test_error_details_carry_no_internal_urls_or_paths():
    from services.contract import public_detail
    detail = ("HTTPConnectionPool(host='10.0.0.5', port=5000): Max retries exceeded with url: "
              "http://mlflow.internal:5000/api/2.0/mlflow/runs/get?run_id=1 at /var/lib/figan/cache/abc/model.pt "
              "or s3://bucket/mlflow/1/artifacts (see ./relative/ok.txt)")
    out = public_detail(detail)
    for leak in ("mlflow.internal", "/var/lib", "s3://bucket", "/api/2.0", "10.0.0.5"):
        assert leak not in out, (leak, out)
    assert "<url>" in out and "<path>" in out and "Max retries exceeded" in out


def test_service_config_from_env(tmp_path, environ):
    environ({"FIGAN_HOME": str(tmp_path)})
    cfg = ServiceConfig.load()
    assert cfg.auth and not cfg.public_read and cfg.api_key is None and cfg.cache_dir == tmp_path / "service-cache"
    environ({"FIGAN_HOME": str(tmp_path), "FIGAN_SERVICE_AUTH": "off", "FIGAN_SERVICE_PUBLIC_READ": "true",
             "FIGAN_SERVICE_LISTING_TTL": "0.5"})
    cfg = ServiceConfig.load()
    assert not cfg.auth and cfg.public_read and cfg.listing_ttl == 0.5
    for var, bad in (("FIGAN_SERVICE_LISTING_TTL", "-1"), ("FIGAN_SERVICE_MAX_UPLOAD", "lots"),
                     ("FIGAN_SERVICE_AUTH", "perhaps")):
        environ({"FIGAN_HOME": str(tmp_path), var: bad})
        with pytest.raises(ValueError, match=var):
            ServiceConfig.load()
