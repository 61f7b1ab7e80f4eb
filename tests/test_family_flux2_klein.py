"""FLUX.2 [klein] on a tiny random model built from configs: images equal diffusers' Flux2KleinPipeline (with and
without a negative, base and step-distilled), loading from a saved folder, rules on velocities, windows and
AUTOMATIC1111 syntax, the command line with --from-png, bad input in one line; its attention read (capture) and
changed (NAG, VSF at CFG 1), each checked against a direct computation on one layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules.base import GuidanceError
from negprompt.interfaces.cli import main
from negprompt.layers.flux2_klein_attention import Flux2KleinReader
from negprompt.models.conditioning import PromptInput
from negprompt.models.families import family_for_index, family_for_parts
from negprompt.models.flux2_klein import DistilledGuidanceError, Flux2KleinFamily, chat_text, token_weights
from negprompt.models.loading import load_components
from negprompt.models.prompts import PromptError
from negprompt.models.saving import save_components
from negprompt.runspec import SettingsError
from negprompt.sampling.loop import Group, encode_groups, sample_groups
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session
from negprompt.testing.tiny_flux2_klein import build_tiny_flux2_klein, flux2_klein_pipeline

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
SEEDS = (3, 11)
HEIGHT, WIDTH, STEPS = 32, 48, 4  # non-square: 8 × 12 tokens of 4 × 4 pixels
TOKENS = 48  # the tiny tokenizer's limit: the model's max_sequence_length here


@pytest.fixture(scope="module")
def klein():
    return build_tiny_flux2_klein(seed=0)


@pytest.fixture(scope="module")
def distilled():
    return build_tiny_flux2_klein(seed=1, distilled=True)


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory, klein):
    return save_components(klein, tmp_path_factory.mktemp("tiny-klein"))


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory, distilled):
    return save_components(distilled, tmp_path_factory.mktemp("tiny-klein-distilled"))


def ours(components, guidance, seeds=SEEDS, **kwargs):
    groups = [Group(guidance, seeds)]
    conditioning = encode_groups(
        components, groups, make_scheduler("default", components.scheduler), STEPS, HEIGHT, WIDTH
    )
    scheduler = make_scheduler("default", components.scheduler)
    return sample_groups(components, groups, scheduler, STEPS, HEIGHT, WIDTH, conditioning=conditioning, **kwargs)


def theirs(components, **kwargs) -> np.ndarray:
    pipe = flux2_klein_pipeline(components)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(
        prompt=[PROMPT] * len(SEEDS),
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        generator=generators,
        output_type="np",
        max_sequence_length=TOKENS,
        **kwargs,
    ).images


def plain(scale: float = 1.0, **kwargs) -> Guidance:
    return Guidance(positive=Term(PROMPT), scale=scale, rule="cfg", **kwargs)


def with_negative(negative: str = NEGATIVE, scale: float = 4.0, **kwargs) -> Guidance:
    return Guidance(positive=Term(PROMPT), negatives=(Term(negative, **kwargs),), scale=scale)


# ---------------------------------------------------------------- equal to diffusers


def test_without_a_negative_images_equal_the_pipeline_in_one_pass_and_with_cfg_on_the_empty_prompt(klein):
    alone = ours(klein, plain())
    assert alone.unet_batch_rows == len(SEEDS) * STEPS  # scale 1: the pipeline's single pass
    assert alone.images.shape == (2, HEIGHT, WIDTH, 3) and alone.images.std() > 0.01
    assert np.abs(alone.images - theirs(klein, guidance_scale=1.0)).max() <= 1e-4
    guided = ours(klein, plain(4.0)).images  # the pipeline's CFG: the negative is "" through the same encoder
    assert np.abs(guided - theirs(klein, guidance_scale=4.0)).max() <= 1e-4
    assert np.abs(guided - alone.images).max() > 1e-3


def test_a_negative_equals_the_pipeline_given_its_own_encoding_of_the_negative(klein):
    pipe = flux2_klein_pipeline(klein)
    negative_embeds, _ = pipe.encode_prompt(NEGATIVE, max_sequence_length=TOKENS)
    mine = ours(klein, with_negative(scale=4.0))
    assert mine.unet_batch_rows == 2 * len(SEEDS) * STEPS  # the negative replaces ∅: two rows per image
    reference = theirs(klein, guidance_scale=4.0, negative_prompt_embeds=negative_embeds.repeat(len(SEEDS), 1, 1))
    assert np.abs(mine.images - reference).max() <= 1e-4
    assert np.abs(mine.images - ours(klein, plain(4.0)).images).max() > 1e-3  # the negative is not ""


def test_prompt_encoding_is_the_pipelines_and_weights_scale_the_prompts_tokens(klein):
    pipe = flux2_klein_pipeline(klein)
    encode = klein.family.encode_one
    reference, text_ids = pipe.encode_prompt(PROMPT, max_sequence_length=TOKENS)
    mine = encode(klein, PromptInput(PROMPT)).hidden_states
    assert mine.shape == (1, TOKENS, 3 * 16) and torch.equal(mine, reference)
    assert text_ids.shape == (1, TOKENS, 4)
    assert torch.equal(encode(klein, PromptInput(f"({PROMPT}:1.0)")).hidden_states, mine)
    weights = token_weights(klein.tokenizer, [("a photo of a ", 1.0), ("cat", 1.3), (" with glasses", 1.0)], TOKENS)
    tokens = klein.tokenizer.convert_ids_to_tokens(pipe.tokenizer(_chat(klein, PROMPT)).input_ids)
    assert [t for t, w in zip(tokens, weights) if w != 1.0] == ["Ġcat"]  # the space before a word is its token's
    weighted = encode(klein, PromptInput("a photo of a (cat:1.3) with glasses")).hidden_states
    assert not torch.allclose(weighted, mine)


def _chat(components, text):
    return chat_text(components.tokenizer, text)


def test_a_step_distilled_klein_runs_one_pass_as_the_pipeline_and_refuses_guidance_in_one_line(klein, distilled):
    session = Session(distilled)
    assert (session.defaults["scale"], session.defaults["steps"]) == (1.0, 50)
    assert (Session(klein).defaults["scale"], Session(klein).defaults["steps"]) == (4.0, 50)  # the pipeline's
    mine = ours(distilled, plain())
    # The pipeline ignores a scale on a distilled model (and warns): the same single pass.
    assert np.abs(mine.images - theirs(distilled, guidance_scale=4.0)).max() <= 1e-4
    for options in ({"scale": 4.0}, {"rule": "dual", "scale": 1.0, "negative_scales": [2.0]}):
        with pytest.raises(DistilledGuidanceError, match="step-distilled") as error:
            session.spec(PROMPT, NEGATIVE, steps=STEPS, size=32, **options)
        assert "\n" not in str(error.value)
    one_pass = session.run(session.spec(PROMPT, NEGATIVE, steps=2, size=32, seeds=(1,)))  # scale 1: the prompt alone
    assert one_pass.unet_batch_rows == 2 and session.unused_negatives(one_pass.spec) == [NEGATIVE]


# ---------------------------------------------------------------- loading


def test_a_saved_folder_loads_back_as_klein_and_gives_the_same_images(klein, klein_dir, distilled_dir):
    import json

    index = json.loads((klein_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert isinstance(family_for_index(index), Flux2KleinFamily) and isinstance(
        family_for_parts(klein), Flux2KleinFamily
    )
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in klein_dir.rglob("*"))
    loaded = load_components(klein_dir)
    assert loaded.family.name == "flux2-klein" and loaded.unet is None
    guidance = with_negative(scale=3.0)
    assert np.array_equal(ours(loaded, guidance).images, ours(klein, guidance).images)
    assert load_components(distilled_dir).pipeline_options["is_distilled"] is True
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(klein_dir, use_safetensors=True, local_files_only=True)
    assert pipe.config.is_distilled is False and pipe.tokenizer.chat_template == klein.tokenizer.chat_template
    theirs_weights, ours_weights = pipe.transformer.state_dict(), klein.transformer.state_dict()
    assert all(torch.equal(theirs_weights[k], ours_weights[k]) for k in ours_weights)
    assert torch.equal(pipe.vae.bn.running_var, klein.vae.bn.running_var)


# ---------------------------------------------------------------- rules, windows, prompt syntax


def test_rules_on_velocities_run_and_the_others_are_refused_in_one_line(klein):
    session = Session(klein)
    options = dict(steps=STEPS, size=32, seeds=(1,))
    base = session.run(session.spec(PROMPT, NEGATIVE, scale=4.0, **options), trace=True)
    for info in base.trace:  # rule sd: v̂ = v_ỹ + s(v_y − v_ỹ) on the velocity branches
        positive, negative = info.predictions["positive"], info.predictions["negative"]
        assert torch.allclose(info.guided, negative + 4.0 * (positive - negative), atol=1e-6)
    # dual: v_∅ + s⁺(v_y − v_∅) − s⁻(v_ỹ − v_∅); s⁻ = s⁺ − 1 is rule sd (eq. (8) reduces to (9)).
    dual = session.run(session.spec(PROMPT, NEGATIVE, rule="dual", scale=4.0, negative_scales=[3.0], **options))
    assert np.abs(dual.pixels - base.pixels).max() <= 1e-4
    stronger = session.run(session.spec(PROMPT, NEGATIVE, rule="dual", scale=4.0, negative_scales=[6.0], **options))
    assert np.abs(stronger.pixels - base.pixels).max() > 1e-3
    two = [NEGATIVE, "glasses"]
    for rule, negatives, extra in (
        ("perp-neg", two, {}),
        ("weighted", two, {}),
        ("cfg-zero-star", NEGATIVE, {}),
        ("sd", NEGATIVE, {"rescale": 0.7, "interval": "1:3"}),
    ):
        run = session.run(session.spec(PROMPT, negatives, rule=rule, scale=4.0, **options, **extra))
        assert np.isfinite(run.pixels).all() and np.abs(run.pixels - base.pixels).max() > 1e-3
    for rule, message in (
        ("dng", "not exact on the velocity predictions"),
        ("apg", "not exact on the velocity predictions"),
    ):
        with pytest.raises(GuidanceError, match=message) as error:
            session.spec(PROMPT, NEGATIVE, rule=rule, scale=4.0, **options)
        assert "\n" not in str(error.value)


def test_klein_declares_joint_attention_read_by_its_own_reader_with_the_templates_tokens_first(klein):
    layout = klein.attention_layout
    assert (layout.kind, layout.text_start_tokens, layout.patch) == ("joint", 3, 1)
    assert layout.readable and layout.changeable and isinstance(layout.reader, Flux2KleinReader)
    ids = klein.tokenizer(_chat(klein, PROMPT)).input_ids
    assert klein.tokenizer.convert_ids_to_tokens(ids[:4]) == ["<|im_start|>", "user", "Ċ", "a"]  # the template's 3
    assert layout.reader.paths(klein.transformer) == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]


def test_a_negative_window_and_prompt_editing_act_from_their_step_and_equal_each_other(klein):
    empty = ours(klein, plain(4.0), keep_trace=True).trace  # before the window: v_∅ stands in for v_ỹ
    windowed = ours(klein, with_negative(window=_window("2:")), keep_trace=True)
    edited = ours(klein, with_negative(f"[{NEGATIVE}:2]"), keep_trace=True)
    assert np.array_equal(windowed.images, edited.images)
    for step in range(2):
        assert torch.equal(windowed.trace[step].guided, empty[step].guided)
    assert not torch.allclose(windowed.trace[2].guided, empty[2].guided)


def test_a1111_weights_and_edits_change_images_where_they_should(klein):
    reference = ours(klein, with_negative()).images
    same = (
        Guidance(positive=Term(f"({PROMPT}:1.0)"), negatives=(Term(NEGATIVE),), scale=4.0),
        Guidance(positive=Term(PROMPT), negatives=(Term(f"({NEGATIVE}:1.0)"),), scale=4.0),
        Guidance(positive=Term("a photo of a [cat:cat:0.5] with glasses"), negatives=(Term(NEGATIVE),), scale=4.0),
    )
    for guidance in same:
        assert np.array_equal(ours(klein, guidance).images, reference)
    changed = (
        Guidance(positive=Term("a photo of a (cat:1.3) with glasses"), negatives=(Term(NEGATIVE),), scale=4.0),
        Guidance(positive=Term(PROMPT), negatives=(Term("a (red:1.4) hat"),), scale=4.0),
    )
    for guidance in changed:  # measured 3·10⁻⁴ and 8·10⁻⁵ (the tiny model reads text weakly); equal above: 0
        assert np.abs(ours(klein, guidance).images - reference).max() > 2e-5
    dog = "a photo of a dog"
    first = ours(klein, Guidance(positive=Term(dog), negatives=(Term(NEGATIVE),), scale=4.0), keep_trace=True).trace
    switched = Guidance(positive=Term(f"[{dog}:{PROMPT}:0.5]"), negatives=(Term(NEGATIVE),), scale=4.0)
    trace = ours(klein, switched, keep_trace=True).trace  # the dog's prompt for steps 0–1, then the cat's
    assert all(torch.equal(trace[s].guided, first[s].guided) for s in range(2))
    assert not torch.allclose(trace[2].guided, first[2].guided)


def _window(text):
    from negprompt.guidance.windows import Window

    return Window.parse(text)


# ---------------------------------------------------------------- the command line


def test_cli_generate_on_a_klein_folder_and_again_from_the_png(klein_dir, tmp_path):
    out = tmp_path / "klein.png"
    args = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(klein_dir), "--steps", "3", "--size", "32"]
    assert main([*args, "--negative-window", "1:", "-q", "--out", str(out)]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cli_refuses_bad_input_on_klein_in_one_line(klein_dir, distilled_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["generate", PROMPT, "-n", NEGATIVE, "--steps", "2", "--size", "32", "-q", "--out", str(out)]
    cases = (
        (["--model", str(klein_dir), "--negative-2", "glasses"], "option(s) of SDXL, SD3 and FLUX models"),
        (["--model", str(klein_dir), "--prompt-2", "a dog"], "option(s) of SDXL, SD3 and FLUX models"),
        (["--model", str(klein_dir), "--embedded-guidance", "3.5"], "takes no guidance scale as an input"),
        (["--model", str(klein_dir), "--rule", "dng"], "not exact on the velocity predictions"),
        (["--model", str(distilled_dir), "--scale", "4"], "is step-distilled"),
    )
    for extra, message in cases:
        assert_usage_error(main([*base, *extra]), capsys, message, out)
    long_prompt = " ".join(["cat"] * 40)  # 40 tokens, 52 in the template: the last 4 would be cut
    code = main(["generate", long_prompt, *base[2:], "--model", str(klein_dir)])
    assert_usage_error(code, capsys, f"over the model's limit of {TOKENS} (max_sequence_length)", out)
    code = main(["generate", PROMPT, "-n", long_prompt, *base[4:], "--model", str(klein_dir)])
    assert_usage_error(code, capsys, "these words would be cut: 'cat cat cat cat'", out)


def test_prompt_length_limit_counts_the_template(klein):
    encode = klein.family.encode_one
    fits = " ".join(["cat"] * 36)  # 36 + 12 template tokens = the limit: encoded whole, as the pipeline does
    pipe = flux2_klein_pipeline(klein)
    assert torch.equal(
        encode(klein, PromptInput(fits)).hidden_states, pipe.encode_prompt(fits, max_sequence_length=TOKENS)[0]
    )
    with pytest.raises(PromptError, match="prompt is 37 tokens, 49 in Qwen's chat template.*cut: 'cat'"):
        encode(klein, PromptInput(fits + " cat"))
    with pytest.raises(SettingsError, match="option.*of SDXL, SD3 and FLUX models"):
        Session(klein).spec(PROMPT, NEGATIVE, negative_2="glasses", steps=2, size=32)


# ---------------------------------------------------------------- attention: capture, NAG and VSF at CFG 1


def _qkv(attn, x, added=False):
    """Direct: a FLUX.2 layer's q, k, v (B, N, H, d) as diffusers' processors compute them (unfused)."""
    if type(attn).__name__ == "Flux2ParallelSelfAttention":
        q, k, v = attn.to_qkv_mlp_proj(x)[..., : 3 * attn.inner_dim].chunk(3, dim=-1)
        norms = attn.norm_q, attn.norm_k
    elif added:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
        norms = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        norms = attn.norm_q, attn.norm_k
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    return norms[0](q), norms[1](k), v


def _rotated(x, rotary):
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=1)


def _softmax_rows(q, k, mask=None):
    """softmax over all keys of q·kᵀ/√d: (B, N, H, d), (B, K, H, d) → (B, H, N, K)."""
    scores = torch.einsum("bnhd,bkhd->bhnk", q.double(), k.double()) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def _layer_inputs(transformer, paths):
    """Forward pre-hooks keeping each module's first call's keyword inputs."""
    seen = {}

    def keep(path):
        return lambda module, args, kwargs: seen.setdefault(path, dict(kwargs)) and None

    hooks = [transformer.get_submodule(p).register_forward_pre_hook(keep(p), with_kwargs=True) for p in paths]
    return seen, hooks


def _call(components, hidden, seed=5):
    """One denoiser call of the family on a random 8 × 12-token latent at t = 700."""
    torch.manual_seed(seed)
    from negprompt.models.conditioning import Conditioning

    latents = torch.randn(hidden.shape[0], 16, HEIGHT // 4, WIDTH // 4)
    rows = [Conditioning(h[None]) for h in hidden]
    with torch.no_grad():
        return components.family.denoise(components, latents, torch.tensor(700.0), rows, {})


def test_captured_probabilities_equal_the_softmax_over_all_keys_and_capture_keeps_the_image(klein):
    session = Session(klein)
    spec = session.spec(PROMPT, steps=2, size=32, seeds=SEEDS, scale=1.0, rule="cfg")
    kept = []

    def reducer(probabilities, selection, hw, size):
        kept.append(probabilities.clone())
        return {}

    paths = klein.attention_layout.reader.paths(klein.transformer)
    inputs, hooks = _layer_inputs(klein.transformer, paths)
    try:
        result = capture(spec, CaptureRequest({"positive": ["cat"]}, steps=[0]), session, reducer=reducer)
    finally:
        for hook in hooks:
            hook.remove()
    assert np.array_equal(result.generation.pixels, session.run(spec).pixels)  # bit-identical without capture
    assert len(kept) == 3 and all(p.shape == (2, 2, 8 * 8, TOKENS) for p in kept)
    for path, recorded in zip(paths, kept):  # direct: softmax over ALL keys [text; image], then the text block
        attn, given = klein.transformer.get_submodule(path), inputs[path]
        with torch.no_grad():
            if "encoder_hidden_states" in given:
                qt, kt, _ = _qkv(attn, given["encoder_hidden_states"], added=True)
                qi, ki, _ = _qkv(attn, given["hidden_states"])
                q, k = torch.cat([qt, qi], dim=1), torch.cat([kt, ki], dim=1)
            else:
                q, k, _ = _qkv(attn, given["hidden_states"])
            q, k = _rotated(q, given["image_rotary_emb"]), _rotated(k, given["image_rotary_emb"])
        direct = _softmax_rows(q, k)[:, :, TOKENS:, :TOKENS]
        assert (recorded.double() - direct).abs().max() <= 1e-5, path
        assert direct.sum(-1).max() < 1 - 1e-3  # the image keys take part of each row


def test_a_masked_key_takes_no_probability_per_row(klein):
    from negprompt.layers.flux2_klein_attention import layer_text_probabilities

    attn = klein.transformer.get_submodule("transformer_blocks.0.attn")
    torch.manual_seed(0)
    text, image = torch.randn(2, 6, 32), torch.randn(2, 10, 32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 4:6] = False  # the second row's text has 4 tokens
    probabilities = layer_text_probabilities(attn, image, text, 6, None, mask).reshape(2, 2, 10, 6)
    qt, kt, _ = _qkv(attn, text, added=True)
    qi, ki, _ = _qkv(attn, image)
    direct = _softmax_rows(qi, torch.cat([kt, ki], dim=1), mask[:, None, None, :])[..., :6]
    assert (probabilities.double() - direct).abs().max() <= 1e-6
    assert probabilities[1, :, :, 4:].abs().max() == 0 and probabilities[0, :, :, 4:].min() > 0


def test_word_maps_sit_at_the_words_tokens_after_the_template(klein):
    session = Session(klein)
    spec = session.spec(PROMPT, NEGATIVE, steps=2, size=32, seeds=(1,), scale=4.0)
    request = CaptureRequest({"positive": ["cat", "<start>"], "negative": ["hat"]})
    result = capture(spec, request, session, reducer=reduce_layer)
    ids = klein.tokenizer(_chat(klein, PROMPT)).input_ids
    tokens = klein.tokenizer.convert_ids_to_tokens(ids)
    cat, start = result.index["tokens"]["positive"][0]["cat"], result.index["tokens"]["positive"][0]["<start>"]
    assert [tokens[p] for p in cat] == ["Ġcat"] and cat == [7] and [tokens[p] for p in start] == ["<|im_start|>"]
    negative = klein.tokenizer.convert_ids_to_tokens(klein.tokenizer(_chat(klein, NEGATIVE)).input_ids)
    assert [negative[p] for p in result.index["tokens"]["negative"][0]["hat"]] == ["Ġhat"]
    for branch, word in (("positive", "cat"), ("negative", "hat")):
        assert result.maps(branch, word).abs().amax() > 0 and (result.mass(branch, word) > 0).all()


def _nag(positive, negative, phi, tau, alpha):
    """Direct: NAG (Chen et al. 2025 §3) per token, L1 ratio clipped at τ, blended with α."""
    extrapolated = phi * positive - (phi - 1) * negative
    ratio = extrapolated.abs().sum(-1, keepdim=True) / positive.abs().sum(-1, keepdim=True)
    return alpha * extrapolated * ratio.clamp(max=tau) / ratio + (1 - alpha) * positive


def _attention(q, k, v):
    """Direct softmax(q·kᵀ/√d)·v, (B, N, H, d) each → (B, N, H·d)."""
    return torch.einsum("bhnk,bkhd->bnhd", _softmax_rows(q, k), v.double()).flatten(2)


def test_nag_output_of_a_layer_equals_the_formula_and_the_negative_stream_moves_as_the_blocks_move_text(klein):
    from negprompt.guidance.attention_processors import nag_combine
    from negprompt.layers.flux2_klein_attention import negative_in_flux2_attention

    encode = klein.family.encode_one
    positive = torch.cat([encode(klein, PromptInput(PROMPT)).hidden_states] * 2)
    negative = torch.cat([encode(klein, PromptInput(NEGATIVE)).hidden_states] * 2)
    transformer, phi, tau, alpha = klein.transformer, 4.0, 2.5, 0.5
    double, single = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"
    inputs, hooks = _layer_inputs(transformer, [double, single, "transformer_blocks.0", "single_transformer_blocks.0"])
    outputs, streams = {}, {}
    for path in (double, single):
        hooks.append(
            transformer.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: outputs.setdefault(p, o))
        )
    guided = negative_in_flux2_attention(
        transformer, slice(0, 2), {"encoder_hidden_states": negative}, nag_combine(phi, tau, alpha)
    )
    try:
        with guided:
            state = transformer.attn_processors[f"{double}.processor"].state
            for index in (0, 1):
                block = transformer.single_transformer_blocks[index]
                hooks.append(block.register_forward_pre_hook(_keeper(streams, index, state)))
            nag_out = _call(klein, positive)
    finally:
        for hook in hooks:
            hook.remove()
    plain_out = _call(klein, positive)
    assert (nag_out - plain_out).abs().max() > 1e-3  # NAG is not a no-op
    with torch.no_grad():
        # the double-stream layer: Ẑ from Z⁺ over [text; image] keys and Z⁻ over [negative text; image] keys
        block, attn, given = transformer.transformer_blocks[0], transformer.get_submodule(double), inputs[double]
        mods = inputs["transformer_blocks.0"]["temb_mod_txt"][:, None].chunk(6, dim=-1)
        start = transformer.context_embedder(negative)
        negative_text = block.norm1_context(start) * (1 + mods[1]) + mods[0]
        rotary = given["image_rotary_emb"]
        qt, kt, vt = _qkv(attn, given["encoder_hidden_states"], added=True)
        qn, kn, vn = _qkv(attn, negative_text, added=True)
        qi, ki, vi = _qkv(attn, given["hidden_states"])
        image_rotary = (rotary[0][TOKENS:], rotary[1][TOKENS:])
        q = _rotated(qi, image_rotary)
        z_pos = _attention(q, _rotated(torch.cat([kt, ki], 1), rotary), torch.cat([vt, vi], 1))
        z_neg = _attention(q, _rotated(torch.cat([kn, ki], 1), rotary), torch.cat([vn, vi], 1))
        expected = attn.to_out[0](_nag(z_pos, z_neg, phi, tau, alpha).float())
        assert (outputs[double][0] - expected).abs().max() <= 1e-5
        # the negative's stream after the block: the block's own text output on [negative text; the same image]
        kwargs = {k: v for k, v in inputs["transformer_blocks.0"].items() if k != "encoder_hidden_states"}
        moved, _ = block(encoder_hidden_states=start, **kwargs)
        assert (streams[0] - moved).abs().max() <= 1e-5
        # the single-stream (parallel) layer: Ẑ joins the MLP BEFORE the fused to_out
        sblock, sattn, sgiven = (
            transformer.single_transformer_blocks[0],
            transformer.get_submodule(single),
            inputs[single],
        )
        shift, scale, _ = inputs["single_transformer_blocks.0"]["temb_mod"][:, None].chunk(3, dim=-1)
        negative_tokens = sblock.norm(streams[0]) * (1 + scale) + shift
        q, k, v = _qkv(sattn, sgiven["hidden_states"])
        _, kn, vn = _qkv(sattn, negative_tokens)
        q, kp, kn = (
            _rotated(q, rotary)[:, TOKENS:],
            _rotated(k, rotary),
            _rotated(torch.cat([kn, k[:, TOKENS:]], 1), rotary),
        )
        z_pos = _attention(q, kp, v)
        z_neg = _attention(q, kn, torch.cat([vn, v[:, TOKENS:]], 1))
        mlp = sattn.to_qkv_mlp_proj(sgiven["hidden_states"])[:, TOKENS:, 3 * sattn.inner_dim :]
        expected = sattn.to_out(torch.cat([_nag(z_pos, z_neg, phi, tau, alpha).float(), sattn.mlp_act_fn(mlp)], -1))
        assert (outputs[single][:, TOKENS:] - expected).abs().max() <= 1e-5
        skwargs = {k: v for k, v in inputs["single_transformer_blocks.0"].items() if k != "hidden_states"}
        image_tokens = inputs["single_transformer_blocks.0"]["hidden_states"][:, TOKENS:]
        moved = sblock(hidden_states=torch.cat([streams[0], image_tokens], 1), **skwargs)[:, :TOKENS]
        assert (streams[1] - moved).abs().max() <= 1e-5


def _keeper(streams, index, state):
    """A forward pre-hook keeping the negative's stream as a block receives it."""

    def keep(module, args):
        streams.setdefault(index, state.stream.clone())

    return keep


