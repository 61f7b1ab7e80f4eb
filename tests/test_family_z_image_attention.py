"""Z-Image's attention on a tiny random model built from configs: the layout reads and changes the main single-stream
layers, the recorded probabilities equal the softmax of the layer's own queries and keys, capture on both branches
leaves the images bit-identical; NAG's layer output equals its formula (Chen et al. 2025 §3) and NAG/VSF act in one
pass. The images against diffusers, rules, prompts, loading and the CLI are in test_family_z_image.py."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from test_family_z_image import HEIGHT, NEGATIVE, PROMPT, SEEDS, WIDTH

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.models.conditioning import PromptInput
from negprompt.session import Session
from negprompt.testing.tiny_z_image import build_tiny_z_image


@pytest.fixture(scope="module")
def z_image():
    return build_tiny_z_image(seed=0)


# ---------------------------------------------------------------- attention


class ListRecorder:
    """A recorder that keeps every layer's probabilities (the Recorder protocol of negprompt.layers.readers)."""

    def __init__(self, text_length: int) -> None:
        self.active, self.text_length = True, text_length
        self.records: list[tuple[str, torch.Tensor, int]] = []

    def record(self, path: str, probabilities: torch.Tensor, heads: int) -> None:
        self.records.append((path, probabilities, heads))


def test_the_layout_reads_and_changes_the_main_layers(z_image):
    layout = z_image.attention_layout
    assert (layout.kind, layout.readable, layout.changeable) == ("joint", True, True)
    assert (layout.patch, layout.text_start_tokens) == (2, 3)  # <|im_start|>, user, newline lead the caption
    assert layout.reader.paths(z_image.transformer) == ["layers.0.attention", "layers.1.attention"]


def test_recorded_probabilities_equal_the_softmax_of_the_layers_own_queries_and_keys(z_image, monkeypatch):
    """Rows of different caption lengths (a batch mask) and image tokens not a multiple of 32 (image pads between
    image and caption keys): each row's probabilities are softmax(q·kᵀ/√d) over every unmasked key of the q and k
    the layer's own processor hands to its attention kernel, the caption's L_i keys in token order, zeros after."""
    from diffusers.models.transformers import transformer_z_image

    from negprompt.layers.processors import installed

    transformer, family = z_image.transformer, z_image.family
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    kernel = transformer_z_image.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((query, key, attn_mask))
        return kernel(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_z_image, "dispatch_attention_fn", spy)
    long_prompt = " ".join(["cat"] * 30)  # 45 templated tokens: padded to 64; the negative's 18 to 32
    rows = [family.encode_one(z_image, PromptInput(text)) for text in (NEGATIVE, long_prompt)]
    lengths = [row.hidden_states.shape[1] for row in rows]
    assert lengths == [18, 45]  # the tiny vocabulary spells "assistant" in pieces
    reader, text_length = z_image.attention_layout.reader, 64
    recorder, paths = ListRecorder(text_length), reader.paths(transformer)
    latents = torch.randn(2, 4, 16, 20, generator=torch.Generator().manual_seed(0))  # 8 × 10 = 80 image tokens
    with torch.no_grad():
        plain = family.denoise(z_image, latents, torch.tensor(700.0), rows, {})
        seen.clear()

        def make(path, original):
            return reader.capture_processor(path, original, recorder) if path in paths else None

        with installed(transformer, make), reader.capturing(transformer):
            captured = family.denoise(z_image, latents, torch.tensor(700.0), rows, {})
    assert torch.equal(captured, plain)  # the layer's own processor computes the output
    assert not transformer._forward_pre_hooks  # the hook is gone
    assert [path for path, _, _ in recorder.records] == paths
    images, caption_start = 80, 96
    for (_, probabilities, heads), (query, key, mask) in zip(recorder.records, seen[-len(paths) :]):
        assert mask is not None and probabilities.shape == (2 * heads, images, text_length)
        q, k = query.transpose(1, 2).float(), key.transpose(1, 2).float()  # (B, H, S, d)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        reference = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # mask (B, 1, 1, S), as the kernel gets it
        recorded = probabilities.reshape(2, heads, images, text_length)
        for i, length in enumerate(lengths):
            expected = reference[i, :, :images, caption_start : caption_start + length]
            assert torch.allclose(recorded[i, :, :, :length], expected, atol=1e-5)
            assert recorded[i, :, :, length:].abs().max() == 0
            assert 0 < float(expected.sum(-1).min()) < 1  # the image and pad keys take the rest


