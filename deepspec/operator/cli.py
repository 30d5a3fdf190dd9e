"""``deepspec operator``: run the operator, print the CRD, render a resource's children."""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from pathlib import Path

HELP = "Kubernetes operator: run it, print/write the CRD, render the children of a DraftTraining"
DESCRIPTION = (
    "run: start the kopf operator (all namespaces or --namespace) with /metrics; "
    "crd: print the generated CRD (--write updates manifests/ and the chart); "
    "render FILE: print every child object the builders produce for a DraftTraining YAML; "
    "seed / read-summary: what the operator's small Jobs run inside the cluster."
)


def peering_priority(peering: str | None, priority: int | None) -> int | None:
    """The explicit priority, or a random one per process when peering: kopf pauses every operator
    that sees a live peer of the same priority (nolar/kopf kopf/_core/engines/peering.py
    process_peering_event @ 07cab4686552776327e4ca9c30a1fc68b06e40c1)."""
    if priority is not None or not peering:
        return priority
    return random.SystemRandom().randint(1, 2**31 - 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="start the operator")
    run.add_argument(
        "--namespace", action="append", default=[], help="watch only these namespaces (repeatable)"
    )
    run.add_argument("--interval", type=float, default=15.0, help="reconcile period per resource, seconds")
    run.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics (0 = off)")
    run.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    run.add_argument(
        "--peering",
        help="kopf peering name: several replicas, one active (leader election; needs kopf's peering CRDs)",
    )
    run.add_argument(
        "--priority",
        type=int,
        help="kopf peering priority: the highest live one is active (default with --peering: random, "
        "as replicas with equal priorities all pause, nolar/kopf docs/peering.rst 'Multi-pod operators')",
    )
    crd = sub.add_parser("crd", help="print the generated CRD YAML")
    crd.add_argument(
        "--write",
        action="store_true",
        help="write manifests/crd.yaml and the chart's copies (CRD, monitor alerts and dashboard)",
    )
    render = sub.add_parser("render", help="print the child objects of a DraftTraining")
    render.add_argument("file", help="DraftTraining YAML")
    render.add_argument(
        "--backend",
        choices=["pytorchjob", "trainjob"],
        default=None,
        help="training backend when spec.training.backend is auto (default pytorchjob)",
    )
    seed = sub.add_parser("seed", help="(seed Job) make a run's dataset and benchmark files exist")
    seed.add_argument("--dataset", required=True, help="dataset path on the run volume")
    seed.add_argument("--source", help="where to copy the dataset from when missing")
    seed.add_argument("--benchmarks-dir", help="benchmark folder on the run volume")
    seed.add_argument("--benchmarks", default="", help="comma-separated benchmark stems")
    seed.add_argument("--fetch-benchmarks", action="store_true", help="build missing ones (network)")
    prune = sub.add_parser("prune", help="(prune Job) delete superseded runs' stage folders")
    prune.add_argument("root", help="the resource's artefact root (/data/<name> or s3://...)")
    prune.add_argument("--keep", required=True, help="comma-separated <stage>-<id> folders to keep")
    prune.add_argument("--endpoint-url", help="S3 endpoint")
    publish = sub.add_parser(
        "publish", help="(publish Job) publish an exported draft: versions/<version>/ + the current pointer"
    )
    publish.add_argument("export_dir", help="the `deepspec export` folder (local or s3://)")
    publish.add_argument("dest", help="publication root (a folder on the volume or s3://bucket/prefix)")
    publish.add_argument("--version", required=True, help="immutable version name (the run)")
    publish.add_argument("--metadata", default="{}", help="JSON object stored in current.json")
    publish.add_argument("--endpoint-url", help="S3 endpoint")
    summary = sub.add_parser("read-summary", help="(summary Job) print an evaluation's summary.json")
    summary.add_argument("uri", help="summary.json path or s3:// URI")
    summary.add_argument("--termination-log", help="also write it to this file")
    summary.add_argument("--endpoint-url", help="S3 endpoint")


