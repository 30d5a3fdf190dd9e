"""A tiny file store over a local directory or an ``s3://bucket/prefix`` (boto3), used by the feature cache.

Only what the cache needs: whole-object writes (atomic locally: temp file + ``os.replace``; S3 PUTs
are atomic by nature), reads into a local path, listing, deletion. Large objects go through a local
file (``upload_file`` / ``download_file``, multipart on S3) so that a shard never has to fit in RAM
twice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


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
        p = self.path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)

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


def resolve_path(recipe: Any, path: str) -> str:
    """Relative paths resolve against ``storage.root`` (local folder or s3:// prefix)."""
    if is_s3(path) or os.path.isabs(path) or recipe.storage.root in ("", "."):
        return path
    return join(recipe.storage.root, path)


def local_file(recipe: Any, uri: str) -> Path:
    """A local path for ``uri`` (downloads s3:// objects to a temp folder)."""
    if not is_s3(uri):
        return Path(uri)
    parent, _, name = uri.rstrip("/").rpartition("/")
    return S3Store(parent, recipe.storage.s3_endpoint_url).local_copy(name)
