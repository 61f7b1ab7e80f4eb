"""Wan on a tiny random model built from configs: frames equal diffusers' WanPipeline (without and with a negative,
and Wan 2.2's two experts at two scales), UMT5 encoding as the pipeline's, frame counts, windows and prompt syntax,
loading saved folders, the run's record, and bad input in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules.base import GuidanceError
from negprompt.interfaces.cli import main
from negprompt.models.conditioning import PromptInput
from negprompt.models.families import family_for_index
from negprompt.models.family import VideoSettingsError
from negprompt.models.loading import load_components
from negprompt.models.prompts import PromptError
from negprompt.models.saving import save_components
from negprompt.models.wan import WanFamily, nearest_frame_counts
from negprompt.runspec import RunSpec, SettingsError
from negprompt.session import Session
from negprompt.testing.tiny_wan import build_tiny_wan, wan_pipeline

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
SEEDS = (3, 11)
HEIGHT, WIDTH, FRAMES, STEPS = 32, 48, 9, 3  # non-square; 9 frames → 3 latent frames
T5_TOKENS = 32  # the tiny tokenizer's limit (the model's max_sequence_length here)
TOLERANCE = 1e-4  # float32 frames, [0, 1]


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan(seed=0)


@pytest.fixture(scope="module")
def wan22():
    """Two experts, the boundary at t = 700: of the 4 steps' timesteps (1000, 858, 602, 9) two are each expert's."""
    return build_tiny_wan(seed=1, two_experts=True, boundary_ratio=0.7)


@pytest.fixture(scope="module")
def wan_dir(wan, tmp_path_factory):
    return save_components(wan, tmp_path_factory.mktemp("tiny-wan"))


def ours(components, negative=None, steps=STEPS, **options) -> np.ndarray:
    session = Session(components)
    spec = session.spec(
        PROMPT, negative, steps=steps, height=HEIGHT, width=WIDTH, frames=FRAMES, seeds=SEEDS, **options
    )
    return session.run(spec).pixels


def theirs(components, steps=STEPS, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return wan_pipeline(components)(
        [PROMPT] * len(SEEDS),
        num_inference_steps=steps,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        generator=generators,
        output_type="np",
        max_sequence_length=T5_TOKENS,
        **kwargs,
    ).frames


# ---------------------------------------------------------------- equal to the pipeline


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_frames_equal_the_pipeline_with_and_without_a_negative(wan, negative):
    """Rule sd at scale g is the pipeline's CFG, noise_uncond + g(noise_cond − noise_uncond), with the negative (or
    the empty prompt) as noise_uncond; frames (B, F, H, W, 3) in [0, 1]."""
    mine = ours(wan, negative, scale=4.0)
    reference = theirs(wan, guidance_scale=4.0, negative_prompt=None if negative is None else [negative] * 2)
    assert mine.shape == reference.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and mine.dtype == np.float32
    assert np.abs(mine - reference).max() <= TOLERANCE
    assert np.abs(mine[0, 0] - mine[0, -1]).max() > 1e-3  # the frames differ: a video, not a still repeated


def test_two_experts_each_at_its_own_scale_equal_the_pipeline(wan22):
    """Wan 2.2: ``transformer`` for t ≥ boundary_ratio × 1000 at ``scale``, ``transformer_2`` below at ``scale_2``,
    as the pipeline's guidance_scale and guidance_scale_2; the boundary falls inside the schedule."""
    scheduler = type(wan22.scheduler).from_config(wan22.scheduler.config)
    scheduler.set_timesteps(4)
    experts = [wan22.family.expert_at(wan22, t) for t in scheduler.timesteps]
    assert experts == [0, 0, 1, 1]
    assert wan22.family.denoiser_at(wan22, scheduler.timesteps[-1]) is wan22.transformer_2
    mine = ours(wan22, NEGATIVE, steps=4, scale=5.0, scale_2=2.0)
    reference = theirs(wan22, steps=4, negative_prompt=[NEGATIVE] * 2, guidance_scale=5.0, guidance_scale_2=2.0)
    assert np.abs(mine - reference).max() <= TOLERANCE
    one_scale = ours(wan22, NEGATIVE, steps=4, scale=5.0)  # scale_2 defaults to scale, as the pipeline's
    assert np.abs(one_scale - theirs(wan22, steps=4, negative_prompt=[NEGATIVE] * 2, guidance_scale=5.0)).max() <= (
        TOLERANCE
    )
    assert np.abs(one_scale - mine).max() > 1e-3  # the second scale acts


