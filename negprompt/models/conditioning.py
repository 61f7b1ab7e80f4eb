"""One prompt's encoded conditioning, as data, and how several are batched into the denoiser's inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from negprompt.errors import NegpromptError


class ConditioningError(NegpromptError):
    """Conditionings that cannot be batched together."""


@dataclass(frozen=True)
class PromptInput:
    """Everything one row of a denoiser call is conditioned on, as the family's adapter encodes it.

    text: the prompt (AUTOMATIC1111 syntax resolved for the step, weights kept);
    text_2: the second text encoder's prompt (SDXL's ``prompt_2``), None → ``text``;
    size_conditions: SDXL's micro-conditions (original height, width, crop top, left, target
    height, width), None for families without them;
    zeros_when_empty: an empty input is encoded as zeros (SDXL's ``force_zeros_for_empty_prompt``,
    set for negative and unconditional rows only).
    """

    text: str
    text_2: str | None = None
    size_conditions: tuple[int, int, int, int, int, int] | None = None
    zeros_when_empty: bool = False

    @property
    def is_plain(self) -> bool:
        """Only a text: what every family can encode."""
        return self.text_2 is None and self.size_conditions is None and not self.zeros_when_empty


def as_input(item: PromptInput | str) -> PromptInput:
    """A bare text as the input of a family without second prompts or size conditions."""
    return item if isinstance(item, PromptInput) else PromptInput(item)


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on for one prompt.

    hidden_states: the text encoder's token states, (1, L, D), given as ``encoder_hidden_states``;
    pooled: a pooled text embedding, (1, P), given as ``added_cond_kwargs["text_embeds"]`` (SDXL);
    extra: further ``added_cond_kwargs`` by name, each (1, …), e.g. SDXL's ``time_ids`` (1, 6).
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Conditioning":
        return Conditioning(
            self.hidden_states.to(device),
            None if self.pooled is None else self.pooled.to(device),
            {k: v.to(device) for k, v in self.extra.items()},
        )

    def added_inputs(self) -> dict[str, torch.Tensor]:
        """The ``added_cond_kwargs`` of this prompt alone (empty for SD 1.x/2.x and the bundled model)."""
        added = dict(self.extra)
        if self.pooled is not None:
            added["text_embeds"] = self.pooled
        return added


def denoiser_inputs(rows: Sequence[Conditioning]) -> dict[str, Any]:
    """Keyword inputs of one denoiser call whose row i is conditioned on ``rows[i]``.

    ``encoder_hidden_states``: (B, L, D); ``added_cond_kwargs`` (only when the family provides any):
    each name's tensors concatenated over rows, (B, …).
    """
    if not rows:
        raise ConditioningError("a denoiser call needs at least one row of conditioning")
    inputs: dict[str, Any] = {"encoder_hidden_states": torch.cat([c.hidden_states for c in rows])}
    added = [c.added_inputs() for c in rows]
    names = set(added[0])
    if any(set(a) != names for a in added[1:]):
        raise ConditioningError("rows of one denoiser call carry different added inputs; encode them with one model")
    if names:
        inputs["added_cond_kwargs"] = {name: torch.cat([a[name] for a in added]) for name in sorted(names)}
    return inputs


def guidance_embedding(scale: float, dim: int) -> torch.Tensor:
    """The guidance scale w as a model input, (1, dim): sinusoidal features of 1000·w (half sines, half
    cosines, frequencies 10000^(−k/(dim/2 − 1))), the form guidance-distilled UNets take as
    ``timestep_cond`` (Meng et al. 2023 condition the student on w; diffusers' LCM pipeline embeds w so)."""
    import math

    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(1, half - 1))
    angles = 1000.0 * float(scale) * frequencies
    embedding = torch.cat([angles.sin(), angles.cos()])
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros(1, dtype=torch.float64)])
    return embedding[None].float()
