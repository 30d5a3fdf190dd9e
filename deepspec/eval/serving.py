"""Speculative serving on the evaluation engine: the app behind ``deepspec serve --draft``.

The serving layer (:mod:`deepspec.serve`) sits below the evaluation stage and may not import it,
so the pieces meet here: the target + draft are loaded with the evaluation loader
(:func:`~deepspec.eval.checkpoints.load_target_and_draft`, or the n-gram drafter), decoded by
:class:`~deepspec.eval.engine.SpeculativeEngine` (``generate_batch``: lossless, per-row acceptance,
the stop tokens of ``deepspec eval``), and served by
:class:`~deepspec.serve.speculative.SpeculativeGenerationEngine` through the same FastAPI app as
the plain server. A live accepted length is therefore measured by the same code, with the same
stop tokens and definition, as ``deepspec eval``'s offline one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from deepspec.config import Recipe
from deepspec.eval.engine import EngineConfig, SpeculativeEngine
from deepspec.eval.metrics import AcceptanceStats
from deepspec.serve.spec_stats import SpecStats
from deepspec.serve.speculative import BatchDecoder, Decoded, SpeculativeGenerationEngine

if TYPE_CHECKING:
    import torch
    from fastapi import FastAPI

DEFAULT_CACHE_LEN = 4096
NGRAM = "ngram"  # --draft ngram: prompt-lookup drafting, no checkpoint


def spec_stats(stats: AcceptanceStats, num_proposals: int) -> SpecStats:
    """The engine's counts as per-request statistics; the histogram from the per-position counts.

    Acceptance is a prefix, so the steps that accepted at least ``j`` draft tokens are
    ``accepted_at[j - 1]`` and those that accepted exactly ``j`` are the difference of neighbours.
    """
    at_least = [stats.rounds, *stats.accepted_at]
    at_least += [0] * (num_proposals + 2 - len(at_least))
    histogram = [at_least[j] - at_least[j + 1] for j in range(num_proposals + 1)]
    return SpecStats(stats.rounds, stats.accepted, stats.proposed, histogram)


def engine_decoder(engine: SpeculativeEngine) -> BatchDecoder:
    """A :data:`BatchDecoder` over ``engine.generate_batch`` (temperature and length set per batch)."""
    base = engine.config

    def decode(
        prompts: list[list[int]],
        temperature: float,
        max_tokens: int,
        generators: list[torch.Generator | None],
    ) -> list[Decoded]:
        engine.config = replace(base, temperature=temperature, max_new_tokens=max_tokens)
        results = engine.generate_batch(prompts, generators)
        return [Decoded(r.tokens, spec_stats(r.stats, base.num_proposals)) for r in results]

    return decode


def build_speculative_app(
    recipe: Recipe,
    draft: str,
    *,
    device: str = "auto",
    num_proposals: int | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 20.0,
    max_model_len: int | None = None,
    request_log: str | None = None,
    served_model_name: str | None = None,
) -> FastAPI:
    """Load the recipe's target and ``draft`` (a checkpoint the evaluation loader accepts, or
    ``ngram``) and build the OpenAI-compatible app that decodes with speculation."""
    from deepspec.devices import pick_device
    from deepspec.eval.batched import drafter_factory
    from deepspec.eval.checkpoints import load_target_and_draft, load_tokenizer
    from deepspec.eval.runner import stop_token_ids
    from deepspec.serve.app import create_app
    from deepspec.serve.embedded import default_revision, default_served_name

    dev = pick_device(device)
    t = recipe.target
    if draft == NGRAM:
        from deepspec.eval.drafters import NGramDrafter
        from deepspec.target_model.model import TargetModel

        target = TargetModel.from_pretrained(
            t.model, recipe.draft.target_layer_ids, recipe.draft.algorithm, device=dev, dtype=t.dtype,
            trust_remote_code=t.trust_remote_code,
        )  # fmt: skip
        drafter = NGramDrafter(target.vocab_size)
    else:
        target, model, _ = load_target_and_draft(recipe, draft, dev)
        drafter = model.as_drafter(target)
    tokenizer = load_tokenizer(target)
    stops = stop_token_ids(tokenizer, target.config)
    proposals = num_proposals or recipe.evaluation.num_proposals
    config = EngineConfig(num_proposals=proposals, stop_token_ids=stops)
    engine = SpeculativeEngine(target, drafter, config, drafter_factory=drafter_factory(drafter))
    context = getattr(target.config, "max_position_embeddings", None)
    max_context = max_model_len or min(context or DEFAULT_CACHE_LEN, DEFAULT_CACHE_LEN)
    serving = SpeculativeGenerationEngine(
        engine_decoder(engine),
        tokenizer,
        model_path=t.model,
        max_context=max_context,
        eos_ids=list(stops),
        num_proposals=proposals,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
    )
    return create_app(
        serving,
        served_model_name=served_model_name or t.served_model_name or default_served_name(t.model),
        revision=t.revision or default_revision(t.model),
        request_log=request_log,
    )
