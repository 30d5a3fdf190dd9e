"""``deepspec serve``: the embedded OpenAI-compatible server on a target model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from deepspec.cli_args import add_recipe_arguments

if TYPE_CHECKING:
    from deepspec.config import TargetConfig

HELP = "serve the target model with an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health)"
DESCRIPTION = (
    HELP + ". The model is a local HF directory, a .gguf file (converted once to a cached safetensors "
    "directory) or 'smollm2'. Without --model, the recipe's target is served."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--model", help="HF directory, .gguf file or 'smollm2' (default: the recipe's target.model)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-model-name", help="name clients send as 'model' (default: the model's basename)"
    )
    parser.add_argument("--revision", help="target revision reported in /v1/models and system_fingerprint")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="weights dtype")
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="requests decoded together (cache slots)"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=20.0, help="when idle, how long to gather the first requests"
    )
    parser.add_argument(
        "--refill-min",
        type=int,
        help="while requests run, admit new ones once this many slots are free (one prefill for all; "
        "default: max-batch-size / 8)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="tokens per request, prompt + answer (default: the model's context, at most 4096)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is best on a busy CPU)"
    )
    parser.add_argument("--request-log", help="append one JSON line per request to this file")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")


def target_from_args(args: argparse.Namespace) -> TargetConfig:
    """The recipe's target with the command line's --model, --dtype and --revision applied."""
    from deepspec.config import load_recipe

    target = load_recipe(args.config, args.overrides).target
    updates = {
        k: v for k, v in (("model", args.model), ("dtype", args.dtype), ("revision", args.revision)) if v
    }
    return target.model_copy(update=updates)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from deepspec.serve.embedded import build_app

    if args.threads:
        torch.set_num_threads(args.threads)
    target = target_from_args(args)
    app = build_app(
        target,
        device=args.device,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        refill_min=args.refill_min,
        max_model_len=args.max_model_len,
        request_log=args.request_log,
        served_model_name=args.served_model_name,
    )
    print(f"deepspec serve: {target.model} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
