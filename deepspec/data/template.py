"""Chat-template rendering and assistant loss masks, computed from the tokenizer's own template.

**The one rule** for regenerate (the embedded server), train (loss masks) and eval (benchmark prompts):
the tokenizer's own chat template, rendered by :func:`render_prompt` / :func:`render_with_mask`, with
the kwargs of :func:`template_kwargs` (the recipe's ``regeneration.chat_template_kwargs`` plus
``enable_thinking`` from ``regeneration.thinking``; evaluation sets the thinking switch from
``evaluation.thinking``). The text is tokenised without extra special tokens (the template writes
its own BOS when it has one). A tokenizer without a chat template is an error everywhere, never a
silent plain-text fallback: a draft trained on templated text would be measured on other text.

Two functions, one rendering rule. :func:`render_prompt` is what the embedded server feeds the model
(the template with ``add_generation_prompt=True`` and the request's ``chat_template_kwargs``);
:func:`render_with_mask` renders a whole conversation with the *same* template and kwargs, so a
training sequence never contains a system prompt the server did not see (a template that adds its
own default system prompt, like SmolLM2's, adds it in both places).

How the mask is found, for any template and without special ``{% generation %}`` markers:

1. ``full`` = the whole conversation rendered as text.
2. For assistant message ``i``, ``prefix_i`` = messages ``[:i]`` rendered with the generation prompt
   (what the server saw before answering). Its longest common prefix with ``full`` is where the
   answer starts. Taking the common prefix, not ``len(prefix_i)``, keeps this right for templates
   that rewrite turns in the full conversation (Qwen3 drops ``<think>`` blocks of earlier turns and
   its no-thinking generation prompt ends with an empty think block).
3. The answer ends with the template's end-of-turn string (found once by rendering a probe answer,
   e.g. ``<|im_end|>``), included in the mask; what follows it (a newline) is not.
4. The text is tokenised piece by piece at the span boundaries (so the prompt part is token for
   token what the server fed the model); answer pieces are 1, the rest 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

_PROBE = "Deepspec probe answer 7f3a9c"


class TemplateError(ValueError):
    """The tokenizer's chat template cannot render these messages, or the mask cannot be located."""


class TemplateSettings(Protocol):
    """The recipe section carrying the template settings (``RegenerationConfig``)."""

    chat_template_kwargs: Mapping[str, Any]
    thinking: bool | None


def template_kwargs(settings: TemplateSettings, thinking: bool | None = None) -> dict[str, Any]:
    """The chat-template kwargs a run renders with: ``settings.chat_template_kwargs`` plus
    ``enable_thinking`` (``thinking`` when given, else ``settings.thinking``; None leaves the template's
    default). ``settings`` is the recipe's regeneration section: the target wrote the training answers
    with these kwargs, so training and evaluation render the same text."""
    kwargs = dict(settings.chat_template_kwargs)
    switch = settings.thinking if thinking is None else thinking
    if switch is not None:
        kwargs["enable_thinking"] = switch
    return kwargs


def _render(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    chat_template_kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; use an instruct "
            "model or add a 'chat_template' to its tokenizer_config.json"
        )
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
    except Exception as e:  # jinja raises many kinds (TemplateError, TypeError...): name the cause
        raise TemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise TemplateError(f"chat template returned {type(text).__name__}, expected text")
    return text


def render_prompt(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the prompt the server generates from: template + generation prompt, no extra BOS."""
    text = _render(
        tokenizer,
        messages,
        add_generation_prompt=True,
        chat_template_kwargs=chat_template_kwargs,
        tools=tools,
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The string the template writes right after an assistant answer (e.g. ``<|im_end|>``), stripped."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    text = _render(tokenizer, msgs, add_generation_prompt=False, chat_template_kwargs=chat_template_kwargs)
    pos = text.rfind(_PROBE)
    if pos < 0:
        raise TemplateError("chat template does not render assistant content verbatim; cannot locate answers")
    eot = text[pos + len(_PROBE) :].strip()
    if not eot and getattr(tokenizer, "eos_token", None):
        eot = str(tokenizer.eos_token)  # templates that write nothing after the last answer
    return eot


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the character spans of each assistant answer
    (content plus end-of-turn string)."""
    kw = chat_template_kwargs or {}
    full = _render(tokenizer, messages, add_generation_prompt=False, chat_template_kwargs=kw, tools=tools)
    eot = end_of_turn(tokenizer, kw)
    spans: list[tuple[int, int]] = []
    floor = 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise TemplateError(
                "message 0 is an assistant turn; a conversation must start with system or user"
            )
        prefix = _render(
            tokenizer, messages[:i], add_generation_prompt=True, chat_template_kwargs=kw, tools=tools
        )
        start = len(prefix) if full.startswith(prefix) else _common_prefix(full, prefix)
        start = max(start, floor)
        end = full.find(eot, start) if eot else -1
        if end < 0:
            raise TemplateError(f"assistant message {i}: end-of-turn {eot!r} not found after its start")
        end += len(eot)
        spans.append((start, end))
        floor = end
    return full, spans


def _segments_concatenate(tokenizer: Any) -> bool:
    """True when tokenising pieces separately adds nothing at piece starts (byte-level BPE: GPT-2, Llama 3,
    Qwen, SmolLM...); False for SentencePiece tokenizers that prepend a dummy space to each call."""
    a = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    b = tokenizer("world", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(list(a) + list(b)) == "Helloworld"


def render_with_mask(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    chat_template_kwargs: dict[str, Any] | None = None,
    max_length: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenise a conversation with its chat template; return ``(input_ids, loss_mask)``.

    ``loss_mask[t]`` is 1 for tokens of assistant answers and the answer's end-of-turn token, 0 for
    everything else (system and user turns, role headers, the generation prompt, the newline after
    the end-of-turn token). ``max_length`` cuts both lists.

    The text is tokenised piece by piece at answer boundaries, so the tokens before an answer are
    exactly the server's prompt tokens (tokenising the whole text at once can merge the generation
    prompt's last newline with the answer's first characters). Tokenizers that prepend a space to
    every call fall back to one call over the whole text, mapped through character offsets.
    """
    full, spans = assistant_spans(tokenizer, messages, chat_template_kwargs, tools)
    ids: list[int] = []
    mask: list[int] = []
    if _segments_concatenate(tokenizer):
        pos = 0
        for start, end in [*spans, (len(full), len(full))]:
            for piece, bit in ((full[pos:start], 0), (full[start:end], 1)):
                if piece:
                    piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                    ids += piece_ids
                    mask += [bit] * len(piece_ids)
            pos = end
    else:
        try:
            enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as e:
            raise TemplateError("this tokenizer needs a fast version (offset mapping) for loss masks") from e
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        j = 0
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:
                continue  # tokens that cover no characters
            while j < len(spans) and s >= spans[j][1]:
                j += 1
            if j < len(spans) and spans[j][0] <= s < spans[j][1]:
                mask[t] = 1
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask
