"""``deepspec monitor``: live acceptance of a deployed target + draft, exported to Prometheus."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepspec.monitor.drift import Baseline
    from deepspec.monitor.service import Source

HELP = "measure the live accepted length of a deployed target + draft and export it to Prometheus"
DESCRIPTION = (
    HELP + ". Scrape mode reads SGLang or vLLM /metrics (windowed counter deltas, SGLang gauges per "
    "build); canary mode sends a fixed, seeded prompt set through the OpenAI-compatible API and reads "
    "per-request speculative statistics. Drift: the windowed live value below the baseline by more "
    "than --tolerance for --duration. See docs/monitoring.md."
)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '1h' or '1d'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["sglang", "vllm"], required=True, help="the serving engine")
    parser.add_argument("--mode", choices=["scrape", "canary"], default="scrape")
    src = parser.add_argument_group("scrape mode")
    src.add_argument(
        "--metrics-url", action="append", default=[], help="engine /metrics URL; repeat for replicas"
    )
    src.add_argument(
        "--sglang-gauges",
        choices=["auto", "interval", "cumulative", "counters"],
        default="auto",
        help="what sglang:spec_accept_length holds in this SGLang build (default: counters when "
        "sglang:spec_verify_calls_total is exported, else interval)",
    )
    src.add_argument(
        "--scrape-every", type=duration, default=30.0, help="seconds between scrapes (default 30s)"
    )
    can = parser.add_argument_group("canary mode")
    can.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://sglang:30000/v1")
    can.add_argument("--prompts", help='JSONL of {"turns": [...]} records (e.g. a benchmark file)')
    can.add_argument("--num-prompts", type=int, default=16, help="prompts per canary run (default 16)")
    can.add_argument("--seed", type=int, default=0, help="selects and orders the prompts (default 0)")
    can.add_argument("--max-tokens", type=int, default=128)
    can.add_argument("--api-key", default="EMPTY")
    can.add_argument("--canary-every", type=duration, default=300.0, help="seconds between runs (default 5m)")
    who = parser.add_argument_group("what is measured")
    who.add_argument("--served-model", help="model name (vLLM/SGLang model_name label; canary 'model')")
    who.add_argument("--draft-version", default="", help="label of the serving draft (e.g. run id)")
    base = parser.add_argument_group("baseline and drift")
    base.add_argument("--baseline", type=float, help="accepted length of the draft at its gate")
    base.add_argument(
        "--baseline-file",
        help="baseline from a file: monitor baseline JSON, eval report.json (macro.tau) or summary.json",
    )
    base.add_argument(
        "--learn-baseline",
        metavar="FILE",
        help="without a baseline: record the first full window as the baseline in FILE (reused on restart)",
    )
    base.add_argument("--tolerance", type=float, default=0.1, help="relative drop that counts (default 0.1)")
    base.add_argument("--duration", type=duration, default=900.0, help="how long the drop must last (15m)")
    base.add_argument("--window", type=duration, default=600.0, help="measurement window (default 10m)")
    base.add_argument(
        "--min-verify-steps", type=float, default=200.0, help="verification steps needed for a decision"
    )
    base.add_argument(
        "--broken-below",
        type=float,
        default=1.1,
        help="accepted length at or below this is 'broken', not drift",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--listen", default="0.0.0.0:9400", help="HOST:PORT of the /metrics server (port 0: any)"
    )
    out.add_argument("--ticks", type=int, help="stop after this many measurements (default: run forever)")
    out.add_argument("--once", action="store_true", help="one measurement, print the decision as JSON, exit")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from deepspec.monitor.drift import DriftPolicy
    from deepspec.monitor.service import Monitor, MonitorLabels, serve_metrics

    try:
        policy = DriftPolicy(args.tolerance, args.duration, args.min_verify_steps, args.broken_below)
        baseline = _baseline(args)
        source, interval = _source(args)
    except ValueError as e:
        return _fail(str(e))
    if args.window <= 0:
        return _fail("--window must be > 0")
    labels = MonitorLabels(args.served_model or "", args.draft_version, args.engine, args.mode)
    monitor = Monitor(source, labels, policy, args.window, baseline, learn_baseline_to=args.learn_baseline)
    if args.once:
        print(json.dumps(monitor.tick().to_dict()))
        return 0
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        return _fail(f"--listen must be HOST:PORT, got {args.listen!r}")
    bound, _registry = serve_metrics(monitor, int(port), addr=host or "0.0.0.0")
    print(f"deepspec monitor: metrics on http://{host or '0.0.0.0'}:{bound}/metrics", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    monitor.run(interval, stop, max_ticks=args.ticks)
    return 0


def _baseline(args: argparse.Namespace) -> Baseline | None:
    from deepspec.monitor.drift import Baseline, load_baseline

    if args.baseline is not None and args.baseline_file:
        raise ValueError("give --baseline or --baseline-file, not both")
    if args.baseline is not None:
        return Baseline(args.baseline, args.draft_version, source="--baseline")
    if args.baseline_file:
        return load_baseline(args.baseline_file, args.draft_version)
    if args.learn_baseline and Path(args.learn_baseline).is_file():
        return load_baseline(args.learn_baseline, args.draft_version)
    return None


def _source(args: argparse.Namespace) -> tuple[Source, float]:
    if args.mode == "scrape":
        from deepspec.monitor.scrape import MetricsScraper

        if not args.metrics_url:
            raise ValueError("scrape mode needs --metrics-url (the engine's /metrics URL)")
        return MetricsScraper(
            args.engine, args.metrics_url, args.served_model, args.sglang_gauges
        ), args.scrape_every
    from deepspec.monitor.canary import CanaryRunner, load_canary_prompts

    if not args.base_url or not args.prompts:
        raise ValueError(
            "canary mode needs --base-url (OpenAI-compatible /v1 URL) and --prompts (JSONL file)"
        )
    prompts = load_canary_prompts(args.prompts, args.num_prompts, args.seed)
    runner = CanaryRunner(
        args.engine,
        args.base_url,
        prompts,
        model=args.served_model,
        max_tokens=args.max_tokens,
        api_key=args.api_key,
    )
    return runner, args.canary_every
