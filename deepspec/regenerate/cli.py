"""`deepspec regenerate`: regenerate the assistant turns of a conversation file with the target."""

from __future__ import annotations

import argparse
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

HELP = "regenerate assistant answers with the target (resumable, shardable)"
DESCRIPTION = (
    "Keep system/user/tool turns, drop the original assistant turns, and regenerate each one in order "
    "through OpenAI-compatible endpoints. Re-running the same command resumes after a crash. "
    "Defaults come from the recipe: regeneration.*, data.path, data.max_samples, target.*."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepspec.cli_args import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--input", help="conversations JSONL, local or s3:// (default: data.path)")
    parser.add_argument(
        "--output",
        help="output JSONL, local or s3:// (default: regeneration.output); a relative path lands under "
        "storage.root",
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="URL",
        help="OpenAI-compatible base URL, repeatable (default: regeneration.endpoints; none = embedded server)",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="take records with index %% N == I (default: JOB_COMPLETION_INDEX of DEEPSPEC_NUM_SHARDS/JOB_COMPLETIONS)",
    )
    parser.add_argument("--merge", action="store_true", help="merge the shard outputs into --output and stop")
    parser.add_argument("--shards", type=int, metavar="N", help="number of shards to merge (with --merge)")
    parser.add_argument(
        "--limit", type=int, metavar="N", help="use only the first N records (default: data.max_samples)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard the journal and previous output; start over"
    )
    parser.add_argument(
        "--workers",
        default="1",
        metavar="N|auto",
        help="client processes sharing the work (default 1). One process spends ~0.6-1.3 ms of CPU per "
        "request and tops out near 800-1,700 requests/s (bench/README.md); N processes take the unfinished "
        "records in chunks from the parent, each with 1/N of the per-endpoint concurrency, journal "
        "separately, and the output is merged in input "
        "order. Resume works whatever N was. 'auto' = one per 64 concurrent requests, at most one per "
        "CPU core",
    )
    parser.add_argument(
        "--servers",
        type=int,
        default=1,
        metavar="N",
        help="with no endpoint: start N embedded servers (`deepspec serve` processes sharing the device, "
        "logs beside the output) instead of one in this process; a small target's server is host-bound, "
        "so several of them serve more tokens (bench/README.md)",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="send nothing: write the output (and summary) from the records the journal already holds, "
        "to train on a regeneration that has not finished; the journal is kept, and the same command "
        "without --partial later finishes the rest",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _embedded_server(target: Any, max_batch_size: int) -> AbstractContextManager[str]:
    try:
        from deepspec.serve import embedded_server  # type: ignore[attr-defined]
    except ImportError as e:
        from deepspec.regenerate.job import RegenerationError

        raise RegenerationError(
            "no endpoint given (--endpoint or regeneration.endpoints) and the embedded server is not "
            f"available ({e}); start a server (e.g. `deepspec serve`) and pass its URL with --endpoint"
        ) from None
    return embedded_server(target, max_batch_size=max_batch_size)


def _servers(
    args: argparse.Namespace, target: Any, concurrency: int, log_base: Any
) -> AbstractContextManager[list[str]]:
    """The embedded server(s) of a run without endpoints: one in this process, or ``--servers N``
    ``deepspec serve`` processes (their logs beside the output). Each decodes up to half of the requests
    the client keeps in flight to it; the other half wait, so that a finished row is refilled at once."""
    from contextlib import contextmanager

    batch = max(1, concurrency // 2)
    if args.servers > 1:
        from deepspec.regenerate.servers import embedded_servers

        overrides = list(args.overrides or [])
        return embedded_servers(
            args.servers, args.config, overrides, log_base, serve_args=["--max-batch-size", str(batch)]
        )

    @contextmanager
    def in_process() -> Any:
        with _embedded_server(target, batch) as url:
            yield [url]

    return in_process()


def _workers(value: str, concurrency: int, endpoints: int) -> int:
    from deepspec.regenerate.job import RegenerationError
    from deepspec.regenerate.workers import auto_workers

    if value == "auto":
        return auto_workers(concurrency, endpoints)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise RegenerationError(f"--workers {value!r}: expected a positive integer or 'auto'")
    return n


def run(args: argparse.Namespace) -> int:
    import logging

    from deepspec.config import load_recipe
    from deepspec.layout import RunLayout
    from deepspec.regenerate.job import RegenerationError, RegenerationJob
    from deepspec.regenerate.remote import OutputLocation, fetch_input
    from deepspec.regenerate.runner import regenerate
    from deepspec.regenerate.servers import ServerStartError
    from deepspec.regenerate.shards import (
        OutputPaths,
        ShardError,
        merge_shards,
        parse_shard,
        shard_count_from_env,
        shard_from_env,
    )

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    recipe = load_recipe(args.config, args.overrides)
    layout = RunLayout.from_recipe(recipe)
    # --output is an output like regeneration.output: a relative path lands under storage.root.
    output = OutputLocation.of(layout, layout.resolve(args.output) if args.output else layout.regenerated)
    try:
        if args.merge:
            count = args.shards or shard_count_from_env()
            if not count:
                raise ShardError("--merge needs --shards N (or DEEPSPEC_NUM_SHARDS)")
            output.fetch_shards(count)
            summary = merge_shards(output.local, count, quiet=False)
            print(output.publish(OutputPaths(output.local), summary))
            return 0
        shard = parse_shard(args.shard) if args.shard else shard_from_env()
        endpoints = args.endpoint or list(recipe.regeneration.endpoints)
        target = recipe.target
        limit = args.limit if args.limit is not None else recipe.data.max_samples
        workers = _workers(args.workers, recipe.regeneration.concurrency, max(1, len(endpoints)))
        input_uri = args.input or layout.dataset  # an input: relative to the working directory
        input_path = fetch_input(layout, input_uri)
        if args.servers < 1 or (args.servers > 1 and endpoints):
            raise RegenerationError(
                f"--servers {args.servers}: give a positive number of embedded servers, and no endpoint "
                "(--endpoint or regeneration.endpoints) beside more than one"
            )
        needs_server = not endpoints and not args.partial
        concurrency = recipe.regeneration.concurrency
        server = _servers(args, target, concurrency, output.local) if needs_server else nullcontext(endpoints)
        with server as urls:
            job = RegenerationJob(
                input_path=str(input_path),
                output_path=str(output.local),
                endpoints=urls or [""],  # --partial sends nothing
                settings=recipe.regeneration,
                model=target.served_model_name,
                revision=target.revision,
                data_format=recipe.data.format,
                limit=limit,
                shard=shard,
                restart=args.restart,
                progress=not args.quiet,
                max_prompt_chars=16 * recipe.data.max_length,
                workers=workers,
                partial=args.partial,
            )
            summary = regenerate(job)
        published = output.publish(job.paths, summary, input_uri)
    except (RegenerationError, ShardError, ServerStartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(published)
    return 0 if summary["error"] == 0 else 1
