"""A prompt as one user message in a Qwen tokenizer's chat template, as the FLUX.2 [klein] and Z-Image pipelines
encode it: the rendered text, where the prompt sits in it, its tokens with their character spans, and the prompt's
words at those tokens.

Both pipelines render ``[{"role": "user", "content": prompt}]`` with the assistant's turn opened
(``add_generation_prompt=True``); FLUX.2 [klein] switches thinking off (``enable_thinking=False``: an empty
``<think>`` block closes the template), Z-Image leaves it on. A family passes its choice as ``thinking``.
"""

from __future__ import annotations

from typing import Any

from negprompt.models.conditioning import ConditioningError

PROMPT_MARK = "\ue000"  # a private-use character: where the prompt sits in the rendered chat template


def chat_text(tokenizer: Any, prompt: str, thinking: bool) -> str:
    """``prompt`` (plain text) as the pipeline hands it to the tokenizer: a user message in the chat template,
    the assistant's turn opened, thinking on or off."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)


def template_parts(tokenizer: Any, thinking: bool) -> tuple[str, str]:
    """The text the chat template puts before and after the prompt: for Qwen3 ``"<|im_start|>user\\n"`` and
    ``"<|im_end|>\\n<|im_start|>assistant\\n"`` (and, thinking off, an empty ``<think>`` block)."""
    before, mark, after = chat_text(tokenizer, PROMPT_MARK, thinking).partition(PROMPT_MARK)
    if not mark:
        raise ConditioningError("the tokenizer's chat template drops the user's message; it cannot wrap a prompt")
    return before, after


def prompt_start(tokenizer: Any, prompt: str, thinking: bool) -> int:
    """Where ``prompt`` starts in :func:`chat_text` (in characters); the template must hold it unchanged."""
    before, _ = template_parts(tokenizer, thinking)
    if not chat_text(tokenizer, prompt, thinking).startswith(before + prompt):
        raise ConditioningError("the tokenizer's chat template changes the prompt text; negprompt cannot read it")
    return len(before)


def templated_tokens(tokenizer: Any, prompt: str, thinking: bool) -> tuple[list[int], list[tuple[int, int]], int]:
    """The templated prompt's token ids, their character spans and where the prompt starts, untruncated."""
    encoded = tokenizer(chat_text(tokenizer, prompt, thinking), return_offsets_mapping=True, verbose=False)
    spans = [tuple(span) for span in encoded.offset_mapping]
    return list(encoded.input_ids), spans, prompt_start(tokenizer, prompt, thinking)


def prompt_tokens(spans: list[tuple[int, int]], start: int, prompt: str) -> list[int]:
    """Positions of the tokens inside the prompt (spans within [start, start + len(prompt)), none empty)."""
    stop = start + len(prompt)
    return [i for i, (first, last) in enumerate(spans) if start <= first and last <= stop and last > first]


def word_groups(
    tokenizer: Any, ids: list[int], tokens: list[str], positions: list[int]
) -> tuple[list[list[int]], list[str]]:
    """The prompt's words at its token ``positions``: a word starts at a token beginning with ``Ġ`` (the byte-level
    space before it) or at the first one; groups that decode to blank are dropped. Returns (each word's
    positions, each word lower-cased)."""
    groups: list[list[int]] = []
    for position in positions:
        if tokens[position].startswith("Ġ") or not groups:
            groups.append([])
        groups[-1].append(position)
    groups = [g for g in groups if tokenizer.decode([ids[p] for p in g]).strip()]
    return groups, [tokenizer.decode([ids[p] for p in g]).strip().lower() for g in groups]
