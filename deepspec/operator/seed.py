"""What the operator's small Jobs run: seeding a fresh volume, reading back an evaluation summary.

``deepspec operator seed`` (the seed Job, first stage of a run on a PVC): a relative dataset or
benchmark path points into the run volume, which is empty the first time. The dataset is copied from
``spec.dataset.source`` when the volume lacks it (``https://``, ``s3://``, ``hf://datasets/<repo>/<file>``,
or a local path); missing benchmark files are built with ``deepspec benchmarks fetch`` when
``evaluation.benchmarksSource`` is ``fetch``. Anything still missing is an error that names the path
and the two ways to provide it, so the resource stalls with that message instead of failing later
inside regeneration.

``deepspec operator read-summary URI`` (the summary Job): copies an evaluation's ``summary.json`` into
the pod's termination message, for when the evaluation pod itself is gone (evicted, GC'd).

``deepspec operator prune ROOT --keep a,b`` (the prune Job, after a run succeeded): deletes the
``<stage>-<id>`` folders under the resource's root that the serving run does not use.
"""

from __future__ import annotations

import re
import shutil
import urllib.request
from pathlib import Path

from deepspec.storage import atomic_open, is_s3, open_store


class SeedError(RuntimeError):
    """An input is missing and cannot be provided automatically (the message says what to do)."""


def _download(source: str, dest: Path, timeout: float) -> None:
    """Copy ``source`` to ``dest`` atomically (a partial file never appears under the final name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.startswith("hf://datasets/"):
        repo_and_file = source.removeprefix("hf://datasets/")
        owner, name, *rest = repo_and_file.split("/")
        if not rest:
            raise SeedError(f"dataset source {source!r}: expected hf://datasets/<owner>/<repo>/<file>")
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(f"{owner}/{name}", "/".join(rest), repo_type="dataset")
        with open(local, "rb") as src, atomic_open(dest) as out:
            shutil.copyfileobj(src, out)
    elif is_s3(source):
        parent, _, key = source.rpartition("/")
        local = open_store(parent).local_copy(key)
        with open(local, "rb") as src, atomic_open(dest) as out:
            shutil.copyfileobj(src, out)
    elif source.startswith(("https://", "http://")):
        with urllib.request.urlopen(source, timeout=timeout) as resp, atomic_open(dest) as out:
            shutil.copyfileobj(resp, out)
    else:
        src_path = Path(source.removeprefix("file://"))
        if not src_path.is_file():
            raise SeedError(f"dataset source {source} does not exist")
        with src_path.open("rb") as src, atomic_open(dest) as out:
            shutil.copyfileobj(src, out)


def seed(
    dataset: str,
    source: str | None = None,
    benchmarks_dir: str | None = None,
    benchmarks: list[str] | None = None,
    fetch_benchmarks: bool = False,
    timeout: float = 120.0,
) -> list[str]:
    """Make the run's inputs exist; returns one line per action taken. Raises :class:`SeedError`."""
    done: list[str] = []
    if not is_s3(dataset):
        path = Path(dataset)
        if path.is_file():
            done.append(f"dataset {path}: present")
        elif source:
            _download(source, path, timeout)
            done.append(f"dataset {path}: copied from {source}")
        else:
            raise SeedError(
                f"dataset {path} is not on the run volume: set spec.dataset.source (https://, s3://, "
                "hf://datasets/...) or copy the file onto the volume once (docs/operator.md, 'Importing data')"
            )
    if benchmarks_dir and benchmarks and not is_s3(benchmarks_dir):
        folder = Path(benchmarks_dir)
        missing = [b for b in benchmarks if not (folder / f"{b}.jsonl").is_file()]
        if missing and fetch_benchmarks:
            from deepspec.eval.benchmarks_cli import SOURCES, fetch

            known = [b for b in missing if b in SOURCES]
            if known:
                fetch(known, folder, timeout, False)
                done.append(f"benchmarks {', '.join(known)}: fetched into {folder}")
            missing = [b for b in benchmarks if not (folder / f"{b}.jsonl").is_file()]
        if missing:
            raise SeedError(
                f"benchmark files {', '.join(f'{b}.jsonl' for b in missing)} are not in {folder}: set "
                "spec.evaluation.benchmarksSource: fetch, or copy them onto the volume (docs/operator.md)"
            )
        done.append(f"benchmarks in {folder}: {', '.join(benchmarks)}")
    return done


def read_summary(uri: str, termination_log: str | None, endpoint_url: str | None = None) -> str:
    """The summary document at ``uri`` (local or s3://), validated, optionally written to the log."""
    from deepspec.eval.summary import EvalSummary

    parent, _, name = uri.rpartition("/")
    text = open_store(parent, endpoint_url).read_text(name)
    summary = EvalSummary.parse(text).to_json()
    if termination_log:
        Path(termination_log).write_text(summary, encoding="utf-8")
    return summary


STAGE_FOLDER = re.compile(r"(regenerate|features|train|evaluate|export)-[0-9a-f]{8}")


def prune(root: str, keep: list[str], endpoint_url: str | None = None) -> list[str]:
    """Delete the stage folders under ``root`` (local or s3://) not named in ``keep``; returns them.

    Only names the operator creates (``<stage>-<8 hex>``) are touched; anything else a user put under
    the root stays.
    """
    if not keep or not all(STAGE_FOLDER.fullmatch(k) for k in keep):
        raise ValueError(f"refusing to prune with keep={keep!r}: expected <stage>-<id> folder names")
    store = open_store(root, endpoint_url)
    if is_s3(root):
        present = {name.split("/", 1)[0] for name in store.list() if "/" in name}
    else:
        present = {p.name for p in Path(root).iterdir() if p.is_dir()} if Path(root).is_dir() else set()
    doomed = sorted(d for d in present - set(keep) if STAGE_FOLDER.fullmatch(d))
    for folder in doomed:
        if is_s3(root):
            for name in store.list(folder + "/"):
                store.delete(name)
        else:
            shutil.rmtree(Path(root) / folder)
    return doomed
