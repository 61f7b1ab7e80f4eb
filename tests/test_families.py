"""Model families describe their own layers: attention layout, text start tokens, latent factor; found by name."""

from __future__ import annotations

import copy

import pytest
import torch

from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import plan_for
from negprompt.layers.attention import attention_paths, is_cross_attention, is_joint_attention
from negprompt.layers.layout import AttentionLayout
from negprompt.layers.processors import AttentionObserver, installed
from negprompt.models.families import FAMILIES, UnsupportedModelError, family_for_parts, family_named
from negprompt.session import Session


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux):
    return {
        "stable-diffusion": tiny_sd,
        "stable-diffusion-xl": tiny_sdxl,
        "stable-diffusion-3": tiny_sd3,
        "flux": tiny_flux,
    }


def test_every_family_is_found_by_its_name_and_from_its_parts(models):
    assert set(FAMILIES) == {
        "stable-diffusion",
        "stable-diffusion-xl",
        "pixel",
        "stable-diffusion-3",
        "flux",
        "chroma",
        "flux2-klein",
        "qwen-image",
        "z-image",
        "wan",
    }
    for name, components in models.items():
        assert family_named(name) is components.family is family_for_parts(components)
    with pytest.raises(UnsupportedModelError, match="no model family 'pixart'; families: stable-diffusion, "):
        family_named("pixart")


def test_parts_of_no_family_or_of_two_are_refused(tiny_sd, tiny_sd3):
    stray = copy.copy(tiny_sd)
    stray.text_encoder_3 = tiny_sd3.text_encoder_3  # SD reads no T5, SDXL needs a second CLIP
    with pytest.raises(UnsupportedModelError, match="match 0 families"):
        family_for_parts(stray)


def test_attention_layouts_say_how_each_family_holds_its_text(models, tiny_sd3):
    layouts = {name: components.attention_layout for name, components in models.items()}
    assert layouts["stable-diffusion"] == AttentionLayout("cross", text_start_tokens=1, patch=1)
    assert layouts["stable-diffusion-xl"] == AttentionLayout("cross", text_start_tokens=1, patch=1)
    patch = int(tiny_sd3.transformer.config.patch_size)
    assert layouts["stable-diffusion-3"] == AttentionLayout("joint", text_start_tokens=1, patch=patch)
    assert layouts["flux"] == AttentionLayout("joint", text_start_tokens=0, patch=2, keys_from_second_prompt=True)
    for name, components in models.items():  # the layout's kind names the layers the denoiser really has
        kind = layouts[name].kind
        test = is_cross_attention if kind == "cross" else is_joint_attention
        paths = attention_paths(components.denoiser, kind)
        assert paths and all(test(components.denoiser.get_submodule(p)) for p in paths)
        other = "joint" if kind == "cross" else "cross"
        assert not attention_paths(components.denoiser, other)


def test_the_latent_factor_comes_from_the_vae_once(models):
    for components in models.values():
        blocks = len(components.vae.config.block_out_channels)
        assert components.latent_factor == 2 ** (blocks - 1)


def test_capture_plans_ask_the_layout_for_the_patch(tiny_flux):
    session = Session(tiny_flux)
    spec = session.spec("a cat with glasses", steps=2, size=32, seeds=[0])
    plan = plan_for(spec, CaptureRequest(words={"positive": ["cat"]}), session)
    assert plan.layout == tiny_flux.attention_layout
    assert {layer.factor for layer in plan.layers} == {2}  # one packed token per 2×2 latent cells


class Watcher:
    """An observer that records which contexts it was handed."""

    def __init__(self, original):
        self.original, self.seen = original, []

    def wants_context(self, branch):
        return True

    def observe_context(self, branch, probabilities, heads):
        self.seen.append((branch, tuple(probabilities.shape), heads))

    def __call__(self, *args, **kwargs):
        return self.original(*args, **kwargs)


def test_a_rule_processor_hands_the_negative_to_an_observer_it_wraps(tiny_sd):
    from negprompt.guidance.attention_processors import negative_in_attention, vsf_combine

    unet, layout = tiny_sd.unet, tiny_sd.attention_layout
    assert isinstance(Watcher(None), AttentionObserver) and not isinstance(object(), AttentionObserver)
    watchers = {}

    def watch(path, original):
        watchers[path] = Watcher(original)
        return watchers[path]

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    negative = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    before = dict(unet.attn_processors)
    with torch.no_grad(), installed(unet, watch):
        with negative_in_attention(
            unet, layout, slice(0, 1), {"encoder_hidden_states": negative}, vsf_combine(2.0, 0.0, 1), "negative_2"
        ):
            unet(latents, torch.tensor([10]), encoder_hidden_states=context)
    assert all(processor is before[key] for key, processor in unet.attn_processors.items())  # both restored
    cross = set(attention_paths(unet, "cross"))
    for path, watcher in watchers.items():
        heads = unet.get_submodule(path).heads
        if path in cross:  # each cross-attention layer reported the negative's attention once
            assert len(watcher.seen) == 1 and watcher.seen[0][0] == "negative_2" and watcher.seen[0][2] == heads
        else:
            assert watcher.seen == []
