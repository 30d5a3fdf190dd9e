"""The run layout: one owner for every artefact path of a recipe, local or ``s3://``.

Rules (the same for ``deepspec run``, every stage command and the operator's Jobs):

* **Outputs** (regenerated data, feature cache, checkpoints, eval report, export) are the recipe's paths
  resolved against ``storage.root``: a relative path lands under the root, an absolute path or an
  ``s3://`` URI is used as is. With ``root: s3://bucket/prefix`` every relative output is an S3 key.
* **Inputs** (``data.path``, ``evaluation.benchmarks_dir``) are user files: relative paths are relative
  to the working directory, like any command-line path (the operator runs its Jobs with the run volume
  as working directory), and ``s3://`` URIs are downloaded on first use.
* Stages that need a local file (tokenizers, ``safetensors`` loaders, matplotlib) go through
  :meth:`RunLayout.local_input` (download into a local cache) and :meth:`RunLayout.local_output` (write
  into a local folder that is uploaded when the block ends), so no stage writes a local folder named
  ``s3:``.

Nothing here imports torch: the operator and the recipe validator use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec.storage import S3Store, is_s3, join

LATEST = "latest"  # the pointer file a training output folder holds (a file, not a symlink)


def cache_home() -> Path:
    """deepspec's local cache (``$DEEPSPEC_CACHE`` or ``~/.cache/deepspec``)."""
    return Path(os.environ.get("DEEPSPEC_CACHE", Path.home() / ".cache" / "deepspec")).expanduser()


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``s3://bucket/a``, ``b``)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent == "s3:/" or not name:
        raise ValueError(f"{uri!r} names no object: expected s3://bucket/key")
    return parent, name


@dataclass(frozen=True)
class RunLayout:
    """Every artefact path of one recipe. Build it with :meth:`from_recipe`."""

    root: str
    endpoint_url: str | None
    dataset: str
    benchmarks_dir: str
    regenerated: str
    features: str | None
    checkpoints: str
    eval_dir: str
    export_dir: str

    @classmethod
    def from_recipe(cls, recipe: Any) -> RunLayout:
        root = recipe.storage.root or "."
        if root != "." and not is_s3(root):
            # Absolute, so that resolving an already resolved path is a no-op: `deepspec run` hands
            # resolved paths (e.g. the checkpoint) to stages that resolve their arguments again.
            root = os.path.abspath(os.path.expanduser(root))

        def out(path: str) -> str:
            return resolve(root, path)

        return cls(
            root=root,
            endpoint_url=recipe.storage.s3_endpoint_url,
            dataset=recipe.data.path,
            benchmarks_dir=recipe.evaluation.benchmarks_dir,
            regenerated=out(recipe.regeneration.output),
            features=out(recipe.features.cache_path) if recipe.features.cache_path else None,
            checkpoints=out(recipe.training.output_dir),
            eval_dir=out(recipe.evaluation.output_dir),
            export_dir=out(recipe.export.output_dir),
        )

    # ---------------------------------------------------------------------------------- paths

    def resolve(self, path: str) -> str:
        """An output path of this run: relative ones land under ``root``."""
        return resolve(self.root, path)

    def checkpoint(self, which: str | int = LATEST) -> str:
        """``<checkpoints>/latest`` (the pointer file) or ``<checkpoints>/step_<N>``."""
        name = which if isinstance(which, str) else f"step_{which}"
        return join(self.checkpoints, name)

    @property
    def is_remote(self) -> bool:
        return is_s3(self.root)

    def all_outputs(self) -> dict[str, str]:
        """Every output location, by name (for ``deepspec recipe show`` and the tests)."""
        out = {
            "regenerated": self.regenerated,
            "checkpoints": self.checkpoints,
            "eval": self.eval_dir,
            "export": self.export_dir,
        }
        if self.features:
            out["features"] = self.features
        return out

    # ---------------------------------------------------------------------------- transfers

    def local_input(self, uri: str | Path) -> Path:
        """A local path holding ``uri``: the path itself when local, else a downloaded copy.

        A URI naming a folder (an S3 prefix with objects under it) is downloaded whole. Copies live under
        ``cache_home()/s3/<bucket>/<key>`` and are refreshed on every call (objects are small next to
        models; a stale copy would be a silent bug).
        """
        text = str(uri)
        if not is_s3(text):
            return Path(text)
        store = S3Store(text, self.endpoint_url)
        dest = cache_home() / "s3" / store.bucket / store.prefix
        if store.exists_prefix():
            names = store.list()
            for name in names:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                store.client.download_file(store.bucket, store.key(name), str(target))
            return dest
        parent, name = split_s3(text)
        obj = S3Store(parent, self.endpoint_url)
        if not obj.exists(name):
            raise FileNotFoundError(f"{text} does not exist (no object and no objects under that prefix)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        obj.client.download_file(obj.bucket, obj.key(name), str(dest))
        return dest

    @contextlib.contextmanager
    def local_output(self, uri: str | Path) -> Iterator[Path]:
        """A local folder to write ``uri``'s files into; for ``s3://`` it is uploaded when the block ends.

        Local: the folder itself (created; removed again if the block raises and left it empty). S3: a fresh temporary folder whose files are uploaded under the
        prefix, then removed. Nothing is uploaded when the block raises, so a failed stage never leaves a
        half-written report behind an old good one.
        """
        text = str(uri)
        if not is_s3(text):
            path = Path(text)
            existed = path.exists()
            path.mkdir(parents=True, exist_ok=True)
            try:
                yield path
            except BaseException:
                if not existed and path.is_dir() and not any(path.iterdir()):
                    path.rmdir()  # a refused or failed stage leaves no empty folder behind
                raise
            return
        tmp = Path(tempfile.mkdtemp(prefix="deepspec-out-"))
        try:
            yield tmp
            upload_folder(tmp, text, self.endpoint_url)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def work_dir(self, uri: str) -> Path:
        """A stable local folder for state that must be local while a stage runs (e.g. a journal).

        For a local ``uri`` it is the folder holding it; for ``s3://`` a folder under the cache named by
        the URI's hash, so that a killed stage resumes from the same local state.
        """
        if not is_s3(uri):
            return Path(uri).parent
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        path = cache_home() / "work" / digest
        path.mkdir(parents=True, exist_ok=True)
        return path


def resolve(root: str, path: str) -> str:
    """``path`` under ``root`` when relative; absolute paths and ``s3://`` URIs as they are."""
    if is_s3(path) or os.path.isabs(path) or root in ("", "."):
        return path
    return join(root, path)


def upload_folder(local: Path, uri: str, endpoint_url: str | None = None) -> list[str]:
    """Upload every file under ``local`` to the ``s3://`` prefix ``uri``; returns the keys' names."""
    store = S3Store(uri, endpoint_url)
    names = []
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        name = f.relative_to(local).as_posix()
        store.client.upload_file(str(f), store.bucket, store.key(name))
        names.append(name)
    return names
