"""Turning prompt text into the text encoder's hidden states, with clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from negprompt.errors import NegpromptError
from negprompt.guidance import syntax
from negprompt.models.embeddings import expand_embeddings


class PromptError(NegpromptError):
    """A prompt the tokenizer cannot take whole."""


def _word_level_vocabulary(tokenizer: Any) -> list[str] | None:
    """The words of a word-level tokenizer (the bundled model's), or None for BPE tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordLevel":
        return None
    special = set(tokenizer.all_special_tokens)
    return sorted((w for w in tokenizer.get_vocab() if w not in special), key=tokenizer.get_vocab().get)


def check_prompt(tokenizer: Any, prompt: str, check_length: bool = True) -> list[int]:
    """Token ids of ``prompt`` (with start/end tokens), or a :class:`PromptError` saying what is wrong.

    Errors: a word unknown to a word-level tokenizer (the message lists the vocabulary); unless not
    ``check_length``, a prompt longer than the tokenizer's ``model_max_length`` (the message names the
    words that would be cut).
    """
    prompt = expand_embeddings(tokenizer, syntax.plain_text(prompt))
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False).input_ids
    vocabulary = _word_level_vocabulary(tokenizer)
    if vocabulary is not None and tokenizer.unk_token_id in ids:
        unknown = [w for w in prompt.lower().split() if w not in tokenizer.get_vocab()]
        raise PromptError(
            f"unknown word(s) {', '.join(repr(w) for w in unknown)} in prompt {prompt!r}; "
            f"known words: {' '.join(vocabulary)}"
        )
    limit = tokenizer.model_max_length
    if check_length and len(ids) > limit:
        cut = tokenizer.decode(ids[limit - 1 : -1]).strip()
        raise PromptError(
            f"prompt is {len(ids)} tokens, over the tokenizer's limit of {limit}: "
            f"these words would be cut: {cut!r}; shorten the prompt"
        )
    return ids


