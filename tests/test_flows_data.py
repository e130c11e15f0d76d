"""DVC data store: real git + DVC repositories and a real local remote in tmp_path, tiny phantoms, no mocks."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from flows.data import (DataStore, DataVersionError, DatasetVersion, dataset_md5, fetch_dataset, list_versions,
                        open_store, version_dataset)
from models.data import ImageDataset
from models.medical_images import write_dicom
from models.phantom import PhantomConfig, write_phantom

# pygtrie deprecation noise from inside DVC 3.67 (dvc/repo/trie.py, graph.py), not from this code
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")


@pytest.fixture(autouse=True)
def _dvc_site_cache(tmp_path, monkeypatch):
    # DVC's per-repo state/index databases go to /var/tmp/dvc unless told otherwise; keep each test hermetic.
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))


@pytest.fixture
def store(tmp_path) -> DataStore:
    return open_store(tmp_path / "store")


@pytest.fixture
def src(tmp_path) -> Path:
    write_phantom(tmp_path / "src", PhantomConfig(n=16, size=16))
    return tmp_path / "src"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def tags(store: DataStore) -> list[str]:
    return git(store.root, "tag", "--list").split()


def n_commits(store: DataStore) -> int:
    return int(git(store.root, "rev-list", "--count", "HEAD"))


def change_one_image(folder: Path, rel: str = "images/000003.png") -> None:
    with Image.open(folder / rel) as im:
        a = np.asarray(im).copy()
    Image.fromarray(255 - a).save(folder / rel)


def snapshot(store: DataStore, name: str = "phantom") -> tuple:
    work = store.datasets_dir / name
    return (git(store.root, "rev-parse", "HEAD"), tags(store), git(store.root, "status", "--porcelain"),
            (store.datasets_dir / f"{name}.dvc").read_bytes(), dataset_md5(work), list_versions(store))


# --------------------------------------------------------------------------------------------- store

def test_open_store_creates_and_is_idempotent(tmp_path):
    s = open_store(tmp_path / "store")
    assert s.root == (tmp_path / "store").resolve() and s.remote == str((tmp_path / "dvc-remote").resolve())
    assert (s.root / ".git").is_dir() and (s.root / ".dvc" / "config").is_file()
    assert git(s.root, "config", "--local", "user.name")                      # identity set in this repo only
    assert git(s.root, "status", "--porcelain") == ""                         # DVC files committed
    head = git(s.root, "rev-parse", "HEAD")
    assert open_store(tmp_path / "store") == s and open_store(tmp_path / "store", s.remote) == s
    assert git(s.root, "rev-parse", "HEAD") == head                           # nothing new to commit

    with pytest.raises(DataVersionError, match="already uses the DVC remote"):
        open_store(tmp_path / "store", tmp_path / "elsewhere")

    s3 = open_store(tmp_path / "s3store", "s3://bucket/figan/data")           # configuration only, no push
    assert s3.remote == "s3://bucket/figan/data"
    conf = (s3.root / ".dvc" / "config").read_text()
    assert "s3://bucket/figan/data" in conf and "remote = storage" in conf

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DataVersionError, match="not empty and not a data store"):
        open_store(tmp_path / "junk")


# --------------------------------------------------------------------------------------------- versioning

def test_version_md5_is_dvcs_directory_hash(store, src):
    (src / "images.txt").write_text("sorts before images/ in DVC's listing\n")   # '.' < '/' ordering edge
    v = version_dataset(store, src)
    assert isinstance(v, DatasetVersion) and v.name == "phantom"
    out = yaml.safe_load((store.datasets_dir / "phantom.dvc").read_text())["outs"][0]
    assert out["md5"] == v.md5 + ".dir"                                      # as DVC wrote it
    assert v.md5 == dataset_md5(src) == dataset_md5(store.datasets_dir / "phantom")
    files = [p for p in src.rglob("*") if p.is_file()]
    assert (v.n_images, v.n_files, v.size_bytes) == (16, len(files), sum(p.stat().st_size for p in files))
    assert tags(store) == [f"phantom@{v.md5[:12]}"] and v.rev == git(store.root, "rev-parse", "HEAD")
    assert (Path(store.remote) / "files" / "md5" / v.md5[:2] / f"{v.md5[2:]}.dir").is_file()   # pushed
    assert git(store.root, "status", "--porcelain") == ""
    assert list_versions(store) == [v] == list_versions(store, "phantom") and list_versions(store, "other") == []


def test_version_twice_is_idempotent(store, src):
    v1 = version_dataset(store, src)
    commits = n_commits(store)
    v2 = version_dataset(store, src)
    copy = src.parent / "copy"                                               # same bytes elsewhere: same version
    shutil.copytree(src, copy)
    v3 = version_dataset(store, copy)
    assert v1 == v2 == v3 and len(tags(store)) == 1 and n_commits(store) == commits


def test_changed_image_makes_a_new_version_and_both_stay_fetchable(store, src, tmp_path):
    v1 = version_dataset(store, src)
    old_bytes = (src / "images/000003.png").read_bytes()
    change_one_image(src)
    v2 = version_dataset(store, src)
    assert v2.md5 != v1.md5 and v2.md5 == dataset_md5(src) and v2.n_images == v1.n_images
    assert [v.md5 for v in list_versions(store, "phantom")] == [v1.md5, v2.md5]
    assert sorted(tags(store)) == sorted([v1.tag, v2.tag])

    a = fetch_dataset(store, "phantom", v1.md5, tmp_path / "a")
    b = fetch_dataset(store, "phantom", v2.md5[:8], tmp_path / "b")           # unique 8-char prefix
    assert dataset_md5(a) == v1.md5 and dataset_md5(b) == v2.md5
    assert (a / "images/000003.png").read_bytes() == old_bytes != (b / "images/000003.png").read_bytes()

    # already materialised: returned without copying (same inode, same mtime)
    st = (a / "manifest.csv").stat()
    assert fetch_dataset(store, "phantom", v1.md5, a) == a
    st2 = (a / "manifest.csv").stat()
    assert (st.st_ino, st.st_mtime_ns) == (st2.st_ino, st2.st_mtime_ns)
    # a folder holding a different version is never overwritten
    with pytest.raises(DataVersionError, match="refusing to overwrite"):
        fetch_dataset(store, "phantom", v1.md5, b)
    assert dataset_md5(b) == v2.md5
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert dataset_md5(fetch_dataset(store, "phantom", v1.md5, tmp_path / "empty")) == v1.md5


def test_fetch_without_local_cache_reads_the_remote(store, src, tmp_path):
    v = version_dataset(store, src)
    shutil.rmtree(store.root / ".dvc" / "cache")
    shutil.rmtree(tmp_path / "dvc-site")                                     # like a fresh machine
    out = fetch_dataset(store, "phantom", v.md5, tmp_path / "out")
    assert dataset_md5(out) == v.md5 and len(list((out / "images").iterdir())) == 16


def test_fetch_of_lost_data_is_a_clear_error(store, src, tmp_path):
    v = version_dataset(store, src)
    shutil.rmtree(store.root / ".dvc" / "cache")
    shutil.rmtree(Path(store.remote) / "files")
    with pytest.raises(DataVersionError, match=r"missing from both the local DVC cache \(.*\) and the remote") as e:
        fetch_dataset(store, "phantom", v.md5, tmp_path / "out")
    assert v.md5 in str(e.value) and store.remote in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.fetch-")]   # no half folder left


def test_invalid_dataset_changes_nothing(store, src, tmp_path):
    version_dataset(store, src)
    before = snapshot(store)

    no_yaml = tmp_path / "no_yaml"
    shutil.copytree(src, no_yaml)
    (no_yaml / "dataset.yaml").unlink()
    with pytest.raises(DataVersionError, match=r"is not valid: .*no dataset.yaml"):
        version_dataset(store, no_yaml, name="phantom")

    missing_image = tmp_path / "missing_image"
    shutil.copytree(src, missing_image)
    (missing_image / "images/000005.png").unlink()
    with pytest.raises(DataVersionError, match=r"lists 'images/000005.png', which does not exist"):
        version_dataset(store, missing_image)

    bad_target = tmp_path / "bad_target"
    shutil.copytree(src, bad_target)
    meta = yaml.safe_load((bad_target / "dataset.yaml").read_text())
    (bad_target / "dataset.yaml").write_text(yaml.safe_dump({**meta, "target": "no_such_column"}))
    with pytest.raises(DataVersionError, match="missing column.*no_such_column"):
        version_dataset(store, bad_target)

    for field, value, why in (("factors", ["heart_size", "shift_x"], "factors must be a mapping of driving/"),
                              ("factor", {"driving": ["heart_size"]}, r"unknown field\(s\) \['factor'\]"),
                              ("target", 3, "target must be a column name")):
        bad_meta = tmp_path / f"bad_yaml_{field}"
        shutil.copytree(src, bad_meta)
        (bad_meta / "dataset.yaml").write_text(yaml.safe_dump({**meta, field: value}))
        with pytest.raises(DataVersionError, match=f"is not valid: .*dataset.yaml: {why}"):
            version_dataset(store, bad_meta)

    with pytest.raises(DataVersionError, match="dataset name 'Bad Name' is not allowed"):
        version_dataset(store, src, name="Bad Name")

    assert snapshot(store) == before


def test_failed_push_leaves_the_store_as_it_was(tmp_path, src):
    (tmp_path / "a_file").write_text("not a folder")
    s = open_store(tmp_path / "store", tmp_path / "a_file" / "remote")       # the remote cannot be created
    head = git(s.root, "rev-parse", "HEAD")
    with pytest.raises(DataVersionError, match="pushing phantom version .* failed"):
        version_dataset(s, src)
    assert git(s.root, "rev-parse", "HEAD") == head and tags(s) == [] and list_versions(s) == []
    assert git(s.root, "status", "--porcelain") == ""
    assert not (s.datasets_dir / "phantom").exists() and not (s.datasets_dir / "phantom.dvc").exists()


def test_unknown_name_or_md5_lists_what_is_known(store, src, tmp_path):
    with pytest.raises(DataVersionError, match="holds no dataset yet"):
        fetch_dataset(store, "phantom", "1234abcd", tmp_path / "x")
    v = version_dataset(store, src)
    with pytest.raises(DataVersionError, match=r"no dataset named 'ghost'.*known datasets: phantom"):
        fetch_dataset(store, "ghost", v.md5, tmp_path / "x")
    with pytest.raises(DataVersionError, match=rf"dataset phantom has no version 1234abcd…; known: {v.md5[:12]} "
                                               r"\(16 images"):
        fetch_dataset(store, "phantom", "1234abcd", tmp_path / "x")
    with pytest.raises(DataVersionError, match="at least 8 hex characters"):
        fetch_dataset(store, "phantom", v.md5[:6], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dataset_md5_of_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataVersionError, match="not a folder"):
        dataset_md5(tmp_path / "nope")


# --------------------------------------------------------------------------------------------- DICOM / NIfTI

def test_a_dicom_dataset_versions_with_its_image_summary_and_fetches_identical(store, tmp_path):
    cfg = PhantomConfig(n=16, size=16, seed=2)
    src = write_phantom(tmp_path / "dcm", cfg, image_format="dicom").root
    v = version_dataset(store, src)
    assert v.n_images == 16 and v.images == {"formats": {"DICOM": 16}, "image_size": [16, 16],
                                             "pixel_spacing": None}
    assert list_versions(store)[0].images == v.images                      # read back from the tag
    out = ImageDataset(fetch_dataset(store, "phantom", v.md5, tmp_path / "out"))
    np.testing.assert_array_equal(out.load(range(16)), ImageDataset(src).load(range(16)))

    other = tmp_path / "other_size"                                          # one DICOM of another size
    shutil.copytree(src, other)
    write_dicom(other / "images/000007.dcm", np.zeros((20, 24), np.float32), uid_seed="odd")
    with pytest.raises(DataVersionError, match=r"'images/000007.dcm' is 24x20 but the dataset's images are 16x16"):
        version_dataset(store, other)


def test_patient_identifying_dicom_is_refused_before_dvc_unless_allowed(store, src, tmp_path):
    version_dataset(store, src)
    before = snapshot(store)
    phi = tmp_path / "phi"
    (phi / "images").mkdir(parents=True)
    for i in range(3):
        shutil.copy(get_testdata_file("CT_small.dcm"), phi / f"images/{i}.dcm")
    pd.DataFrame({"path": [f"images/{i}.dcm" for i in range(3)], "y": [1.0, 2.0, 3.0]}).to_csv(
        phi / "manifest.csv", index=False)
    meta = {"name": "ct", "target": "y", "task": "regression"}
    (phi / "dataset.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DataVersionError, match=r"3 DICOM files carry patient-identifying tags: PatientName \(3 "
                                               r"files\), PatientID \(3 files\).*e.g. 'images/0.dcm'") as e:
        version_dataset(store, phi)
    assert "CompressedSamples" not in str(e.value) and "1CT1" not in str(e.value)     # no tag values
    assert snapshot(store) == before and not (store.datasets_dir / "ct").exists()

    (phi / "dataset.yaml").write_text(yaml.safe_dump({**meta, "phi": "allowed"}))
    v = version_dataset(store, phi)
    assert v.images["phi"] == {"allowed": True, "tags": {"OtherPatientIDsSequence": 3, "PatientID": 3,
                                                         "PatientName": 3}}
    assert v.images["pixel_spacing"] == {"images": 3, "row_mm": [0.661468] * 3, "col_mm": [0.661468] * 3}
    note = git(store.root, "tag", "-l", "--format=%(contents)", v.tag)
    assert "PatientName" in note and "CompressedSamples" not in note and "1CT1" not in note
