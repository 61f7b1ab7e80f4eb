"""negprompt and diffusers' guiders (issue 30): the same formulas where both exist, diffusers' guiders as the
rule ``guider``, and negprompt's rules as diffusers guiders inside diffusers' modular pipelines."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeZeroStarGuidance,
    MagnitudeAwareGuidance,
    TangentialClassifierFreeGuidance,
)
from helpers import assert_usage_error

from negprompt.guidance import formulas
from negprompt.guidance.plan import UNCONDITIONAL, Guidance, Term
from negprompt.guidance.rules.base import GuidanceError
from negprompt.guidance.rules.cfg_zero_star import cfg_zero_star
from negprompt.guidance.windows import Window
from negprompt.interfaces.cli import main

PROMPT, NEGATIVE = "a red circle with a hat", "a hat"
REPO = Path(__file__).resolve().parent.parent


def predictions(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, 4, 8, 8, generator=g, dtype=dtype) for n in (UNCONDITIONAL, "positive", "negative")}


def run_diffusers(guider, cond, uncond, step: int, num_steps: int) -> torch.Tensor:
    """One step of a diffusers guider as a modular pipeline calls it."""
    guider.set_state(step=step, num_inference_steps=num_steps, timestep=None)
    batches = guider.prepare_inputs({})
    for batch in batches:
        batch.noise_pred = {"pred_cond": cond, "pred_uncond": uncond}[getattr(batch, guider._identifier_key)]
    return guider(batches).pred


# ---------------------------------------------------------------- 1. agreement where both exist


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("eta, threshold, momentum", [(0.0, 0.0, 0.0), (0.5, 5.0, 0.0), (0.0, 15.0, -0.5)])
def test_apg_equals_diffusers_original_formulation_at_scale_minus_one(eta, threshold, momentum, dtype, tolerance):
    """negprompt's apg is Sadat et al.'s ε̂ = ε_y + (s − 1)(Δ⊥ + ηΔ∥); diffusers' APG computes it with
    use_original_formulation=True and guidance_scale = s − 1 (docs/guiders.md). Four steps, momentum carried.
    On float64 predictions they agree to rounding; on float32 to 3e-6 (measured; predictions of size ~10),
    because diffusers projects in float64 and negprompt in the predictions' dtype."""
    s = 5.0
    theirs = AdaptiveProjectedGuidance(
        guidance_scale=s - 1,
        eta=eta,
        adaptive_projected_guidance_rescale=threshold,
        adaptive_projected_guidance_momentum=momentum or None,
        use_original_formulation=True,
    )
    previous = None
    for step in range(4):
        p = predictions(step, dtype)
        reference = run_diffusers(theirs, p["positive"], p["negative"], step, 10)
        ours, carried = formulas.projected(
            p["negative"], p["positive"], s, eta=eta, norm_threshold=threshold, momentum=momentum, previous=previous
        )
        previous = carried if momentum else None
        torch.testing.assert_close(ours, reference, rtol=0, atol=tolerance)


def test_apg_in_float64_agrees_to_rounding_and_diffusers_default_form_differs():
    p = predictions(1, torch.float64)
    theirs = AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.0, adaptive_projected_guidance_rescale=0.0)
    original = theirs.new(use_original_formulation=True)
    ours, _ = formulas.projected(p["negative"], p["positive"], 5.0, eta=0.0)
    torch.testing.assert_close(ours, run_diffusers(original, p["positive"], p["negative"], 0, 10), rtol=0, atol=1e-12)
    # the default form ε_u + s(Δ⊥ + ηΔ∥) is another prediction unless η = 1 and r = 0 (then both are CFG)
    default = theirs.new(guidance_scale=5.0)
    assert (ours - run_diffusers(default, p["positive"], p["negative"], 0, 10)).abs().max() > 0.1
    cfg_like, _ = formulas.projected(p["negative"], p["positive"], 5.0, eta=1.0)
    torch.testing.assert_close(
        cfg_like, run_diffusers(default.new(eta=1.0), p["positive"], p["negative"], 0, 10), rtol=0, atol=1e-12
    )


