"""The strength of a negative token over the steps, r_t, in two definitions.

**Article** (its eq. (10)): for negative word i and its most related positive word r(i),

    r_t = Σ_k ‖F^(t)_{k, p₋(i)}‖_F / Σ_k ‖F^(t)_{k, p₊(r(i))}‖_F

over the captured cross-attention layers k. F is the word's head-averaged attention map in layer k
(the sum over the word's tokens), upsampled bicubically to the capture's common size S×S and
clamped ≥ 0 — so layers of every resolution weigh alike, as in Ban et al.'s code.

**Released code** (Ban et al.'s repository, ``compute_activation_ratio``): with
E = Σ_{layers k} Σ_{heads} mean over all L token maps and all S×S pixels of A², where each head's
token map is upsampled bicubically to S×S and clamped ≥ 0 before squaring,

    r_t = E_negative-branch / E_positive-branch,

summed over the layers of the down and up blocks only: their code does not hook the mid block. It
uses every token of each branch's prompt (padding included), not one word. S is the capture's map
size: the latent side by default and in the built-in study specs, as in their code.

Both are computed from an :class:`~negprompt.attention.result.AttentionCapture`; steps where the
negative branch was not evaluated give NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from negprompt.attention.result import AttentionCapture
from negprompt.errors import NegpromptError

# Words never chosen as r(i): they name nothing in the image.
FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "in", "on", "at", "with", "and", "by", "to", "for", ",", "."})


def article_ratio(negative_frobenius: torch.Tensor, positive_frobenius: torch.Tensor) -> torch.Tensor:
    """Eq. (10): Σ_k ‖F_neg‖_F / Σ_k ‖F_pos‖_F; inputs (steps, layers, B) → (steps, B)."""
    return negative_frobenius.sum(dim=1) / positive_frobenius.sum(dim=1)


def released_ratio(negative_energy: torch.Tensor, positive_energy: torch.Tensor) -> torch.Tensor:
    """Ban et al.'s code: Σ_k E_neg / Σ_k E_pos; inputs (steps, layers, B) → (steps, B)."""
    return negative_energy.sum(dim=1) / positive_energy.sum(dim=1)


def map_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of maps over pixels: (…, S, S) × (…, S, S) → (…)."""
    a, b = a.flatten(-2), b.flatten(-2)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def related_word(capture: AttentionCapture, negative_word: str, candidates: Sequence[str] | None = None) -> list[str]:
    """r(i) per image: the positive word whose map is most like the negative word's.

    Similarity is the cosine of the two maps (mean over layers), averaged over the steps where the
    negative branch was evaluated. Function words ("a", "with", …) are never chosen. Candidates
    default to every captured positive word.
    """
    words = [w for w in (candidates or capture.index["words"].get("positive", [])) if w not in FUNCTION_WORDS]
    if not words:
        raise NegpromptError("no content word of the positive prompt was captured to relate the negative word to")
    present = capture.present("negative")
    if not bool(present.any()):
        raise NegpromptError("the negative branch was never evaluated, so nothing relates to it")
    negative = capture.maps("negative", negative_word)[present]  # (steps, B, S, S)
    scores = torch.stack([map_similarity(negative, capture.maps("positive", w)[present]).mean(dim=0) for w in words])
    return [words[i] for i in scores.argmax(dim=0).tolist()]


def strength_curves(
    capture: AttentionCapture, negative_word: str, related: str | Sequence[str] | None = None
) -> dict[str, torch.Tensor | list[str]]:
    """r_t per kept step and image under both definitions, and the r(i) used per image."""
    batch = capture.energy("negative").shape[-1]
    if related is None:
        chosen = related_word(capture, negative_word)
    elif isinstance(related, str):
        chosen = [related] * batch
    else:
        chosen = list(related)
    negative = capture.frobenius("negative", negative_word)  # (steps, layers, B)
    positive = torch.stack([capture.frobenius("positive", word)[:, :, b] for b, word in enumerate(chosen)], dim=-1)
    hooked = [i for i, layer in enumerate(capture.index["layers"]) if not layer["path"].startswith("mid_block.")]
    if not hooked:
        raise NegpromptError("the released r_t sums down- and up-block layers, and none was captured")
    return {
        "article": article_ratio(negative, positive),
        "released": released_ratio(capture.energy("negative")[:, hooked], capture.energy("positive")[:, hooked]),
        "related": chosen,
    }
