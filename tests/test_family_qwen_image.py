"""Qwen-Image on a tiny random model built from configs: images equal diffusers' QwenImagePipeline (with and without
its true CFG), the per-token renormalisation as a rule, prompts batched as the pipeline batches them, loading, rules,
windows, prompt syntax, the study, the CLI with --from-png, and bad input. The attention capture and NAG/VSF are in
test_family_qwen_image_attention.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_usage_error
from PIL import Image

from negprompt.analysis.spec import load_spec
from negprompt.guidance.plan import UNCONDITIONAL, Guidance, Term
from negprompt.guidance.rules import all_rules
from negprompt.guidance.rules.base import GuidanceError
from negprompt.guidance.rules.token_renorm import token_norms, token_renormalized
from negprompt.guidance.windows import Window
from negprompt.interfaces.cli import main
from negprompt.layers.layout import AttentionLayout
from negprompt.models.conditioning import PromptInput
from negprompt.models.families import family_for_index, family_for_parts
from negprompt.models.flux import pack, unpack
from negprompt.models.loading import load_components
from negprompt.models.prompts import PromptError
from negprompt.models.qwen_image import (
    PROMPT_TEMPLATE,
    TEMPLATE_TOKENS,
    QwenImageFamily,
    batch_prompts,
    templated_tokens,
)
from negprompt.models.saving import save_components
from negprompt.runspec import SettingsError
from negprompt.sampling.loop import Group, encode_groups, sample_groups
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session
from negprompt.testing.tiny_qwen_image import build_tiny_qwen_image, qwen_image_pipeline

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"  # 7 and 3 prompt tokens: batched rows differ
SEEDS = (3, 11)
HEIGHT, WIDTH, STEPS = 32, 48, 4  # non-square: 8 × 12 image tokens


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen_image(seed=0)


@pytest.fixture(scope="module")
def qwen_dir(qwen, tmp_path_factory):
    return save_components(qwen, tmp_path_factory.mktemp("tiny-qwen-image"))


def ours(components, guidance, seeds=SEEDS, **kwargs):
    groups = [Group(guidance, seeds)]
    conditioning = encode_groups(
        components, groups, make_scheduler("default", components.scheduler), STEPS, HEIGHT, WIDTH
    )
    scheduler = make_scheduler("default", components.scheduler)
    return sample_groups(components, groups, scheduler, STEPS, HEIGHT, WIDTH, conditioning=conditioning, **kwargs)


def theirs(components, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    batched = {k: [v] * len(SEEDS) if isinstance(v, str) else v for k, v in kwargs.items()}
    return qwen_image_pipeline(components)(
        [PROMPT] * len(SEEDS),
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        generator=generators,
        output_type="np",
        **batched,
    ).images


def plain(prompt=PROMPT, **kwargs) -> Guidance:
    return Guidance(positive=Term(prompt), scale=1.0, rule="cfg", **kwargs)


def largest_change(run, other) -> float:
    return max(float((a.guided - b.guided).abs().max()) for a, b in zip(run.trace, other.trace))


# ---------------------------------------------------------------- equal to diffusers


def test_without_a_negative_equals_the_pipeline_in_one_pass(qwen):
    """The pipeline runs no CFG without a negative prompt (whatever true_cfg_scale): negprompt's scale 1."""
    mine = ours(qwen, plain())
    reference = theirs(qwen)  # true_cfg_scale 4 by default, ignored without a negative
    assert mine.images.shape == reference.shape == (2, HEIGHT, WIDTH, 3) and reference.std() > 0.01
    assert np.abs(mine.images - reference).max() <= 1e-4
    assert mine.unet_batch_rows == len(SEEDS) * STEPS


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_true_cfg_with_renormalisation_equals_the_pipeline(qwen, negative):
    """Rule token-renorm is the pipeline's true CFG: two passes a step, comb renormalised per image token. Its
    negative and positive (of other lengths) share one call, padded and masked; an empty negative is the empty
    prompt ∅ (the template around ""), which negprompt uses where no negative is given."""
    negatives = (Term(negative),) if negative else ()
    guidance = Guidance(positive=Term(PROMPT), negatives=negatives, scale=4.0, rule="token-renorm")
    mine = ours(qwen, guidance)
    reference = theirs(qwen, negative_prompt=negative, true_cfg_scale=4.0)
    assert np.abs(mine.images - reference).max() <= 1e-4
    assert mine.unet_batch_rows == 2 * len(SEEDS) * STEPS
    if negative:  # without the renormalisation (rule sd) the images are other ones
        unnormalised = ours(qwen, Guidance(positive=Term(PROMPT), negatives=negatives, scale=4.0, rule="sd"))
        assert np.abs(unnormalised.images - reference).max() > 1e-3


