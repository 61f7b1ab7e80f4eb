"""Models that take the guidance scale as an input (guidance-distilled): w reaches the UNet with every
row as ``timestep_cond``, is recorded with the run, and is refused by models that take none."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import assert_usage_error

from negprompt.interfaces.cli import main
from negprompt.models.components import Components
from negprompt.models.conditioning import guidance_embedding
from negprompt.runspec import RunSpec, SettingsError
from negprompt.session import Session

PROMPT, NEGATIVE = "a photo of a cat", "glasses"
OPTIONS = dict(steps=3, scheduler="ddim", seeds=[1, 2], size=32)


def distilled(tiny_sd, declarations=None) -> Components:
    """The tiny SD with a UNet that takes an 8-wide guidance embedding (random weights)."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**{**dict(tiny_sd.unet.config), "time_cond_proj_dim": 8}).eval()
    return Components(
        unet, tiny_sd.text_encoder, tiny_sd.tokenizer, tiny_sd.scheduler, tiny_sd.vae, declarations=declarations or {}
    )


def test_guidance_embedding_is_the_sinusoid_of_1000_w():
    embedding = guidance_embedding(0.001, 4)  # frequencies 1 and 10000^(−1): angles 1 and 1e-4
    expected = torch.tensor([[math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)]])
    torch.testing.assert_close(embedding, expected)
    assert guidance_embedding(3.0, 7).shape == (1, 7)


def test_w_reaches_every_row_and_changes_the_images(tiny_sd):
    session = Session(distilled(tiny_sd, {"embedded_guidance": 4.0, "scale": 1.0}))
    seen = []
    handle = session.components.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("timestep_cond")), with_kwargs=True
    )
    try:
        default = session.run(session.spec(PROMPT, NEGATIVE, **OPTIONS))
        stronger = session.run(session.spec(PROMPT, NEGATIVE, embedded_guidance=8.0, **OPTIONS))
    finally:
        handle.remove()
    assert default.spec.embedded_guidance == 4.0 and default.spec.guidance.scale == 1.0
    first = seen[0]
    # rule (9) at s = 1: the positive's rows only, one per image, each with the same w
    assert first.shape == (2, 8) and torch.equal(first, guidance_embedding(4.0, 8).expand(2, -1))
    assert np.abs(default.pixels - stronger.pixels).max() > 1e-3
    record = RunSpec.from_json(default.spec.to_json())
    assert record == default.spec and "Embedded guidance: 4.0" in default.spec.infotext(0)
    # a plain negative at s = 1 cannot act: the same images as without it
    plain = session.run(session.spec(PROMPT, **OPTIONS))
    assert np.array_equal(plain.pixels, default.pixels)


def test_refusals(tiny_sd, tmp_path, capsys):
    with pytest.raises(SettingsError, match="declares no default: give --embedded-guidance"):
        Session(distilled(tiny_sd)).spec(PROMPT, **OPTIONS)
    with pytest.raises(SettingsError, match="takes no guidance scale as an input"):
        Session(tiny_sd).spec(PROMPT, embedded_guidance=3.0, **OPTIONS)
    out = tmp_path / "x.png"
    code = main(["generate", "a red circle", "--embedded-guidance", "3", "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, "takes no guidance scale as an input", out)
    with pytest.raises(SettingsError, match="finite number ≥ 0"):
        RunSpec.from_json({**Session(tiny_sd).spec(PROMPT, **OPTIONS).to_json(), "embedded_guidance": -1})