def test_capture_records_both_branches_at_the_words_tokens_and_leaves_images_bit_identical(z_image):
    session = Session(z_image)
    spec = session.spec(PROMPT, NEGATIVE, scale=4.0, steps=3, size=(HEIGHT, WIDTH), seeds=list(SEEDS))
    plain = session.run(spec).images
    words = CaptureRequest({"positive": ["cat", "glasses"], "negative": ["hat"]}, average_layers=False)
    result = capture(spec, words, session, reducer=reduce_layer)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.generation.images, plain))
    assert [layer["path"] for layer in result.index["layers"]] == ["layers.0.attention", "layers.1.attention"]
    for branch, word in (("positive", "cat"), ("positive", "glasses"), ("negative", "hat")):
        assert torch.isfinite(result.frobenius(branch, word)).all() and (result.frobenius(branch, word) > 0).all()
        assert float(result.maps(branch, word).abs().amax()) > 0
    # Key j is token j of the templated prompt: <|im_start|> user \n a photo of a cat with glasses <|im_end|> …
    tokenizer = z_image.tokenizer
    for branch, text, word in (("positive", PROMPT, "cat"), ("negative", NEGATIVE, "hat")):
        ids = tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
        ).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for image in range(len(SEEDS)):
            (position,) = result.index["tokens"][branch][image][word]
            assert tokens[position] == "Ġ" + word
    assert result.index["tokens"]["positive"][0] == {"cat": [7], "glasses": [9]}
    assert result.index["tokens"]["negative"][0] == {"hat": [5]}


# ---------------------------------------------------------------- NAG and VSF


def nag_formula(positive, negative, phi, tau, alpha):
    """Direct: NAG (Chen et al. 2025 §3) per token, L1 ratio clipped at τ, blended with α."""
    extrapolated = phi * positive - (phi - 1) * negative
    ratio = extrapolated.abs().sum(-1, keepdim=True) / positive.abs().sum(-1, keepdim=True)
    return alpha * extrapolated * ratio.clamp(max=tau) / ratio + (1 - alpha) * positive


def direct_qkv(attn, x, freqs):
    """q, k, v (B, S, H, d) as ZSingleStreamAttnProcessor computes them (RMSNorms, complex rotary positions)."""
    q, k, v = (p(x).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)

    def rotated(t):
        pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3)

    return rotated(q), rotated(k), v


def direct_attention(q, k, v):
    """softmax(q·kᵀ/√d)·v, float64: (B, N, H, d), (B, K, H, d) ×2 → (B, N, H·d)."""
    scores = torch.einsum("bnhd,bkhd->bhnk", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.einsum("bhnk,bkhd->bnhd", scores.softmax(-1), v.double()).flatten(2)


def first_main_layer(z_image, rows, latents, nag=None):
    """One denoiser call (under ``nag``: (rows, negative states, combine)): (output, block 0's inputs, its
    layer's inputs and output, the negative's stream as block 1 receives it)."""
    from negprompt.layers.z_image_attention import negative_in_z_image_attention

    transformer, seen = z_image.transformer, {}
    hooks = [
        transformer.layers[0].register_forward_pre_hook(lambda m, a: seen.setdefault("block", a) and None),
        transformer.layers[0].attention.register_forward_pre_hook(
            lambda m, a, kw: seen.setdefault("layer", (a, kw)) and None, with_kwargs=True
        ),
        transformer.layers[0].attention.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.clone())),
    ]
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if nag is not None:
                guided, states, combine = nag
                stack.enter_context(
                    negative_in_z_image_attention(transformer, guided, {"encoder_hidden_states": states}, combine)
                )
                state = transformer.get_submodule("layers.0.attention").processor.state

                def keep_stream(module, args):
                    seen.setdefault("stream", state.stream.clone())

                hooks.append(transformer.layers[1].register_forward_pre_hook(keep_stream))
            output = z_image.family.denoise(z_image, latents, torch.tensor(700.0), rows, {})
    finally:
        for hook in hooks:
            hook.remove()
    return output, seen