def _render(path: str, backend: str | None) -> int:
    import yaml
    from pydantic import ValidationError

    from deepspec.operator.builders import Run, build_all

    with open(path, encoding="utf-8") as f:
        body = yaml.safe_load(f)
    if not isinstance(body, dict) or body.get("kind") != "DraftTraining":
        print(f"error: {path} is not a DraftTraining resource", file=sys.stderr)
        return 2
    body.setdefault("metadata", {}).setdefault("namespace", "default")
    wanted = (body.get("spec") or {}).get("training", {}).get("backend", "auto")
    chosen = backend or (wanted if wanted != "auto" else "pytorchjob")
    try:
        run = Run.from_body(body, training_backend=chosen)
        objs = build_all(run)
    except ValidationError as e:
        print(f"error: invalid DraftTraining {path}:\n{e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(objs, sort_keys=False), end="")
    return 0


def _publish(args: argparse.Namespace) -> int:
    import json

    from deepspec.layout import split_s3
    from deepspec.monitor.publish import PublishError, publish_draft
    from deepspec.storage import S3Store, is_s3

    try:
        metadata = json.loads(args.metadata)
        if not isinstance(metadata, dict):
            raise ValueError("--metadata must be a JSON object")
        src = Path(args.export_dir)
        if is_s3(args.export_dir):  # a local copy of the exported folder
            import tempfile

            store = S3Store(args.export_dir, args.endpoint_url)
            src = Path(tempfile.mkdtemp(prefix="deepspec-publish-")) / split_s3(args.export_dir)[1]
            for name in store.list():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                store.client.download_file(store.bucket, store.key(name), str(src / name))
        pub = publish_draft(src, args.dest, args.version, metadata, endpoint_url=args.endpoint_url)
    except (OSError, ValueError, PublishError) as e:
        print(f"error: cannot publish {args.export_dir} to {args.dest}: {e}", file=sys.stderr)
        with contextlib.suppress(OSError):
            Path("/dev/termination-log").write_text(str(e)[:4000], encoding="utf-8")
        return 2
    state = "already published" if pub.already_published else f"published {pub.files} file(s)"
    print(f"{state}: {pub.uri}; current -> {pub.version}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "crd":
        from deepspec.operator.crd import crd_yaml, write_chart_monitoring, write_crd

        if args.write:
            for p in [*write_crd(), *write_chart_monitoring()]:
                print(f"wrote {p}")
        else:
            print(crd_yaml(), end="")
        return 0
    if args.action == "render":
        return _render(args.file, args.backend)
    if args.action == "seed":
        from deepspec.operator.seed import SeedError, seed

        benchmarks = [b for b in args.benchmarks.split(",") if b]
        try:
            for line in seed(
                args.dataset, args.source, args.benchmarks_dir, benchmarks, args.fetch_benchmarks
            ):
                print(line)
        except SeedError as e:
            print(f"error: {e}", file=sys.stderr)
            with contextlib.suppress(OSError):  # the reason shows in `kubectl describe` / the status
                Path("/dev/termination-log").write_text(str(e)[:4000], encoding="utf-8")
            return 2
        return 0
    if args.action == "prune":
        from deepspec.operator.seed import prune

        try:
            for folder in prune(args.root, [k for k in args.keep.split(",") if k], args.endpoint_url):
                print(f"deleted {args.root}/{folder}")
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.action == "publish":
        return _publish(args)
    if args.action == "read-summary":
        from deepspec.operator.seed import read_summary

        try:
            print(read_summary(args.uri, args.termination_log, args.endpoint_url))
        except (OSError, ValueError) as e:
            print(f"error: cannot read the evaluation summary {args.uri}: {e}", file=sys.stderr)
            return 2
        return 0

    import asyncio

    import kopf

    from deepspec.operator.handlers import build_registry

    # exact namespace names need no namespace/CRD scanning (nor its cluster-wide RBAC)
    scanning = not args.namespace or any(c in ns for ns in args.namespace for c in "*?[!")
    registry = build_registry(
        interval=args.interval, metrics_port=args.metrics_port or None, scanning=scanning
    )
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not args.namespace,
            namespaces=args.namespace,  # [] with clusterwide (kopf 1.45 fails on None)
            standalone=not args.peering,
            peering_name=args.peering,
            priority=peering_priority(args.peering, args.priority),
            liveness_endpoint=args.liveness,
        )
    )
    return 0
