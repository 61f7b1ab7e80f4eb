"""SDXL on a tiny random model built from configs: images equal diffusers' StableDiffusionXLPipeline,
the whole negative surface (negative_2, negative micro-conditions, zeroed empty negatives), every rule,
loading from a directory, bfloat16, capture, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureError, CaptureRequest
from negprompt.attention.result import capture
from negprompt.guidance.plan import Guidance, MicroConditions, Term
from negprompt.guidance.rules import all_rules
from negprompt.interfaces.cli import main
from negprompt.models.loading import load_components
from negprompt.models.stable_diffusion_xl import StableDiffusionXLFamily
from negprompt.runspec import SettingsError
from negprompt.sampling.loop import sample
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session
from negprompt.testing.peers import diffusers_pipeline

PROMPT, NEGATIVE = "a photo of a cat", "glasses"
SEEDS = [3, 11]
HEIGHT, WIDTH = 32, 48  # non-square
SURFACE = dict(  # diffusers' names for the prompts and micro-conditions of the runs compared
    prompt_2="red hat",
    original_size=(64, 64),
    negative_prompt=NEGATIVE,
    negative_prompt_2="a dog",
    negative_original_size=(16, 16),
    negative_crops_coords_top_left=(2, 4),
    negative_target_size=(32, 48),
)


def pipeline(components, scheduler="default", force_zeros=True):
    if not force_zeros:
        components = replace(components, pipeline_options={"force_zeros_for_empty_prompt": False})
    return diffusers_pipeline(components, make_scheduler(scheduler, components.scheduler))


def theirs(components, scheduler="default", one_call_per_image=True, force_zeros=True, **kwargs) -> np.ndarray:
    """diffusers' images for SEEDS. With negative micro-conditions the pipeline must run one image per call:
    it repeats its [negative, positive] time ids per image, so in a batch of two rows 1 and 2 get each
    other's (its embeddings are laid out negatives first)."""
    pipe = pipeline(components, scheduler, force_zeros)
    common = dict(num_inference_steps=6, guidance_scale=5.0, height=HEIGHT, width=WIDTH, output_type="np", **kwargs)
    if not one_call_per_image:
        generators = [torch.Generator().manual_seed(s) for s in SEEDS]
        batched = {k: [v] * len(SEEDS) if isinstance(v, str) else v for k, v in common.items()}
        return pipe([PROMPT] * len(SEEDS), generator=generators, **batched).images
    return np.concatenate([pipe(PROMPT, generator=torch.Generator().manual_seed(s), **common).images for s in SEEDS])


def ours(components, guidance, scheduler="default") -> np.ndarray:
    return sample(components, guidance, make_scheduler(scheduler, components.scheduler), SEEDS, 6, HEIGHT, WIDTH).images


@pytest.mark.parametrize("scheduler", ["default", "euler-a", "dpm++2m", "ddim", "unipc"])
def test_equals_diffusers_with_negative_2_and_negative_micro_conditions(tiny_sdxl, scheduler):
    mine = ours(
        tiny_sdxl,
        Guidance(
            positive=Term(PROMPT, prompt_2="red hat", micro=MicroConditions(original_size=(64, 64))),
            negatives=(Term(NEGATIVE, prompt_2="a dog", micro=MicroConditions((16, 16), (2, 4), (32, 48))),),
            scale=5.0,
        ),
        scheduler,
    )
    reference = theirs(tiny_sdxl, scheduler, **SURFACE)
    assert mine.shape == reference.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(mine - reference).max() <= 1e-4


def test_equals_diffusers_batched_with_one_negative(tiny_sdxl):
    mine = ours(tiny_sdxl, Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=5.0), "euler")
    reference = theirs(tiny_sdxl, "euler", one_call_per_image=False, negative_prompt=NEGATIVE)
    assert np.abs(mine - reference).max() <= 1e-4


