"""Dataset versioning with DVC: a *data store* that names every dataset version by its DVC md5.

``models/`` never imports DVC; this module is the one place that does. The design:

* A **data store** is a folder holding a git repository and a DVC repository on top of it (a small "data
  registry") plus a default DVC remote named ``storage``. :func:`open_store` creates it when missing (``git
  init`` with a store-local user.name/email, ``dvc init``, the remote) and is idempotent. The remote is a local
  folder by default (``<root>/../dvc-remote``, absolute); any DVC URL (``s3://bucket/path``, ...) is written to
  ``.dvc/config`` as is, so moving to S3/MinIO is configuration, not code.

* **Versioning** (:func:`version_dataset`) validates the folder with ``models.data.ImageDataset`` (plus: every
  file the manifest lists exists) and ``models.dataset_audit.audit_dataset`` (every image's header: readable, one
  size, no patient-identifying DICOM tags unless dataset.yaml says ``phi: allowed``), all before any DVC work,
  copies it to ``<root>/datasets/<name>/`` (the working copy, replaced),
  ``dvc add``-s it, ``dvc push``-es the objects to the remote, git-commits ``datasets/<name>.dvc`` and tags the
  commit ``<name>@<md5[:12]>`` with an annotated tag whose message carries the version's summary as JSON
  (counts, sizes and the audit's ``images`` facts: formats, image size, pixel spacing; never a DICOM tag value).
  The **md5 is DVC's directory hash** (the ``xxx.dir`` value of the ``.dvc`` file without ``.dir``), so the
  same bytes always get the same name: the source is hashed first and, when that version is already tagged,
  nothing is copied, pushed or committed (re-versioning an older content returns its existing version; the
  working copy and HEAD stay at the most recently added one). A failure before the commit restores the previous working copy and
  ``.dvc`` file, so a failed or invalid call leaves what is stored as it was. Operations that change the store
  hold an exclusive ``flock`` on ``.git/figan-data-store.lock``, so concurrent callers run one after another.

* **Listing** (:func:`list_versions`) reads the tags (one ``git for-each-ref``); git tags are the index.

* **Fetching** (:func:`fetch_dataset`) materialises exactly one version with
  ``DVCFileSystem(root, rev=<tag>).get(...)``, which reads each object from the local DVC cache or, failing
  that, from the remote. It downloads into a hidden sibling folder, recomputes the directory md5
  (:func:`dataset_md5`) and opens it with ``ImageDataset`` before renaming it into place, so the destination is
  either absent or complete and verified. A destination that already holds the identical version is returned
  after hashing it (no copy); any other non-empty destination is refused.

* :func:`dataset_md5` re-derives DVC 3.x's directory hash without DVC (checked against
  ``dvc_data.hashfile.tree.Tree.digest``): the md5 of each file's raw bytes, the list
  ``[{"md5": ..., "relpath": ...}]`` sorted by posix relpath, ``json.dumps(..., sort_keys=True)`` of it, md5 of
  that. Like DVC it skips ``.git``, ``.hg`` and ``.dvc`` entries; symlinks are followed (their content is what a
  copy, and therefore DVC, sees).

DVC keeps per-repo state (hash and index databases) in its site cache dir, ``/var/tmp/dvc`` by default; set
``DVC_SITE_CACHE_DIR`` to move it (the tests do). Git is driven through its command line (it must be
installed); DVC through its Python API (``dvc.repo.Repo``, ``dvc.api.DVCFileSystem``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import yaml

from models.data import DatasetError, ImageDataset
from models.dataset_audit import DatasetAudit, audit_dataset

if TYPE_CHECKING:
    from dvc.repo import Repo

REMOTE_NAME = "storage"                 # the default DVC remote of a data store
DATASETS_DIR = "datasets"               # <root>/datasets/<name>/ and <root>/datasets/<name>.dvc
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"
MIN_MD5_PREFIX = 8
SHORT_MD5 = 12                          # tag = <name>@<md5[:12]>
LOCK_TIMEOUT_S = 600.0
GIT_USER = ("FIGAN data store", "figan-data-store@localhost")

_NAME_RE = re.compile(NAME_PATTERN)
_TAG_RE = re.compile(rf"(?P<name>{NAME_PATTERN})@(?P<short>[0-9a-f]{{{SHORT_MD5}}})")
_HEX_RE = re.compile(r"[0-9a-f]+")
_IGNORED_DIRS = frozenset({".git", ".hg", ".dvc"})   # DVC's default ignore patterns: .git .git/ .hg/ .dvc/
_IGNORED_FILES = frozenset({".git"})
_CHUNK = 1 << 20


class DataVersionError(Exception):
    """A data store, dataset version or fetch request is not usable; the message names what is wrong."""


class InvalidDatasetError(DataVersionError):
    """The folder (to version, or a fetched version) is not a valid dataset: dataset.yaml, manifest or files."""


@dataclass(frozen=True)
class DataStore:
    """A git + DVC data registry at ``root`` whose data lives in the DVC remote ``remote`` (a URL or path)."""

    root: Path
    remote: str

    @property
    def datasets_dir(self) -> Path:
        return self.root / DATASETS_DIR


@dataclass(frozen=True)
class DatasetVersion:
    """One version of a dataset, named by its DVC directory md5 (32 hex, no ``.dir``)."""

    name: str
    md5: str
    n_images: int          # images: rows of manifest.csv, NIfTI volumes counted by their selected slices
    n_files: int           # files DVC tracks (images, masks, manifest.csv, dataset.yaml)
    size_bytes: int        # total size of those files
    rev: str               # the git commit the tag points to
    created: str = ""      # UTC ISO-8601 time it was versioned
    images: dict = field(default_factory=dict, compare=False)   # the audit's summary: formats, size, spacing

    @property
    def tag(self) -> str:
        return version_tag(self.name, self.md5)

    def describe(self) -> str:
        return f"{self.md5[:SHORT_MD5]} ({self.n_images} images, {self.created[:19] or 'unknown date'})"


def version_tag(name: str, md5: str) -> str:
    """The git tag of a dataset version: ``<name>@<md5[:12]>``."""
    return f"{name}@{md5[:SHORT_MD5]}"


# --------------------------------------------------------------------------------------------- hashing

def _file_md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dataset_md5(path: str | Path) -> str:
    """DVC-compatible directory md5 of any folder (what ``dvc add`` writes as ``<md5>.dir``, without ``.dir``)."""
    root = Path(path)
    if not root.is_dir():
        raise DataVersionError(f"cannot hash {str(root)!r}: it is not a folder")
    entries: list[dict[str, str]] = []
    try:
        for d, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [x for x in dirs if x not in _IGNORED_DIRS]
            rel_dir = Path(d).relative_to(root).as_posix()
            for f in files:
                if f in _IGNORED_FILES:
                    continue
                rel = f if rel_dir == "." else f"{rel_dir}/{f}"
                entries.append({"md5": _file_md5(os.path.join(d, f)), "relpath": rel})
    except OSError as e:
        raise DataVersionError(f"cannot hash {str(root)!r}: {e}") from None
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest()


# --------------------------------------------------------------------------------------------- helpers

def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                        "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_PREFIX")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["git", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args]
    try:
        res = subprocess.run(cmd, cwd=root, env=_git_env(), capture_output=True, text=True)
    except FileNotFoundError:
        raise DataVersionError("git is not installed (a data store is a git + DVC repository)") from None
    if check and res.returncode != 0:
        raise DataVersionError(f"git {' '.join(args)} failed in {root}: {(res.stderr or res.stdout).strip()}")
    return res


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC configures its loggers at import and prints hints at INFO; keep them to warnings while we work."""
    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _dvc_repo(root: Path, remote: str | None = None) -> Iterator["Repo"]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    config = _remote_override(remote) if remote is not None else None
    try:
        repo = Repo(str(root), config=config)
    except DvcException as e:
        raise DataVersionError(f"{root} is not a usable DVC repository: {e}") from None
    repo.scm_context.quiet = True
    try:
        yield repo
    finally:
        repo.close()


