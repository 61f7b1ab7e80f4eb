"""Z-Image on a tiny random model built from configs: images equal diffusers' ZImagePipeline (CFG with a negative,
cfg_normalization as rule cfg-renorm, cfg_truncation as a guidance interval), variable-length prompts batched as
the pipeline batches them, loading, rules on velocities, the study spec, windows and prompt syntax, the CLI with
--from-png, and bad input. The attention capture of the main single-stream layers and NAG/VSF are in
test_family_z_image_attention.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.guidance import formulas
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules import all_rules
from negprompt.guidance.rules.base import GuidanceError
from negprompt.guidance.rules.cfg_renorm import renormalized
from negprompt.guidance.windows import Window, WindowError
from negprompt.interfaces.cli import main
from negprompt.models.conditioning import PromptInput
from negprompt.models.families import family_for_index, family_for_parts
from negprompt.models.loading import load_components
from negprompt.models.prompts import PromptError
from negprompt.models.saving import save_components
from negprompt.models.z_image import ZImageFamily, chat_template_parts, truncation_interval
from negprompt.runspec import SettingsError
from negprompt.sampling.loop import Group, encode_groups, sample_groups
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session
from negprompt.testing.tiny_z_image import build_tiny_z_image, z_image_pipeline

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
SEEDS = (3, 11)
HEIGHT, WIDTH, STEPS = 32, 48, 5  # non-square
TOLERANCE = 1e-4  # float32 images in [0, 1]
REFUSED_ON_VELOCITY = ("dng", "apg")


@pytest.fixture(scope="module")
def z_image():
    return build_tiny_z_image(seed=0)


@pytest.fixture(scope="module")
def z_image_dir(z_image, tmp_path_factory):
    return save_components(z_image, tmp_path_factory.mktemp("tiny-z-image"))


def ours(components, guidance, seeds=SEEDS, steps=STEPS, **kwargs):
    groups = [Group(guidance, seeds)]
    conditioning = encode_groups(components, groups, make_scheduler("default", components.scheduler), steps)
    scheduler = make_scheduler("default", components.scheduler)
    return sample_groups(components, groups, scheduler, steps, HEIGHT, WIDTH, conditioning=conditioning, **kwargs)


def theirs(components, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    batched = {k: [v] * len(SEEDS) if isinstance(v, str) else v for k, v in kwargs.items()}
    pipe = z_image_pipeline(components)
    return pipe(
        [PROMPT] * len(SEEDS),
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        generator=generators,
        output_type="np",
        **batched,
    ).images


def sd(negatives=(), scale=5.0, rule="sd", **kwargs) -> Guidance:
    return Guidance(
        positive=Term(PROMPT), negatives=tuple(Term(n) for n in negatives), scale=scale, rule=rule, **kwargs
    )


# ---------------------------------------------------------------- equal to diffusers


def test_images_equal_the_pipeline_without_guidance_and_with_cfg_on_the_empty_prompt(z_image):
    """guidance_scale g = 0: one pass a step, rule sd at s = 1; g > 0 without a negative: CFG on the templated
    empty prompt, rule sd at s = g + 1."""
    one_pass = ours(z_image, sd(scale=1.0))
    reference = theirs(z_image, guidance_scale=0.0)
    assert one_pass.images.shape == reference.shape == (len(SEEDS), HEIGHT, WIDTH, 3)
    assert np.abs(one_pass.images - reference).max() <= TOLERANCE
    assert one_pass.unet_batch_rows == len(SEEDS) * STEPS
    empty = ours(z_image, sd(scale=5.0))
    assert np.abs(empty.images - theirs(z_image, guidance_scale=4.0)).max() <= TOLERANCE
    assert empty.unet_batch_rows == 2 * len(SEEDS) * STEPS
    assert np.abs(empty.images - one_pass.images).max() > 1e-2  # guidance acts


@pytest.mark.parametrize(
    "rule, settings, pipeline_options",
    [
        ("sd", None, {}),
        ("cfg-renorm", {"ratio": 1.0}, {"cfg_normalization": True}),
        ("cfg-renorm", {"ratio": 1.05}, {"cfg_normalization": 1.05}),
    ],
    ids=["negative", "normalization-true", "normalization-1.05"],
)
def test_images_equal_the_pipeline_with_a_negative(z_image, rule, settings, pipeline_options):
    guidance = sd((NEGATIVE,), scale=5.0, rule=rule, settings=settings)
    mine = ours(z_image, guidance).images
    reference = theirs(z_image, negative_prompt=NEGATIVE, guidance_scale=4.0, **pipeline_options)
    assert np.abs(mine - reference).max() <= TOLERANCE
    if rule != "sd":  # the cap binds on this model: the renormalised images are not the plain negative's
        assert np.abs(mine - ours(z_image, sd((NEGATIVE,), scale=5.0)).images).max() > 1e-3


@pytest.mark.parametrize("normalization", [False, True])
def test_cfg_truncation_is_a_guidance_interval_from_the_first_step(z_image, normalization):
    """cfg_truncation c: no guidance (the positive alone, one pass) where (1000 − t)/1000 > c — the interval [0, K)."""
    interval = truncation_interval(z_image, STEPS, 0.5, HEIGHT, WIDTH)
    assert interval is not None and interval.start == 0 and 0 < interval.end < STEPS
    rule, settings = ("cfg-renorm", {"ratio": 1.0}) if normalization else ("sd", None)
    mine = ours(z_image, sd((NEGATIVE,), scale=5.0, rule=rule, settings=settings, interval=interval))
    options = {"cfg_normalization": True} if normalization else {}
    reference = theirs(z_image, negative_prompt=NEGATIVE, guidance_scale=4.0, cfg_truncation=0.5, **options)
    assert np.abs(mine.images - reference).max() <= TOLERANCE
    guided = interval.end
    assert mine.unet_batch_rows == len(SEEDS) * (2 * guided + (STEPS - guided))


def test_truncation_interval_at_its_edges(z_image):
    assert truncation_interval(z_image, STEPS, 1.0, HEIGHT, WIDTH) is None  # every step guided (the default c = 1)
    assert truncation_interval(z_image, STEPS, 0.0, HEIGHT, WIDTH) == Window(0, 1)  # the first step's time is 0
    with pytest.raises(WindowError, match="leaves no step guided"):
        truncation_interval(z_image, STEPS, -0.1, HEIGHT, WIDTH)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(z_image):
    """Second-to-last Qwen3 states of the templated prompt's tokens, no padding: a length of its own per prompt."""
    pipe = z_image_pipeline(z_image)
    lengths = set()
    for text in (PROMPT, "", "cat"):
        encoded = z_image.family.encode_one(z_image, PromptInput(text)).hidden_states
        (reference,) = pipe._encode_prompt([text], device=torch.device("cpu"), max_sequence_length=512)
        assert torch.equal(encoded[0], reference)
        lengths.add(encoded.shape[1])
    assert len(lengths) == 3


