"""Tamper-evident explanations: a signed manifest of every published file and of the exact inputs.

An explanation's manifest (``audit/manifest.json`` beside the files it covers) holds

* ``files``: the sha256 of every other file of the explanation, by its relative POSIX path;
* ``inputs``: what the explanation was made from (the CNN's digest and registry identity, the dataset's name, DVC
  md5 and version date, the explain-config hash, the code version, the versions of the libraries that did the
  work), so an auditor can tell *from which data and code* the pictures came;
* ``subject``: what it explains (model, version, explanation key, run id), so a valid manifest cannot be moved
  to another explanation;
* ``signature``: HMAC-SHA256 of the canonical JSON of everything above under the platform's key, and the key's id
  (the first 16 hex digits of the key's sha256), so a wrong key is told apart from an edited manifest.

The manifest file's own sha256 (:func:`manifest_digest`) is the explanation's fingerprint: the platform records it
where the explanation is published (a registry tag), and :func:`verify_folder` checks a folder against all three
(files, signature, fingerprint), naming every changed, missing and extra file.

Plain Python (hashlib, hmac, json): no MLOps package, so any machine holding the files and the key can check them.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .layout import MANIFEST

__all__ = ["SCHEMA", "LIBRARIES", "file_sha256", "folder_digests", "tree_digest",
           "library_versions", "key_id", "build_manifest", "sign", "manifest_bytes", "manifest_digest",
           "write_manifest", "Verification", "verify_folder"]

SCHEMA = "figan.manifest/1"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16
# the packages whose versions decide what an explanation contains (distribution names)
LIBRARIES = ("torch", "numpy", "scipy", "scikit-learn", "pillow", "torchmetrics", "captum", "mlflow", "prefect",
             "dvc", "evidently", "figan-platform")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- digests

def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(root: str | Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of every file under ``root``, except paths equal to or under an entry of
    ``skip`` (e.g. ``"audit/manifest.json"``, ``"service/"``)."""
    root = Path(root)
    skip = tuple(skip)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not _under(rel, skip):
            out[rel] = file_sha256(path)
    return out


def tree_digest(root: str | Path) -> str:
    """One sha256 for a whole folder (its files' paths and contents): what identifies a model's files."""
    lines = "".join(f"{rel}\0{digest}\n" for rel, digest in folder_digests(root).items())
    return hashlib.sha256(lines.encode()).hexdigest()


def _under(rel: str, prefixes: tuple[str, ...]) -> bool:
    return any(rel == p.rstrip("/") or rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for one that is not installed) and of Python itself."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------- signing

def key_id(key: bytes) -> str:
    """A key's public id: the first 16 hex digits of its sha256 (names the key without revealing it)."""
    return hashlib.sha256(key).hexdigest()[:16]


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"audit key: must be at least {MIN_KEY_BYTES} bytes, got "
                         f"{len(key) if isinstance(key, bytes) else type(key).__name__}")
    return key


def _canonical(manifest: dict) -> bytes:
    """The signed bytes: the manifest without its signature, as compact JSON with sorted keys."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def build_manifest(files: dict[str, str], inputs: dict[str, Any], subject: dict[str, Any]) -> dict[str, Any]:
    """An unsigned manifest of ``files`` (``{path: sha256}``, e.g. :func:`folder_digests`), ``inputs`` and
    ``subject``. The manifest's own path may not be among the files."""
    if MANIFEST in files:
        raise ValueError(f"files: the manifest cannot list itself ({MANIFEST})")
    return {"schema": SCHEMA, "subject": dict(subject), "inputs": dict(inputs), "files": dict(sorted(files.items()))}


def sign(manifest: dict[str, Any], key: bytes) -> dict[str, Any]:
    """The manifest with its ``signature``: HMAC-SHA256 of its canonical JSON under ``key``, and the key's id."""
    mac = hmac.new(_check_key(key), _canonical(manifest), hashlib.sha256).hexdigest()
    return {**{k: v for k, v in manifest.items() if k != "signature"},
            "signature": {"algorithm": ALGORITHM, "key_id": key_id(key), "value": mac}}