def _remote_override(remote: str) -> dict:
    return {"core": {"remote": REMOTE_NAME}, "remote": {REMOTE_NAME: {"url": remote}}}


@contextlib.contextmanager
def _store_lock(root: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive advisory lock on the store, so concurrent callers (flows, CLIs) run one after another."""
    path = root / ".git" / "figan-data-store.lock"
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DataVersionError(f"data store {root} stayed locked by another process for "
                                           f"{timeout_s:.0f} s ({path})") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_url(remote: str) -> bool:
    return "://" in remote


def _normalise_remote(remote: str | Path) -> str:
    s = str(remote).strip()
    if not s:
        raise DataVersionError("the DVC remote must be a URL (s3://bucket/path, ...) or a local folder, got ''")
    return s if _is_url(s) else str(Path(s).expanduser().resolve())


def _same_remote(a: str, b: str) -> bool:
    if _is_url(a) or _is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _check_name(name: str, what: str = "dataset name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name or name.endswith((".", ".lock")):
        raise DataVersionError(f"{what} {name!r} is not allowed: use lower-case letters, digits, '.', '_' and '-', "
                               f"starting with a letter or digit ({NAME_PATTERN}), without '..' and not ending "
                               f"in '.' or '.lock'")
    return name


def _require_store(store: DataStore) -> Path:
    root = Path(store.root)
    if not (root / ".git").exists() or not (root / ".dvc").is_dir():
        raise DataVersionError(f"{root} is not a data store (no .git and .dvc there); create it with open_store()")
    return root


def _commit_if_staged(root: Path, paths: list[str], message: str) -> bool:
    """git add + commit exactly ``paths``; False (and no commit) when they equal HEAD."""
    _git(root, "add", "--", *paths)
    if not _git(root, "status", "--porcelain", "--", *paths).stdout.strip():
        return False
    has_head = _git(root, "rev-parse", "--verify", "-q", "HEAD", check=False).returncode == 0
    args = ["commit", "-q", "--no-verify", "-m", message]
    _git(root, *args, *(["--", *paths] if has_head else []))
    return True


# --------------------------------------------------------------------------------------------- the store

def open_store(root: str | Path, remote: str | Path | None = None) -> DataStore:
    """Open the data store at ``root``, creating it when missing (idempotent).

    ``remote`` defaults to ``<root>/../dvc-remote`` (absolute) for a new store and to the configured default
    remote for an existing one; a URL such as ``s3://bucket/path`` is passed to DVC as is. Asking an existing
    store for a different remote than the one it uses is an error (data already pushed would be stranded).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise DataVersionError(f"data store root {root} exists and is not a folder")
    has_git, has_dvc = (root / ".git").exists(), (root / ".dvc").is_dir()
    if not has_git:
        if has_dvc:
            raise DataVersionError(f"{root} holds a .dvc folder but no git repository; a data store needs both")
        if root.exists() and any(root.iterdir()):
            raise DataVersionError(f"{root} is not empty and not a data store; pick a new or empty folder")
        root.mkdir(parents=True, exist_ok=True)
        _git(root, "init", "-q")
    for key, value in zip(("user.name", "user.email"), GIT_USER):  # this repository only, and only if unset
        if _git(root, "config", "--local", "--get", key, check=False).returncode != 0:
            _git(root, "config", "--local", key, value)

    want = _normalise_remote(remote) if remote is not None else None
    with _store_lock(root), _quiet_dvc():
        if not (root / ".dvc").is_dir():
            try:
                Repo.init(str(root)).close()
            except DvcException as e:
                raise DataVersionError(f"dvc init failed in {root}: {e}") from None
        with _dvc_repo(root) as repo:
            # the store's own configuration (repo + local levels), never a user's global/system default remote
            conf_levels = [repo.config.read(level) for level in ("repo", "local")]
            current_name = next((c["core"]["remote"] for c in reversed(conf_levels) if c["core"].get("remote")),
                                None)
            current = next((c["remote"][current_name]["url"] for c in reversed(conf_levels)
                            if current_name and c["remote"].get(current_name, {}).get("url")), None)
            if current is not None and want is not None and not _same_remote(current, want):
                raise DataVersionError(f"data store {root} already uses the DVC remote {current!r} "
                                       f"(remote {current_name!r}); refusing to switch it to {want!r} silently: "
                                       f"change .dvc/config deliberately (and move the data) if that is meant")
            url = str(current) if current is not None else (want or str(root.parent / "dvc-remote"))
            with repo.config.edit("repo") as conf:
                if current is None:
                    conf["remote"][REMOTE_NAME] = {"url": url}
                    conf["core"]["remote"] = REMOTE_NAME
                conf["core"]["analytics"] = False             # no usage reports from `dvc` CLI runs in the store
        paths = [p for p in (".dvc/config", ".dvc/.gitignore", ".dvcignore") if (root / p).exists()]
        _commit_if_staged(root, paths, "Initialise the FIGAN data store (DVC, default remote)")
    return DataStore(root=root, remote=url)


# --------------------------------------------------------------------------------------------- versioning

def _validate_source(src: Path) -> tuple[ImageDataset, DatasetAudit]:
    try:
        ds = ImageDataset(src)
    except DatasetError as e:
        raise InvalidDatasetError(f"dataset {src} is not valid: {e}") from None
    m = ds.manifest
    for col in ("path", "mask"):
        if col not in m.columns:
            continue
        for rel in m[col].dropna().astype(str).unique():
            p = (src / rel)
            if not p.is_file():
                raise InvalidDatasetError(f"dataset {src} is not valid: manifest.csv column {col!r} lists {rel!r}, "
                                          f"which does not exist in the folder")
    try:
        return ds, audit_dataset(ds)
    except DatasetError as e:
        raise InvalidDatasetError(f"dataset {src} is not valid: {e}") from None


def _read_dvc_out(path: Path) -> tuple[str, int, int]:
    """(md5 without .dir, nfiles, size) of the single output of a ``.dvc`` file."""
    return _parse_dvc_out(path.read_text(), str(path))


def _parse_dvc_out(text: str, where: str) -> tuple[str, int, int]:
    try:
        outs = (yaml.safe_load(text) or {}).get("outs") or []
        out = outs[0]
        md5 = str(out["md5"])
    except (yaml.YAMLError, AttributeError, IndexError, KeyError, TypeError) as e:
        raise DataVersionError(f"{where} is not a DVC file with one output: {e!r}") from None
    if not md5.endswith(".dir"):
        raise DataVersionError(f"{where} tracks a file, not a dataset folder (md5 {md5})")
    return md5[: -len(".dir")], int(out.get("nfiles", 0)), int(out.get("size", 0))


def _copy_dataset(src: Path, dst: Path) -> None:
    def ignore(d: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _IGNORED_FILES or (n in _IGNORED_DIRS and os.path.isdir(os.path.join(d, n)))}

    try:
        shutil.copytree(src, dst, symlinks=False, ignore=ignore)
    except (OSError, shutil.Error) as e:
        raise DataVersionError(f"copying dataset {src} into the data store failed: {e}") from None


def version_dataset(store: DataStore, src: str | Path, name: str | None = None) -> DatasetVersion:
    """Version the dataset folder ``src`` as ``name`` (default: its dataset.yaml name); return its version.

    The same content always gets the same md5 and, once versioned, is returned as is (no copy, push or commit).
    """
    root = _require_store(store)
    src = Path(src).expanduser().resolve()
    ds, audit = _validate_source(src)
    name = _check_name(ds.name if name is None else name,
                       "dataset name" if name is not None else f"dataset name (from {src}/dataset.yaml)")
    md5 = dataset_md5(src)
    with _store_lock(root), _quiet_dvc():
        for v in list_versions(store, name):
            if v.tag == version_tag(name, md5):
                if v.md5 != md5:
                    raise DataVersionError(f"tag {v.tag} already names {name} version {v.md5}, whose first "
                                           f"{SHORT_MD5} hex digits collide with the new version {md5}")
                return v
        return _add_version(store, root, src, name, md5, len(ds), audit.summary())


def _add_version(store: DataStore, root: Path, src: Path, name: str, md5: str, n_images: int,
                 images: dict) -> DatasetVersion:
    from dvc.exceptions import DvcException

    work = root / DATASETS_DIR / name
    dvc_file = root / DATASETS_DIR / f"{name}.dvc"
    gitignore = root / DATASETS_DIR / ".gitignore"
    rel_paths = [f"{DATASETS_DIR}/{name}.dvc", f"{DATASETS_DIR}/.gitignore"]
    staging = root / ".dvc" / "tmp" / "figan"           # git-ignored (.dvc/.gitignore), same filesystem
    staging.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    incoming, previous = staging / f"{name}.incoming-{token}", staging / f"{name}.previous-{token}"
    saved = {p: (p.read_bytes() if p.exists() else None) for p in (dvc_file, gitignore)}

    _copy_dataset(src, incoming)
    moved_old = placed = False
    try:
        work.parent.mkdir(parents=True, exist_ok=True)
        if work.exists():
            work.rename(previous)
            moved_old = True
        incoming.rename(work)
        placed = True
        with _dvc_repo(root, store.remote) as repo:
            try:
                repo.add(str(work))
            except (DvcException, OSError) as e:
                raise DataVersionError(f"dvc add {DATASETS_DIR}/{name} failed: {e}") from None
            added, n_files, size = _read_dvc_out(dvc_file)
            if added != md5:
                raise DataVersionError(f"dataset {src} changed while it was being versioned (md5 {md5} before the "
                                       f"copy, {added} after); version it again once it is stable")
            try:
                repo.push(targets=[str(work)])
            except (DvcException, OSError) as e:
                raise DataVersionError(f"pushing {name} version {md5} to the DVC remote {store.remote!r} failed: "
                                       f"{e}") from None
        created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        _commit_if_staged(root, rel_paths, f"Version dataset {name}: {md5} ({n_images} images)")
    except BaseException:
        # put the store back as it was: working copy, .dvc file, datasets/.gitignore, git index
        if placed:
            shutil.rmtree(work, ignore_errors=True)
        if moved_old:
            previous.rename(work)
        for p, data in saved.items():
            if data is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(data)
        _git(root, "reset", "-q", "--", *rel_paths, check=False)
        raise
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)

    # the annotated tag is the index entry: list_versions() reads this JSON back
    tag = version_tag(name, md5)
    body = json.dumps({"name": name, "md5": md5, "n_images": n_images, "n_files": n_files, "size_bytes": size,
                       "created": created, "images": images}, sort_keys=True)
    _git(root, "tag", "-a", tag, "-m", f"dataset {name} version {md5}\n\n{body}", "HEAD")
    rev = _git(root, "rev-parse", f"{tag}^{{commit}}").stdout.strip()
    return DatasetVersion(name=name, md5=md5, n_images=n_images, n_files=n_files, size_bytes=size, rev=rev,
                          created=created, images=images)


