"""models.audit on real files: a signed manifest verifies, and every kind of tampering is detected and named (one
edited byte, a missing file, an extra file, an edited manifest, another key, another subject, another digest)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import audit, layout

KEY = b"k" * 32
SUBJECT = {"model": "cnn", "version": "3", "key": "abc", "run_id": "0" * 32}


@pytest.fixture
def signed(tmp_path) -> tuple[Path, str]:
    """A small explanation folder with its signed manifest; returns the folder and the manifest's digest."""
    root = tmp_path / "explanation"
    (root / "sequences").mkdir(parents=True)
    (root / "sequences" / "component_1.gif").write_bytes(bytes(range(256)) * 4)
    (root / "metrics.json").write_text(json.dumps({"fid": {"best": 12.5}}))
    (root / "report.html").write_text("<html>report</html>")
    manifest = audit.sign(audit.build_manifest(audit.folder_digests(root), {"dataset_md5": "d" * 32}, SUBJECT), KEY)
    _, digest = audit.write_manifest(root, manifest)
    return root, digest


def flip_one_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_signed_folder_verifies(signed):
    root, digest = signed
    result = audit.verify_folder(root, KEY, expected_sha256=digest, subject=SUBJECT)
    assert result.ok and result.headline() == "verified", result.problems
    assert result.signature == "valid" and result.checked == 3 and result.manifest_sha256 == digest
    assert result.inputs == {"dataset_md5": "d" * 32}
    on_disk = json.loads((root / layout.MANIFEST).read_text())
    assert set(on_disk["files"]) == {"sequences/component_1.gif", "metrics.json", "report.html"}
    assert on_disk["signature"]["key_id"] == audit.key_id(KEY) and KEY.decode() not in json.dumps(on_disk)


def test_one_edited_byte_is_detected_and_named(signed):
    root, digest = signed
    flip_one_byte(root / "sequences" / "component_1.gif")
    result = audit.verify_folder(root, KEY, expected_sha256=digest)
    assert not result.ok and result.changed == ["sequences/component_1.gif"]
    assert result.signature == "valid" and not result.missing and not result.extra
    assert result.headline() == "1 changed: sequences/component_1.gif"


def test_missing_and_extra_files_are_named(signed):
    root, digest = signed
    (root / "report.html").unlink()
    (root / "sequences" / "component_9.gif").write_bytes(b"GIF89a")
    result = audit.verify_folder(root, KEY, expected_sha256=digest)
    assert (result.missing, result.extra, result.changed) == (["report.html"], ["sequences/component_9.gif"], [])
    assert "1 missing: report.html" in result.headline() and "1 extra: sequences/component_9.gif" in result.headline()


def test_only_fetched_paths_must_be_present_and_ignored_files_are_not_extra(signed):
    root, digest = signed
    (root / "report.html").unlink()                        # not fetched by this reader
    (root / "service").mkdir()
    (root / "service" / "fid_trace.png").write_bytes(b"own file")
    ok = audit.verify_folder(root, KEY, expected_sha256=digest, within=("sequences", "metrics.json"),
                             ignore=("service",))
    assert ok.ok, ok.problems
    (root / "metrics.json").unlink()                       # fetched, so it must be there
    assert audit.verify_folder(root, KEY, within=("sequences", "metrics.json"), ignore=("service",)).missing == \
        ["metrics.json"]


def test_a_wrong_key_is_a_signature_failure_naming_both_key_ids(signed):
    root, digest = signed
    other = b"x" * 32
    result = audit.verify_folder(root, other, expected_sha256=digest)
    assert not result.ok and result.signature == "other key" and not result.changed
    assert any(audit.key_id(KEY) in p and audit.key_id(other) in p for p in result.problems)
    assert result.headline() == "signature other key"                 # key ids stay out of the short line


def test_an_edited_manifest_breaks_the_signature_and_the_digest(signed):
    root, digest = signed
    path = root / layout.MANIFEST
    manifest = json.loads(path.read_text())
    flip_one_byte(root / "report.html", at=3)
    manifest["files"]["report.html"] = audit.file_sha256(root / "report.html")     # re-hash the edited file
    path.write_text(json.dumps(manifest))
    result = audit.verify_folder(root, KEY, expected_sha256=digest)
    assert result.signature == "invalid" and not result.changed
    assert any(p.startswith("manifest digest:") for p in result.problems)
    assert any("edited after signing" in p for p in result.problems)


def test_a_manifest_about_another_explanation_or_none_at_all_is_refused(signed):
    root, digest = signed
    moved = audit.verify_folder(root, KEY, expected_sha256=digest, subject={**SUBJECT, "version": "4"})
    assert not moved.ok and moved.problems == ["subject: the manifest is about version '3', not '4'"]
    (root / layout.MANIFEST).unlink()
    none = audit.verify_folder(root, KEY, expected_sha256=digest)
    assert not none.ok and none.manifest is None and none.signature == "missing"
    assert "no signed manifest" in none.headline()


def test_keys_and_digests():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        audit.sign(audit.build_manifest({}, {}, {}), b"short")
    with pytest.raises(ValueError, match="cannot list itself"):
        audit.build_manifest({layout.MANIFEST: "0"}, {}, {})
    versions = audit.library_versions()
    assert versions["torch"] and versions["mlflow"] and versions["scikit-learn"] and versions["python"]


def test_tree_digest_follows_names_and_contents(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "w.pt").write_bytes(b"weights")
    first = audit.tree_digest(a)
    assert audit.tree_digest(a) == first
    (a / "w.pt").write_bytes(b"weightz")
    assert audit.tree_digest(a) != first
    (a / "w.pt").write_bytes(b"weights")
    (a / "w.pt").rename(a / "v.pt")
    assert audit.tree_digest(a) != first


def test_the_platform_key_is_made_once_private_and_refused_when_others_may_read_it(tmp_path, environ):
    from flows.audit import AuditError, signing_key
    from flows.settings import Settings

    settings = Settings(home=tmp_path)
    with pytest.raises(AuditError, match="no audit key: set FIGAN_AUDIT_KEY"):
        signing_key(settings)                                   # readers never make one
    key = signing_key(settings, create=True)
    assert len(key) == 64 and (tmp_path / "audit.key").stat().st_mode & 0o777 == 0o600
    assert signing_key(settings) == key == signing_key(settings, create=True)
    (tmp_path / "audit.key").chmod(0o644)
    with pytest.raises(AuditError, match="may be read by others .*chmod 600"):
        signing_key(settings)
    environ({"FIGAN_HOME": str(tmp_path), "FIGAN_AUDIT_KEY": "y" * 20})
    configured = Settings.load()
    assert signing_key(configured) == b"y" * 20 and "y" * 20 not in repr(configured)
    with pytest.raises(AuditError, match=r"audit_key \(FIGAN_AUDIT_KEY\) must be at least 16 characters"):
        signing_key(Settings(home=tmp_path, audit_key="short"))