def manifest_bytes(signed: dict[str, Any]) -> bytes:
    """The manifest file's bytes (indented JSON, sorted keys, one trailing newline)."""
    return (json.dumps(signed, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def manifest_digest(data: bytes) -> str:
    """sha256 of a manifest file's bytes: the explanation's fingerprint, recorded where it is published."""
    return hashlib.sha256(data).hexdigest()


def write_manifest(root: str | Path, signed: dict[str, Any]) -> tuple[Path, str]:
    """Write ``<root>/audit/manifest.json``; returns its path and :func:`manifest_digest`."""
    path = Path(root) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    data = manifest_bytes(signed)
    path.write_bytes(data)
    return path, manifest_digest(data)


# --------------------------------------------------------------------------------------------- verifying

@dataclass
class Verification:
    """What :func:`verify_folder` found. ``ok`` only when the manifest is there and readable, its signature is
    valid, its digest is the expected one (when one was given) and no file changed, went missing or was added."""
    manifest_sha256: str | None = None
    manifest: dict[str, Any] | None = None
    signature: str = "missing"            # valid | invalid | other key | missing
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    checked: int = 0                      # files whose sha256 was recomputed
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def inputs(self) -> dict[str, Any]:
        return (self.manifest or {}).get("inputs") or {}

    def headline(self, limit: int = 5) -> str:
        """One line naming what failed (at most ``limit`` files per kind; the signature by its state alone, without
        key ids), or ``verified``."""
        if self.ok:
            return "verified"
        parts = [p for p in self.problems if not p.startswith(("changed:", "missing:", "extra:", "signature:"))]
        if self.manifest is not None and self.signature != "valid":
            parts.append(f"signature {self.signature}")
        for kind, files in (("changed", self.changed), ("missing", self.missing), ("extra", self.extra)):
            if files:
                more = f" and {len(files) - limit} more" if len(files) > limit else ""
                parts.append(f"{len(files)} {kind}: {', '.join(files[:limit])}{more}")
        return "; ".join(parts)


def _read_manifest(root: Path, result: Verification) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        result.problems.append(f"no signed manifest ({MANIFEST} is missing)")
        return None
    data = path.read_bytes()
    result.manifest_sha256 = manifest_digest(data)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("schema") == SCHEMA and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("signature"), dict)):
        result.problems.append(f"{MANIFEST} is not a {SCHEMA} manifest")
        return None
    return manifest


def _check_signature(manifest: dict, key: bytes, result: Verification) -> None:
    sig = manifest["signature"]
    if sig.get("algorithm") != ALGORITHM:
        result.signature = "invalid"
        result.problems.append(f"signature: algorithm {str(sig.get('algorithm'))[:40]!r} is not {ALGORITHM}")
        return
    try:
        want = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    except ValueError:                    # NaN or infinity in an edited manifest: not what sign() wrote
        want = ""
    if hmac.compare_digest(want, str(sig.get("value", ""))):
        result.signature = "valid"
    elif sig.get("key_id") != key_id(key):
        result.signature = "other key"
        result.problems.append(f"signature: made with another key (key id {str(sig.get('key_id'))[:16]}, this "
                               f"platform's is {key_id(key)})")
    else:
        result.signature = "invalid"
        result.problems.append("signature: does not match the manifest (the manifest was edited after signing)")


def verify_folder(root: str | Path, key: bytes, expected_sha256: str | None = None,
                  subject: dict[str, Any] | None = None, within: Iterable[str] | None = None,
                  ignore: Iterable[str] = ()) -> Verification:
    """Check a folder against its signed manifest: the manifest's digest (against ``expected_sha256``, the one
    recorded at publication, when given), its signature under ``key``, that it is about ``subject`` (each given
    field equal to the manifest's), and the sha256 of every file.

    ``within``: only these paths (files or folders) were fetched, so only listed files under them must be present
    (a service that downloads part of an explanation checks what it serves); default: every listed file. Files
    in the folder that the manifest does not list are ``extra``, except under ``ignore`` (a cache's own files).
    Every problem is named in ``problems``; nothing is raised for a bad folder."""
    root = Path(root)
    _check_key(key)
    result = Verification()
    manifest = _read_manifest(root, result)
    if expected_sha256 is not None and result.manifest_sha256 != expected_sha256:
        result.problems.append(f"manifest digest: {result.manifest_sha256 or 'none'} is not the published "
                               f"{expected_sha256}")
    if manifest is None:
        return result
    result.manifest = manifest
    _check_signature(manifest, key, result)
    signed_subject = manifest.get("subject") or {}
    for name, value in (subject or {}).items():
        if str(signed_subject.get(name)) != str(value):
            result.problems.append(f"subject: the manifest is about {name} {str(signed_subject.get(name))[:64]!r}, "
                                   f"not {str(value)[:64]!r}")
    listed: dict[str, str] = {str(k): str(v) for k, v in manifest["files"].items()}
    scope = None if within is None else tuple(within)
    present = folder_digests(root, skip=(MANIFEST, *ignore))
    for rel, digest in listed.items():
        if rel not in present:
            if scope is None or _under(rel, scope):
                result.missing.append(rel)
        elif present[rel] != digest:
            result.changed.append(rel)
    result.extra = [rel for rel in present if rel not in listed]
    result.checked = sum(rel in present for rel in listed)
    for kind in ("changed", "missing", "extra"):
        result.problems += [f"{kind}: {rel}" for rel in getattr(result, kind)]
    return result
