"""Qwen-Image's attention on a tiny random model built from configs: the recorded probabilities equal the layer's
softmax over its unmasked keys, capture on both branches leaves the images bit-identical, word positions are the
embedding's text keys; NAG's layer output equals its formula (Chen et al. 2025 §3) and NAG/VSF act in one pass.
The images against diffusers, rules, prompts, loading and the CLI are in test_family_qwen_image.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from test_family_qwen_image import HEIGHT, NEGATIVE, PROMPT, WIDTH

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.attention.tokens import tokenize_words
from negprompt.models.conditioning import PromptInput
from negprompt.models.qwen_image import (
    TEMPLATE_TOKENS,
    templated_tokens,
)
from negprompt.session import Session
from negprompt.testing.tiny_qwen_image import build_tiny_qwen_image


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen_image(seed=0)


# ---------------------------------------------------------------- attention capture


class ListRecorder:
    """A recorder that keeps every layer's probabilities (the Recorder protocol of negprompt.layers.readers)."""

    def __init__(self, text_length: int) -> None:
        self.active, self.text_length, self.seen = True, text_length, {}

    def record(self, path, probabilities, heads):
        self.seen[path] = (probabilities, heads)


def direct_text_probabilities(attn, image, text, mask, rotary) -> torch.Tensor:
    """The text block of the softmax over every unmasked key of each row, (B, H, N, L) float64, from the q and k
    QwenDoubleStreamAttnProcessor2_0 computes (written out here as its lines do it, in (B, S, H, d))."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    head_dim = attn.inner_dim // attn.heads

    def queries_keys(x, to_q, to_k, norm_q, norm_k):
        return norm_q(to_q(x).unflatten(-1, (-1, head_dim))), norm_k(to_k(x).unflatten(-1, (-1, head_dim)))

    image_q, image_k = queries_keys(image, attn.to_q, attn.to_k, attn.norm_q, attn.norm_k)
    _, text_k = queries_keys(text, attn.add_q_proj, attn.add_k_proj, attn.norm_added_q, attn.norm_added_k)
    image_freqs, text_freqs = rotary
    image_q = apply_rotary_emb_qwen(image_q, image_freqs, use_real=False)
    image_k = apply_rotary_emb_qwen(image_k, image_freqs, use_real=False)
    text_k = apply_rotary_emb_qwen(text_k, text_freqs, use_real=False)
    keys = torch.cat([text_k, image_k], dim=1)  # [text; image], the processor's order
    scores = torch.einsum("bnhd,bshd->bhns", image_q.double(), keys.double()) * head_dim**-0.5
    if mask is not None:
        kept = torch.cat([mask.bool(), torch.ones(mask.shape[0], image.shape[1], dtype=torch.bool)], dim=1)
        scores = scores.masked_fill(~kept[:, None, None, :], float("-inf"))
    return scores.softmax(-1)[..., : text.shape[1]]


def layer_probabilities(components, rows, latents, path, text_length=512):
    """(recorded (B·H, N, text_length), the layer's inputs) of the layer at ``path`` in one denoiser call."""
    transformer, family = components.transformer, components.family
    reader = components.attention_layout.reader
    recorder, inputs = ListRecorder(text_length), {}
    originals = dict(transformer.attn_processors)

    def spy(original):
        def call(attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, **kwargs):
            inputs.update(hidden=hidden_states, text=encoder_hidden_states, mask=encoder_hidden_states_mask, **kwargs)
            return original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, **kwargs)

        return call

    key = f"{path}.processor"
    transformer.set_attn_processor({**originals, key: reader.capture_processor(path, spy(originals[key]), recorder)})
    try:
        with torch.no_grad():
            family.denoise(components, latents, torch.tensor(700.0), rows, {})
    finally:
        transformer.set_attn_processor(originals)
    return recorder.seen[path][0], inputs