def list_versions(store: DataStore, name: str | None = None) -> list[DatasetVersion]:
    """Every version in the store (or of one dataset), from its tags; by name, then oldest first."""
    root = _require_store(store)
    if name is not None:
        _check_name(name)
    fmt = "%(refname:strip=2)%00%(objecttype)%00%(*objectname)%00%(contents:body)%1e"
    out = _git(root, "for-each-ref", f"--format={fmt}", "refs/tags").stdout
    versions: list[DatasetVersion] = []
    for record in out.split("\x1e"):
        fields = record.lstrip("\n").split("\x00")
        if len(fields) != 4:
            continue
        tag, objtype, commit, body = fields
        m = _TAG_RE.fullmatch(tag)
        if not m or objtype != "tag" or (name is not None and m["name"] != name):
            continue
        try:
            info = json.loads(body.strip())
            v = DatasetVersion(name=str(info["name"]), md5=str(info["md5"]), n_images=int(info["n_images"]),
                               n_files=int(info["n_files"]), size_bytes=int(info["size_bytes"]), rev=commit,
                               created=str(info.get("created", "")), images=dict(info.get("images") or {}))
        except (ValueError, KeyError, TypeError):
            continue                                      # an annotated tag not written by version_dataset
        if v.tag == tag:
            versions.append(v)
    versions.sort(key=lambda v: (v.name, v.created, v.md5))
    return versions


