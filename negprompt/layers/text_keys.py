"""Handing a rule's combination (NAG, VSF) a positive and a negative text of different lengths.

The combinations of :mod:`negprompt.guidance.attention_processors` read the positive's and the negative's text
keys side by side (one attention call over both), so both must have one length. Families whose prompts keep their
own lengths (Qwen-Image, Z-Image) pad the shorter text with keys that take no part in any softmax: zero keys and
values whose logit offset is −∞ (``text_bias``), which leaves every attention output as over the unpadded keys.
"""

from __future__ import annotations

import torch

from negprompt.layers.attention import Combine, KeysValues


def padded_text(
    keys_values: KeysValues, bias: torch.Tensor | None, length: int
) -> tuple[KeysValues, torch.Tensor | None]:
    """Keys and values (B, H, L, d) padded with zeros to ``length`` tokens, and their logit offsets (B, ``length``)
    float32: ``bias`` (B, L) (None: 0 on every key), −∞ on the padding. Unchanged where L = ``length``."""
    keys, values = keys_values
    missing = length - keys.shape[2]
    if missing == 0:
        return keys_values, bias
    pad = (0, 0, 0, missing)
    if bias is None:
        bias = keys.new_zeros(keys.shape[0], keys.shape[2], dtype=torch.float32)
    bias = torch.cat([bias.float(), bias.new_full((bias.shape[0], missing), float("-inf"), dtype=torch.float32)], 1)
    return (torch.nn.functional.pad(keys, pad), torch.nn.functional.pad(values, pad)), bias


def combine_texts(
    combine: Combine,
    query: torch.Tensor,
    text: KeysValues,
    negative: KeysValues,
    image: KeysValues,
    text_bias: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """``combine`` of image queries (B, H, N, d) over [text; image] and [negative; image] keys, the texts (B, H, L, d)
    and (B, H, L⁻, d) padded to one length (:func:`padded_text`); ``text_bias``: each text's logit offsets (B, L) and
    (B, L⁻) (0 kept, −∞ left out), or None where every key is kept. Returns (B, N, H·d)."""
    length = max(text[0].shape[2], negative[0].shape[2])
    text, positive_bias = padded_text(text, text_bias[0], length)
    negative, negative_bias = padded_text(negative, text_bias[1], length)
    if positive_bias is None and negative_bias is None:
        return combine(query, text, negative, image)
    batch = query.shape[0]
    zeros = query.new_zeros(batch, length, dtype=torch.float32)
    biases = tuple(zeros if b is None else b.float() for b in (positive_bias, negative_bias))
    return combine(query, text, negative, image, text_bias=biases)
