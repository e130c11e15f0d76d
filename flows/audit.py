"""The platform's audit trail around :mod:`models.audit`: the signing key, and checking a published explanation.

* **The key** (:func:`signing_key`): the setting ``audit_key`` (``FIGAN_AUDIT_KEY``) when set, which is how a team
  deployment gives the worker, its flow runs and the service one secret; otherwise ``<home>/audit.key`` (64 random
  hex digits), created on first use with mode 0600, which every process of the embedded platform shares through
  its home. A key file that others may read is refused.
* **Publishing** signs: :func:`flows.registry.publish_explanation` logs the manifest last and tags its digest.
* **``figan verify``** (:func:`verify_version`): downloads every artifact of the version's explanation run,
  recomputes every sha256, checks the HMAC, that the manifest is about this model, version, key and run, and that
  its digest is the one tagged on the version and on the run.
* **The service** (:func:`verify_served`): the same checks on the part of the run it downloaded into its cache.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models import audit, layout

from . import registry as R
from .settings import Settings

__all__ = ["AuditError", "signing_key", "verify_version", "verify_served"]


class AuditError(RuntimeError):
    """The audit trail cannot be checked as configured (no key, a key file others can read, nothing published)."""


def signing_key(settings: Settings, create: bool = False) -> bytes:
    """The platform's HMAC key: ``settings.audit_key`` (``FIGAN_AUDIT_KEY``), else the key file in the home,
    written first (atomically, mode 0600) when ``create`` and there is none. :class:`AuditError` names what is
    wrong: no key (and ``create`` false), a key shorter than 16 characters, a key file others may read."""
    if settings.audit_key:
        key = settings.audit_key.strip().encode()
        if len(key) < audit.MIN_KEY_BYTES:
            raise AuditError(f"settings: audit_key (FIGAN_AUDIT_KEY) must be at least {audit.MIN_KEY_BYTES} "
                             f"characters, got {len(key)}")
        return key
    path = settings.audit_key_file
    if not path.exists():
        if not create:
            raise AuditError(f"no audit key: set FIGAN_AUDIT_KEY, or use the home whose {path.name} signed the "
                             f"explanations ({path} does not exist)")
        _write_key_file(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AuditError(f"audit key file {path} may be read by others (mode {mode:o}): `chmod 600 {path}`")
    key = path.read_text().strip().encode()
    if len(key) < audit.MIN_KEY_BYTES:
        raise AuditError(f"audit key file {path} holds fewer than {audit.MIN_KEY_BYTES} characters")
    return key


def _write_key_file(path: Path) -> None:
    """32 random bytes as hex into ``path`` (mode 0600); whoever links first wins when processes race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".audit-key-", dir=path.parent)       # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def verify_version(client: MlflowClient, key: bytes, name: str, version: str | int) -> tuple[str, audit.Verification]:
    """Check the published explanation of a model version against its signed manifest: every artifact of its run
    downloaded and hashed, the signature, the subject (model, version, key, run) and the manifest's digest against
    the version's and the run's ``figan.manifest_sha256`` tags. Returns the run id and what was found (a bad run is
    reported, not raised); :class:`AuditError` when the version has no published explanation."""
    version = str(version)
    try:
        status = R.get_status(client, name, version)
    except MlflowException as e:
        raise AuditError(f"model version {name}/{version} cannot be read from the registry ({e.message})") from e
    run_id = status.get("run_id")
    if not run_id:
        raise AuditError(f"model version {name}/{version} has no published explanation (status "
                         f"{status.get('status') or 'none'})")
    expected = status.get("manifest_sha256")
    with tempfile.TemporaryDirectory(prefix="figan-verify-") as tmp:
        root = Path(client.download_artifacts(run_id, "", dst_path=tmp))
        result = audit.verify_folder(root, key, expected_sha256=expected, subject=_subject(name, version, run_id,
                                                                                           status.get("key")))
    if expected is None:
        result.problems.insert(0, f"the version has no {R.TAG_MANIFEST} tag")
    run_tag = R.run_manifest_sha256(client, run_id)
    if result.manifest_sha256 and run_tag != result.manifest_sha256:
        result.problems.append(f"run tag {R.RUN_TAG_MANIFEST}: {run_tag or 'missing'} is not the manifest's digest")
    return run_id, result


def verify_served(folder: Path, row: dict, ignore: tuple[str, ...] = (),
                  settings: Settings | None = None) -> audit.Verification:
    """Check the part of an explanation run a service downloaded (:func:`flows.registry.download_explanation`)
    against its signed manifest and the version's ``figan.manifest_sha256`` (``row``: a
    :func:`flows.registry.list_versions` row). Files under ``ignore`` are the service's own."""
    key = signing_key(settings or Settings.load())
    expected = row.get("manifest_sha256")
    subject = _subject(row["name"], str(row["version"]), row["run_id"], row.get("key"))
    result = audit.verify_folder(folder, key, expected_sha256=expected, within=layout.SERVED_ARTIFACTS,
                                 ignore=ignore, subject=subject)
    if expected is None:
        result.problems.insert(0, f"the version has no {R.TAG_MANIFEST} tag")
    return result


def _subject(name: str, version: str, run_id: str, key: str | None) -> dict[str, str]:
    return {"model": name, "version": version, "run_id": run_id, **({"key": key} if key else {})}
