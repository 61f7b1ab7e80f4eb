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
from negprompt.attention.capture import CaptureRequest
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
    if rule in ("dng", "apg"):
        with pytest.raises(GuidanceError, match="not exact on the velocity") as error:
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


# ---------------------------------------------------------------- attention: capture


class ListRecorder:
    """A recorder that keeps every layer's probabilities as recorded (the reader's seam, without the plan)."""

    active = True

    def __init__(self):
        self.seen: dict[str, torch.Tensor] = {}

    def record(self, path, probabilities, heads):
        self.seen[path] = probabilities.reshape(-1, heads, *probabilities.shape[1:])

    def wants_context(self, branch):
        return False


def _heads(attn, x):
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _direct_scores(attn, inputs, text_length):
    """softmax(q·kᵀ/√d + mask) over ALL keys of the image queries, computed here from the layer's own inputs as
    FluxAttnProcessor does (projections, q/k norms, rotary on [text; image]), with the mask the call carries:
    (B, H, N, L + N)."""
    from diffusers.models.embeddings import apply_rotary_emb

    hidden, context, mask, rotary = inputs
    if context is not None:
        tokens = torch.cat([context, hidden], dim=1)
        q = torch.cat(
            [attn.norm_added_q(_heads(attn, attn.add_q_proj(context))), attn.norm_q(_heads(attn, attn.to_q(hidden)))], 2
        )
        k = torch.cat(
            [attn.norm_added_k(_heads(attn, attn.add_k_proj(context))), attn.norm_k(_heads(attn, attn.to_k(hidden)))], 2
        )
    else:
        tokens = hidden
        q, k = attn.norm_q(_heads(attn, attn.to_q(tokens))), attn.norm_k(_heads(attn, attn.to_k(tokens)))
    q, k = apply_rotary_emb(q, rotary, sequence_dim=2), apply_rotary_emb(k, rotary, sequence_dim=2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    assert tokens.shape[1] == mask.shape[-1]
    return scores.softmax(dim=-1)[:, :, text_length:]


@pytest.mark.parametrize("family", ["reference", "additive"])
def test_captured_probabilities_equal_a_direct_softmax_under_each_rows_mask(chroma, additive, family):
    """Each layer's recorded (B·heads, N, L) equals the text block of softmax over ALL keys of the row, masked keys
    excluded (reference) or the mask added (the pipeline's form), computed from the layer's q/k (≤ 1e-5); rows of
    different lengths in one call keep their own masks; capture leaves the call's output bit-identical."""
    from negprompt.layers.processors import installed

    components = chroma if family == "reference" else additive
    transformer, reader = components.transformer, components.attention_layout.reader
    rows = [components.family.encode_one(components, PromptInput(text)) for text in (PROMPT, "hat")]
    kept = [int(row.extra[TEXT_MASK].sum()) for row in rows]
    latents = torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(0))
    inputs = {}

    def keep_inputs(path):
        def hook(module, args, kwargs):
            inputs[path] = (
                kwargs["hidden_states"],
                kwargs.get("encoder_hidden_states"),
                kwargs["attention_mask"],
                kwargs["image_rotary_emb"],
            )

        return hook

    paths = reader.paths(transformer)
    assert paths == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    recorder = ListRecorder()
    hooks = [transformer.get_submodule(p).register_forward_pre_hook(keep_inputs(p), with_kwargs=True) for p in paths]
    with torch.no_grad():
        plain = components.family.denoise(components, latents, torch.tensor(700.0), rows, {})
        with installed(transformer, lambda path, original: reader.capture_processor(path, original, recorder)):
            captured = components.family.denoise(components, latents, torch.tensor(700.0), rows, {})
        for hook in hooks:
            hook.remove()
        assert torch.equal(plain, captured)
        for path in paths:
            attn = transformer.get_submodule(path)
            direct = _direct_scores(attn, inputs[path], T5_TOKENS)[..., :T5_TOKENS]
            assert recorder.seen[path].shape == direct.shape == (2, 2, HEIGHT * WIDTH // 16, T5_TOKENS)
            assert (recorder.seen[path] - direct).abs().max() <= 1e-5
    probabilities = recorder.seen[paths[-1]]
    for row, length in enumerate(kept):
        assert (probabilities[row, :, :, :length] > 0).all()
        padding = probabilities[row, :, :, length:]
        assert (padding == 0).all() if family == "reference" else (padding > 0).all()


def test_capture_keeps_images_and_finds_each_words_t5_keys(chroma):
    session = Session(chroma)
    spec = session.spec(PROMPT, NEGATIVE, scale=4.0, steps=3, size=32, seeds=(1, 2))
    plain = session.run(spec).images
    words = CaptureRequest({"positive": ["cat", "glasses"], "negative": ["hat"]}, average_layers=False)
    result = capture(spec, words, session, reducer=reduce_layer)
    assert [np.asarray(a).tolist() for a in result.generation.images] == [np.asarray(a).tolist() for a in plain]
    assert [layer["path"] for layer in result.index["layers"]] == chroma.attention_layout.reader.paths(
        chroma.transformer
    )
    assert [layer["side"] for layer in result.index["layers"]] == [8, 8, 8]  # 32 px / 2 (VAE) / 2 (patch)
    tokens = chroma.tokenizer.convert_ids_to_tokens(chroma.tokenizer(PROMPT).input_ids)
    assert chroma.attention_layout.text_start_tokens == 0  # T5: no start token leads the keys
    assert result.index["tokens"]["positive"][0] == {"cat": [tokens.index("▁cat")], "glasses": [6]}
    negative_tokens = chroma.tokenizer.convert_ids_to_tokens(chroma.tokenizer(NEGATIVE).input_ids)
    assert result.index["tokens"]["negative"][0]["hat"] == [negative_tokens.index("▁hat")]
    for branch in ("positive", "negative"):
        mass, maps = result.tensors[f"mass.{branch}"], result.tensors[f"maps.{branch}"]
        assert mass.shape[:3] == (3, 3, 2) and torch.isfinite(mass).all() and (mass > 0).all()
        assert (maps.float().amax(dim=(-1, -2)) > 0).all()


def test_the_strength_study_and_attend_run_on_chroma(chroma_dir, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: t\nmodel: {chroma_dir}\nsteps: 3\nscale: 4\nsize: 32\nseeds: [1]\npairs:\n"
        "  - {group: noun, prompt: a photo of a cat, negative: red hat}\n"
        "  - {group: adjective, prompt: a woman in the street, negative: glasses, related: woman}\n"
    )
    assert main(["study", str(spec), "--out", str(tmp_path / "s"), "-q"]) == 0
    assert main(["report", str(tmp_path / "s")]) == 0
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| noun |" in report and "| adjective |" in report
    out = tmp_path / "attend"
    args = ["attend", PROMPT, "-n", NEGATIVE, "--model", str(chroma_dir), "--steps", "2", "--size", "32", "-q"]
    assert main([*args, "--out", str(out)]) == 0
    assert any(out.glob("*.png"))
    capsys.readouterr()


def test_the_built_in_study_spec_parses_and_needs_the_model_in_the_cache(tmp_path, capsys, monkeypatch):
    from negprompt.analysis.spec import load_spec

    spec = load_spec("ban2024-chroma")
    assert (spec.model, spec.steps, spec.scale, spec.size, spec.map_size) == (
        "lodestones/Chroma1-HD",
        35,
        5.0,
        1024,
        64,
    )
    assert len(spec.pairs) == 20 and len(spec.seeds) == 10
    from negprompt.interfaces.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--help"])
    assert "ban2024-chroma" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "study"
    code = main(["study", "ban2024-chroma", "--out", str(out), "-q"])
    assert_usage_error(code, capsys, "model id 'lodestones/Chroma1-HD' is not in the local Hugging Face cache", out)


# ---------------------------------------------------------------- attention: NAG and VSF


@pytest.mark.parametrize("family", ["reference", "additive"])
def test_nag_in_a_joint_layer_equals_its_formula_under_both_masks(chroma, additive, family):
    """The joint block's image output under NAG equals to_out(nag(Z⁺, Z⁻)) computed here: Z⁺ the image queries'
    attention over [positive text; image] under the positive's mask, Z⁻ over [negative text; image] under the
    negative's, whose stream enters as norm1_context(context_embedder(T5 states), temb[:, 6:]) (≤ 1e-5)."""
    from negprompt.guidance.attention_processors import nag_combine
    from negprompt.models.conditioning import denoiser_inputs

    components = chroma if family == "reference" else additive
    transformer = components.transformer
    block, attn = transformer.transformer_blocks[0], transformer.transformer_blocks[0].attn
    positive = components.family.encode_one(components, PromptInput(PROMPT))
    negative = components.family.encode_one(components, PromptInput(NEGATIVE))
    latents = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, a, k: seen.update(temb=k["temb"]), with_kwargs=True),
        attn.register_forward_hook(lambda m, a, k, out: seen.update(inputs=k, out=out), with_kwargs=True),
    ]
    phi, tau, alpha = 3.0, 2.5, 0.5
    reader = components.attention_layout.reader
    with torch.no_grad():
        with reader.negative_in_attention(
            transformer, slice(0, 1), denoiser_inputs([negative]), nag_combine(phi, tau, alpha), "negative"
        ):
            components.family.denoise(components, latents, torch.tensor(700.0), [positive], {})
        for hook in hooks:
            hook.remove()
        from diffusers.models.embeddings import apply_rotary_emb

        hidden, context = seen["inputs"]["hidden_states"], seen["inputs"]["encoder_hidden_states"]
        mask, rotary = seen["inputs"]["attention_mask"], seen["inputs"]["image_rotary_emb"]
        stream = block.norm1_context(transformer.context_embedder(negative.hidden_states), emb=seen["temb"][:, 6:])[0]
        q = apply_rotary_emb(
            attn.norm_q(_heads(attn, attn.to_q(hidden))), tuple(r[T5_TOKENS:] for r in rotary), sequence_dim=2
        )
        image_k, image_v = attn.norm_k(_heads(attn, attn.to_k(hidden))), _heads(attn, attn.to_v(hidden))

        def attend(text, text_keep):
            k = torch.cat([attn.norm_added_k(_heads(attn, attn.add_k_proj(text))), image_k], dim=2)
            v = torch.cat([_heads(attn, attn.add_v_proj(text)), image_v], dim=2)
            k = apply_rotary_emb(k, rotary, sequence_dim=2)
            keep = torch.cat([text_keep, torch.ones(1, image_k.shape[2], dtype=torch.bool)], dim=1)[:, None, None, :]
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            scores = scores.masked_fill(~keep, float("-inf")) if mask.dtype == torch.bool else scores + keep.float()
            return (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)

        z_positive = attend(context, positive.extra[TEXT_MASK])
        z_negative = attend(stream, negative.extra[TEXT_MASK])
        expected = attn.to_out[1](attn.to_out[0](formulas.nag(z_positive, z_negative, phi, tau, alpha)))
    assert (mask.dtype == torch.bool) == (family == "reference")
    assert (seen["out"][0] - expected).abs().max() <= 1e-5
    assert (z_positive - z_negative).abs().max() > 1e-3  # the negative is read