@pytest.mark.parametrize("beside_a_longer_row", [False, True])
def test_nag_output_of_a_main_layer_equals_the_formula_and_the_negative_caption_moves_as_the_blocks_move_it(
    z_image, beside_a_longer_row
):
    """Layer 0's image output under NAG equals to_out(NAG(Z⁺, Z⁻)) written out from the processor's own q, k, v:
    Z⁺ over the row's [image; caption] keys (pads included), Z⁻ over [image; negative caption], the negative's
    caption as the transformer refines a caption alone (read from a plain call on it); its caption output is the
    plain layer's; the negative's stream after the block is the block's own output on [image; negative caption].
    Beside a longer row (batch padding, a mask) with a negative longer than the positive (64 keys beside 32), the
    other row is left as it is."""
    from negprompt.guidance.attention_processors import nag_combine

    family, (phi, tau, alpha) = z_image.family, (4.0, 2.5, 0.5)
    long_text = " ".join(["cat"] * 30)  # 45 templated tokens: 64 keys
    positive = family.encode_one(z_image, PromptInput(PROMPT))
    negative = family.encode_one(z_image, PromptInput(long_text if beside_a_longer_row else NEGATIVE))
    longer = family.encode_one(z_image, PromptInput(long_text))
    rows, guided = ([longer, positive], slice(1, 2)) if beside_a_longer_row else ([positive, positive], slice(0, 2))
    count = guided.stop - guided.start
    states = torch.cat([negative.hidden_states] * count)
    latents = torch.randn(2, 4, 16, 20, generator=torch.Generator().manual_seed(0))  # 80 image tokens, 96 with pads
    images, caption_start = 80, 96
    plain, plain_seen = first_main_layer(z_image, rows, latents)
    output, seen = first_main_layer(z_image, rows, latents, (guided, states, nag_combine(phi, tau, alpha)))
    _, alone = first_main_layer(z_image, [negative] * count, latents[guided])
    assert (output[guided] - plain[guided]).abs().max() > 1e-3  # NAG is not a no-op
    assert torch.equal(output[: guided.start], plain[: guided.start])  # the other row: as without NAG
    block = z_image.transformer.layers[0]
    (hidden,), kwargs = seen["layer"]
    x, mask, freqs, adaln = seen["block"][:4]
    assert (mask is not None) == beside_a_longer_row
    end = caption_start + 32  # the positive's caption: 22 tokens and 10 pads
    negative_end = caption_start + (64 if beside_a_longer_row else 32)
    start, negative_freqs = (t[:, caption_start:negative_end] for t in (alone["block"][0], alone["block"][2]))
    with torch.no_grad():
        q, k, v = direct_qkv(block.attention, hidden[guided, :end], kwargs["freqs_cis"][guided, :end])
        scale_msa = 1.0 + block.adaLN_modulation(adaln[guided]).unsqueeze(1).chunk(4, dim=2)[0]
        _, kn, vn = direct_qkv(block.attention, block.attention_norm1(start) * scale_msa, negative_freqs)
        query, image_keys, image_values = q[:, :caption_start], k[:, :caption_start], v[:, :caption_start]
        z_pos = direct_attention(query, k, v)
        z_neg = direct_attention(query, torch.cat([image_keys, kn], 1), torch.cat([image_values, vn], 1))
        expected = block.attention.to_out[0](nag_formula(z_pos, z_neg, phi, tau, alpha).float())
        assert (seen["out"][guided, :caption_start] - expected).abs().max() <= 1e-5
        assert (
            seen["out"][guided, caption_start:end] - plain_seen["out"][guided, caption_start:end]
        ).abs().max() <= 1e-5
        assert images < caption_start  # the image's pad tokens are queries of the combination too
        if not beside_a_longer_row:
            joined = torch.cat([x[guided, :caption_start], start], 1)
            moved = block(joined, None, torch.cat([freqs[guided, :caption_start], negative_freqs], 1), adaln[guided])
            assert (seen["stream"] - moved[:, caption_start:]).abs().max() <= 1e-5


def nag_spec(session, rule="nag", **kwargs):
    options = dict(steps=3, size=(HEIGHT, WIDTH), seeds=(3,), scale=1.0, rule=rule)
    return session.spec(PROMPT, NEGATIVE, **{**options, **kwargs})


def test_nag_and_vsf_change_the_image_in_one_pass_at_scale_one_and_neutral_settings_are_plain(z_image):
    session = Session(z_image)
    plain = session.run(session.spec(PROMPT, steps=3, size=(HEIGHT, WIDTH), seeds=(3,), scale=1.0, rule="sd"))
    for rule, neutral in (("nag", {"phi": 1.0}), ("nag", {"alpha": 0.0}), ("vsf", {"scale": 0.0})):
        assert np.array_equal(session.run(nag_spec(session, rule, rule_settings=neutral)).pixels, plain.pixels)
    for rule in ("nag", "vsf"):
        run = session.run(nag_spec(session, rule))
        assert run.unet_batch_rows == 3  # one pass a step: the positive's row
        assert np.abs(run.pixels - plain.pixels).max() > 1e-3, rule  # measured 3·10⁻² (NAG), 1·10⁻¹ (VSF)
    silenced = session.run(nag_spec(session, "vsf", rule_settings={"offset": -1e4}))  # the negative's keys off
    assert np.abs(silenced.pixels - plain.pixels).max() <= 1e-5


def test_nag_with_cfg_and_truncation_guides_around_the_guided_positive_and_capture_records_the_negative(z_image):
    """At s = g + 1 = 4 NAG is CFG around the guided positive (two rows a step; the empty prompt's caption and the
    positive's differ in length: a batch mask); with the pipeline's truncation as an interval the steps after it
    are the positive alone, as without NAG; capture during NAG keeps the image and records the negative."""
    session = Session(z_image)
    spec = nag_spec(session, scale=4.0)
    run = session.run(spec, trace=True)
    cfg = session.run(session.spec(PROMPT, steps=3, size=(HEIGHT, WIDTH), seeds=(3,), scale=4.0, rule="sd"))
    assert run.unet_batch_rows == 6 and np.abs(run.pixels - cfg.pixels).max() > 1e-3
    truncated = session.run(nag_spec(session, scale=4.0, interval="0:1"), trace=True)
    assert torch.equal(truncated.trace[0].guided, run.trace[0].guided) and truncated.unet_batch_rows == 2 + 2
    result = capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)
    assert np.array_equal(result.generation.pixels, run.pixels)
    assert result.tensors["present.negative"].all()
    frobenius = result.tensors["frobenius.negative"]
    assert torch.isfinite(frobenius).all() and (frobenius > 0).all()
