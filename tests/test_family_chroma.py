"""Chroma on a tiny random model built from configs: images equal diffusers' ChromaPipeline (with its additive text
mask), the reference's boolean mask excludes padding keys, per-row masks in batched calls, loading, rules on
velocities, windows and prompt syntax, the CLI with --from-png, and bad input."""

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
from negprompt.guidance import formulas
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules import all_rules
from negprompt.guidance.rules.base import GuidanceError
from negprompt.guidance.windows import Window
from negprompt.interfaces.cli import main
from negprompt.models.chroma import TEXT_MASK, ChromaFamily
from negprompt.models.conditioning import Conditioning, PromptInput
from negprompt.models.families import family_for_index, family_for_parts
from negprompt.models.loading import load_components
from negprompt.models.prompts import PromptError
from negprompt.models.saving import save_components
from negprompt.runspec import SettingsError
from negprompt.sampling.loop import Group, encode_groups, sample_groups
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session
from negprompt.testing.tiny_chroma import build_tiny_chroma, chroma_pipeline

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
SEEDS = (3, 11)
HEIGHT, WIDTH, STEPS = 32, 48, 4  # non-square
T5_TOKENS = 32  # the tiny T5 tokenizer's limit (the model's max_sequence_length here)
TOLERANCE = 1e-4  # float32 images, [0, 1]


@pytest.fixture(scope="module")
def chroma():
    return build_tiny_chroma(seed=0)


@pytest.fixture(scope="module")
def additive(chroma):
    """The same modules with diffusers 0.42.1's text mask: 0/1 added to the attention logits."""
    return replace(chroma, family=ChromaFamily(additive_mask=True))


@pytest.fixture(scope="module")
def chroma_dir(chroma, tmp_path_factory):
    return save_components(chroma, tmp_path_factory.mktemp("tiny-chroma"))


def ours(components, guidance, seeds=SEEDS, conditioning=None, **kwargs):
    groups = [Group(guidance, seeds)]
    if conditioning is None:
        conditioning = encode_groups(components, groups, make_scheduler("default", components.scheduler), STEPS)
    scheduler = make_scheduler("default", components.scheduler)
    return sample_groups(components, groups, scheduler, STEPS, HEIGHT, WIDTH, conditioning=conditioning, **kwargs)