def nag_spec(session, negative, rule="nag", **kwargs):
    options = dict(rule=rule, scale=1.0, steps=3, size=32, seeds=(1, 2))
    return session.spec(PROMPT, negative, **{**options, **kwargs})


def largest_change(run, plain) -> float:
    return max(float((a.guided - b.guided).abs().max()) for a, b in zip(run.trace, plain.trace))


@pytest.mark.parametrize("family", ["reference", "additive"])
def test_the_negative_text_stream_follows_the_blocks_and_nag_vsf_change_the_image(chroma, additive, family):
    """NAG with the prompt itself as the negative: Z⁻ = Z⁺ in every layer only if the negative's stream (and
    its mask) follows the positive's through every block, so NAG changes nothing (≤ 1e-5); VSF with a bias of
    −10⁴ on the negative's keys changes nothing either; with a real negative both change the image."""
    session = Session(chroma if family == "reference" else additive)
    plain = session.run(session.spec(PROMPT, steps=3, size=32, seeds=(1, 2), scale=1.0, rule="cfg"), trace=True)
    same = session.run(nag_spec(session, PROMPT), trace=True)
    assert same.unet_batch_rows == plain.unet_batch_rows == 2 * 3  # one pass a step
    assert largest_change(same, plain) <= 1e-5
    silenced = nag_spec(session, NEGATIVE, rule="vsf", rule_settings={"offset": -1e4})
    assert largest_change(session.run(silenced, trace=True), plain) <= 1e-5
    for rule in ("nag", "vsf"):
        guided = session.run(nag_spec(session, NEGATIVE, rule=rule), trace=True)
        assert largest_change(guided, plain) > 1e-3
        assert np.abs(np.asarray(guided.images, float) - np.asarray(plain.images, float)).max() > 0


