"""NAG and VSF inside joint attention (SD3, FLUX): the negative's text runs as a stream of its own beside the positive's pass.

In an MMDiT the text tokens are a stream that every block updates (Esser et al. 2024, Fig. 2); a negative read
inside attention therefore needs its own text stream through the blocks, not a fixed context. The stream and the
processors that carry it live in :mod:`negprompt.layers.joint_negative`, shared with Chroma's masked layers
(:mod:`negprompt.layers.chroma_attention`); SD3 and FLUX hand their layers no text mask and modulate a joint
block's text with the whole time embedding. For the positive branch's rows, the image queries get the rule's
combination in place of their attention over [positive text; image] keys: NAG's (Chen et al. 2025 §3) of Z⁺
and Z⁻, the attention over [negative text; image] keys with the same image keys and values; VSF's, the
negative's text keys appended with their values' sign flipped. The image stream is computed once: one pass a
step at s = 1; the extra work is the negative's text tokens (512 beside FLUX's 4096 image tokens at 1024²) and
the second attention of the image queries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from negprompt.layers.attention import Combine
from negprompt.layers.joint_negative import joint_negative_run, negative_in_joint_layers
from negprompt.layers.readers import NegativeCaller


@contextmanager
def joint_attention_run(transformer: Any) -> Iterator[NegativeCaller]:
    """Installs the negative's processors on every joint attention layer of an SD3 or FLUX transformer for a run
    (SD3.5's image-only ``attn2`` layers keep their processors); yields what hands them one call's negative (its
    denoiser inputs: T5 states (B, L⁻, D)). Restores the processors and removes the hooks on exit (also on error)."""
    with joint_negative_run(transformer) as run:

        def call(rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str) -> Any:
            return run.call(rows, negative_inputs["encoder_hidden_states"], combine, branch)

        yield call


@contextmanager
def negative_in_joint_attention(
    transformer: Any, rows: slice, negative: torch.Tensor, combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """For one call, the rows ``rows`` of an SD3 or FLUX transformer read the negative's T5 states (B, L⁻, D)
    inside every joint attention layer, combined by ``combine`` (SD3.5's image-only ``attn2`` layers keep their
    processors); restores the processors and removes the hooks on exit (also on error)."""
    with negative_in_joint_layers(transformer, rows, negative, combine, branch):
        yield