def _nag_spec(session, rule="nag", **kwargs):
    options = dict(steps=STEPS, size=32, seeds=(1,), scale=1.0, rule=rule)
    return session.spec(PROMPT, NEGATIVE, **{**options, **kwargs})


def test_nag_and_vsf_at_cfg_1_change_the_image_in_one_pass_and_neutral_settings_are_plain(klein, distilled):
    for components in (klein, distilled):
        session = Session(components)
        plain = session.run(session.spec(PROMPT, steps=STEPS, size=32, seeds=(1,), scale=1.0, rule="cfg"))
        for rule, neutral in (("nag", {"phi": 1.0}), ("nag", {"alpha": 0.0}), ("vsf", {"scale": 0.0})):
            same = session.run(_nag_spec(session, rule, rule_settings=neutral))
            assert np.array_equal(same.pixels, plain.pixels)
        for rule in ("nag", "vsf"):
            run = session.run(_nag_spec(session, rule))
            assert run.unet_batch_rows == STEPS  # one pass a step: the positive's row
            # measured 4·10⁻³ and 1·10⁻³ (NAG), 2·10⁻² and 7·10⁻³ (VSF): the tiny model reads text weakly; neutral: 0
            assert np.abs(run.pixels - plain.pixels).max() > 2e-4, rule
    session = Session(klein)
    plain = session.run(session.spec(PROMPT, steps=STEPS, size=32, seeds=(1,), scale=1.0, rule="cfg"))
    silenced = session.run(_nag_spec(session, "vsf", rule_settings={"offset": -1e4}))  # the negative's keys off
    assert np.abs(silenced.pixels - plain.pixels).max() <= 1e-5