def test_empty_negative_is_zeros_as_the_model_asks(tiny_sdxl):
    plain = Guidance(positive=Term(PROMPT), scale=5.0)
    assert np.abs(ours(tiny_sdxl, plain) - theirs(tiny_sdxl)).max() <= 1e-4  # negative_prompt=None → zeros
    # negative micro-conditions alone: zero embeddings with the negative's time ids
    micro = MicroConditions((16, 16), None, (8, 8))
    micro_only = Guidance(positive=Term(PROMPT), negatives=(Term("", micro=micro),), scale=5.0)
    reference = theirs(tiny_sdxl, negative_original_size=(16, 16), negative_target_size=(8, 8))
    assert np.abs(ours(tiny_sdxl, micro_only) - reference).max() <= 1e-4
    # a model that does not ask for zeros encodes the empty text
    no_zeros = replace(tiny_sdxl, pipeline_options={"force_zeros_for_empty_prompt": False})
    reference = theirs(tiny_sdxl, force_zeros=False)
    assert np.abs(ours(no_zeros, plain) - reference).max() <= 1e-4
    assert np.abs(ours(no_zeros, plain) - ours(tiny_sdxl, plain)).max() > 1e-3  # the choice matters


def test_negative_options_follow_the_negatives_window(tiny_sdxl):
    """negative_2 and the negative micro-conditions are the negative branch's inputs: outside its window ∅ stands in."""
    session = Session(tiny_sdxl)
    spec = session.spec(
        PROMPT,
        NEGATIVE,
        negative_2="a dog",
        negative_original_size=(8, 8),
        negative_windows=["3:"],
        steps=6,
        seeds=[1],
        size=(HEIGHT, WIDTH),
    )
    seen = []
    handle = tiny_sdxl.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"][:, 0].tolist()),
        with_kwargs=True,
    )
    try:
        session.run(spec)
    finally:
        handle.remove()
    # steps 0–2: ∅ (the positive's size conditions) and positive; from step 3 the negative's original size 8
    assert seen[:3] == [[HEIGHT, HEIGHT]] * 3 and seen[3:] == [[8.0, HEIGHT]] * 3
    assert spec.guidance.negatives[0].prompt_2 == "a dog"
    info = spec.infotext(0)
    assert 'Negative 1 prompt 2: "a dog"' in info and 'Negative 1 size conditions: "original 8,8"' in info


@pytest.mark.parametrize("rule", sorted(set(all_rules()) - {"cfg"}))
def test_every_rule_runs_on_sdxl(tiny_sdxl, rule):
    session = Session(tiny_sdxl)
    extra = {"negative_scales": [4.0]} if rule in ("dual", "weighted", "perp-neg") else {}
    spec = session.spec(PROMPT, NEGATIVE, rule=rule, steps=4, seeds=[0], size=32, negative_2="a dog", **extra)
    images = session.run(spec).pixels
    plain = session.run(session.spec(PROMPT, rule="cfg", steps=4, seeds=[0], size=32)).pixels
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert np.abs(images - plain).max() > 1e-3  # the negative changes the image


def test_sdxl_directory_loads_and_gives_the_same_images(tiny_sdxl, tiny_sdxl_dir):
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    loaded = load_components(tiny_sdxl_dir)
    assert (
        isinstance(loaded.family, StableDiffusionXLFamily) and loaded.pipeline_options["force_zeros_for_empty_prompt"]
    )
    session, memory = Session(loaded), Session(tiny_sdxl)
    assert session.defaults["scale"] == 5.0  # SDXL pipeline's default
    spec = session.spec(PROMPT, NEGATIVE, steps=3, seeds=[2], size=(HEIGHT, WIDTH))
    assert np.array_equal(session.run(spec).pixels, memory.run(spec).pixels)