def test_prompts_are_batched_as_the_pipeline_batches_them(qwen):
    """Prompts encoded alone, then zero-padded and masked, equal the pipeline's batch of them (encoded padded
    together: the encoder's attention is causal and its padding on the right); the masked padding leaves the
    transformer's output for the shorter prompt as without it."""
    family = qwen.family
    pipe = qwen_image_pipeline(qwen)
    texts = [PROMPT, NEGATIVE]
    embeds, mask = pipe.encode_prompt(texts, device=torch.device("cpu"), max_sequence_length=512)
    rows = [family.encode_one(qwen, PromptInput(text)) for text in texts]
    hidden, ours_mask = batch_prompts(rows)
    assert rows[0].hidden_states.shape == (1, 7 + 5, 16) and rows[1].hidden_states.shape == (1, 3 + 5, 16)
    assert torch.equal(ours_mask, mask) and ours_mask.dtype == mask.dtype == torch.long
    assert torch.allclose(hidden, embeds, atol=1e-5)
    assert batch_prompts([rows[0], rows[0]])[1] is None  # one length: no mask, as the pipeline drops an all-ones one
    latents = torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    with torch.no_grad():
        together = family.denoise(qwen, latents, t, rows, {})
        alone = family.denoise(qwen, latents[1:], t, rows[1:], {})
    assert torch.allclose(together[1:], alone, atol=1e-5)


# ---------------------------------------------------------------- the renormalisation rule


def test_token_renormalisation_equals_the_pipelines_packed_form():
    """comb·‖v_y‖/‖comb‖ over the last axis of the packed (B, h/2·w/2, 4C) prediction, as QwenImagePipeline
    computes it, is token_renormalized with patch 2 on the unpacked (B, C, h, w)."""
    g = torch.Generator().manual_seed(1)
    positive, negative = torch.randn(2, 4, 6, 10, generator=g), torch.randn(2, 4, 6, 10, generator=g)
    comb = negative + 3.0 * (positive - negative)
    packed_positive, packed_comb = pack(positive), pack(comb)
    packed = packed_comb * (
        torch.norm(packed_positive, dim=-1, keepdim=True) / torch.norm(packed_comb, dim=-1, keepdim=True)
    )
    mine = token_renormalized(comb, positive, 2)
    assert torch.allclose(mine, unpack(packed, 6, 10), atol=1e-6)
    assert torch.allclose(token_norms(mine, 2), token_norms(positive, 2), atol=1e-5)  # each token keeps ‖v_y‖
    assert not torch.allclose(mine, token_renormalized(comb, positive, 1), atol=1e-3)  # the patch matters
    per_cell = torch.linalg.vector_norm(token_renormalized(comb, positive, 1), dim=1)
    assert torch.allclose(per_cell, torch.linalg.vector_norm(positive, dim=1), atol=1e-5)


def test_the_rule_reads_the_patch_from_the_layout_and_is_plain_at_scale_one():
    g = torch.Generator().manual_seed(2)
    predictions = {name: torch.randn(1, 4, 4, 4, generator=g) for name in (UNCONDITIONAL, "positive", "negative")}
    guidance = Guidance(positive=Term("a"), negatives=(Term("b"),), scale=5.0, rule="token-renorm")
    for patch in (1, 2):
        guided = guidance.combine(predictions, 0, 4, attention=AttentionLayout("unread", patch=patch))
        comb = predictions["negative"] + 5.0 * (predictions["positive"] - predictions["negative"])
        assert torch.allclose(guided, token_renormalized(comb, predictions["positive"], patch))
    with pytest.raises(GuidanceError, match="works per image token"):
        guidance.combine(predictions, 0, 4)
    assert guidance.branches_at(0, 4) == ["negative", "positive"]  # no ∅ while the negative is active
    one = Guidance(positive=Term("a"), negatives=(Term("b"),), scale=1.0, rule="token-renorm")
    assert one.branches_at(0, 4) == ["positive"] and torch.equal(
        one.combine(predictions, 0, 4), predictions["positive"]
    )
    with pytest.raises(GuidanceError, match="takes one negative"):
        Guidance(positive=Term("a"), negatives=(Term("b"), Term("c")), rule="token-renorm")


