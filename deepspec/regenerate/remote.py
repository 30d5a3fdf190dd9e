"""Where a regeneration reads and writes: the run layout's locations, local or ``s3://``.

The runner works on local files only: its journal is appended and fsync'd record by record, which an
object store cannot do. So:

* an ``s3://`` input is downloaded first (:meth:`RunLayout.local_input`); the journal's fingerprint
  holds its sha256, so a changed object is refused on resume like a changed local file;
* for an ``s3://`` output the run works in a local folder derived from the output URI
  (:meth:`RunLayout.work_dir`, under ``$DEEPSPEC_CACHE``): the journal lives there, so a re-run on
  the same machine (or with the same cache volume) resumes; a fresh machine starts over. When the run
  has finished, the output, the errors file and the summary are uploaded beside the URI, the summary
  last (its presence marks a complete output; ``--merge`` relies on it). The journal is never uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec.layout import RunLayout, split_s3
from deepspec.regenerate.job import RegenerationError
from deepspec.regenerate.shards import OutputPaths, Shard
from deepspec.storage import S3Store, atomic_write_json, is_s3, join


def fetch_input(layout: RunLayout, uri: str) -> Path:
    """A local path holding the input ``uri`` (downloaded when it is an ``s3://`` object)."""
    try:
        return layout.local_input(uri)
    except FileNotFoundError as e:
        raise RegenerationError(f"input {uri}: {e} (set data.path or pass --input)") from None
    except Exception as e:  # botocore: no credentials, endpoint unreachable, access denied...
        raise RegenerationError(f"cannot download the input {uri}: {e}") from None


@dataclass(frozen=True)
class OutputLocation:
    """The output ``uri`` of a run and the local file the runner writes for it."""

    uri: str
    local: Path
    endpoint_url: str | None = None

    @classmethod
    def of(cls, layout: RunLayout, uri: str) -> OutputLocation:
        if not is_s3(uri):
            return cls(uri, Path(uri))
        _, name = split_s3(uri)
        return cls(uri, layout.work_dir(uri) / name, layout.endpoint_url)

    @property
    def remote(self) -> bool:
        return is_s3(self.uri)

    def uri_of(self, local: Path) -> str:
        """Where a file beside the local output is published (itself when the output is local)."""
        return join(split_s3(self.uri)[0], local.name) if self.remote else str(local)

    def _store(self) -> S3Store:
        return S3Store(split_s3(self.uri)[0], self.endpoint_url)

    def publish(self, paths: OutputPaths, summary: dict[str, Any], input_uri: str | None = None) -> str:
        """Record the published locations in the summary and, for ``s3://``, upload the finished files.

        Returns the published output location.
        """
        summary["output"] = self.uri_of(paths.output)
        summary["errors_file"] = self.uri_of(paths.errors)
        if input_uri is not None:
            summary["input_path"] = input_uri
        atomic_write_json(paths.summary, summary)
        if self.remote:
            store = self._store()
            for f in (paths.output, paths.errors, paths.summary):  # the summary last: it marks completion
                try:
                    store.client.upload_file(str(f), store.bucket, store.key(f.name))
                except Exception as e:
                    raise RegenerationError(
                        f"cannot upload {f} to {self.uri_of(f)}: {e}; the local files are complete: "
                        "re-run the same command to upload them again"
                    ) from None
        return summary["output"]

    def fetch_shards(self, count: int) -> None:
        """Download the published shard outputs (for ``--merge``) next to the local output."""
        if not self.remote:
            return
        store = self._store()
        base = OutputPaths(self.local)
        for i in range(count):
            shard = base.shard(Shard(i, count))
            if not store.exists(shard.summary.name):
                raise RegenerationError(
                    f"shard {i}/{count} is missing or unfinished ({self.uri_of(shard.output)} has no "
                    f"summary); run `deepspec regenerate --shard {i}/{count}` with the same settings, "
                    "then merge again"
                )
            for f in (shard.output, shard.errors, shard.summary):
                if store.exists(f.name):
                    f.parent.mkdir(parents=True, exist_ok=True)
                    store.client.download_file(store.bucket, store.key(f.name), str(f))
