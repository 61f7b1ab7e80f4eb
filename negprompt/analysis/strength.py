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

**Videos** (a capture with latent frames F′, statistics per frame): :func:`strength_curves` gives r_t of the
whole video — its map over all frames, ‖F‖_F = √(Σ_f ‖F_f‖²_F), and E over all frames' pixels, the mean of the
frames' E — and :func:`strength_over_frames` gives r_t of each latent frame apart, (steps, B, F′).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from negprompt.attention.result import AttentionCapture
from negprompt.errors import NegpromptError

# Words never chosen as r(i): they name nothing in the image.
BRANCHES = ("negative", "positive")  # r_t's numerator and denominator
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
    negative = capture.maps("negative", negative_word)[present]  # (steps, B, S, S); a video's (steps, B, F′, S, S)
    scores = torch.stack([_over_frames(map_similarity(negative, capture.maps("positive", w)[present])) for w in words])
    return [words[i] for i in scores.argmax(dim=0).tolist()]


def _over_frames(similarity: torch.Tensor) -> torch.Tensor:
    """Similarities (steps, B) → (B,), the mean over steps; a video's (steps, B, F′): over frames, then steps."""
    if similarity.ndim == 3:
        similarity = similarity.mean(dim=2)
    return similarity.mean(dim=0)


def chosen_related(capture: AttentionCapture, negative_word: str, related: str | Sequence[str] | None) -> list[str]:
    """r(i) per image: ``related`` (one word for all, or one per image), or :func:`related_word`'s choice."""
    batch = capture.energy("negative").shape[2]
    if related is None:
        return related_word(capture, negative_word)
    if isinstance(related, str):
        return [related] * batch
    return list(related)


def hooked_layers(capture: AttentionCapture) -> list[int]:
    """The captured layers the released r_t sums: all but a UNet's mid block (their code hooks none there)."""
    hooked = [i for i, layer in enumerate(capture.index["layers"]) if not layer["path"].startswith("mid_block.")]
    if not hooked:
        raise NegpromptError("the released r_t sums down- and up-block layers, and none was captured")
    return hooked


def strength_over_frames(
    capture: AttentionCapture, negative_word: str, related: str | Sequence[str] | None = None
) -> dict[str, torch.Tensor | list[str]]:
    """A video's r_t per kept step, video and latent frame under both definitions, (steps, B, F′) each (the
    frame's maps and E alone), and the r(i) used per video (chosen over all frames, as :func:`strength_curves`)."""
    if capture.frames is None:
        raise NegpromptError("r_t over frames needs a video's capture; this capture holds images")
    chosen = chosen_related(capture, negative_word, related)
    negative = capture.frobenius("negative", negative_word)  # (steps, layers, B, F′)
    positive = torch.stack([capture.frobenius("positive", word)[:, :, b] for b, word in enumerate(chosen)], dim=2)
    hooked = hooked_layers(capture)
    return {
        "article": article_ratio(negative, positive),
        "released": released_ratio(capture.energy("negative")[:, hooked], capture.energy("positive")[:, hooked]),
        "related": chosen,
    }


def strength_curves(
    capture: AttentionCapture, negative_word: str, related: str | Sequence[str] | None = None
) -> dict[str, torch.Tensor | list[str]]:
    """r_t per kept step and image under both definitions, and the r(i) used per image."""
    chosen = chosen_related(capture, negative_word, related)
    negative = capture.frobenius("negative", negative_word)  # (steps, layers, B[, F′])
    positive = torch.stack([capture.frobenius("positive", word)[:, :, b] for b, word in enumerate(chosen)], dim=2)
    negative_energy, positive_energy = (capture.energy(branch)[:, hooked_layers(capture)] for branch in BRANCHES)
    if capture.frames is not None:  # a video: its map over all frames, E over all frames' pixels
        negative, positive = (x.square().sum(dim=3).sqrt() for x in (negative, positive))
        negative_energy, positive_energy = negative_energy.mean(dim=3), positive_energy.mean(dim=3)
    return {
        "article": article_ratio(negative, positive),
        "released": released_ratio(negative_energy, positive_energy),
        "related": chosen,
    }
