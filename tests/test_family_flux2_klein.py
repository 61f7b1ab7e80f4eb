"""FLUX.2 [klein] on a tiny random model built from configs: images equal diffusers' Flux2KleinPipeline (with and
without a negative, base and step-distilled), loading from a saved folder, rules on velocities, windows and
AUTOMATIC1111 syntax, the command line with --from-png, and bad input in one line (phase 1: no attention reader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureError, CaptureRequest
from negprompt.attention.result import capture
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules.base import GuidanceError
from negprompt.interfaces.cli import main
from negprompt.layers.attention import attention_paths
from negprompt.layers.layout import AttentionLayout
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
        ("nag", "cannot yet change on FLUX.2 [klein]"),
        ("vsf", "cannot yet change on FLUX.2 [klein]"),
    ):
        with pytest.raises(GuidanceError, match=message.replace("[", r"\[")) as error:
            session.spec(PROMPT, NEGATIVE, rule=rule, scale=4.0, **options)
        assert "\n" not in str(error.value)
    spec = session.spec(PROMPT, NEGATIVE, scale=4.0, **options)
    with pytest.raises(CaptureError, match=r"cannot yet capture the attention of FLUX.2 \[klein\]"):
        capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)


def test_phase_one_reads_no_attention_of_klein_and_says_where_its_text_keys_start(klein):
    layout = klein.attention_layout
    assert layout == AttentionLayout("unread", text_start_tokens=3, patch=1, family=Flux2KleinFamily.description)
    assert layout.reads_text and not layout.readable
    ids = klein.tokenizer(_chat(klein, PROMPT)).input_ids
    assert klein.tokenizer.convert_ids_to_tokens(ids[:4]) == ["<|im_start|>", "user", "Ċ", "a"]  # the template's 3
    assert attention_paths(klein.transformer, "joint") == []  # Flux2Attention, Flux2ParallelSelfAttention: unread


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
        (["--model", str(klein_dir), "--rule", "nag"], "cannot yet change on FLUX.2 [klein]"),
        (["--model", str(distilled_dir), "--scale", "4"], "is step-distilled"),
    )
    for extra, message in cases:
        assert_usage_error(main([*base, *extra]), capsys, message, out)
    long_prompt = " ".join(["cat"] * 40)  # 40 tokens, 52 in the template: the last 4 would be cut
    code = main(["generate", long_prompt, *base[2:], "--model", str(klein_dir)])
    assert_usage_error(code, capsys, f"over the model's limit of {TOKENS} (max_sequence_length)", out)
    code = main(["generate", PROMPT, "-n", long_prompt, *base[4:], "--model", str(klein_dir)])
    assert_usage_error(code, capsys, "these words would be cut: 'cat cat cat cat'", out)
    attend = tmp_path / "attend"
    code = main(["attend", PROMPT, "-n", NEGATIVE, "--model", str(klein_dir), "--steps", "2", "--size", "32"])
    assert_usage_error(code, capsys, "cannot yet capture the attention of FLUX.2 [klein]", attend)


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