def test_renormalization_formula():
    """ε̂·min(1, k‖ε_y‖/‖ε̂‖) per image: a capped image gets norm k‖ε_y‖ and keeps its direction; others stay."""
    generator = torch.Generator().manual_seed(0)
    positive = torch.randn(3, 4, 6, 5, generator=generator)
    guided = torch.randn(3, 4, 6, 5, generator=generator) * torch.tensor([3.0, 0.2, 1.5]).view(3, 1, 1, 1)
    out = renormalized(guided, positive, 1.1)
    for i in range(3):
        cap = 1.1 * positive[i].norm()
        if guided[i].norm() > cap:
            assert torch.allclose(out[i].norm(), cap, rtol=1e-5)
            assert torch.allclose(out[i] / out[i].norm(), guided[i] / guided[i].norm(), atol=1e-6)
        else:
            assert torch.equal(out[i], guided[i])
    assert {bool(guided[i].norm() > 1.1 * positive[i].norm()) for i in range(3)} == {True, False}
    with pytest.raises(GuidanceError, match="cfg_renorm_ratio must be above 0") as error:
        sd((NEGATIVE,), rule="cfg-renorm", settings={"ratio": 0.0})
    assert "\n" not in str(error.value)


def test_cfg_renorm_on_velocities_equals_its_formula(z_image):
    guidance = sd((NEGATIVE,), scale=5.0, rule="cfg-renorm", settings={"ratio": 1.0})
    for info in ours(z_image, guidance, seeds=(3,), steps=3, keep_trace=True).trace:
        positive, negative = info.predictions["positive"], info.predictions["negative"]
        expected = renormalized(formulas.sd_negative(negative, positive, 5.0), positive, 1.0)
        assert torch.equal(info.guided, expected)
        assert float(info.guided.norm()) <= float(positive.norm()) * (1 + 1e-5)


