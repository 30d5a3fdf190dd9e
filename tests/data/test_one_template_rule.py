"""Issue 9, acceptance 4: regenerate, train and eval render the same token ids for the same conversation
and settings (one chat-template rule, :mod:`deepspec.data.template`).

Each stage is driven through its own code path:

* regenerate: the request body :func:`deepspec.regenerate.send.sampling_params` builds for the history
  it sends, parsed by the embedded server's :func:`~deepspec.serve.protocol.parse_chat_request` and
  rendered as the server renders it;
* train: :func:`deepspec.data.sequences.tokenize_records` with the kwargs :func:`load_sequences` uses;
* eval: :func:`deepspec.eval.runner.run_prompt` over every turn with the Evaluator's settings, the
  engine replaced by one that records the prompt ids it is given and answers with the conversation's
  answers.
"""

from __future__ import annotations

import pytest

from deepspec.config import Recipe
from deepspec.data.sequences import tokenize_records
from deepspec.data.template import TemplateError, render_prompt, template_kwargs
from deepspec.eval.benchmarks import BenchmarkPrompt
from deepspec.eval.engine import GenerationResult
from deepspec.eval.evaluator import EvalOptions, run_settings
from deepspec.eval.metrics import AcceptanceStats
from deepspec.eval.runner import run_prompt
from deepspec.regenerate.plan import history_message
from deepspec.regenerate.send import sampling_params
from deepspec.serve.protocol import parse_chat_request

# the recipe's extra chat_template_kwargs must reach every stage: this template writes one into the text
FLAG_PREFIX = "{%- if custom_flag is defined -%}{{- '<|im_start|>system\\nflag ' ~ custom_flag ~ '<|im_end|>\\n' -}}{%- endif -%}"

CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "That makes 6. Done."},
]
ANSWERS = [m["content"] for m in CONV if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def flagged_qwen3_tokenizer(qwen3_tokenizer):
    import copy

    tok = copy.deepcopy(qwen3_tokenizer)
    tok.chat_template = FLAG_PREFIX + qwen3_tokenizer.chat_template
    return tok


def regenerate_prompts(tokenizer, recipe: Recipe) -> list[list[int]]:
    """The prompt ids the embedded server computes for each turn regenerate sends."""
    params, extra = sampling_params(recipe.regeneration, 0)
    out = []
    for i, m in enumerate(CONV):
        if m["role"] != "assistant":
            continue
        body = {"model": "m", "messages": [history_message(x) for x in CONV[:i]], **params, **extra}
        req = parse_chat_request(body, ("m",))
        out.append(render_prompt(tokenizer, req.messages, req.chat_template_kwargs, req.tools))
    return out


class RecordingEngine:
    """Stands in for the speculative engine: records prompts, answers with the conversation's answers."""

    device = "cpu"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prompts: list[list[int]] = []

    def generate(self, ids, generator=None) -> GenerationResult:
        self.prompts.append(list(ids))
        answer = ANSWERS[len(self.prompts) - 1]
        tokens = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return GenerationResult(list(tokens), "stop", AcceptanceStats(prompts=1), 0.0)


def eval_prompts(tokenizer, recipe: Recipe) -> list[list[int]]:
    settings = run_settings(recipe, EvalOptions(baseline=False, progress=False))
    engine = RecordingEngine(tokenizer)
    turns = [m["content"] for m in CONV if m["role"] == "user"]
    run_prompt(engine, tokenizer, BenchmarkPrompt("b", 0, turns, 1), settings)
    return engine.prompts


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "flagged_qwen3_tokenizer"])
def test_regenerate_train_and_eval_render_the_same_ids(tokenizer_name, thinking, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    recipe = Recipe.model_validate(
        {
            "regeneration": {"thinking": thinking, "chat_template_kwargs": {"custom_flag": 1}},
            "evaluation": {"thinking": thinking, "all_turns": True},
        }
    )
    regen = regenerate_prompts(tokenizer, recipe)
    evaluated = eval_prompts(tokenizer, recipe)
    [seq] = tokenize_records(
        [{"id": "c", "messages": CONV}], tokenizer, 4096, template_kwargs(recipe.regeneration)
    )
    ids, mask = seq.input_ids.tolist(), seq.loss_mask.tolist()

    assert evaluated == regen  # eval feeds the target what the server fed it during regeneration
    # training sees the server's prompt, token for token, right before the answer. A Qwen3-style template
    # rewrites earlier turns once a later user turn follows (empty think blocks dropped), so there the
    # whole-conversation sequence can only match the prompt of the last answer; SmolLM2's matches every one.
    checked = regen if tokenizer_name == "smollm2_tokenizer" else regen[-1:]
    for prompt in checked:
        assert ids[: len(prompt)] == prompt
        assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1
    if tokenizer_name == "flagged_qwen3_tokenizer":  # the recipe's kwargs reached every stage's template
        text = tokenizer.decode(regen[0])
        assert text.startswith("<|im_start|>system\nflag 1<|im_end|>")
        assert ("<think>\n\n</think>" in text) is (not thinking)


def test_eval_thinking_switch_overrides_the_regeneration_one():
    recipe = Recipe.model_validate(
        {
            "regeneration": {"thinking": True, "chat_template_kwargs": {"x": 1}},
            "evaluation": {"thinking": False},
        }
    )
    assert template_kwargs(recipe.regeneration) == {"x": 1, "enable_thinking": True}
    assert run_settings(recipe, EvalOptions()).template_kwargs == {"x": 1, "enable_thinking": False}
    assert template_kwargs(Recipe().regeneration) == {}  # None leaves the template's default


def test_a_tokenizer_without_chat_template_is_an_error_in_eval(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        eval_prompts(tok, Recipe())