def test_capture_with_nag_records_the_negative_and_keeps_images(chroma):
    session = Session(chroma)
    spec = nag_spec(session, NEGATIVE, scale=3.0)  # ∅ and the guided positive in one call
    alone = session.run(spec).images
    result = capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)
    assert [np.asarray(a).tolist() for a in result.generation.images] == [np.asarray(a).tolist() for a in alone]
    assert result.tensors["present.negative"].all()
    frobenius = result.tensors["frobenius.negative"]
    assert torch.isfinite(frobenius).all() and (frobenius > 0).all()


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
        (["--size", "30"], "not a positive multiple of 4"),
    ]
    for extra, message in refusals:
        assert_usage_error(main([*base, *model, *extra]), capsys, message, out)
    long_prompt = " ".join(["cat"] * (T5_TOKENS + 3))  # 35 + 1 T5 tokens
    code = main(["generate", long_prompt, *base[2:], *model])
    assert_usage_error(code, capsys, "these words would be cut: 'cat cat cat cat'", out)
    code = main([base[0], PROMPT, "-n", long_prompt, *base[4:], *model])  # a negative over the limit too
    assert_usage_error(code, capsys, "over the model's limit of 32 (max_sequence_length)", out)


def test_prompts_over_t5s_limit_are_refused_naming_the_cut_words(chroma):
    with pytest.raises(
        PromptError, match=r"36 T5 tokens, over the model's limit of 32.*would be cut: 'cat cat cat cat'"
    ):
        chroma.family.encode_one(chroma, PromptInput(" ".join(["cat"] * 35)))
    with pytest.raises(SettingsError, match="option.*of SDXL, SD3 and FLUX models, but"):
        Session(chroma).spec(PROMPT, NEGATIVE, negative_2="glasses", steps=2, size=32)