# ---------------------------------------------------------------- loading


def test_a_saved_folder_loads_back_as_z_image_and_gives_the_same_images(z_image, z_image_dir):
    index = json.loads((z_image_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline" and index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert isinstance(family_for_index(index), ZImageFamily) and isinstance(family_for_parts(z_image), ZImageFamily)
    weights = {p.suffix for p in z_image_dir.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")}
    assert weights == {".safetensors"}
    loaded = load_components(z_image_dir)
    assert isinstance(loaded.family, ZImageFamily) and loaded.unet is None
    assert chat_template_parts(loaded.tokenizer) == chat_template_parts(z_image.tokenizer)
    guidance = sd((NEGATIVE,), scale=4.0)
    assert np.array_equal(ours(loaded, guidance, steps=3).images, ours(z_image, guidance, steps=3).images)


def test_diffusers_loads_the_saved_folder(z_image, z_image_dir):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(z_image_dir, use_safetensors=True, local_files_only=True)
    theirs_weights, ours_weights = pipe.transformer.state_dict(), z_image.transformer.state_dict()
    assert theirs_weights.keys() == ours_weights.keys()
    assert all(torch.equal(theirs_weights[k], ours_weights[k]) for k in ours_weights)


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize("rule", sorted(all_rules()))
def test_every_rule_runs_on_velocities_or_is_refused_in_one_line(z_image, rule):
    session = Session(z_image)
    negatives = [NEGATIVE, "glasses"] if rule in ("dual", "weighted", "perp-neg") else [NEGATIVE]
    options = dict(rule=rule, scale=4.0, steps=3, size=(HEIGHT, WIDTH), seeds=[3])
    if rule == "cfg":
        negatives = []
    if rule in REFUSED_ON_VELOCITY:
        with pytest.raises(GuidanceError, match="not exact on the velocity predictions") as error:
            session.spec(PROMPT, negatives, **options)
        assert "\n" not in str(error.value)
        return
    images = session.run(session.spec(PROMPT, negatives, **options)).pixels
    plain = session.run(session.spec(PROMPT, **{**options, "rule": "sd"})).pixels
    assert np.isfinite(images).all() and images.std() > 0
    if negatives:
        assert np.abs(images - plain).max() > 1e-3  # the negative acts


def test_dual_scales_are_independent_and_reduce_to_sd_at_s_minus_one(z_image):
    """Eq. (8) with s⁻ = s − 1 is eq. (9); another s⁻ changes the image."""
    negative = (Term(NEGATIVE),)
    single = ours(z_image, sd((NEGATIVE,), scale=4.0), seeds=(3,), steps=3).images
    same = ours(z_image, Guidance("dual", Term(PROMPT), negative, scale=4.0), seeds=(3,), steps=3).images
    assert np.abs(same - single).max() <= 1e-5
    own = Guidance("dual", Term(PROMPT), (Term(NEGATIVE, scale=1.0),), scale=4.0)
    assert np.abs(ours(z_image, own, seeds=(3,), steps=3).images - single).max() > 1e-3


def test_weighted_with_two_negatives_equals_its_formula(z_image):
    guidance = Guidance("weighted", Term(PROMPT), (Term(NEGATIVE, scale=2.0), Term("glasses", scale=1.0)), scale=4.0)
    for info in ours(z_image, guidance, seeds=(3,), steps=2, keep_trace=True).trace:
        p = info.predictions
        expected = formulas.weighted_sum(
            p["unconditional"], [p["positive"], p["negative"], p["negative_2"]], [4.0, -2.0, -1.0]
        )
        assert torch.allclose(info.guided, expected, atol=1e-6)


# ---------------------------------------------------------------- the strength study


def test_the_strength_study_and_attend_run_on_z_image(z_image_dir, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: t\nmodel: {z_image_dir}\nsteps: 3\nscale: 4\nsize: 32\nseeds: [1]\npairs:\n"
        "  - {group: noun, prompt: a photo of a cat, negative: red hat}\n"
        "  - {group: adjective, prompt: a woman in the street, negative: glasses, related: woman}\n"
    )
    assert main(["study", str(spec), "--out", str(tmp_path / "s"), "-q"]) == 0
    assert main(["report", str(tmp_path / "s")]) == 0
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| noun |" in report and "| adjective |" in report
    out = tmp_path / "attend"
    args = ["attend", PROMPT, "-n", NEGATIVE, "--model", str(z_image_dir), "--steps", "2", "--size", "32"]
    assert main([*args, "--out", str(out), "-q"]) == 0
    assert any(out.glob("*.png"))
    capsys.readouterr()


def test_the_z_image_study_spec_parses_and_names_the_pipelines_defaults():
    from pathlib import Path

    from negprompt.analysis.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "negprompt" / "studies" / "ban2024-zimage.yaml")
    assert spec.model == "Tongyi-MAI/Z-Image" and spec.rule == "sd"
    assert (spec.steps, spec.scale, spec.size, spec.map_size) == (50, 6.0, 1024, 64)  # g = 5; 128 cells / 2
    assert len(spec.pairs) == 20 and load_spec("ban2024-zimage") == spec


# ---------------------------------------------------------------- windows and prompt syntax


def test_negative_window_and_prompt_editing_act_where_they_should(z_image):
    """A negative from step 2 (window or [NEGATIVE:2]) leaves steps 0–1 as CFG on the empty prompt; a positive
    edited at step 2 is the first prompt until then."""
    plain = ours(z_image, sd(scale=5.0), seeds=(3,), keep_trace=True)
    windowed = ours(
        z_image,
        Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(2)),), scale=5.0),
        seeds=(3,),
        keep_trace=True,
    )
    edited = ours(z_image, sd((f"[{NEGATIVE}:2]",), scale=5.0), seeds=(3,), keep_trace=True)
    assert np.array_equal(windowed.images, edited.images)
    for step in range(2):
        assert torch.equal(windowed.trace[step].guided, plain.trace[step].guided)
    assert not torch.allclose(windowed.trace[2].guided, plain.trace[2].guided)

    dog = "a photo of a dog"
    first = ours(z_image, Guidance(positive=Term(dog), scale=5.0), seeds=(3,), keep_trace=True)
    switched = ours(z_image, Guidance(positive=Term(f"[{dog}:{PROMPT}:2]"), scale=5.0), seeds=(3,), keep_trace=True)
    for step in range(2):
        assert torch.equal(switched.trace[step].guided, first.trace[step].guided)
    assert not torch.allclose(switched.trace[2].guided, first.trace[2].guided)
    assert np.abs(switched.images - first.images).max() > 1e-3