def test_cfg_zero_star_equals_diffusers_including_the_zeroed_steps():
    theirs = ClassifierFreeZeroStarGuidance(guidance_scale=6.0, zero_init_steps=2)
    guidance = Guidance(
        rule="cfg-zero-star", positive=Term("a"), negatives=(Term("b"),), scale=6.0, settings={"zero_steps": 2}
    )
    for step in range(5):
        p = predictions(step)
        reference = run_diffusers(theirs, p["positive"], p["negative"], step, 10)
        torch.testing.assert_close(guidance.combine(p, step, 10), reference, rtol=1e-6, atol=1e-6)
        if step >= 2:  # past the zeroed steps: the formula of rules/cfg_zero_star.py
            torch.testing.assert_close(cfg_zero_star(p["negative"], p["positive"], 6.0), reference, rtol=0, atol=1e-6)
        else:
            assert torch.equal(reference, torch.zeros_like(reference))


# ---------------------------------------------------------------- 2. diffusers' guiders as the rule `guider`


def guider_rule(name: str, config: dict | str = "{}", scale: float = 5.0, window: Window | None = None) -> Guidance:
    text = config if isinstance(config, str) else json.dumps(config)
    negative = Term("b", window=window) if window else Term("b")
    return Guidance(
        rule="guider", positive=Term("a"), negatives=(negative,), scale=scale, settings={"name": name, "config": text}
    )


def test_cfg_guider_is_rule_sd_and_a_window_gives_the_empty_prompt_base():
    p = predictions(3)
    torch.testing.assert_close(
        guider_rule("ClassifierFreeGuidance").combine(p, 2, 10), formulas.sd_negative(p["negative"], p["positive"], 5.0)
    )
    windowed = guider_rule("ClassifierFreeGuidance", window=Window(3))
    torch.testing.assert_close(windowed.combine(p, 1, 10), formulas.cfg(p[UNCONDITIONAL], p["positive"], 5.0))
    assert windowed.branches_at(1, 10) == [UNCONDITIONAL, "positive"] and windowed.branches_at(5, 10) == [
        "negative",
        "positive",
    ]


@pytest.mark.parametrize(
    "cls, config",
    [(TangentialClassifierFreeGuidance, {}), (MagnitudeAwareGuidance, {"alpha": 4.0}), (MagnitudeAwareGuidance, {})],
)
def test_wrapped_guider_is_diffusers_forward_on_the_negative(cls, config):
    p = predictions(4)
    ours = guider_rule(cls.__name__, config).combine(p, 2, 10)
    flat = {k: v.reshape(2, -1, 1) for k, v in p.items()}  # MAMBO-G's norm needs (B, N, 1) in diffusers 0.42
    reference = run_diffusers(cls(guidance_scale=5.0, **config), flat["positive"], flat["negative"], 2, 10)
    torch.testing.assert_close(ours, reference.reshape(p["positive"].shape), rtol=1e-6, atol=1e-6)
    assert (ours - formulas.sd_negative(p["negative"], p["positive"], 5.0)).abs().max() > 1e-3  # not plain CFG


def test_wrapped_fdg_is_diffusers_forward_on_the_negative_images():
    """FDG (Sadat et al. 2025) guides low and high frequencies of the prediction with their own scales (a Laplacian
    pyramid through kornia): equal to diffusers' on the same 4-D predictions, and not plain CFG."""
    from diffusers.guiders import FrequencyDecoupledGuidance

    p = predictions(4)
    config = {"guidance_scales": [7.0, 3.0]}
    ours = guider_rule("FrequencyDecoupledGuidance", config).combine(p, 2, 10)
    reference = run_diffusers(FrequencyDecoupledGuidance(**config), p["positive"], p["negative"], 2, 10)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert (ours - formulas.sd_negative(p["negative"], p["positive"], 5.0)).abs().max() > 1e-3


def test_wrapped_apg_carries_its_momentum_across_steps_as_diffusers_does():
    config = {"adaptive_projected_guidance_momentum": -0.5, "eta": 0.0, "adaptive_projected_guidance_rescale": 0.0}
    guidance, theirs, state = guider_rule("AdaptiveProjectedGuidance", config), None, {}
    theirs = AdaptiveProjectedGuidance(guidance_scale=5.0, **config)
    for step in range(4):
        p = predictions(10 + step)
        ours = guidance.combine(p, step, 10, state)
        reference = run_diffusers(theirs, p["positive"], p["negative"], step, 10)
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert "guider_momentum" in state


