"""Storage primitives: atomic local writes, and a tiny file store over a local directory or an
``s3://bucket/prefix`` (boto3), used by the feature cache and the run layout (:mod:`deepspec.layout`).

Only what the cache needs: whole-object writes (atomic locally: temp file + ``os.replace``; S3 PUTs
are atomic by nature), reads into a local path, listing, deletion. Large objects go through a local
file (``upload_file`` / ``download_file``, multipart on S3) so that a shard never has to fit in RAM
twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file to write ``path`` through: a temporary file in the same folder, fsync'd and renamed
    over ``path`` when the block ends without error (removed otherwise).

    Readers see the old content or the new one, never a torn file, even after a SIGKILL. For
    streaming large files; :func:`atomic_write_bytes` for a payload in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """:func:`atomic_write_bytes` for a JSON document (UTF-8, trailing newline)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Stream ``records`` to ``path`` as JSON lines, atomically (:func:`atomic_open`); returns the count."""
    n = 0
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts for a local path or an S3 URI."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


class LocalStore:
    """Objects are files under ``root``."""

    def __init__(self, root: str):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def read_text(self, name: str) -> str:
        return self.path(name).read_text(encoding="utf-8")

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path(name), text)

    def put_file(self, name: str, local: Path) -> None:
        """Move a finished local file into place atomically."""
        p = self.path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, p)

    def local_copy(self, name: str) -> Path:
        """A local path holding the object (the file itself for a local store)."""
        p = self.path(name)
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
        return p

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def staging_dir(self) -> Path:
        """Where partial files are written before being moved into place (same filesystem)."""
        d = self.root / ".staging"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def free_bytes(self) -> int | None:
        p = self.root
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free


class S3Store:
    """Objects are keys under ``s3://bucket/prefix`` (endpoint from the recipe or ``AWS_ENDPOINT_URL``)."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        import boto3

        rest = uri[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.uri = uri.rstrip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
        self._tmp = Path(tempfile.mkdtemp(prefix="deepspec-s3-"))
        self._downloads: dict[str, Path] = {}

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def exists_prefix(self) -> bool:
        """Whether any object lives under this store's prefix (i.e. the URI names a folder)."""
        prefix = self.prefix + "/" if self.prefix else ""
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        return bool(page.get("Contents"))

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_text(self, name: str) -> str:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read().decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=text.encode("utf-8"))

    def put_file(self, name: str, local: Path) -> None:
        self.client.upload_file(str(local), self.bucket, self.key(name))
        local.unlink(missing_ok=True)

    def local_copy(self, name: str) -> Path:
        if name not in self._downloads:
            dest = self._tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, self.key(name), str(dest))
            self._downloads[name] = dest
        return self._downloads[name]

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
        self._downloads.pop(name, None)

    def list(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        base = self.key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                out.append(k[len(self.prefix) + 1 :] if self.prefix else k)
        return sorted(out)

    def staging_dir(self) -> Path:
        d = self._tmp / ".staging"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def free_bytes(self) -> int | None:
        return None  # object stores have no meaningful free-space figure; local staging is checked instead


def open_store(uri: str, endpoint_url: str | None = None) -> LocalStore | S3Store:
    return S3Store(uri, endpoint_url) if is_s3(uri) else LocalStore(uri)