# ---------------------------------------------------------------- prompts


def test_the_template_is_dropped_and_prompts_keep_their_tokens(qwen):
    """The tiny tokenizer splits the template as Qwen2.5-VL's does: 34 tokens before the prompt (the pipeline's
    drop_idx), 5 after; the embedding holds the prompt's tokens and those 5."""
    ids, spans = templated_tokens(qwen.tokenizer, PROMPT)
    tokens = qwen.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[TEMPLATE_TOKENS - 3 : TEMPLATE_TOKENS] == ["<|im_start|>", "user", "Ċ"]
    assert tokens[TEMPLATE_TOKENS:-5] == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat", "Ġwith", "Ġglasses"]
    assert tokens[-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert qwen.family.encode_one(qwen, PromptInput("")).hidden_states.shape == (1, 5, 16)


def test_a1111_weights_are_refused_because_the_transformer_normalises_each_token(qwen):
    """negprompt weighs a word by scaling its tokens' states; Qwen-Image's transformer first normalises each text
    token (txt_norm, an RMSNorm), which undoes that: 1.6 on one token moves the velocity by float rounding only
    (measured 2e-7), against 0.01 for another word there. So weights ≠ 1 are refused; 1 is the plain prompt."""
    family = qwen.family
    row = family.encode_one(qwen, PromptInput(PROMPT))
    scaled = row.hidden_states.clone()
    scaled[:, 4] *= 1.6  # "Ġcat"
    other = family.encode_one(qwen, PromptInput("a photo of a dog with glasses"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(800.0)
    with torch.no_grad():
        velocity = family.denoise(qwen, latents, t, [row], {})
        weighed = family.denoise(qwen, latents, t, [type(row)(scaled)], {})
        dog = family.denoise(qwen, latents, t, [other], {})
    assert float((weighed - velocity).abs().max()) < 1e-5 and float((dog - velocity).abs().max()) > 1e-3
    assert torch.equal(family.encode_one(qwen, PromptInput(f"({PROMPT}:1.0)")).hidden_states, row.hidden_states)
    with pytest.raises(PromptError, match=r"weighs words \(1.1, 1.5\).*RMSNorm.*changes nothing") as error:
        family.encode_one(qwen, PromptInput("a photo of a (cat:1.5) with (glasses)"))
    assert "\n" not in str(error.value)


def test_prompt_syntax_and_windows_act_where_they_should(qwen):
    """A1111 edits and weights on each prompt, and a negative's window: equal to the plain prompt before they act,
    different after."""
    guided = dict(scale=4.0, rule="token-renorm")
    base = ours(qwen, Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), **guided), keep_trace=True)
    # the positive edited at step 2 of 4: the dog's prompt before, the cat's after
    dog = ours(
        qwen, Guidance(positive=Term("a photo of a dog"), negatives=(Term(NEGATIVE),), **guided), keep_trace=True
    )
    edited = Term("[a photo of a dog:a photo of a cat with glasses:0.5]")
    switched = ours(qwen, Guidance(positive=edited, negatives=(Term(NEGATIVE),), **guided), keep_trace=True)
    for step in range(2):
        assert torch.equal(switched.trace[step].guided, dog.trace[step].guided)
    assert not torch.allclose(switched.trace[2].guided, dog.trace[2].guided, atol=1e-4)
    # the negative added at step 2 by its window or by [text:2]: ∅ before, the same images either way
    windowed = Term(NEGATIVE, window=Window.parse("2:"))
    late = ours(qwen, Guidance(positive=Term(PROMPT), negatives=(windowed,), **guided), keep_trace=True)
    added = ours(qwen, Guidance(positive=Term(PROMPT), negatives=(Term(f"[{NEGATIVE}:2]"),), **guided), keep_trace=True)
    empty = ours(qwen, Guidance(positive=Term(PROMPT), **guided), keep_trace=True)
    assert np.array_equal(late.images, added.images)
    for step in range(2):
        assert torch.equal(late.trace[step].guided, empty.trace[step].guided)
    assert not torch.allclose(late.trace[2].guided, empty.trace[2].guided, atol=1e-4)
    # a weight of 1 on each prompt is the plain prompt
    weighted = Guidance(positive=Term(f"({PROMPT}:1.0)"), negatives=(Term(f"({NEGATIVE}:1.0)"),), **guided)
    assert np.array_equal(ours(qwen, weighted).images, base.images)


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize("rule", sorted(all_rules()))
def test_every_rule_runs_on_velocities_or_is_refused_in_one_line(qwen, rule):
    session = Session(qwen)
    negatives = [NEGATIVE, "glasses"] if rule in ("dual", "weighted", "perp-neg") else [NEGATIVE]
    extra = {"negative_scales": [3.0, 1.5]} if rule in ("dual", "weighted") else {}  # s⁻ apart from s⁺
    options = dict(rule=rule, scale=4.0, steps=3, seeds=[3], size=(HEIGHT, WIDTH), **extra)
    if rule in ("dng", "apg"):
        with pytest.raises(GuidanceError, match=f"rule {rule!r} is not exact on the velocity predictions") as error:
            session.spec(PROMPT, negatives, **options)
    else:
        spec = session.spec(PROMPT, [] if rule == "cfg" else negatives, **options)
        images = np.asarray(session.run(spec).pixels)
        reference = np.asarray(
            session.run(session.spec(PROMPT, rule="cfg", scale=1.0, steps=3, seeds=[3], size=(HEIGHT, WIDTH))).pixels
        )
        assert np.isfinite(images).all() and np.abs(images - reference).max() > 1e-3
        return
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the strength study


def test_the_strength_study_and_attend_run_on_the_family(qwen_dir, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: t\nmodel: {qwen_dir}\nsteps: 2\nscale: 4\nsize: 32\nseeds: [1]\npairs:\n"
        "  - {group: noun, prompt: a photo of a cat, negative: red hat}\n"
        "  - {group: adjective, prompt: a woman in the street, negative: glasses, related: woman}\n"
    )
    assert main(["study", str(spec), "--out", str(tmp_path / "s"), "-q"]) == 0
    assert main(["report", str(tmp_path / "s")]) == 0
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| noun |" in report and "| adjective |" in report
    out = tmp_path / "attend"
    args = ["attend", PROMPT, "-n", NEGATIVE, "--model", str(qwen_dir), "--steps", "2", "--size", "32", "-q"]
    assert main([*args, "--out", str(out)]) == 0
    assert any(out.glob("*.png")) and json.loads((out / "maps.json").read_text())["words"]["negative"] == [
        "a",
        "red",
        "hat",
    ]
    capsys.readouterr()


def test_the_built_in_study_spec_parses_and_needs_the_model_in_the_cache(tmp_path, capsys, monkeypatch):
    spec = load_spec("ban2024-qwenimage")
    assert (spec.model, spec.steps, spec.scale, spec.size, spec.map_size) == ("Qwen/Qwen-Image", 50, 4.0, 1024, 64)
    assert len(spec.pairs) == 20 and len(spec.seeds) == 10
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "study"
    code = main(["study", "ban2024-qwenimage", "--out", str(out), "-q"])
    assert_usage_error(code, capsys, "model id 'Qwen/Qwen-Image' is not in the local Hugging Face cache", out)


# ---------------------------------------------------------------- loading, CLI, bad input


def test_a_saved_directory_loads_back_as_qwen_image_and_as_a_diffusers_pipeline(qwen, qwen_dir):
    index = json.loads((qwen_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline" and index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert isinstance(family_for_index(index), QwenImageFamily) and isinstance(family_for_parts(qwen), QwenImageFamily)
    assert not any(qwen_dir.rglob("*.bin"))
    loaded = load_components(qwen_dir)
    assert isinstance(loaded.family, QwenImageFamily) and loaded.unet is None
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=3.0, rule="token-renorm")
    assert np.array_equal(ours(loaded, guidance).images, ours(qwen, guidance).images)
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(qwen_dir, use_safetensors=True, local_files_only=True)
    theirs_weights, ours_weights = pipe.transformer.state_dict(), qwen.transformer.state_dict()
    assert theirs_weights.keys() == ours_weights.keys()
    assert all(torch.equal(theirs_weights[k], ours_weights[k]) for k in ours_weights)
    assert pipe.tokenizer(PROMPT_TEMPLATE.format(PROMPT)).input_ids == templated_tokens(qwen.tokenizer, PROMPT)[0]


def test_cli_generate_on_a_directory_and_again_from_the_png(qwen_dir, tmp_path):
    out, again = tmp_path / "qwen.png", tmp_path / "again.png"
    args = ["generate", "a photo of a (cat:1.0) with [glasses:0.5]", "-n", NEGATIVE, "--model", str(qwen_dir)]
    args += ["--rule", "token-renorm", "--scale", "3", "--steps", "3", "--size", "32", "--negative-window", "1:"]
    assert main([*args, "-q", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert "Rule: token-renorm" in image.text["parameters"] and "Negative 1 window" in image.text["parameters"]
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cli_refuses_bad_input_in_one_line(qwen_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["generate", PROMPT, "-n", NEGATIVE, "--steps", "2", "--size", "32", "-q", "--out", str(out)]
    base += ["--model", str(qwen_dir)]
    assert_usage_error(main([*base, "--negative-2", "glasses"]), capsys, "negative_2: option(s) of SDXL", out)
    assert_usage_error(main([*base, "--prompt-2", "a dog"]), capsys, "is Qwen-Image", out)
    assert_usage_error(main([*base, "--embedded-guidance", "3"]), capsys, "takes no guidance scale as an input", out)
    assert_usage_error(main([*base, "--rule", "nag", "--nag-tau", "0.5"]), capsys, "nag_tau (τ) must be > 1", out)
    assert_usage_error(main([*base, "--rule", "dng"]), capsys, "not exact on the velocity predictions", out)
    assert_usage_error(main([*base, "--size", "30"]), capsys, "not a positive multiple of 4", out)
    attend = ["attend", PROMPT, "-n", NEGATIVE, "--model", str(qwen_dir), "--steps", "2", "--size", "32", "-q"]
    code = main([*attend, "--words", "dog", "--out", str(tmp_path / "maps")])
    assert_usage_error(code, capsys, "word 'dog' is not in the prompt", tmp_path / "maps")
    code = main([*attend[:2], *attend[4:], "--rule", "vsf", "--out", str(tmp_path / "maps")])
    assert_usage_error(code, capsys, "rule 'vsf' needs a negative prompt", tmp_path / "maps")
    code = main(["generate", "a photo of a (cat:1.3)", *base[2:]])
    assert_usage_error(code, capsys, "weighs words (1.3), but Qwen-Image normalises each text token", out)
    long_prompt = " ".join(["cat"] * 510 + ["with", "red", "glasses", "in", "the", "street"])  # 516 + 5 tokens
    assert_usage_error(
        main(["generate", long_prompt, *base[2:]]),
        capsys,
        "prompt is 521 Qwen2.5-VL tokens with the template's end, over the model's limit of 512 "
        "(max_sequence_length): these words would be cut: 'glasses in the street'",
        out,
    )


def test_a_declared_max_sequence_length_is_the_limit(qwen):
    from dataclasses import replace

    short = replace(qwen, declarations={"max_sequence_length": 8})
    assert short.family.encode_one(short, PromptInput("a red hat")).hidden_states.shape[1] == 8
    with pytest.raises(PromptError, match="9 Qwen2.5-VL tokens.*limit of 8.*the template's closing tokens"):
        short.family.encode_one(short, PromptInput("a red hat with"))
    shorter = replace(qwen, declarations={"max_sequence_length": 4})
    with pytest.raises(PromptError, match="10 Qwen2.5-VL tokens.*limit of 4.*would be cut: 'glasses'"):
        shorter.family.encode_one(shorter, PromptInput("a red hat with glasses"))
    session = Session(qwen)
    with pytest.raises(SettingsError, match="option.*of SDXL models"):
        session.spec(PROMPT, NEGATIVE, original_size=(64, 64), steps=2, size=32)