# --------------------------------------------------------------------------------------------- fetching

def dataset_version(store: DataStore, name: str, md5: str) -> DatasetVersion:
    """The version of dataset ``name`` whose md5 is ``md5`` (full or a unique prefix of >= 8 hex): its commit,
    size and the date it was versioned. :class:`DataVersionError` names the known versions when there is none."""
    _require_store(store)
    _check_name(name)
    return _resolve(store, name, md5)


def _resolve(store: DataStore, name: str, md5: str) -> DatasetVersion:
    versions = list_versions(store)
    mine = [v for v in versions if v.name == name]
    if not mine:
        names = sorted({v.name for v in versions})
        known = f"known datasets: {', '.join(names)}" if names else "the store holds no dataset yet"
        raise DataVersionError(f"no dataset named {name!r} in the data store {store.root}; {known}")
    want = str(md5).strip().lower().removesuffix(".dir")
    if not (MIN_MD5_PREFIX <= len(want) <= 32) or not _HEX_RE.fullmatch(want):
        raise DataVersionError(f"md5 {md5!r} for dataset {name}: give the full DVC md5 or a unique prefix of at "
                               f"least {MIN_MD5_PREFIX} hex characters")
    hits = [v for v in mine if v.md5.startswith(want)]
    known = "; ".join(v.describe() for v in mine)
    if not hits:
        raise DataVersionError(f"dataset {name} has no version {want}…; known: {known}")
    if len(hits) > 1:
        raise DataVersionError(f"md5 prefix {want} matches {len(hits)} versions of {name}: "
                               f"{'; '.join(v.describe() for v in hits)}; give more characters")
    return hits[0]