def test_config_file_is_read_once_and_stored_as_json(tmp_path):
    path = tmp_path / "mambo.json"
    path.write_text('{ "alpha": 4 }')
    settings = guider_rule("MagnitudeAwareGuidance", str(path)).settings
    assert settings.config == '{"alpha":4}' and 'guider_config: {"alpha":4}' in settings.infotext_fields()
    assert type(settings).from_json(settings.to_json()) == settings


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"name": "Nope"}, "unknown diffusers guider 'Nope'; choose one of: ClassifierFreeGuidance"),
        ({"name": "PerturbedAttentionGuidance"}, "is not supported: its third branch replaces self-attention"),
        ({"config": "[1]"}, "must be a JSON object"),
        ({"config": '{"foo": 1}'}, "has no option 'foo'; its options: guidance_rescale"),
        ({"config": '{"guidance_scale": 3}'}, "set it with --scale"),
        ({"config": '{"start": 0.8, "stop": 0.2}'}, "refuses"),
    ],
)
def test_bad_guider_settings_are_one_line(settings, message):
    with pytest.raises(GuidanceError, match=None) as error:
        Guidance(rule="guider", positive=Term("a"), negatives=(Term("b"),), scale=5.0, settings=settings)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guider-name", "Nope"], "unknown diffusers guider 'Nope'; choose one of: ClassifierFreeGuidance"),
        (["--guider-name", "SkipLayerGuidance"], "is not supported: its third branch skips"),
        (["--guider-config", "BAD"], "is not JSON"),
        (["--guider-config", "MISSING"], "no such guider config file"),
    ],
)
def test_bad_guider_input_on_the_command_line_is_one_line_exit_2(extra, message, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"alpha": 4')
    extra = [str(bad) if e == "BAD" else str(tmp_path / "none.json") if e == "MISSING" else e for e in extra]
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "-n", NEGATIVE, "--rule", "guider", "--steps", "2", "-q", "--out", str(out)]
    assert_usage_error(main(argv + extra), capsys, message, out)


def test_guider_run_round_trips_through_its_png(tmp_path, capsys):
    """Bundled model: the settings (name, JSON read from a file) are in the infotext and regenerate bit-exactly."""
    from PIL import Image

    config = tmp_path / "mambo.json"
    config.write_text('{"alpha": 4}')
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["generate", PROMPT, "-n", NEGATIVE, "--rule", "guider", "--guider-name", "MagnitudeAwareGuidance"]
    assert (
        main(
            [
                *argv,
                "--guider-config",
                str(config),
                "--negative-window",
                "1:",
                "--steps",
                "3",
                "-q",
                "--out",
                str(first),
            ]
        )
        == 0
    )
    assert main(["generate", "--from-png", str(first), "-q", "--out", str(again)]) == 0
    text = Image.open(first).text["parameters"]
    assert "Rule: guider" in text and 'guider_config: {"alpha":4}' in text and "MagnitudeAwareGuidance" in text
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    plain = tmp_path / "c.png"
    assert main(["generate", PROMPT, "-n", NEGATIVE, "--steps", "3", "-q", "--out", str(plain)]) == 0
    assert np.abs(np.asarray(Image.open(first), int) - np.asarray(Image.open(plain), int)).max() > 0


def test_bench_methods_lists_the_wrapped_guiders_with_valid_settings():
    from negprompt.shapes.methods import METHODS

    wrapped = {m.name: m for m in METHODS if m.rule == "guider"}
    assert {"guider TCFG", "guider FDG 5/2.5", "guider MAMBO-G α=8", "guider APG-Mix"} <= set(wrapped)
    for method in wrapped.values():
        Guidance(rule="guider", positive=Term("a"), negatives=(Term("b"),), scale=5.0, settings=method.settings)


# ---------------------------------------------------------------- 3. negprompt's rules as diffusers guiders


def test_the_core_never_imports_the_integrations():
    for path in (REPO / "negprompt").rglob("*.py"):
        if "integrations" not in path.parts:
            assert "negprompt.integrations" not in path.read_text(encoding="utf-8"), path


def modular(components):
    """A diffusers modular pipeline (SDXL or SD3 blocks) on ``components`` with the null conditioning block."""
    from negprompt.integrations.diffusers_guiders import with_null_conditioning, without_progress_bars

    if components.transformer is None:
        from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks as Blocks
    else:
        from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks as Blocks
    pipe = without_progress_bars(with_null_conditioning(Blocks())).init_pipeline()
    parts = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    found = {name: getattr(components, name, None) for name in ("unet", "transformer", "scheduler", *parts)}
    pipe.update_components(**{name: part for name, part in found.items() if part is not None})
    return pipe