def test_the_released_checkpoints_scheduler_gives_the_pipelines_frames_too(wan):
    """Wan's diffusers checkpoints ship UniPC with flow sigmas (``flow_shift`` 3, velocity predictions): set, as the
    pipeline sets it, with the step count alone."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    components = replace(wan, scheduler=scheduler)
    reference = wan_pipeline(components)(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        height=HEIGHT,
        width=WIDTH,
        num_frames=5,
        generator=[torch.Generator().manual_seed(SEEDS[0])],
        output_type="np",
        max_sequence_length=T5_TOKENS,
        guidance_scale=4.0,
    ).frames
    session = Session(components)
    spec = session.spec(PROMPT, NEGATIVE, steps=4, height=HEIGHT, width=WIDTH, frames=5, seeds=SEEDS[:1], scale=4.0)
    assert np.abs(session.run(spec).pixels - reference).max() <= TOLERANCE
    with pytest.raises(GuidanceError, match="not exact on the velocity predictions"):  # UniPC on flow sigmas
        session.spec(PROMPT, NEGATIVE, rule="dng", frames=5, size=32, steps=2)


def test_umt5_states_are_the_pipelines_zeroed_past_the_prompt(wan):
    """The conditioning equals ``WanPipeline.encode_prompt`` (mask, zeros past the prompt's tokens, its cleaning of
    HTML entities and white space)."""
    text = "a  photo of a cat &amp; glasses "
    mine = wan.family.encode_one(wan, PromptInput(text)).hidden_states
    reference, _ = wan_pipeline(wan).encode_prompt(
        text, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS, device=torch.device("cpu")
    )
    assert mine.shape == reference.shape == (1, T5_TOKENS, 32)
    assert (mine - reference).abs().max() <= 1e-6
    tokens = len(wan.tokenizer("a photo of a cat & glasses").input_ids)
    assert (mine[0, tokens:] == 0).all() and (mine[0, :tokens].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------- frames, windows, syntax


def test_frame_counts_latent_shapes_and_refusals(wan):
    family = wan.family
    assert family.latent_shape(wan, 32, 48, 9) == (16, 3, 4, 6)
    assert family.latent_shape(wan, 32, 48, 1) == (16, 1, 4, 6)
    assert family.size_multiple(wan) == 16 and nearest_frame_counts(10, 4) == (9, 13)
    with pytest.raises(VideoSettingsError, match=r"frames 10: Wan makes 4k \+ 1 frames .* nearest counts are 9 or 13"):
        Session(wan).spec(PROMPT, frames=10, size=32, steps=2)
    assert Session(wan).spec(PROMPT, size=32, steps=2).frames == 81  # the pipeline's default
    with pytest.raises(VideoSettingsError, match="has one denoiser"):
        Session(wan).spec(PROMPT, frames=5, size=32, steps=2, scale_2=3.0)


def test_image_families_stay_at_one_frame():
    session = Session("shapes")
    spec = session.spec("a red circle", steps=2)
    assert spec.frames == 1 and spec.scale_2 is None and "frames" not in spec.to_json()
    with pytest.raises(VideoSettingsError, match="which makes images; give frames"):
        session.spec("a red circle", steps=2, frames=5)
    with pytest.raises(SettingsError, match="frames must be a whole number"):
        session.spec("a red circle", steps=2, frames=0)


def test_scale_one_on_one_expert_only_is_refused(wan22):
    with pytest.raises(VideoSettingsError, match="scale 1 .* on one expert only is not supported"):
        Session(wan22).spec(PROMPT, NEGATIVE, frames=5, size=32, steps=2, scale=1.0, scale_2=3.0)


def test_windows_edits_and_weights_act_on_umt5(wan):
    """A negative window leaves the negative out of the steps outside it; prompt edits switch text at their step;
    AUTOMATIC1111 weights scale a word's UMT5 states (the transformer's text embedder has no per-token norm)."""
    session = Session(wan)
    options = dict(steps=STEPS, size=32, frames=5, seeds=(1,), scale=4.0)
    windowed = session.run(session.spec(PROMPT, NEGATIVE, negative_windows=["1:"], **options), trace=True)
    assert [sorted(info.predictions) for info in windowed.trace] == [
        ["positive", "unconditional"],
        ["negative", "positive"],
        ["negative", "positive"],
    ]
    edited = session.run(session.spec("a photo of a [dog:cat:1]", NEGATIVE, **options))
    dog = session.run(session.spec("a photo of a dog", NEGATIVE, **options))
    assert np.abs(edited.pixels - dog.pixels).max() > 1e-4
    plain = wan.family.encode_one(wan, PromptInput("a photo of a cat")).hidden_states
    weighted = wan.family.encode_one(wan, PromptInput("a photo of a (cat:1.5)")).hidden_states
    assert (weighted - plain).abs().max() > 1e-3 and (weighted[0, 6:] == 0).all()
    assert session.run(session.spec("a photo of a (cat:1.5)", "[a red hat:1]", **options)).pixels.shape[1] == 5


def test_velocity_rules_and_long_prompts_are_refused(wan):
    with pytest.raises(GuidanceError, match="not exact on the velocity predictions"):
        Session(wan).spec(PROMPT, NEGATIVE, rule="dng", frames=5, size=32, steps=2)
    with pytest.raises(PromptError, match=r"over the model's limit of 32.*would be cut: 'cat cat cat cat'"):
        wan.family.encode_one(wan, PromptInput(" ".join(["cat"] * 35)))


def test_a_video_over_the_memory_estimate_is_refused_before_sampling(wan):
    with pytest.raises(SettingsError, match=r"101 frames of 8192×8192 take 76 GiB .* over the 64 GiB"):
        Session(wan).spec(PROMPT, frames=101, size=8192, steps=2)


# ---------------------------------------------------------------- record, loading, command line


def test_the_run_records_frames_and_the_second_scale(wan22):
    session = Session(wan22)
    spec = session.spec(PROMPT, NEGATIVE, frames=5, size=32, steps=2, scale=4.0, scale_2=2.5)
    record = json.loads(json.dumps(spec.to_json()))
    assert (record["frames"], record["scale_2"]) == (5, 2.5)
    again = RunSpec.from_json(record)
    assert again == spec
    assert "Frames: 5" in spec.infotext(0) and "CFG scale 2: 2.5" in spec.infotext(0)
    guidance = Guidance(positive=Term(PROMPT), scale=3.0)
    with pytest.raises(SettingsError, match="second guidance scale 500 is outside"):
        RunSpec(guidance, frames=5, scale_2=500.0)


def test_saved_folders_load_as_wan_one_and_two_experts(wan, wan_dir, wan22, tmp_path):
    loaded = load_components(wan_dir)
    assert isinstance(loaded.family, WanFamily) and loaded.transformer_2 is None
    assert np.abs(ours(loaded, NEGATIVE, scale=4.0) - ours(wan, NEGATIVE, scale=4.0)).max() == 0
    folder = tmp_path / "wan22"
    wan_pipeline(wan22).save_pretrained(folder, safe_serialization=True)  # diffusers' own layout
    index = json.loads((folder / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.7 and index["transformer_2"][1] == "WanTransformer3DModel"
    assert isinstance(family_for_index(index), WanFamily)
    loaded = load_components(folder)
    assert loaded.transformer_2 is not None and loaded.pipeline_options["boundary_ratio"] == 0.7
    options = dict(steps=4, scale=5.0, scale_2=2.0)
    assert np.abs(ours(loaded, NEGATIVE, **options) - ours(wan22, NEGATIVE, **options)).max() == 0
    resaved = load_components(save_components(loaded, tmp_path / "resaved"))  # negprompt's own save keeps both
    assert resaved.transformer_2 is not None and resaved.pipeline_options["boundary_ratio"] == 0.7
    assert np.abs(ours(resaved, NEGATIVE, **options) - ours(wan22, NEGATIVE, **options)).max() == 0


def test_cli_refuses_a_frame_count_wan_cannot_make(wan_dir, tmp_path, capsys):
    out = tmp_path / "video.webp"
    base = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(wan_dir), "--steps", "2", "--size", "32", "-q"]
    code = main([*base, "--frames", "10", "--out", str(out)])
    assert_usage_error(code, capsys, "frames 10: Wan makes 4k + 1 frames", out)
    code = main([*base, "--frames", "5", "--scale-2", "3", "--out", str(out)])
    assert_usage_error(code, capsys, "has one denoiser", out)
    code = main([*base, "--frames", "0", "--out", str(out)])
    assert_usage_error(code, capsys, "'0' frames: give 1–10001", out)


def test_nag_acts_on_the_expert_of_each_step(wan22):
    """NAG (at CFG 1) with its negative only in the second expert's steps (2 and 3 of 4) changes those steps'
    guided velocity: the loop prepares ``transformer_2`` there, not the idle ``transformer``."""
    session = Session(wan22)
    options = dict(steps=4, size=32, frames=5, seeds=(1,), scale=1.0)
    plain = session.run(session.spec(PROMPT, rule="cfg", **options), trace=True)
    nag = session.run(session.spec(PROMPT, NEGATIVE, rule="nag", negative_windows=["2:"], **options), trace=True)
    change = [float((a.guided - b.guided).abs().max()) for a, b in zip(nag.trace, plain.trace)]
    assert change[:2] == [0.0, 0.0] and min(change[2:]) > 1e-3
