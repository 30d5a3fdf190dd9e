"""``deepspec serve``: the embedded server, plain or, with ``--draft``, with speculative decoding.

The command lives in the evaluation stage because ``--draft`` serves through the evaluation engine
(:mod:`deepspec.eval.serving`), which the serving layer below may not import; without ``--draft``
it is the plain server of :mod:`deepspec.serve.cli`, unchanged.
"""

from __future__ import annotations

import argparse

from deepspec.serve import cli as plain

HELP = plain.HELP + "; with --draft, speculative decoding with per-request statistics"
DESCRIPTION = (
    plain.DESCRIPTION + " With --draft CKPT (a draft checkpoint `deepspec eval` accepts, or 'ngram') the "
    "answers are decoded by the evaluation engine with speculation (lossless), carry per-request "
    "speculative statistics (vLLM's metrics.speculative_decoding; SGLang's sglext.spec_tokens_details "
    "when the request sets return_spec_tokens_details) and /metrics exports SGLang's and vLLM's "
    "speculative metrics. See docs/serving.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    plain.add_arguments(parser)
    parser.add_argument(
        "--draft",
        help="serve with speculative decoding: a draft checkpoint (step folder, training output folder "
        "or its 'latest'/'selected' pointer, s3:// included) or 'ngram'",
    )
    parser.add_argument(
        "--num-proposals",
        type=int,
        help="draft tokens per verification step (default: evaluation.num_proposals)",
    )


def run(args: argparse.Namespace) -> int:
    if not args.draft:
        return plain.run(args)
    import torch
    import uvicorn

    from deepspec.config import load_recipe
    from deepspec.eval.serving import build_speculative_app

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.config, args.overrides)
    recipe = recipe.model_copy(update={"target": plain.target_from_args(args)})
    app = build_speculative_app(
        recipe,
        args.draft,
        device=args.device,
        num_proposals=args.num_proposals,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_model_len=args.max_model_len,
        request_log=args.request_log,
        served_model_name=args.served_model_name,
    )
    print(
        f"deepspec serve: {recipe.target.model} + draft {args.draft} on http://{args.host}:{args.port}/v1",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