def theirs(components, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    batched = {k: [v] * len(SEEDS) if isinstance(v, str) else v for k, v in kwargs.items()}
    return chroma_pipeline(components)(
        [PROMPT] * len(SEEDS),
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        generator=generators,
        output_type="np",
        max_sequence_length=T5_TOKENS,
        **batched,
    ).images


def plain(components, scale=4.0, **kwargs):
    return ours(components, Guidance(positive=Term(PROMPT), scale=scale, rule="sd"), **kwargs)


# ---------------------------------------------------------------- equal to diffusers


@pytest.mark.parametrize(
    "negatives, scale, passes",
    [((), 1.0, 1), ((), 4.0, 2), ((NEGATIVE,), 4.0, 2)],
    ids=["one-pass", "cfg-on-empty", "negative"],
)
def test_images_equal_chroma_pipeline_with_its_additive_mask(additive, negatives, scale, passes):
    """ChromaPipeline: real CFG v̂ = v_ỹ + s(v_y − v_ỹ) for s > 1 (ỹ the negative, else ""), one pass at s = 1."""
    guidance = Guidance(positive=Term(PROMPT), negatives=tuple(Term(n) for n in negatives), scale=scale, rule="sd")
    mine = ours(additive, guidance)
    reference = theirs(additive, guidance_scale=scale, **({"negative_prompt": negatives[0]} if negatives else {}))
    assert mine.images.shape == reference.shape == (len(SEEDS), HEIGHT, WIDTH, 3)
    assert np.abs(mine.images - reference).max() <= TOLERANCE
    assert mine.unet_batch_rows == passes * len(SEEDS) * STEPS


def test_prompts_are_encoded_as_the_pipeline_encodes_them(chroma, additive):
    """T5's states read with its padding masked, and the transformer's text mask: the prompt's tokens (with the
    end token) and one padding token."""
    pipe = chroma_pipeline(additive)
    for text in (PROMPT, "", "cat"):
        encoded = chroma.family.encode_one(chroma, PromptInput(text))
        hidden, mask = pipe._get_t5_prompt_embeds(text, max_sequence_length=T5_TOKENS)
        assert torch.equal(encoded.hidden_states, hidden)
        assert encoded.extra[TEXT_MASK].dtype == torch.bool and torch.equal(encoded.extra[TEXT_MASK].float(), mask)
    tokens = len(chroma.tokenizer(PROMPT).input_ids)  # with the end token
    assert int(chroma.family.encode_one(chroma, PromptInput(PROMPT)).extra[TEXT_MASK].sum()) == tokens + 1


# ---------------------------------------------------------------- the reference's boolean mask


def test_boolean_mask_excludes_padding_keys_and_differs_from_the_additive_form(chroma, additive):
    """With the reference's mask the image equals a run whose text is cut to its unmasked tokens (masked keys take
    no part in any softmax), and differs measurably from the pipeline's additive mask and from no mask at all."""
    guidance = Guidance(positive=Term(PROMPT), scale=1.0, rule="cfg")  # one pass: one row per image
    groups = [Group(guidance, SEEDS)]
    conditioning = encode_groups(chroma, groups, make_scheduler("default", chroma.scheduler), STEPS)
    (item,) = conditioning
    full = conditioning[item]
    kept = int(full.extra[TEXT_MASK].sum())
    assert kept < T5_TOKENS

    def with_text(hidden, mask):
        return {item: Conditioning(hidden, extra={TEXT_MASK: mask})}

    cut = with_text(full.hidden_states[:, :kept], full.extra[TEXT_MASK][:, :kept])
    unmasked = with_text(full.hidden_states, torch.ones_like(full.extra[TEXT_MASK]))
    masked = ours(chroma, guidance, conditioning=conditioning).images
    assert np.abs(masked - ours(chroma, guidance, conditioning=cut).images).max() <= 1e-5
    assert np.abs(masked - ours(chroma, guidance, conditioning=unmasked).images).max() > 1e-3
    assert np.abs(masked - ours(additive, guidance, conditioning=conditioning).images).max() > 1e-3


@pytest.mark.parametrize("family", ["reference", "additive"])
def test_each_row_keeps_its_own_mask_in_a_batched_call(chroma, additive, family):
    """Positive and negative rows of different lengths in one call: each row's velocity is the one it has alone."""
    components = chroma if family == "reference" else additive
    rows = [components.family.encode_one(components, PromptInput(text)) for text in (PROMPT, "hat", "")]
    assert len({int(row.extra[TEXT_MASK].sum()) for row in rows}) == 3
    latents = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(700.0)
    with torch.no_grad():
        batched = components.family.denoise(components, latents.repeat(3, 1, 1, 1), timestep, rows, {})
        for i, row in enumerate(rows):
            alone = components.family.denoise(components, latents, timestep, [row], {})
            assert torch.allclose(batched[i : i + 1], alone, atol=1e-5)


# ---------------------------------------------------------------- loading


def test_a_saved_directory_loads_back_as_chroma_with_the_same_images(chroma, chroma_dir):
    index = json.loads((chroma_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ChromaPipeline" and family_for_index(index).name == "chroma"
    assert family_for_parts(chroma).name == "chroma"
    assert not any(chroma_dir.rglob("*.bin")) and any((chroma_dir / "transformer").glob("*.safetensors"))
    loaded = load_components(chroma_dir)
    assert loaded.family.name == "chroma" and loaded.unet is None and loaded.text_encoder_2 is None
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=3.0)
    assert np.array_equal(ours(loaded, guidance).images, ours(chroma, guidance).images)
    import diffusers

    pipe = diffusers.ChromaPipeline.from_pretrained(chroma_dir, use_safetensors=True, local_files_only=True)
    assert type(pipe.transformer).__name__ == "ChromaTransformer2DModel"


def test_the_session_uses_the_pipelines_defaults(chroma):
    session = Session(chroma)
    spec = session.spec(PROMPT, NEGATIVE)
    assert (spec.guidance.scale, spec.steps, spec.height, spec.width) == (5.0, 35, 256, 256)  # 128 cells × 2 px
    assert spec.embedded_guidance is None


# ---------------------------------------------------------------- rules, windows, prompt syntax


@pytest.mark.parametrize("rule", sorted(all_rules()))
def test_every_rule_runs_on_velocities_or_is_refused_in_one_line(chroma, rule):
    negatives = [NEGATIVE, "glasses"] if rule in ("dual", "weighted", "perp-neg") else [NEGATIVE]
    session = Session(chroma)
    options = dict(rule=rule, scale=4.0, steps=3, size=32, seeds=[3])
    if rule in ("dng", "apg", "nag", "vsf"):
        message = "not exact on the velocity" if rule in ("dng", "apg") else "cannot yet change on Chroma"
        with pytest.raises(GuidanceError, match=message) as error:
            session.spec(PROMPT, [] if rule == "cfg" else negatives, **options)
        assert "\n" not in str(error.value)
        return
    generation = session.run(session.spec(PROMPT, [] if rule == "cfg" else negatives, **options))
    images = np.asarray(generation.pixels)
    assert np.isfinite(images).all() and images.std() > 0


def _check_formula(trace, formula):
    for info in trace:
        p = info.predictions
        assert torch.allclose(info.guided, formula(p), atol=1e-5)


def test_rules_on_velocities_combine_this_familys_branches(chroma):
    """sd, dual (s⁺ and s⁻ independent), weighted with two negatives and perp-neg act on the velocity branches
    of every step as their formulas say, and each negative changes the image."""
    base = plain(chroma).images
    sd = ours(chroma, Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=4.0), keep_trace=True)
    _check_formula(sd.trace, lambda p: p["negative"] + 4.0 * (p["positive"] - p["negative"]))
    dual = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, scale=1.5),), scale=4.0, rule="dual")
    run = ours(chroma, dual, keep_trace=True)
    _check_formula(run.trace, lambda p: formulas.dual_scale(p["unconditional"], p["positive"], p["negative"], 4, 1.5))
    two = (Term(NEGATIVE, scale=2.0), Term("glasses", scale=1.0))
    weighted = ours(chroma, Guidance(positive=Term(PROMPT), negatives=two, scale=4.0, rule="weighted"), keep_trace=True)
    _check_formula(
        weighted.trace,
        lambda p: formulas.weighted_sum(
            p["unconditional"], [p["positive"], p["negative"], p["negative_2"]], [4.0, -2.0, -1.0]
        ),
    )
    perp = ours(chroma, Guidance(positive=Term(PROMPT), negatives=two, scale=4.0, rule="perp-neg"))
    for images in (sd.images, run.images, weighted.images, perp.images):
        assert np.abs(images - base).max() > 1e-3


