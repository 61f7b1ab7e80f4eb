"""How a model's attention layers hold its text: what rules and capture ask a family, never a class name.

Imports nothing heavy: the command line reads it while parsing (rules name it in their checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

LayoutKind = Literal["cross", "joint", "unread", "none"]


@dataclass(frozen=True)
class AttentionLayout:
    """The attention layout of a model family's denoiser.

    ``kind``: ``"cross"`` — UNet cross-attention layers, image queries on text keys only (SD, SDXL,
    the bundled model); ``"joint"`` — MMDiT joint attention (Esser et al. 2024, Fig. 2): image and
    text tokens attend over [text; image] keys together, the text a stream of its own through the
    blocks (SD3, FLUX); ``"unread"`` — attention layers read the text, but negprompt has no reader for
    them yet (capture and rules acting inside attention refuse such a model, naming ``family``);
    ``"none"`` — no attention layer reads the text.
    ``text_start_tokens``: start tokens leading the text keys, attention sinks a negative's keys
    leave out (CLIP's 1; FLUX's T5 tokens have none).
    ``patch``: latent cells per side of one image token of a transformer's attention (1 for UNets,
    whose layers give their own resolutions).
    ``keys_from_second_prompt``: the text keys are the tokens of the second prompt (FLUX's T5 reads
    ``prompt_2``), so a captured word must be in both prompts alike.
    ``frames``: the image tokens are a video's, laid out (F′, h′, w′) — latent frames, then rows, then columns,
    one token per latent frame (Wan's patch (1, 2, 2)); capture keeps maps and statistics per latent frame, F′
    the family's latent frames of the run (``latent_shape``).
    """

    kind: LayoutKind
    text_start_tokens: int = 1
    patch: int = 1
    keys_from_second_prompt: bool = False
    frames: bool = False

    family: str = ""  # the family's description, for refusals
    # The family's own reader of its attention (a ``negprompt.layers.readers.AttentionReader``), for layers the
    # built-in cross/joint readers do not cover; None: the built-in reader of ``kind``.
    reader: Any = field(default=None, compare=False)

    @property
    def reads_text(self) -> bool:
        """Whether any attention layer has text keys."""
        return self.kind != "none"

    @property
    def readable(self) -> bool:
        """Whether negprompt can read (capture) the text's attention."""
        return self.kind in ("cross", "joint")

    @property
    def changeable(self) -> bool:
        """Whether negprompt can change the text's attention (NAG, VSF)."""
        return self.readable and (self.reader is None or self.reader.negative_in_attention is not None)