@pytest.mark.parametrize("dtype, largest", [("float16", 0.01), ("bfloat16", 0.05)])
def test_half_precision_on_cpu_stays_near_float32(tiny_sdxl_dir, dtype, largest):
    """Measured on the tiny SDXL (6 steps, 32×48): float16 differs from float32 by at most 0.0018 (mean
    0.0003), bfloat16 (8 bits of mantissa) by 0.019 (mean 0.0027); the bounds leave room for other CPUs."""
    spec_args = dict(steps=6, seeds=[5], size=(HEIGHT, WIDTH))
    full = Session(str(tiny_sdxl_dir), device="cpu", dtype="float32")
    half = Session(str(tiny_sdxl_dir), device="cpu", dtype=dtype)
    a = full.run(full.spec(PROMPT, NEGATIVE, **spec_args)).pixels
    b = half.run(half.spec(PROMPT, NEGATIVE, **spec_args)).pixels
    parts = half.components
    assert {parts.unet.dtype, parts.text_encoder_2.dtype, parts.vae.dtype} == {getattr(torch, dtype)}  # VAE restored
    assert np.isfinite(b).all() and np.abs(a - b).max() <= largest and np.abs(a - b).mean() <= largest / 10


def test_float16_vae_decodes_in_float32_and_is_restored(tiny_sdxl_dir):
    components = load_components(tiny_sdxl_dir)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = components.family.to_pixels(components, latents)
    components.vae.to(torch.float16)
    upcast = components.family.to_pixels(components, latents.half())
    assert components.vae.dtype == torch.float16 and upcast.dtype == torch.float32
    assert (upcast - reference).abs().max() <= 5e-3  # only the float16 round trip of weights and latents


def test_capture_leaves_sdxl_images_identical_and_sees_two_resolutions(tiny_sdxl):
    session = Session(tiny_sdxl)
    spec = session.spec(PROMPT, NEGATIVE, steps=4, seeds=[1, 2], size=(HEIGHT, WIDTH))
    plain = session.run(spec).pixels
    request = CaptureRequest(words={"positive": ["cat"], "negative": ["glasses"]})
    result = capture(spec, request, session, reducer=reduce_layer)
    assert np.array_equal(result.generation.pixels, plain)
    layers = result.index["layers"]
    assert len({layer["side"] for layer in layers}) == 2  # cross-attention at two resolutions, as in SDXL
    assert all(layer["path"].startswith(("down_blocks.", "up_blocks.", "mid_block.")) for layer in layers)
    assert result.maps("negative", "glasses").shape[1] == 2 and torch.isfinite(result.maps("positive", "cat")).all()
    with pytest.raises(CaptureError, match="prompt_2"):
        capture(
            session.spec(PROMPT, NEGATIVE, negative_2="a dog", steps=2, size=32), request, session, reducer=reduce_layer
        )


def test_sdxl_options_on_an_sd_model_are_refused(tiny_sd):
    session = Session(tiny_sd)
    for options in ({"negative_2": "a dog"}, {"negative_original_size": (8, 8)}, {"prompt_2": "x"}):
        with pytest.raises(SettingsError, match="option.*of SDXL.* models, but .*Stable Diffusion 1.x/2.x"):
            session.spec(PROMPT, NEGATIVE, **options)


