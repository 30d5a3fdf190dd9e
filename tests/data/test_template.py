"""Assistant loss masks from the tokenizer's own chat template (SmolLM2's, and a Qwen3-style one)."""

from __future__ import annotations

import pytest

from deepspec.data import TemplateError, render_prompt, render_with_mask


def masked_spans(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """Decode each maximal run of masked tokens."""
    spans, run = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            run.append(t)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "That makes 6.\nDone."},
]


# ------------------------------------------------------------------------------------------------
# SmolLM2's real template (it adds its own default system prompt)
# ------------------------------------------------------------------------------------------------


def test_smollm2_mask_is_exactly_answers_and_end_of_turn(smollm2_tokenizer):
    ids, mask = render_with_mask(smollm2_tokenizer, CONV)
    assert len(ids) == len(mask)
    assert masked_spans(smollm2_tokenizer, ids, mask) == [
        "It is 4.<|im_end|>",
        "That makes 6.\nDone.<|im_end|>",
    ]
    # everything else (system, user, headers, trailing newline) is 0
    unmasked = smollm2_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "<|im_start|>assistant\n" in unmasked and "What is 2+2?" in unmasked
    assert smollm2_tokenizer.decode(ids[-1:]) == "\n" and mask[-1] == 0


def test_smollm2_renders_what_the_server_renders(smollm2_tokenizer):
    ids, mask = render_with_mask(smollm2_tokenizer, CONV)
    # the tokens before the last answer are exactly the server's prompt for that turn
    prompt = render_prompt(smollm2_tokenizer, CONV[:3])
    assert ids[: len(prompt)] == prompt
    assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1
    # the only system prompt is the template's own default, as the server would render it
    text = smollm2_tokenizer.decode(ids)
    assert text == smollm2_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text.count("<|im_start|>system") == 1


def test_smollm2_explicit_system_prompt_is_not_duplicated(smollm2_tokenizer):
    conv = [{"role": "system", "content": "Be brief."}, *CONV]
    ids, mask = render_with_mask(smollm2_tokenizer, conv)
    text = smollm2_tokenizer.decode(ids)
    assert text.count("<|im_start|>system") == 1 and "SmolLM" not in text
    assert masked_spans(smollm2_tokenizer, ids, mask) == [
        "It is 4.<|im_end|>",
        "That makes 6.\nDone.<|im_end|>",
    ]


def test_max_length_cuts_both(smollm2_tokenizer):
    ids, mask = render_with_mask(smollm2_tokenizer, CONV)
    cut_ids, cut_mask = render_with_mask(smollm2_tokenizer, CONV, max_length=20)
    assert cut_ids == ids[:20] and cut_mask == mask[:20]


def test_assistant_first_is_a_clear_error(smollm2_tokenizer):
    with pytest.raises(TemplateError, match="assistant"):
        render_with_mask(smollm2_tokenizer, [{"role": "assistant", "content": "hi"}])


# ------------------------------------------------------------------------------------------------
# A Qwen3-style template: thinking on/off, earlier turns rewritten
# ------------------------------------------------------------------------------------------------


def test_qwen3_thinking_off_multi_turn(qwen3_tokenizer):
    kw = {"enable_thinking": False}
    ids, mask = render_with_mask(qwen3_tokenizer, CONV, kw)
    text = qwen3_tokenizer.decode(ids)
    # the last turn keeps the empty think block of the no-thinking generation prompt, unmasked
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nThat makes 6." in text
    assert masked_spans(qwen3_tokenizer, ids, mask) == [
        "It is 4.<|im_end|>",
        "That makes 6.\nDone.<|im_end|>",
    ]
    assert ids[: len(render_prompt(qwen3_tokenizer, CONV[:3], kw))] == render_prompt(
        qwen3_tokenizer, CONV[:3], kw
    )
    assert "system" not in text  # this template adds no system prompt, so none is injected


def test_qwen3_thinking_on_multi_turn(qwen3_tokenizer):
    conv = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nthree and three\n</think>\n\nThat makes 6."},
    ]
    ids, mask = render_with_mask(qwen3_tokenizer, conv, {"enable_thinking": True})
    text = qwen3_tokenizer.decode(ids)
    assert "add them" not in text  # the template drops earlier reasoning
    assert masked_spans(qwen3_tokenizer, ids, mask) == [
        "It is 4.<|im_end|>",
        "<think>\nthree and three\n</think>\n\nThat makes 6.<|im_end|>",
    ]


def test_qwen3_thinking_flag_changes_the_rendering(qwen3_tokenizer):
    on = render_prompt(qwen3_tokenizer, CONV[:1], {"enable_thinking": True})
    off = render_prompt(qwen3_tokenizer, CONV[:1], {"enable_thinking": False})
    assert qwen3_tokenizer.decode(off).endswith("<think>\n\n</think>\n\n")
    assert qwen3_tokenizer.decode(on).endswith("<|im_start|>assistant\n")


def test_qwen3_system_and_tool_turns_are_unmasked(qwen3_tokenizer):
    conv = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Calling the tool."},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    ids, mask = render_with_mask(qwen3_tokenizer, conv, {"enable_thinking": False})
    assert masked_spans(qwen3_tokenizer, ids, mask) == ["Calling the tool.<|im_end|>", "Sunny.<|im_end|>"]


@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "qwen3_tokenizer"])
def test_offset_fallback_gives_the_same_spans(request, monkeypatch, tokenizer_name):
    """Tokenizers that prepend a space per call use one call + character offsets: same answers masked."""
    import deepspec.data.template as template

    tok = request.getfixturevalue(tokenizer_name)
    kw = {"enable_thinking": False}
    pieces = masked_spans(tok, *render_with_mask(tok, CONV, kw))
    monkeypatch.setattr(template, "_segments_concatenate", lambda _tok: False)
    assert masked_spans(tok, *render_with_mask(tok, CONV, kw)) == pieces