def _open_fetched(path: Path, v: DatasetVersion) -> None:
    try:
        ImageDataset(path)
    except DatasetError as e:
        raise InvalidDatasetError(f"{v.name} version {v.md5} was fetched into {path} but does not open as a "
                                  f"dataset: {e}") from None


def fetch_dataset(store: DataStore, name: str, md5: str, dest: str | Path) -> Path:
    """Materialise exactly version ``md5`` (full or a unique prefix of >= 8 hex) of ``name`` into ``dest``.

    ``dest`` must be missing or empty, or already hold that very version (then it is returned after hashing,
    without copying). The data is read through DVC from the local cache or the remote, then verified.
    """
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexDirError, DataIndexError

    root = _require_store(store)
    _check_name(name)
    v = _resolve(store, name, md5)
    dest = Path(dest).expanduser().resolve()
    if dest.exists():
        if not dest.is_dir():
            raise DataVersionError(f"cannot fetch {v.tag} into {dest}: it exists and is not a folder")
        if any(dest.iterdir()):
            have = dataset_md5(dest)
            if have == v.md5:
                _open_fetched(dest, v)
                return dest
            raise DataVersionError(f"cannot fetch {name} version {v.md5} into {dest}: the folder is not empty and "
                                   f"holds different data (md5 {have}); refusing to overwrite it, fetch into a new "
                                   f"or empty folder")

    dvc_rel = f"{DATASETS_DIR}/{name}.dvc"
    shown = _git(root, "show", f"{v.rev}:{dvc_rel}", check=False)
    if shown.returncode != 0:
        raise DataVersionError(f"tag {v.tag} (commit {v.rev[:12]}) has no {dvc_rel}; the data store is inconsistent")
    tracked, _, _ = _parse_dvc_out(shown.stdout, f"{v.tag}:{dvc_rel}")
    if tracked != v.md5:
        raise DataVersionError(f"tag {v.tag} names md5 {v.md5} but its {dvc_rel} tracks {tracked}; "
                               f"the data store is inconsistent")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.fetch-{uuid.uuid4().hex[:8]}"
    try:
        with _quiet_dvc():
            fs = DVCFileSystem(str(root), rev=v.rev, config=_remote_override(store.remote))
            try:
                fs.get(f"{DATASETS_DIR}/{name}", str(tmp), recursive=True)
            except (FileNotFoundError, DataIndexDirError) as e:
                cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
                raise DataVersionError(
                    f"dataset {name} version {v.md5} is known (tag {v.tag}) but its data is missing from both the "
                    f"local DVC cache ({root / '.dvc' / 'cache'}) and the remote {store.remote!r} ({cause}); it "
                    f"cannot be materialised until the remote's objects are restored") from None
            except (DvcException, DataIndexError, OSError) as e:
                raise DataVersionError(f"reading {name} version {v.md5} through DVC (cache, then remote "
                                       f"{store.remote!r}) failed: {e}") from None
            finally:
                fs.close()
        if not tmp.is_dir() or not any(tmp.iterdir()):
            raise DataVersionError(f"dataset {name} version {v.md5} is known (tag {v.tag}) but its data is missing "
                                   f"from both the local DVC cache and the remote {store.remote!r}")
        got = dataset_md5(tmp)
        if got != v.md5:
            raise DataVersionError(f"fetched {name} version {v.md5} but the files hash to {got}: the cache or the "
                                   f"remote {store.remote!r} holds corrupt objects")
        _open_fetched(tmp, v)
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