def test_cli_refuses_bad_sdxl_input_in_one_line(tiny_sd_dir, tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["generate", "a cat", "-n", "dog", "--steps", "2", "--size", "32", "-q", "--out", str(out)]
    code = main([*base, "--model", str(tiny_sd_dir), "--negative-2", "a hat"])
    assert_usage_error(code, capsys, "option(s) of SDXL, SD3 and FLUX models, but", out)
    code = main([*base, "--model", str(tiny_sdxl_dir), "--negative-original-size", "0,64"])
    assert_usage_error(code, capsys, "sizes must be positive", out)
    code = main([*base, "--model", str(tiny_sdxl_dir), "--target-size", "64x64"])
    assert_usage_error(code, capsys, "two whole numbers like 1024,1024", out)
    code = main([*base, "--model", str(tiny_sdxl_dir), "--crops-coords-top-left", "-1,0"])
    assert_usage_error(code, capsys, "", out)


def test_cli_generates_on_sdxl_with_its_options(tiny_sdxl, tiny_sdxl_dir, tmp_path, capsys):
    from negprompt.interfaces.png import read_png_settings

    out = tmp_path / "xl.png"
    code = main(
        [
            "generate",
            PROMPT,
            "-n",
            NEGATIVE,
            "--negative-2",
            "a dog",
            "--negative-original-size",
            "16,16",
            "--negative-target-size",
            "32,48",
            "--negative-crops-coords-top-left",
            "2,4",
            "--prompt-2",
            "red hat",
            "--original-size",
            "64,64",
            "--scheduler",
            "unipc",
            "--steps",
            "6",
            "--scale",
            "5",
            "--seed",
            "3",
            "--height",
            str(HEIGHT),
            "--width",
            str(WIDTH),
            "--model",
            str(tiny_sdxl_dir),
            "-q",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    settings, _ = read_png_settings(out)
    negative = settings.guidance.negatives[0]
    assert negative.prompt_2 == "a dog" and negative.micro == MicroConditions((16, 16), (2, 4), (32, 48))
    from PIL import Image

    pixels = np.asarray(Image.open(out)).astype(np.float32) / 255
    reference = theirs(tiny_sdxl, "unipc", **SURFACE)[0]  # seed 3
    assert np.abs(pixels - reference).max() <= 1 / 255 + 1e-6  # PNG rounding only


def test_attend_timeline_and_strength_study_run_on_sdxl(tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "attend"
    argv = [
        "attend",
        PROMPT,
        "-n",
        NEGATIVE,
        "--steps",
        "3",
        "--size",
        "32",
        "--model",
        str(tiny_sdxl_dir),
        "-q",
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "timeline.png").exists() and "glasses" in json.dumps(summary)
    spec = tmp_path / "xl-study.yaml"
    spec.write_text(
        f"name: xl\nmodel: {tiny_sdxl_dir}\nsteps: 3\nseeds: [0]\nsize: 32\npairs:\n"
        "  - {group: noun, prompt: a photo of a cat, negative: a dog}\n"
        "  - {group: adjective, prompt: a photo of a cat, negative: red}\n"
    )
    study = tmp_path / "study"
    assert main(["study", str(spec), "--out", str(study), "-q"]) == 0, capsys.readouterr().err
    assert main(["report", str(study)]) == 0, capsys.readouterr().err
    assert (study / "report.md").exists()


def test_negative_2_takes_automatic1111_weights_and_edits(tiny_sdxl):
    """negative_2 is a prompt like any other: weights scale the second encoder's states only, and a
    prompt edit switches its text at the given step."""
    from negprompt.sampling.loop import Group, encode_groups

    def negative_rows(negative_2: str, steps: int = 4) -> dict:
        spec = Session(tiny_sdxl).spec(PROMPT, NEGATIVE, negative_2=negative_2, steps=steps, size=32)
        scheduler = make_scheduler("default", tiny_sdxl.scheduler)
        encoded = encode_groups(tiny_sdxl, [Group(spec.guidance, (0,))], scheduler, steps, 32, 32)
        return {key.text_2: c for key, c in encoded.items() if key.text == NEGATIVE}

    width_1 = tiny_sdxl.text_encoder.config.hidden_size
    plain = negative_rows("a dog")["a dog"].hidden_states
    weighted = negative_rows("a (dog:1.5)")["a (dog:1.5)"].hidden_states
    assert torch.equal(weighted[..., :width_1], plain[..., :width_1])  # encoder 1 reads the negative, unweighted
    assert not torch.allclose(weighted[..., width_1:], plain[..., width_1:])
    edited = negative_rows("[a dog:a hat:2]")
    assert set(edited) == {"a dog", "a hat"}  # before and after step 2