def weighted_tokens(tokenizer: Any, prompt: str, length: int | None = None) -> tuple[list[int], list[float]]:
    """Token ids padded (or cut) to ``length`` (default ``model_max_length``) and a weight per token, from
    ``(text:w)`` chunks; a start token only where the tokenizer has one (CLIP, not T5)."""
    length = length or tokenizer.model_max_length
    chunks = syntax.resolve(syntax.parse(prompt), 0, 1)
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids, weights = list(start), [1.0] * len(start)
    for text, weight in chunks:
        piece = tokenizer(expand_embeddings(tokenizer, text), add_special_tokens=False, verbose=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    ids, weights = ids[: length - 1], weights[: length - 1]  # as the tokenizer truncates: the end token stays
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    padding = length - len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ids + [pad] * padding, weights + [1.0] * padding


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Hidden states of the text encoder's last layer: (len(prompts), model_max_length, D).

    As diffusers does it: pad to ``model_max_length``, no attention mask unless the text encoder's
    config asks for one, and take ``last_hidden_state``. A prompt with AUTOMATIC1111 weights
    (``(word:1.3)``) is tokenized chunk by chunk; each token's hidden state is multiplied by its
    weight and the result rescaled to the unweighted mean, as AUTOMATIC1111 does (unless that
    rescale factor is not in (0.1, 10): then the weighted states are kept as they are).
    A loaded multi-vector textual-inversion token stands for all its vectors (see
    :mod:`negprompt.models.embeddings`).
    """
    if not any(syntax.has_syntax(p) for p in prompts):
        return encode_prompt_batch(tokenizer, text_encoder, prompts)
    return torch.cat([encode_prompt(tokenizer, text_encoder, p)[0] for p in prompts])


def encode_prompt_batch(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden states of prompts without AUTOMATIC1111 syntax, encoded in one batch: (N, L, D)."""
    for prompt in prompts:
        check_prompt(tokenizer, prompt)
    tokens = tokenizer(
        [expand_embeddings(tokenizer, p) for p in prompts],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return hidden.to(dtype=text_encoder.dtype)


def encode_prompt(
    tokenizer: Any, text_encoder: Any, prompt: str, penultimate: bool = False, truncate: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prompt's hidden states (1, L, D), of the last layer or, with ``penultimate``, of the one before
    it (SDXL's), and the encoder's pooled projection (1, P) when it has one (``text_embeds``), else None.

    Weights of AUTOMATIC1111 syntax scale the hidden states as :func:`encode_prompts` says; the pooled
    projection is the encoder's, unweighted. ``truncate``: a prompt over the tokenizer's limit is cut
    there, as diffusers cuts CLIP's part of an SD3 or FLUX prompt (whose T5 encoder reads it whole),
    instead of refused.
    """
    check_prompt(tokenizer, prompt, check_length=not truncate)
    if not penultimate and not syntax.has_syntax(prompt):
        return encode_prompt_batch(tokenizer, text_encoder, [prompt]), None
    if syntax.has_syntax(prompt):
        ids, weights = weighted_tokens(tokenizer, prompt)
        mask = None
    else:
        tokens = tokenizer(
            [expand_embeddings(tokenizer, prompt)],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, weights = tokens.input_ids[0].tolist(), None
        mask = tokens.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    device = text_encoder.device
    with torch.no_grad():
        output = text_encoder(
            torch.tensor([ids], device=device),
            attention_mask=None if mask is None else mask.to(device),
            output_hidden_states=penultimate,
        )
    hidden = output.hidden_states[-2] if penultimate else output[0]
    pooled = output[0] if output[0].ndim == 2 else None
    if weights is not None:
        hidden = apply_weights(hidden, weights)
    return hidden.to(dtype=text_encoder.dtype), None if pooled is None else pooled.to(dtype=text_encoder.dtype)


def apply_weights(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Token states (1, L, D) scaled by a weight per token, then rescaled to the unweighted mean (as
    :func:`encode_prompts` says)."""
    scale = torch.tensor(weights, device=hidden.device, dtype=hidden.dtype)[None, :, None]
    original_mean = hidden.mean()
    hidden = hidden * scale
    ratio = original_mean / hidden.mean()
    # The weighted mean can come out near zero or with the other sign (seen on a random-weight tiny
    # SD: the ratio was inf and the images NaN); then keep the weighted embedding unrescaled.
    if torch.isfinite(ratio) and 0.1 < float(ratio) < 10.0:
        hidden = hidden * ratio
    return hidden


def check_t5_prompt(tokenizer: Any, prompt: str, length: int) -> list[int]:
    """T5 token ids of ``prompt`` (with the end token), or a :class:`PromptError` when they are over
    ``length`` (the model's ``max_sequence_length``): the message names the words that would be cut."""
    ids = tokenizer(syntax.plain_text(prompt), add_special_tokens=True, verbose=False).input_ids
    if len(ids) > length:
        cut = tokenizer.decode(ids[length - 1 : -1]).strip()
        raise PromptError(
            f"prompt is {len(ids)} T5 tokens, over the model's limit of {length} (max_sequence_length): "
            f"these words would be cut: {cut!r}; shorten the prompt"
        )
    return ids


def encode_t5(tokenizer: Any, text_encoder: Any, prompt: str, length: int) -> torch.Tensor:
    """A T5 encoder's last hidden states of ``prompt`` padded to ``length`` tokens: (1, length, D), as
    diffusers' SD3 and FLUX pipelines encode it (no attention mask); AUTOMATIC1111 weights scale the
    states as :func:`encode_prompts` says. Refuses a prompt over ``length`` (:func:`check_t5_prompt`)."""
    check_t5_prompt(tokenizer, prompt, length)
    if syntax.has_syntax(prompt):
        ids, weights = weighted_tokens(tokenizer, prompt, length)
    else:
        ids = tokenizer(
            [prompt], padding="max_length", max_length=length, truncation=True, add_special_tokens=True
        ).input_ids[0]
        weights = None
    device = text_encoder.device
    with torch.no_grad():
        hidden = text_encoder(torch.tensor([ids], device=device))[0]
    if weights is not None:
        hidden = apply_weights(hidden, weights)
    return hidden.to(dtype=text_encoder.dtype)