def test_prompt_weights_of_one_equal_the_plain_prompt_and_others_are_refused(z_image):
    """Weight 1 is the plain prompt, on the positive and on the negative. Another weight would scale a token's
    state, which the transformer's caption embedder normalises away (RMSNorm first): refused in one line."""
    encode = z_image.family.encode_one
    plain = encode(z_image, PromptInput(PROMPT)).hidden_states
    assert torch.equal(encode(z_image, PromptInput(f"({PROMPT}:1.0)")).hidden_states, plain)
    base = ours(z_image, sd((NEGATIVE,)), seeds=(3,), steps=3).images
    assert np.array_equal(base, ours(z_image, sd((f"({NEGATIVE}:1)",)), seeds=(3,), steps=3).images)
    for text in ("a photo of a (cat:1.3) with glasses", "[a photo of a cat:a (red:0.5) hat:2]"):
        with pytest.raises(PromptError, match="prompt weights such as .* cannot act on Z-Image") as error:
            ours(z_image, sd((text,)), seeds=(3,), steps=3)
        assert "\n" not in str(error.value)
    # Why: RMSNorm(w·x) = RMSNorm(x) up to its ε (measured: 0.4 % here, from a 30 % change of the states).
    with torch.no_grad():
        embedded = z_image.transformer.cap_embedder(plain[0])
        scaled = z_image.transformer.cap_embedder(1.3 * plain[0])
    assert float((scaled - embedded).norm() / embedded.norm()) < 0.01