def test_a_negative_window_and_the_delay_syntax_are_plain_before_their_step(chroma):
    reference = plain(chroma, keep_trace=True)
    windowed = ours(
        chroma,
        Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window.parse("2:")),), scale=4.0),
        keep_trace=True,
    )
    delayed = ours(chroma, Guidance(positive=Term(PROMPT), negatives=(Term(f"[{NEGATIVE}:2]"),), scale=4.0))
    assert np.array_equal(delayed.images, windowed.images)
    for step in range(2):
        assert torch.equal(windowed.trace[step].guided, reference.trace[step].guided)
    assert not torch.allclose(windowed.trace[2].guided, reference.trace[2].guided, atol=1e-4)


@pytest.mark.parametrize("where", ["positive", "negative"])
def test_a1111_weights_and_edits_on_each_prompt(chroma, where):
    """``(text:1.0)`` over the whole prompt is the plain prompt (states and mask alike); ``(word:1.3)`` changes the
    image; ``[a:b:0.5]`` is the first text for the first half of the steps, then changes the image."""
    text = PROMPT if where == "positive" else NEGATIVE

    def run(edited):
        if where == "positive":
            guidance = Guidance(positive=Term(edited), negatives=(Term(NEGATIVE),), scale=4.0)
        else:
            guidance = Guidance(positive=Term(PROMPT), negatives=(Term(edited),), scale=4.0)
        return ours(chroma, guidance, keep_trace=True)

    whole = chroma.family.encode_one(chroma, PromptInput(f"({text}:1.0)"))
    alone = chroma.family.encode_one(chroma, PromptInput(text))
    assert torch.equal(whole.hidden_states, alone.hidden_states)
    assert torch.equal(whole.extra[TEXT_MASK], alone.extra[TEXT_MASK])
    reference = run(text)
    assert np.array_equal(run(f"({text}:1.0)").images, reference.images)
    weighted = text.replace("hat", "(hat:1.3)").replace("cat", "(cat:1.3)")
    assert not torch.allclose(
        chroma.family.encode_one(chroma, PromptInput(weighted)).hidden_states, alone.hidden_states
    )
    # One token's states × 1.3, then all rescaled to the plain mean: a small change on the tiny model (measured
    # 2.5–4.5·10⁻⁴), far above float rounding (equal inputs give bit-identical images here).
    assert np.abs(run(weighted).images - reference.images).max() > 1e-4
    first, second = text.rsplit(" ", 1)
    edited = run(f"{first} [{second}:dog:0.5]")
    for step in range(STEPS // 2):
        assert torch.equal(edited.trace[step].guided, reference.trace[step].guided)
    assert not torch.allclose(edited.trace[STEPS // 2].guided, reference.trace[STEPS // 2].guided, atol=1e-4)


# ---------------------------------------------------------------- attention: phase 1 refuses


def test_attention_is_unread_so_capture_and_rules_in_attention_refuse(chroma):
    layout = chroma.attention_layout
    assert (layout.kind, layout.readable, layout.reads_text, layout.patch) == ("unread", False, True, 2)
    session = Session(chroma)
    spec = session.spec(PROMPT, NEGATIVE, steps=2, size=32, seeds=[1])
    with pytest.raises(CaptureError, match="cannot yet capture the attention of Chroma") as error:
        capture(spec, CaptureRequest({"positive": ["cat"]}), session, reducer=reduce_layer)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- command line


def test_cli_generate_on_a_chroma_directory_and_again_from_the_png(chroma_dir, tmp_path):
    out = tmp_path / "chroma.png"
    args = ["generate", "a photo of a (cat:1.2)", "-n", "[a red hat:1]", "--model", str(chroma_dir)]
    assert main([*args, "--steps", "3", "--size", "32", "--negative-window", "0:2", "-q", "--out", str(out)]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cli_refuses_bad_input_in_one_line(chroma_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["generate", PROMPT, "-n", NEGATIVE, "--steps", "2", "--size", "32", "-q", "--out", str(out)]
    model = ["--model", str(chroma_dir)]
    refusals = [
        (["--negative-2", "glasses"], "negative_2: option(s) of SDXL, SD3 and FLUX models"),
        (["--prompt-2", "a dog"], "prompt_2: option(s) of SDXL, SD3 and FLUX models"),
        (["--embedded-guidance", "3.5"], "takes no guidance scale as an input"),
        (["--rule", "dng"], "not exact on the velocity predictions"),
        (["--rule", "nag"], "cannot yet change on Chroma"),
        (["--size", "30"], "not a positive multiple of 4"),
    ]
    for extra, message in refusals:
        assert_usage_error(main([*base, *model, *extra]), capsys, message, out)
    long_prompt = " ".join(["cat"] * (T5_TOKENS + 3))  # 35 + 1 T5 tokens
    code = main(["generate", long_prompt, *base[2:], *model])
    assert_usage_error(code, capsys, "these words would be cut: 'cat cat cat cat'", out)
    code = main([base[0], PROMPT, "-n", long_prompt, *base[4:], *model])  # a negative over the limit too
    assert_usage_error(code, capsys, "over the model's limit of 32 (max_sequence_length)", out)
    attend = tmp_path / "attend"
    code = main(["attend", PROMPT, "-n", NEGATIVE, *model, "--steps", "2", "--size", "32", "-q", "--out", str(attend)])
    assert_usage_error(code, capsys, "cannot yet capture the attention of Chroma", attend)


def test_prompts_over_t5s_limit_are_refused_naming_the_cut_words(chroma):
    with pytest.raises(
        PromptError, match=r"36 T5 tokens, over the model's limit of 32.*would be cut: 'cat cat cat cat'"
    ):
        chroma.family.encode_one(chroma, PromptInput(" ".join(["cat"] * 35)))
    with pytest.raises(SettingsError, match="option.*of SDXL, SD3 and FLUX models, but"):
        Session(chroma).spec(PROMPT, NEGATIVE, negative_2="glasses", steps=2, size=32)