def test_recorded_probabilities_equal_the_layers_softmax_over_its_unmasked_keys(qwen):
    """One call with the positive (12 text tokens) and the negative (8, padded and masked): the recorded text block
    equals the softmax of the processor's own q·kᵀ/√d over each row's unmasked keys (1e-5), zeros at the padding and
    past the call's text length up to L = 512; the negative's row equals the negative alone in a call (no padding,
    no mask: the mask is honoured)."""
    family, path = qwen.family, "transformer_blocks.1.attn"
    rows = [family.encode_one(qwen, PromptInput(text)) for text in (PROMPT, NEGATIVE)]
    latents = torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(0))
    recorded, inputs = layer_probabilities(qwen, rows, latents, path)
    heads, images = qwen.transformer.config.num_attention_heads, (HEIGHT // 4) * (WIDTH // 4)
    assert recorded.shape == (2 * heads, images, 512) and inputs["mask"] is not None
    direct = direct_text_probabilities(
        qwen.transformer.get_submodule(path),
        inputs["hidden"],
        inputs["text"],
        inputs["mask"],
        inputs["image_rotary_emb"],
    )
    recorded = recorded.reshape(2, heads, images, 512)
    assert torch.allclose(recorded[..., :12].double(), direct, atol=1e-5)
    assert recorded[1, ..., 8:].abs().max() == 0 and recorded[0, ..., 12:].abs().max() == 0
    text_mass = recorded.sum(-1)
    assert (text_mass > 0).all() and (text_mass < 1).all()  # the image keys take the rest of each row
    alone, alone_inputs = layer_probabilities(qwen, rows[1:], latents[1:], path)
    assert alone_inputs["mask"] is None
    assert torch.allclose(alone.reshape(1, heads, images, 512), recorded[1:], atol=1e-5)


def test_capture_records_words_on_both_branches_and_leaves_images_bit_identical(qwen):
    session = Session(qwen)
    spec = session.spec(PROMPT, NEGATIVE, scale=4.0, steps=3, size=32, seeds=(1, 2), rule="token-renorm")
    plain_images = session.run(spec).images
    request = CaptureRequest({"positive": ["cat", "glasses"], "negative": ["hat"]}, average_layers=False)
    result = capture(spec, request, session, reducer=reduce_layer)
    assert [np.asarray(a).tolist() for a in result.generation.images] == [np.asarray(a).tolist() for a in plain_images]
    paths = [f"transformer_blocks.{i}.attn" for i in range(2)]
    assert [layer["path"] for layer in result.index["layers"]] == paths
    assert [layer["side"] for layer in result.index["layers"]] == [8, 8]  # 16 latent cells / patch 2
    for branch in ("positive", "negative"):
        assert result.present(branch).all()
        for name in ("frobenius", "mass"):
            values = result.tensors[f"{name}.{branch}"]
            assert values.shape[:3] == (3, 2, 2) and torch.isfinite(values).all() and (values > 0).all()
    maps = result.maps("positive", "cat", layer=1)
    assert maps.shape == (3, 2, 8, 8) and (maps.flatten(1).amax(1) > 0).all()
    # the keys are the embedding's tokens: the prompt's own first (no start token), the template's 34 dropped
    assert qwen.attention_layout.text_start_tokens == 0 and qwen.attention_layout.readable
    assert result.index["tokens"]["positive"][0] == {"cat": [4], "glasses": [6]}
    assert result.index["tokens"]["negative"][0] == {"hat": [2]}


@pytest.mark.parametrize("prompt", [PROMPT, "a cat, with (red) glasses", NEGATIVE])
def test_word_positions_are_the_text_keys_of_the_embedding(qwen, prompt):
    """Each word's positions hold its tokens at the text keys: the templated tokens after the first 34; <end> is the
    template's <|im_end|> closing the prompt, and the keys' first position is the prompt's first token."""
    tokenizer = qwen.tokenizer
    keys = qwen.family.text_key_segments(qwen)
    assert keys == [(tokenizer, 0, 512)]
    tokenized = tokenize_words(tokenizer, prompt, 512)
    ids = templated_tokens(tokenizer, prompt)[0][TEMPLATE_TOKENS:]
    assert tokenized.words and len(tokenized.words) == len(prompt.replace(",", "").split())
    for word, positions in zip(tokenized.words, tokenized.positions):
        assert tokenizer.decode([ids[p] for p in positions]).strip().lower().rstrip(",") == word.rstrip(",")
    assert tokenizer.convert_ids_to_tokens(ids[tokenized.end]) == "<|im_end|>" and tokenized.positions[0] == (0,)
    assert len(ids) == tokenized.end + 5  # the embedding's length: the prompt's tokens and the 5 closing ones


# ---------------------------------------------------------------- NAG and VSF


def nag_formula(positive, negative, phi, tau, alpha):
    """Direct: NAG (Chen et al. 2025 §3) per token, L1 ratio clipped at τ, blended with α."""
    extrapolated = phi * positive - (phi - 1) * negative
    ratio = extrapolated.abs().sum(-1, keepdim=True) / positive.abs().sum(-1, keepdim=True)
    return alpha * extrapolated * ratio.clamp(max=tau) / ratio + (1 - alpha) * positive


def direct_qkv(attn, x, added=False):
    """q, k, v (B, S, H, d) as QwenDoubleStreamAttnProcessor2_0 computes them."""
    head_dim = attn.inner_dim // attn.heads
    if added:
        projections, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
    else:
        projections, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
    q, k, v = (p(x).unflatten(-1, (-1, head_dim)) for p in projections)
    return norms[0](q), norms[1](k), v


def direct_attention(q, k, v, kept=None):
    """softmax(q·kᵀ/√d)·v over the kept keys, float64: (B, N, H, d), (B, K, H, d) ×2 → (B, N, H·d)."""
    scores = torch.einsum("bnhd,bkhd->bhnk", q.double(), k.double()) * q.shape[-1] ** -0.5
    if kept is not None:
        scores = scores.masked_fill(~kept[:, None, None, :], float("-inf"))
    return torch.einsum("bhnk,bkhd->bnhd", scores.softmax(-1), v.double()).flatten(2)


def call_with_nag(qwen, rows, guided, negative, combine, keep):
    """One denoiser call under NAG on rows ``guided``: (output, inputs of block 0 and its layer, the layer's output,
    the negative's stream as block 1 receives it)."""
    from negprompt.layers.qwen_image_attention import negative_in_qwen_attention

    transformer, seen = qwen.transformer, {}
    latents = torch.randn(len(rows), 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(0))
    hooks = [
        transformer.get_submodule(path).register_forward_pre_hook(
            lambda m, a, kw, p=path: seen.setdefault(p, dict(kw)) and None, with_kwargs=True
        )
        for path in ("transformer_blocks.0", "transformer_blocks.0.attn")
    ]
    hooks.append(
        transformer.transformer_blocks[0].attn.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    )
    try:
        with (
            torch.no_grad(),
            negative_in_qwen_attention(transformer, guided, {"encoder_hidden_states": negative}, combine),
        ):
            state = transformer.attn_processors["transformer_blocks.0.attn.processor"].state

            def keep_stream(module, args):
                seen.setdefault("stream", state.stream.clone())

            hooks.append(transformer.transformer_blocks[1].register_forward_pre_hook(keep_stream))
            output = qwen.family.denoise(qwen, latents, torch.tensor(700.0), rows, {}) if keep else None
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        plain = qwen.family.denoise(qwen, latents, torch.tensor(700.0), rows, {})
    return output, plain, seen


@pytest.mark.parametrize("beside_a_longer_row", [False, True])
def test_nag_output_of_a_layer_equals_the_formula_and_the_negative_stream_moves_as_the_blocks_move_text(
    qwen, beside_a_longer_row
):
    """Block 0's image output under NAG equals to_out(NAG(Z⁺, Z⁻)) written out from the processor's own q, k, v
    (Z⁺ over [text; image] with the row's text mask, Z⁻ over [negative text; image], the negative's token j at text
    position j); the negative's stream after the block is the block's own text output on it; a row beside the
    positive's (padded text, a mask) is left as it is."""
    from negprompt.guidance.attention_processors import nag_combine

    family, transformer, (phi, tau, alpha) = qwen.family, qwen.transformer, (4.0, 2.5, 0.5)
    positive, negative = (family.encode_one(qwen, PromptInput(text)) for text in (PROMPT, NEGATIVE))
    longer = family.encode_one(qwen, PromptInput("a photo of a cat with glasses on a sunny street"))
    rows, guided = ([longer, positive], slice(1, 2)) if beside_a_longer_row else ([positive, positive], slice(0, 2))
    states = torch.cat([negative.hidden_states] * (guided.stop - guided.start))
    output, plain, seen = call_with_nag(qwen, rows, guided, states, nag_combine(phi, tau, alpha), keep=True)
    assert (output[guided] - plain[guided]).abs().max() > 1e-3  # NAG is not a no-op
    assert torch.equal(output[: guided.start], plain[: guided.start])  # the other row: as without NAG
    block, given = transformer.transformer_blocks[0], seen["transformer_blocks.0.attn"]
    attn, mask = block.attn, given["encoder_hidden_states_mask"]
    assert (mask is not None) == beside_a_longer_row
    kept = None if mask is None else mask[guided].bool()
    image_freqs, text_freqs = given["image_rotary_emb"]
    negative_freqs = text_freqs[: states.shape[1]]  # token j of any prompt sits at text position j
    temb = seen["transformer_blocks.0"]["temb"][guided]
    with torch.no_grad():
        start = transformer.txt_in(transformer.txt_norm(states))
        shift, scale, _ = block.txt_mod(temb).chunk(2, dim=-1)[0].chunk(3, dim=-1)
        negative_text = block.txt_norm1(start) * (1 + scale[:, None]) + shift[:, None]
        qi, ki, vi = direct_qkv(attn, given["hidden_states"][guided])
        _, kt, vt = direct_qkv(attn, given["encoder_hidden_states"][guided], added=True)
        _, kn, vn = direct_qkv(attn, negative_text, added=True)
        rotated = apply_rotary_emb_qwen
        qi, ki = rotated(qi, image_freqs, use_real=False), rotated(ki, image_freqs, use_real=False)
        kt, kn = rotated(kt, text_freqs, use_real=False), rotated(kn, negative_freqs, use_real=False)
        positive_keys = None if kept is None else torch.cat([kept, torch.ones(kept.shape[0], ki.shape[1]).bool()], 1)
        z_pos = direct_attention(qi, torch.cat([kt, ki], 1), torch.cat([vt, vi], 1), positive_keys)
        z_neg = direct_attention(qi, torch.cat([kn, ki], 1), torch.cat([vn, vi], 1))
        expected = attn.to_out[0](nag_formula(z_pos, z_neg, phi, tau, alpha).float())
        assert (seen["out"][0][guided] - expected).abs().max() <= 1e-5
        if not beside_a_longer_row:
            kwargs = {
                **seen["transformer_blocks.0"],
                "encoder_hidden_states": start,
                "encoder_hidden_states_mask": None,
            }
            moved, _ = block(**{**kwargs, "image_rotary_emb": (image_freqs, negative_freqs)})
            assert (seen["stream"] - moved).abs().max() <= 1e-5


def nag_spec(session, rule="nag", **kwargs):
    options = dict(steps=3, size=(HEIGHT, WIDTH), seeds=(3,), scale=1.0, rule=rule)
    return session.spec(PROMPT, NEGATIVE, **{**options, **kwargs})


def test_nag_and_vsf_change_the_image_in_one_pass_at_scale_one_and_neutral_settings_are_plain(qwen):
    session = Session(qwen)
    plain = session.run(session.spec(PROMPT, steps=3, size=(HEIGHT, WIDTH), seeds=(3,), scale=1.0, rule="cfg"))
    for rule, neutral in (("nag", {"phi": 1.0}), ("nag", {"alpha": 0.0}), ("vsf", {"scale": 0.0})):
        assert np.array_equal(session.run(nag_spec(session, rule, rule_settings=neutral)).pixels, plain.pixels)
    for rule in ("nag", "vsf"):
        run = session.run(nag_spec(session, rule))
        assert run.unet_batch_rows == 3  # one pass a step: the positive's row
        # measured 2·10⁻³ (NAG) and 4·10⁻³ (VSF): the tiny model reads text weakly; neutral: 0
        assert np.abs(run.pixels - plain.pixels).max() > 5e-4, rule
    silenced = session.run(nag_spec(session, "vsf", rule_settings={"offset": -1e4}))  # the negative's keys off
    assert np.abs(silenced.pixels - plain.pixels).max() <= 1e-5


def test_nag_with_cfg_guides_around_the_guided_positive_and_capture_records_the_negative(qwen):
    """At s = 4 NAG is CFG around the guided positive (two rows a step, the empty prompt's row padded beside the
    positive's: a text mask in every layer); capture during NAG keeps the image and records the negative."""
    session = Session(qwen)
    cfg = session.run(session.spec(PROMPT, steps=3, size=(HEIGHT, WIDTH), seeds=(3,), scale=4.0, rule="sd"))
    spec = nag_spec(session, scale=4.0)
    run = session.run(spec)
    assert run.unet_batch_rows == 6 and np.abs(run.pixels - cfg.pixels).max() > 5e-4
    result = capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)
    assert np.array_equal(result.generation.pixels, run.pixels)
    assert result.tensors["present.negative"].all()
    frobenius = result.tensors["frobenius.negative"]
    assert torch.isfinite(frobenius).all() and (frobenius > 0).all()