def integration_cases():
    from negprompt.integrations.diffusers_guiders import DualScaleGuidance, NegativePromptGuidance, PerpNegGuidance

    return {
        "sd-window": (
            NegativePromptGuidance(guidance_scale=5.0, negative_window="2:"),
            Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(2)),), scale=5.0),
        ),
        "dual": (
            DualScaleGuidance(guidance_scale=5.0, negative_scale=3.0, negative_window="0:3"),
            Guidance(rule="dual", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 3.0, Window(0, 3)),), scale=5.0),
        ),
        "perp-neg": (
            PerpNegGuidance(guidance_scale=5.0, negative_weight=2.0),
            Guidance(rule="perp-neg", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 2.0),), scale=5.0),
        ),
    }


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("case", ["sd-window", "dual", "perp-neg"])
def test_modular_pipeline_with_a_negprompt_guider_equals_negprompts_loop(family, case, request):
    from negprompt.sampling.loop import sample
    from negprompt.sampling.schedulers import make_scheduler

    components = request.getfixturevalue("tiny_sdxl" if family == "sdxl" else "tiny_sd3")
    guider, guidance = integration_cases()[case]
    pipe = modular(components)
    pipe.update_components(guider=guider)
    extra = {"max_sequence_length": 32} if family == "sd3" else {}
    theirs = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=5,
        height=32,
        width=48,
        output="images",
        output_type="np",
        **extra,
    )
    ours = sample(components, guidance, make_scheduler("default", components.scheduler), [3], 5, 32, 48).images
    assert np.asarray(theirs).shape == ours.shape == (1, 32, 48, 3)
    assert np.abs(np.asarray(theirs) - ours).max() <= 1e-4


@pytest.mark.parametrize("case", ["sd-window", "dual", "perp-neg"])
def test_negprompt_guiders_save_and_load_with_diffusers_config(case):
    guider, _ = integration_cases()[case]
    with tempfile.TemporaryDirectory() as folder:
        guider.save_pretrained(folder)
        assert json.loads((Path(folder) / "guider_config.json").read_text())["_class_name"] == type(guider).__name__
        loaded = type(guider).from_pretrained(folder)
    public = {k: v for k, v in guider.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    assert loaded.window == guider.window


def test_branches_per_step_follow_the_window_and_the_null_block_is_required():
    from negprompt.integrations.diffusers_guiders import DualScaleGuidance, NegativePromptGuidance

    sd = NegativePromptGuidance(guidance_scale=5.0, negative_window="2:")
    sd.set_state(step=0, num_inference_steps=5, timestep=None)
    assert sd.predictions_needed() == ["pred_cond", "pred_null"]
    sd.set_state(step=3, num_inference_steps=5, timestep=None)
    assert sd.predictions_needed() == ["pred_cond", "pred_uncond"]  # two branches, as rule sd
    dual = DualScaleGuidance(guidance_scale=5.0)
    dual.set_state(step=0, num_inference_steps=5, timestep=None)
    assert dual.num_conditions == 3
    data = {"prompt_embeds": (torch.ones(1, 2), torch.zeros(1, 2))}
    with pytest.raises(ValueError, match="add a null conditioning block"):
        dual.prepare_inputs(data)
    dual.set_null_conditioning({"prompt_embeds": torch.full((1, 2), 7.0)})
    batches = dual.prepare_inputs(data)
    assert [float(b.prompt_embeds[0, 0]) for b in batches] == [1.0, 0.0, 7.0]
    with pytest.raises(ValueError, match="needs negprompt's loop"):
        NegativePromptGuidance(negative_window="2:auto")


# ---------------------------------------------------------------- 5. the benchmark runs


def test_bench_guiders_quick_prints_its_ratio(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_guiders

    out = tmp_path / "guiders.json"
    monkeypatch.setattr(sys, "argv", ["bench_guiders.py", "--quick", "--out", str(out)])
    assert bench_guiders.main() == 0
    result = json.loads(out.read_text())
    assert result["ratio"] > 0 and result["target"] == 1.02 and result["settings"]["quick"] is True
    assert "negprompt guider / diffusers CFG" in capsys.readouterr().out
