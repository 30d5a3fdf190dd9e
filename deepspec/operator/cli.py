"""``deepspec operator``: run the operator, print the CRD, render a resource's children."""

from __future__ import annotations

import argparse
import sys

HELP = "Kubernetes operator: run it, print/write the CRD, render the children of a DraftTraining"
DESCRIPTION = (
    "run: start the kopf operator (all namespaces or --namespace) with /metrics; "
    "crd: print the generated CRD (--write updates manifests/ and the chart); "
    "render FILE: print every child object the builders produce for a DraftTraining YAML."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="start the operator")
    run.add_argument(
        "--namespace", action="append", default=[], help="watch only these namespaces (repeatable)"
    )
    run.add_argument("--interval", type=float, default=15.0, help="reconcile period per resource, seconds")
    run.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics (0 = off)")
    crd = sub.add_parser("crd", help="print the generated CRD YAML")
    crd.add_argument("--write", action="store_true", help="write manifests/crd.yaml and the chart's copy")
    render = sub.add_parser("render", help="print the child objects of a DraftTraining")
    render.add_argument("file", help="DraftTraining YAML")
    render.add_argument(
        "--backend",
        choices=["pytorchjob", "trainjob"],
        default=None,
        help="training backend when spec.training.backend is auto (default pytorchjob)",
    )


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


def run(args: argparse.Namespace) -> int:
    if args.action == "crd":
        from deepspec.operator.crd import crd_yaml, write_crd

        if args.write:
            for p in write_crd():
                print(f"wrote {p}")
        else:
            print(crd_yaml(), end="")
        return 0
    if args.action == "render":
        return _render(args.file, args.backend)

    import asyncio

    import kopf

    from deepspec.operator.handlers import build_registry

    registry = build_registry(interval=args.interval, metrics_port=args.metrics_port or None)
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not args.namespace,
            namespaces=args.namespace or None,
            standalone=True,
        )
    )
    return 0
