"""SD3 and FLUX on tiny random transformers built from configs: images equal diffusers' StableDiffusion3Pipeline
(negative prompts) and FluxPipeline (true CFG, embedded guidance), rules on velocities, windows, attention capture
on joint attention, loading from directories, the study, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules import all_rules
from negprompt.guidance.rules.base import GuidanceError
from negprompt.interfaces.cli import main
from negprompt.layers.attention import attention_paths, joint_attention_probabilities
from negprompt.models.loading import ModelLoadError, load_components
from negprompt.models.prompts import PromptError
from negprompt.models.saving import save_components
from negprompt.runspec import SettingsError
from negprompt.sampling.loop import Group, encode_groups, sample_groups
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session
from negprompt.testing.peers import diffusers_pipeline
from negprompt.testing.tiny_mmdit import build_tiny_flux, build_tiny_sd3

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
SEEDS = (3, 11)
HEIGHT, WIDTH, STEPS = 32, 48, 5  # non-square
T5_TOKENS = 32  # the tiny T5 tokenizer's limit (the models' max_sequence_length here)


@pytest.fixture
def sd3(tiny_sd3):
    return tiny_sd3


@pytest.fixture
def flux(tiny_flux):
    return tiny_flux


def ours(components, guidance, embedded_guidance=None, seeds=SEEDS, **kwargs):
    groups = [Group(guidance, seeds)]
    scheduler = make_scheduler("default", components.scheduler)
    conditioning = encode_groups(components, groups, scheduler, STEPS, HEIGHT, WIDTH)
    return sample_groups(
        components,
        groups,
        make_scheduler("default", components.scheduler),
        STEPS,
        HEIGHT,
        WIDTH,
        conditioning=conditioning,
        embedded_guidance=embedded_guidance,
        **kwargs,
    )


def theirs(components, max_sequence_length=T5_TOKENS, **kwargs) -> np.ndarray:
    pipe = diffusers_pipeline(components)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    batched = {k: [v] * len(SEEDS) if isinstance(v, str) else v for k, v in kwargs.items()}
    return pipe(
        [PROMPT] * len(SEEDS),
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        generator=generators,
        output_type="np",
        max_sequence_length=max_sequence_length,
        **batched,
    ).images


# ---------------------------------------------------------------- equal to diffusers


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_equals_stable_diffusion_3_pipeline_with_negative_and_second_prompts(with_t5):
    components = build_tiny_sd3(seed=1, with_t5=with_t5)
    guidance = Guidance(
        positive=Term(PROMPT, prompt_2="a photo of a dog"),
        negatives=(Term(NEGATIVE, prompt_2="glasses"),),
        scale=6.0,
    )
    mine = ours(components, guidance).images
    reference = theirs(
        components,
        T5_TOKENS if with_t5 else 256,  # without T5, zeros of the pipeline's default length stand in for it
        prompt_2="a photo of a dog",
        negative_prompt=NEGATIVE,
        negative_prompt_2="glasses",
        guidance_scale=6.0,
    )
    assert mine.shape == reference.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(mine - reference).max() <= 1e-4


def test_sd3_without_negative_is_cfg_on_the_empty_prompt(sd3):
    mine = ours(sd3, Guidance(positive=Term(PROMPT), scale=4.0, rule="cfg")).images
    assert np.abs(mine - theirs(sd3, guidance_scale=4.0)).max() <= 1e-4


def test_flux_true_cfg_equals_flux_pipeline(flux):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=4.0)
    mine = ours(flux, guidance, embedded_guidance=3.5)
    reference = theirs(flux, negative_prompt=NEGATIVE, true_cfg_scale=4.0, guidance_scale=3.5)
    assert np.abs(mine.images - reference).max() <= 1e-4
    assert mine.unet_batch_rows == 2 * len(SEEDS) * STEPS  # two passes a step: positive and negative


def test_flux_distilled_guidance_alone_is_one_pass_and_equals_the_pipeline(flux):
    mine = ours(flux, Guidance(positive=Term(PROMPT), scale=1.0, rule="cfg"), embedded_guidance=2.0)
    assert mine.unet_batch_rows == len(SEEDS) * STEPS
    assert np.abs(mine.images - theirs(flux, guidance_scale=2.0)).max() <= 1e-4


def test_flux_schnell_form_takes_no_guidance_input():
    schnell = build_tiny_flux(seed=2, guidance_embeds=False)
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=3.0)
    mine = ours(schnell, guidance).images
    assert np.abs(mine - theirs(schnell, negative_prompt=NEGATIVE, true_cfg_scale=3.0)).max() <= 1e-4
    with pytest.raises(Exception, match="takes no guidance scale as an input"):
        ours(schnell, guidance, embedded_guidance=3.5)


# ---------------------------------------------------------------- rules, windows, prediction type


def test_velocity_predictions_give_x0_as_x_minus_sigma_v(flux):
    trace = ours(flux, Guidance(positive=Term(PROMPT), scale=1.0, rule="cfg"), embedded_guidance=3.5, keep_trace=True)
    scheduler = make_scheduler("default", flux.scheduler)
    for info in trace.trace:
        sigma = info.timestep / scheduler.config.num_train_timesteps
        assert torch.allclose(info.denoised, info.latents - sigma * info.guided)


@pytest.mark.parametrize("rule", sorted(all_rules()))
def test_every_rule_runs_on_velocity_or_is_refused_in_one_line(sd3, rule):
    negatives = (Term(NEGATIVE), Term("glasses")) if rule in ("dual", "weighted", "perp-neg") else (Term(NEGATIVE),)
    if rule == "cfg":
        negatives = ()
    guidance = Guidance(positive=Term(PROMPT), negatives=negatives, scale=4.0, rule=rule)
    if rule in ("dng", "apg"):  # refused where the run is specified (Session.check; the loop relies on it)
        with pytest.raises(GuidanceError, match=f"rule {rule!r} is not exact on the velocity predictions") as error:
            Session(sd3).spec(PROMPT, list(negatives), rule=rule, scale=4.0, steps=STEPS, seeds=[3])
        assert "\n" not in str(error.value)
    else:
        images = ours(sd3, guidance, seeds=(3,)).images
        assert np.isfinite(images).all() and images.std() > 0


def test_sd_rule_on_velocity_equals_its_formula(sd3):
    """ε̂ = v_ỹ + s(v_y − v_ỹ), eq. (9), applied to the velocity branches of every step."""
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=6.0)
    for info in ours(sd3, guidance, keep_trace=True).trace:
        positive, negative = info.predictions["positive"], info.predictions["negative"]
        assert torch.allclose(info.guided, negative + 6.0 * (positive - negative), atol=1e-6)


def test_delayed_negative_on_sd3_is_plain_before_its_window_and_equals_the_window_syntax(sd3):
    plain = ours(sd3, Guidance(positive=Term(PROMPT), scale=5.0, rule="sd"), keep_trace=True)
    delayed = ours(
        sd3, Guidance(positive=Term(PROMPT), negatives=(Term(f"[{NEGATIVE}:2]"),), scale=5.0), keep_trace=True
    )
    windowed = ours(
        sd3,
        Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=_window("2:")),), scale=5.0),
        keep_trace=True,
    )
    assert np.array_equal(delayed.images, windowed.images)
    for step in range(2):
        assert torch.equal(delayed.trace[step].guided, plain.trace[step].guided)
    assert not torch.equal(delayed.trace[2].guided, plain.trace[2].guided)


# ---------------------------------------------------------------- NAG and VSF in joint attention


def nag_spec(session, negative, rule="nag", **kwargs):
    options = dict(rule=rule, scale=1.0, steps=4, size=32, seeds=(1, 2))
    return session.spec(PROMPT, negative, **{**options, **kwargs})


def largest_change(run, plain) -> float:
    return max(float((a.guided - b.guided).abs().max()) for a, b in zip(run.trace, plain.trace))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_negative_text_stream_follows_the_blocks(family, request):
    """NAG with the prompt itself as the negative: Z⁻ = Z⁺ in every layer only if the negative's text stream
    follows the positive's through every block (same states, same time embedding; SD3's last block only
    reads it), so NAG then changes nothing. VSF with a bias of −10⁴ on the negative keys gives them no
    weight, so it changes nothing either. Measured: 5·10⁻⁷ (float rounding), against 0.01–0.4 otherwise."""
    session = Session(request.getfixturevalue(family))
    plain = session.run(session.spec(PROMPT, steps=4, size=32, seeds=(1, 2), scale=1.0, rule="cfg"), trace=True)
    same = session.run(nag_spec(session, PROMPT), trace=True)
    assert same.unet_batch_rows == plain.unet_batch_rows == 2 * 4  # one pass a step
    assert largest_change(same, plain) <= 1e-5
    assert largest_change(session.run(nag_spec(session, NEGATIVE), trace=True), plain) > 1e-2
    silenced = nag_spec(session, NEGATIVE, rule="vsf", rule_settings={"offset": -1e4})
    assert largest_change(session.run(silenced, trace=True), plain) <= 1e-5
    assert largest_change(session.run(nag_spec(session, NEGATIVE, rule="vsf"), trace=True), plain) > 1e-2


def test_nag_on_flux_follows_windows_and_cfg_around_it(flux):
    session = Session(flux)
    plain = session.run(session.spec(PROMPT, steps=4, size=32, seeds=(1, 2), scale=1.0, rule="cfg"), trace=True)
    late = session.run(nag_spec(session, NEGATIVE, negative_windows=["2:"]), trace=True)
    for step in range(2):
        assert torch.equal(late.trace[step].guided, plain.trace[step].guided)
    assert not torch.equal(late.trace[2].guided, plain.trace[2].guided)
    guided = session.run(nag_spec(session, NEGATIVE, scale=3.0))
    assert guided.unet_batch_rows == 2 * 2 * 4  # ∅ and the guided positive
    assert np.isfinite(np.asarray(guided.images, float)).all()


@pytest.mark.parametrize("family, rule", [("flux", "nag"), ("sd3", "vsf")])
def test_capture_with_a_negative_in_joint_attention_records_it_and_keeps_images(family, rule, request):
    session = Session(request.getfixturevalue(family))
    spec = nag_spec(session, NEGATIVE, rule=rule)
    alone = session.run(spec).images
    result = capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)
    assert [np.asarray(a).tolist() for a in result.generation.images] == [np.asarray(a).tolist() for a in alone]
    assert result.tensors["present.negative"].all()
    frobenius = result.tensors["frobenius.negative"]
    assert torch.isfinite(frobenius).all() and (frobenius > 0).all()


def _window(text):
    from negprompt.guidance.windows import Window

    return Window.parse(text)


def test_flow_models_refuse_other_schedulers_in_one_line(sd3):
    with pytest.raises(Exception, match="flow matching.*choose 'default'"):
        make_scheduler("ddim", sd3.scheduler)


# ---------------------------------------------------------------- attention on joint layers


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_capture_on_joint_attention_leaves_images_bit_identical(family, request):
    components = request.getfixturevalue(family)
    session = Session(components)
    spec = session.spec(PROMPT, NEGATIVE, scale=4.0, steps=3, size=32, seeds=(1, 2))
    plain = session.run(spec).images
    words = CaptureRequest({"positive": ["cat", "glasses"], "negative": ["hat"]}, average_layers=False)
    result = capture(spec, words, session, reducer=reduce_layer)
    assert [np.asarray(a).tolist() for a in result.generation.images] == [np.asarray(a).tolist() for a in plain]
    layers = attention_paths(components.transformer, "joint")
    assert [layer["path"] for layer in result.index["layers"]] == layers
    if family == "flux":
        assert any(path.startswith("single_transformer_blocks.") for path in layers)
    frobenius = result.tensors["frobenius.negative"]
    assert frobenius.shape == (3, len(layers), 2, 1) and torch.isfinite(frobenius).all() and (frobenius > 0).all()
    # SD3's keys: CLIP's 77 tokens, then T5's; a word is found in both. FLUX's: T5's only.
    positions = result.index["tokens"]["negative"][0]["hat"]
    assert positions == ([3, 77 + 2] if family == "sd3" else [2])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_probabilities_sum_to_one_and_equal_the_layers_own_attention(family, request, monkeypatch):
    """The probabilities computed beside each layer equal softmax(q·kᵀ/√d) of the q and k the layer's own
    processor hands to scaled_dot_product_attention (recorded there), and each row sums to 1 over all keys."""
    components = request.getfixturevalue(family)
    transformer = components.transformer
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    inside = [False]  # only the transformer's attention layers, not the text encoders' or the VAE's

    def recording(query, key, value, *args, **kwargs):
        if inside[0]:
            seen.append((query, key))
        return original_sdpa(query, key, value, *args, **kwargs)

    inputs: list[tuple] = []
    paths = attention_paths(transformer, "joint")
    processors = dict(transformer.attn_processors)

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            inputs.append((attn, hidden_states, encoder_hidden_states, image_rotary_emb))
            inside[0] = True
            try:
                if image_rotary_emb is None:
                    return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
                return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            finally:
                inside[0] = False

    transformer.set_attn_processor({k: Spy(p) for k, p in processors.items()})
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    try:
        session = Session(components)
        session.run(session.spec(PROMPT, NEGATIVE, scale=4.0, steps=1, size=32, seeds=(1,)))
    finally:
        transformer.set_attn_processor(processors)
    text_length = 77 + T5_TOKENS if family == "sd3" else T5_TOKENS
    assert len(inputs) == len(seen) == len(paths)
    for (attn, hidden, context, rotary), (query, key) in zip(inputs, seen):
        full = joint_attention_probabilities(attn, hidden, context, text_length, rotary, text_block=False)
        assert torch.allclose(full.sum(-1), torch.ones(()), atol=1e-5)
        # The layer's own probabilities, from its q and k, (B, H, S, d) as the processors hand them to SDPA.
        reference = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)
        images = full.shape[1]
        if family == "sd3":  # SD3 orders keys [image; text] and queries likewise
            reference = reference[:, :, :images]
            reference = torch.cat([reference[..., images:], reference[..., :images]], dim=-1)
        else:  # FLUX: [text; image]
            reference = reference[:, :, -images:]
        assert torch.allclose(full, reference.reshape(full.shape), atol=1e-5)
        text = joint_attention_probabilities(attn, hidden, context, text_length, rotary)
        assert text.shape == (full.shape[0], images, text_length)
        assert torch.allclose(text, full[..., :text_length], atol=1e-5)  # the fused kernel's log-sum-exp path


# ---------------------------------------------------------------- loading, CLI, study


@pytest.fixture
def sd3_dir(tiny_sd3_dir):
    return tiny_sd3_dir


@pytest.fixture
def flux_dir(tiny_flux_dir):
    return tiny_flux_dir


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_saved_directory_loads_back_to_the_same_images(family, request):
    components = request.getfixturevalue(family)
    folder = request.getfixturevalue(f"{family}_dir")
    loaded = load_components(folder)
    assert loaded.family.name == components.family.name and loaded.unet is None
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=3.0)
    kwargs = {"embedded_guidance": 3.5} if family == "flux" else {}
    assert np.array_equal(ours(loaded, guidance, **kwargs).images, ours(components, guidance, **kwargs).images)


def test_sd3_without_t5_saves_and_loads_as_diffusers_does(tmp_path):
    components = build_tiny_sd3(seed=3, with_t5=False)
    folder = save_components(components, tmp_path / "no-t5")
    loaded = load_components(folder)
    assert loaded.text_encoder_3 is None
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(  # diffusers asks for the absent T5 by name
        folder, text_encoder_3=None, tokenizer_3=None, use_safetensors=True, local_files_only=True
    )
    assert pipe.text_encoder_3 is None
    theirs_weights, ours_weights = pipe.transformer.state_dict(), components.transformer.state_dict()
    assert theirs_weights.keys() == ours_weights.keys()
    assert all(torch.equal(theirs_weights[k], ours_weights[k]) for k in ours_weights)


def test_cli_generate_on_sd3_and_flux_directories_and_again_from_the_png(sd3_dir, flux_dir, tmp_path):
    for folder, extra in ((sd3_dir, []), (flux_dir, ["--scale", "3"]), (flux_dir, ["--rule", "nag"])):
        out = tmp_path / f"{folder.name}-{len(extra)}-{extra[-1] if extra else ''}.png"
        args = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(folder), "--steps", "3", "--size", "32"]
        assert main([*args, *extra, "-q", "--out", str(out)]) == 0
        again = tmp_path / "again.png"
        assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
        assert again.read_bytes() == out.read_bytes()  # the settings (embedded guidance too) travel in the PNG


def test_cli_refuses_bad_transformer_input_in_one_line(sd3_dir, flux_dir, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["generate", PROMPT, "-n", NEGATIVE, "--steps", "2", "--size", "32", "-q", "--out", str(out)]
    code = main([*base, "--model", str(sd3_dir), "--rule", "dng"])
    assert_usage_error(code, capsys, "not exact on the velocity predictions", out)
    code = main([*base, "--model", str(sd3_dir), "--rule", "apg"])
    assert_usage_error(code, capsys, "not exact on the velocity predictions", out)
    code = main([*base, "--model", str(sd3_dir), "--embedded-guidance", "3.5"])  # FLUX's guidance input on SD3
    assert_usage_error(code, capsys, "takes no guidance scale as an input", out)
    code = main([*base, "--model", str(tiny_sd_dir), "--embedded-guidance", "3.5"])
    assert_usage_error(code, capsys, "takes no guidance scale as an input", out)
    code = main([*base, "--model", str(sd3_dir), "--scheduler", "ddim"])
    assert_usage_error(code, capsys, "choose 'default'", out)
    long_prompt = " ".join(["cat"] * (T5_TOKENS + 3))
    code = main(["generate", long_prompt, *base[2:], "--model", str(flux_dir)])
    assert_usage_error(code, capsys, f"over the model's limit of {T5_TOKENS} (max_sequence_length)", out)


def test_a_missing_text_encoder_folder_is_named(sd3_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd3_dir, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(ModelLoadError, match="lists a text_encoder_3 but the text_encoder_3/ folder is missing"):
        load_components(broken)
    shutil.rmtree(broken / "text_encoder_2")
    out = tmp_path / "x.png"
    code = main(["generate", PROMPT, "--model", str(broken), "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, "lacks the part(s) text_encoder_2", out)


def test_t5_prompts_over_the_limit_are_refused_and_clip_is_cut_where_t5_reads_it_whole(sd3, flux):
    from dataclasses import replace

    long_prompt = " ".join(["cat"] * 80)  # 81 T5 tokens, 82 CLIP tokens
    for components in (sd3, flux):
        with pytest.raises(PromptError, match=f"81 T5 tokens, over the model's limit of {T5_TOKENS}"):
            components.family.encode_one(components, _input(long_prompt))
        # With room for it in T5 the prompt is taken; CLIP's part is cut at 77, as the pipelines cut it.
        roomy = replace(components, declarations={"max_sequence_length": 100})
        hidden = roomy.family.encode_one(roomy, _input(long_prompt)).hidden_states
        assert hidden.shape[1] == (77 + 100 if components is sd3 else 100)
    session = Session(build_tiny_sd3(seed=4, with_t5=False))  # CLIP alone reads the prompt: its limit holds
    with pytest.raises(PromptError, match="over the tokenizer's limit of 77"):
        session.run(session.spec(long_prompt, steps=1, size=32))


def _input(text):
    from negprompt.models.conditioning import PromptInput

    return PromptInput(text)


def test_sdxl_options_are_refused_on_sd3_and_second_prompts_accepted(sd3):
    session = Session(sd3)
    session.spec(PROMPT, NEGATIVE, prompt_2="a dog", negative_2="glasses", steps=2, size=32)
    with pytest.raises(SettingsError, match="option.*of SDXL models, but"):
        session.spec(PROMPT, NEGATIVE, original_size=(64, 64), steps=2, size=32)


def test_noise_level_interval_on_flow_matching(sd3):
    session = Session(sd3)
    spec = session.spec(PROMPT, NEGATIVE, steps=6, size=32, interval_sigma=(0.0, 1.0))
    scheduler = make_scheduler("default", sd3.scheduler)
    scheduler.set_timesteps(6)
    sigmas = [float(t) / 1000 for t in scheduler.timesteps]
    inside = [i for i, s in enumerate(sigmas) if s < 1 and s / (1 - s) <= 1.0]
    assert 0 < inside[0] and (spec.guidance.interval.start, spec.guidance.interval.end) == (inside[0], inside[-1] + 1)
    assert not math.isclose(sigmas[0], 0.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_strength_study_runs_on_tiny_transformers(family, request, tmp_path, capsys):
    folder = request.getfixturevalue(f"{family}_dir")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: t\nmodel: {folder}\nsteps: 3\nscale: 4\nsize: 32\nseeds: [1]\npairs:\n"
        "  - {group: noun, prompt: a photo of a cat, negative: red hat}\n"
        "  - {group: adjective, prompt: a woman in the street, negative: glasses, related: woman}\n"
    )
    assert main(["study", str(spec), "--out", str(tmp_path / "s"), "-q"]) == 0
    assert main(["report", str(tmp_path / "s")]) == 0
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| noun |" in report and "| adjective |" in report
    capsys.readouterr()


def test_attend_command_draws_the_timeline_on_flux(flux_dir, tmp_path):
    out = tmp_path / "attend"
    args = ["attend", PROMPT, "-n", NEGATIVE, "--model", str(flux_dir), "--steps", "3", "--size", "32", "--scale", "3"]
    assert main([*args, "--out", str(out), "-q"]) == 0
    assert any(out.glob("*.png"))


def test_a_negative_that_takes_no_part_is_warned_about(flux_dir, tmp_path, capsys):
    """FLUX's default scale is 1 (one pass): rule sd then evaluates the positive alone, as diffusers'
    FluxPipeline does at true_cfg_scale 1 (and warns); the command says so in one line and still runs."""
    out = tmp_path / "x.png"
    args = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(flux_dir), "--steps", "2", "--size", "32", "-q"]
    assert main([*args, "--out", str(out)]) == 0 and out.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: warning: the negative prompt(s) 'a red hat' took no part") and "\n" not in err
    assert main([*args, "--rule", "nag", "--out", str(out)]) == 0
    assert main([*args, "--scale", "2", "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a1111_weights_reach_t5_as_on_clip(sd3, flux):
    """A weight of 1 on the whole prompt is the plain encoding (the chunked tokenization of T5 equals the
    whole one); another weight changes the token states."""
    for components in (sd3, flux):
        encode = components.family.encode_one
        plain = encode(components, _input("a photo of a cat")).hidden_states
        assert torch.equal(encode(components, _input("(a photo of a cat:1.0)")).hidden_states, plain)
        assert not torch.allclose(encode(components, _input("a photo of a (cat:1.5)")).hidden_states, plain)


def test_the_full_size_presets_have_the_real_models_sizes():
    """The GPU benchmark's presets, built on the meta device (no memory): SD3-medium's transformer has
    about 2.0 B parameters, FLUX-dev's about 11.9 B."""
    with torch.device("meta"):
        sd3 = build_tiny_sd3(preset="sd3-medium")
        flux = build_tiny_flux(preset="flux-dev")
    billions = [sum(p.numel() for p in c.transformer.parameters()) / 1e9 for c in (sd3, flux)]
    assert 1.9 < billions[0] < 2.2 and 11.5 < billions[1] < 12.2, billions
