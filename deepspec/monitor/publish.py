"""GitOps publication of a promoted draft: immutable versioned folders plus a ``current`` pointer.

Layout under a destination (a local folder, e.g. a shared volume, or an ``s3://bucket/prefix``)::

    versions/<version>/...            the exported draft, file for file
    versions/<version>/MANIFEST.json  written last: every file with its size and sha256
    current.json                      {"version", "path", "uri", "previous", "published_at", ...metadata}
    current -> versions/<version>     local folders only: a relative symlink, so a serving Deployment
                                      can keep one fixed ``--speculative-draft-model-path``

A version is complete once its manifest exists, and ``current.json`` is rewritten only after that,
so a reader never follows the pointer into a half-copied folder. Versions are immutable:
publishing the same version again with the same files is a no-op, with other files an error.
Rolling back is :func:`set_current` to an older version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deepspec.storage import LocalStore, S3Store, is_s3, join, open_store

MANIFEST = "MANIFEST.json"
CURRENT = "current.json"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PublishError(ValueError):
    """Publication refused; the message says why and what to do."""


@dataclass(frozen=True)
class Publication:
    version: str
    uri: str  # the version folder
    current_uri: str  # the pointer file
    files: int
    already_published: bool = False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_of(src: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    return {str(p.relative_to(src)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def _check_version(version: str) -> None:
    if not _VERSION.fullmatch(version):
        raise PublishError(
            f"version {version!r} is not a valid folder name (letters, digits, '.', '_', '-'; up to 128)"
        )


def _now(now: float | None) -> str:
    t = datetime.now(timezone.utc) if now is None else datetime.fromtimestamp(now, tz=timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def read_current(dest: str, endpoint_url: str | None = None) -> dict[str, Any] | None:
    """The ``current.json`` pointer, or None before the first publication."""
    store = open_store(dest, endpoint_url)
    if not store.exists(CURRENT):
        return None
    return json.loads(store.read_text(CURRENT))


def publish_draft(
    src: str | Path,
    dest: str,
    version: str,
    metadata: dict[str, Any] | None = None,
    endpoint_url: str | None = None,
    now: float | None = None,
) -> Publication:
    """Copy the exported draft folder ``src`` to ``dest/versions/<version>/`` and point ``current`` at it."""
    _check_version(version)
    src = Path(src)
    if not src.is_dir():
        raise PublishError(f"draft folder {src} not found (publish the `deepspec export` output folder)")
    manifest = _manifest_of(src)
    if not manifest:
        raise PublishError(f"draft folder {src} is empty")
    if MANIFEST in manifest:
        raise PublishError(f"{src} holds a file named {MANIFEST}; that name is reserved for the publication")
    store = open_store(dest, endpoint_url)
    prefix = f"versions/{version}"
    already = False
    if store.exists(f"{prefix}/{MANIFEST}"):
        published = json.loads(store.read_text(f"{prefix}/{MANIFEST}"))["files"]
        if published != manifest:
            raise PublishError(
                f"version {version!r} is already published at {join(dest, prefix)} with other files; "
                "versions are immutable: publish under a new version"
            )
        already = True
    else:
        staging = store.staging_dir()
        for rel in manifest:
            tmp = staging / f"publish-{os.getpid()}-{hashlib.sha1(rel.encode()).hexdigest()[:12]}"
            shutil.copy2(src / rel, tmp)
            store.put_file(f"{prefix}/{rel}", tmp)  # moves / uploads and removes the staging copy
        store.write_text(
            f"{prefix}/{MANIFEST}", json.dumps({"version": version, "files": manifest}, indent=2) + "\n"
        )
    _write_current(store, dest, version, metadata or {}, now)
    return Publication(version, join(dest, prefix), join(dest, CURRENT), len(manifest), already)


def set_current(
    dest: str,
    version: str,
    metadata: dict[str, Any] | None = None,
    endpoint_url: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Point ``current`` at an already published version (a rollback); returns the new pointer."""
    _check_version(version)
    store = open_store(dest, endpoint_url)
    if not store.exists(f"versions/{version}/{MANIFEST}"):
        known = sorted({n.split("/")[1] for n in store.list("versions") if n.endswith("/" + MANIFEST)})
        raise PublishError(
            f"version {version!r} is not published under {dest} (published: {known or 'none'})"
        )
    return _write_current(store, dest, version, metadata or {}, now)


def _write_current(
    store: LocalStore | S3Store, dest: str, version: str, metadata: dict[str, Any], now: float | None
) -> dict[str, Any]:
    previous = json.loads(store.read_text(CURRENT)).get("version") if store.exists(CURRENT) else None
    pointer = {
        **metadata,
        "version": version,
        "path": f"versions/{version}",
        "uri": join(dest, "versions", version),
        "previous": previous if previous != version else None,
        "published_at": _now(now),
    }
    store.write_text(CURRENT, json.dumps(pointer, indent=2) + "\n")
    if not is_s3(dest):
        _point_symlink(Path(dest).expanduser(), version)
    return pointer


def _point_symlink(root: Path, version: str) -> None:
    """``root/current`` -> ``versions/<version>``, replaced atomically (rename over the old link)."""
    tmp = root / f".current.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(Path("versions") / version, tmp)
    os.replace(tmp, root / "current")