def test_nag_follows_a_negative_window_and_capture_during_nag_records_the_negative(klein):
    session = Session(klein)
    plain = session.run(session.spec(PROMPT, steps=STEPS, size=32, seeds=(1,), scale=1.0, rule="cfg"), trace=True)
    for rule in ("nag", "vsf"):
        late = session.run(_nag_spec(session, rule, negative_windows=["2:"]), trace=True)
        assert all(torch.equal(late.trace[s].guided, plain.trace[s].guided) for s in range(2))
        assert not torch.equal(late.trace[2].guided, plain.trace[2].guided)
    spec = _nag_spec(session)
    result = capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)
    assert np.array_equal(result.generation.pixels, session.run(spec).pixels)
    assert result.tensors["present.negative"].all()
    frobenius = result.tensors["frobenius.negative"]
    assert frobenius.shape[1] == 3 and torch.isfinite(frobenius).all() and (frobenius > 0).all()


def test_the_strength_study_and_attend_run_on_klein(klein_dir, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: t\nmodel: {klein_dir}\nsteps: 2\nscale: 4\nsize: 32\nseeds: [1]\npairs:\n"
        "  - {group: noun, prompt: a photo of a cat, negative: red hat}\n"
    )
    assert main(["study", str(spec), "--out", str(tmp_path / "s"), "-q"]) == 0
    assert main(["report", str(tmp_path / "s")]) == 0
    assert "| noun |" in (tmp_path / "s" / "report.md").read_text()
    out = tmp_path / "attend"
    args = ["attend", PROMPT, "-n", NEGATIVE, "--model", str(klein_dir), "--steps", "2", "--size", "32"]
    assert main([*args, "--rule", "nag", "--scale", "1", "--out", str(out), "-q"]) == 0
    assert any(out.glob("*.png"))
    capsys.readouterr()


def test_the_klein_study_spec_parses_and_names_the_pipelines_defaults():
    from pathlib import Path

    from negprompt.analysis.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "negprompt" / "studies" / "ban2024-flux2-klein.yaml")
    assert spec.model == "black-forest-labs/FLUX.2-klein-base-9B"
    assert (spec.steps, spec.scale, spec.size, spec.map_size) == (50, 4.0, 1024, 64)
    assert len(spec.pairs) == 20