# ---------------------------------------------------------------- command line


def test_cli_generate_on_a_z_image_folder_and_again_from_the_png(z_image_dir, tmp_path):
    out = tmp_path / "z.png"
    args = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(z_image_dir), "--steps", "3", "--seed", "4"]
    extra = ["--width", str(WIDTH), "--height", str(HEIGHT), "--rule", "cfg-renorm", "--cfg-renorm-ratio", "1.2"]
    assert main([*args, *extra, "--interval", "0:2", "-q", "--out", str(out)]) == 0
    from PIL import Image

    info = Image.open(out).text["parameters"]
    assert "Rule: cfg-renorm" in info and "cfg_renorm_ratio: 1.2" in info and "Guidance interval: [0, 2)" in info
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cli_refuses_bad_input_in_one_line(z_image_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(z_image_dir), "--steps", "2", "--size", "32"]
    base += ["-q", "--out", str(out)]
    assert_usage_error(main([*base, "--negative-2", "glasses"]), capsys, "negative_2: option(s) of SDXL, SD3", out)
    assert_usage_error(main([*base, "--prompt-2", "a dog"]), capsys, "but", out)
    assert_usage_error(main([*base, "--rule", "nag", "--nag-alpha", "2"]), capsys, "nag_alpha (α) must be in", out)
    assert_usage_error(main([*base[:2], *base[4:], "--rule", "vsf"]), capsys, "rule 'vsf' needs a negative", out)
    assert_usage_error(main([*base, "--rule", "dng"]), capsys, "not exact on the velocity predictions", out)
    weighted = ["generate", "a photo of a (cat:1.2)", *base[2:]]
    assert_usage_error(main(weighted), capsys, "prompt weights such as (cat:1.2) cannot act on Z-Image", out)
    assert_usage_error(main([*base, "--size", "30"]), capsys, "not a positive multiple of 4", out)
    long_prompt = " ".join(["cat"] * 510)  # 510 tokens and the template's
    code = main(["generate", long_prompt, *base[2:]])
    assert_usage_error(code, capsys, "over the model's limit of 512 (max_sequence_length)", out)


def test_a_prompt_over_the_limit_names_the_words_that_would_be_cut(z_image):
    long_prompt = " ".join(["cat"] * 509 + ["red", "dog", "with", "glasses"])  # 3 template tokens lead it
    with pytest.raises(PromptError, match="these words would be cut: 'red dog with glasses'") as error:
        z_image.family.encode_one(z_image, PromptInput(long_prompt))
    assert "\n" not in str(error.value)
    with pytest.raises(SettingsError, match="option.*of SDXL models"):
        Session(z_image).spec(PROMPT, NEGATIVE, original_size=(64, 64), steps=2, size=32)
