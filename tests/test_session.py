"""The opened core: conditioning as data, model families, schedule facts, sessions with a device and dtype."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from helpers import assert_usage_error
from PIL import Image

import negprompt
from negprompt.devices import DeviceError, resolve_device, torch_dtype
from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance, Term
from negprompt.interfaces.cli import main
from negprompt.models.components import Components
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput, denoiser_inputs
from negprompt.models.families import UnsupportedModelError, family_for_index
from negprompt.models.loading import load_components
from negprompt.models.pixel import PixelFamily
from negprompt.models.stable_diffusion import StableDiffusionFamily
from negprompt.models.stable_diffusion_xl import StableDiffusionXLFamily
from negprompt.runspec import RunSpec, SettingsError
from negprompt.sampling.loop import Group, SamplingError, encode_groups, sample_groups
from negprompt.sampling.schedule import alpha_bar_at, denoiser_calls, sigma_at
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session, image_size
from negprompt.testing.peers import diffusers_pipeline

PROMPT, NEGATIVE = "a photo of a cat", "glasses"


# ---------------------------------------------------------------- conditioning


def test_denoiser_inputs_batch_hidden_states_and_added_inputs():
    a = Conditioning(torch.zeros(1, 4, 8), pooled=torch.zeros(1, 3), extra={"time_ids": torch.zeros(1, 6)})
    b = Conditioning(torch.ones(1, 4, 8), pooled=torch.ones(1, 3), extra={"time_ids": torch.ones(1, 6)})
    inputs = denoiser_inputs([a, b, a])
    assert inputs["encoder_hidden_states"].shape == (3, 4, 8)
    assert inputs["encoder_hidden_states"][1].eq(1).all() and inputs["encoder_hidden_states"][2].eq(0).all()
    added = inputs["added_cond_kwargs"]
    assert set(added) == {"text_embeds", "time_ids"}
    assert added["text_embeds"].shape == (3, 3) and added["time_ids"].shape == (3, 6)
    assert added["time_ids"][:, 0].tolist() == [0, 1, 0]


def test_denoiser_inputs_without_added_inputs_pass_none_and_mixed_rows_are_refused():
    plain = Conditioning(torch.zeros(1, 4, 8))
    assert set(denoiser_inputs([plain, plain])) == {"encoder_hidden_states"}
    with pytest.raises(ConditioningError, match="different added inputs"):
        denoiser_inputs([plain, Conditioning(torch.zeros(1, 4, 8), pooled=torch.zeros(1, 3))])
    with pytest.raises(ConditioningError):
        denoiser_inputs([])


class TimeIdsFamily(StableDiffusionFamily):
    """Stable Diffusion whose conditioning also carries SDXL-style added inputs (the tiny UNet ignores them)."""

    def encode(self, components, texts):
        return {
            item: Conditioning(c.hidden_states, extra={"time_ids": torch.full((1, 6), float(len(item.text)))})
            for item, c in super().encode(components, texts).items()
        }


def test_loop_passes_a_familys_added_inputs_to_the_denoiser(tiny_sd):
    parts = Components(tiny_sd.unet, tiny_sd.text_encoder, tiny_sd.tokenizer, tiny_sd.scheduler, tiny_sd.vae)
    with_ids = Components(**{**parts.__dict__, "family": TimeIdsFamily()})
    seen = []
    handle = tiny_sd.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("added_cond_kwargs")), with_kwargs=True
    )
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),))
    try:
        groups, scheduler = [Group(guidance, (1, 2))], make_scheduler("ddim", tiny_sd.scheduler)
        conditioning = encode_groups(with_ids, groups, scheduler, 3)
        out = sample_groups(with_ids, groups, scheduler, 3, 32, 32, conditioning=conditioning)
        plain = Session(parts).generate(PROMPT, NEGATIVE, seeds=[1, 2], steps=3, scheduler="ddim", size=32)
    finally:
        handle.remove()
    assert len(seen) == 6 and all(s is not None for s in seen[:3]) and all(s is None for s in seen[3:])
    # rows: negative for seeds 1, 2, then positive for seeds 1, 2 (branch order of the plan)
    ids = seen[0]["time_ids"]
    assert ids.shape == (4, 6) and sorted(set(ids[:, 0].tolist())) == [float(len(NEGATIVE)), float(len(PROMPT))]
    assert np.array_equal(out.images, plain.pixels)  # the tiny UNet has no added embedding: same images


def test_loop_refuses_missing_conditioning_and_bad_rows_per_call(tiny_sd):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),))
    groups = [Group(guidance, (0,))]
    scheduler = make_scheduler("ddim", tiny_sd.scheduler)
    partial = {k: v for k, v in encode_groups(tiny_sd, groups, scheduler, 2).items() if k.text != NEGATIVE}
    with pytest.raises(SamplingError, match="no conditioning given for the prompt.*'glasses'"):
        sample_groups(tiny_sd, groups, make_scheduler("ddim", tiny_sd.scheduler), 2, 32, 32, conditioning=partial)
    full = encode_groups(tiny_sd, groups, scheduler, 2)
    for rows, hooks in ((0, ()), (2, (object(),))):
        with pytest.raises(SamplingError, match="max_rows_per_call") as caught:
            sample_groups(
                tiny_sd, groups, scheduler, 2, 32, 32, conditioning=full, max_rows_per_call=rows, unet_hooks=hooks
            )
        assert isinstance(caught.value, NegpromptError)


# ---------------------------------------------------------------- families


def test_family_is_chosen_from_model_index(tiny_sd_dir):
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    assert isinstance(family_for_index(index), StableDiffusionFamily)
    assert isinstance(family_for_index({**index, "_class_name": "StableDiffusionPipeline"}), StableDiffusionFamily)
    assert isinstance(family_for_index({**index, "vae": [None, None]}), PixelFamily)
    assert isinstance(family_for_index({**index, "_class_name": "StableDiffusionXLPipeline"}), StableDiffusionXLFamily)
    assert family_for_index({**index, "_class_name": "StableDiffusion3Pipeline"}).name == "stable-diffusion-3"
    assert family_for_index({**index, "_class_name": "FluxPipeline"}).name == "flux"
    with pytest.raises(
        UnsupportedModelError, match="PixArtAlphaPipeline with a VAE.*supported: Stable Diffusion 1.x/2.x.*XL.*3.*FLUX"
    ):
        family_for_index({**index, "_class_name": "PixArtAlphaPipeline"})


def test_unsupported_family_is_refused_when_loading(tiny_sd_dir, tmp_path):
    import shutil

    model = tmp_path / "xl"
    shutil.copytree(tiny_sd_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(NegpromptError, match="cannot run; supported"):
        load_components(model)
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(NegpromptError, match="lacks the part.*transformer, text_encoder, text_encoder_2"):
        load_components(model)
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(NegpromptError, match="lacks the part.*text_encoder_2, tokenizer_2"):
        load_components(model)


def test_families_know_latent_geometry(tiny_sd, tiny_shapes_dir):
    assert isinstance(tiny_sd.family, StableDiffusionFamily)
    assert (tiny_sd.latent_factor, tiny_sd.latent_channels) == (2, 4)
    assert tiny_sd.family.latent_shape(tiny_sd, 32, 48) == (4, 16, 24)
    shapes = load_components(tiny_shapes_dir)
    assert isinstance(shapes.family, PixelFamily)
    assert (shapes.latent_factor, shapes.latent_channels) == (1, 3)
    latents = torch.full((1, 3, 4, 4), 0.5)
    assert np.allclose(shapes.family.decode(shapes, latents), 0.75)  # pixels in [-1, 1] → [0, 1]


# ---------------------------------------------------------------- schedule facts


def test_denoiser_calls_per_scheduler(tiny_sd):
    assert denoiser_calls("pndm", tiny_sd.scheduler, 4) == 5  # PRK skipped: N + 1
    assert denoiser_calls("ddim", tiny_sd.scheduler, 4) == 4
    assert denoiser_calls("heun", tiny_sd.scheduler, 4) == 7  # 2N − 1
    assert Session(tiny_sd).denoiser_calls("heun", 4) == 7


def test_alpha_bar_and_sigma_at_integer_and_fractional_timesteps(tiny_sd):
    alphas = tiny_sd.scheduler.alphas_cumprod
    assert alpha_bar_at(alphas, 500) == pytest.approx(float(alphas.double()[500]), rel=1e-12)
    s0, s1 = sigma_at(alphas, 500), sigma_at(alphas, 501)
    assert sigma_at(alphas, 500.25) == pytest.approx(0.75 * s0 + 0.25 * s1, rel=1e-12)  # σ is interpolated
    assert alpha_bar_at(alphas, 500.25) == pytest.approx(1 / (1 + sigma_at(alphas, 500.25) ** 2), rel=1e-12)


# ---------------------------------------------------------------- devices and dtypes


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="'cuda' is not available.*accepted on this machine: auto, cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu'; accepted: auto, cpu, cuda, mps"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="unknown dtype 'float8'; accepted: float32, float16, bfloat16"):
        torch_dtype("float8")


@pytest.mark.parametrize("command", ["generate", "attend", "edit"])
def test_cli_device_cuda_without_cuda_is_a_usage_error_before_loading(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("negprompt.session.load_components", never)
    out = tmp_path / ("x.png" if command == "generate" else "x")
    extra = ["--negative", "a hat"] if command == "edit" else []
    code = main([command, "a red circle", *extra, "--device", "cuda", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, "device 'cuda' is not available", out)
    code = main([command, "a red circle", *extra, "--dtype", "half", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, "unknown dtype 'half'; accepted: float32, float16, bfloat16", out)


def test_cli_device_option_on_every_generating_command(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["demo"], ["evaluate"], ["bench-methods"], ["edit-sweep", "--pair", "a red circle->a hat"]):
        code = main([*argv, "--device", "cuda", "-q"])
        assert_usage_error(code, capsys, "device 'cuda' is not available")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_on_cpu_runs(tiny_sd_dir, dtype):
    """bfloat16 and (with this torch) float16 run on the CPU: finite images of the right shape."""
    session = Session(tiny_sd_dir, device="cpu", dtype=dtype)
    assert session.components.unet.dtype == session.components.vae.dtype == torch_dtype(dtype)
    assert session.components.text_encoder.dtype == torch_dtype(dtype)
    result = session.generate(PROMPT, NEGATIVE, seeds=[0, 1], steps=3, scheduler="ddim", size=32)
    assert result.pixels.shape == (2, 32, 32, 3) and result.pixels.dtype == np.float32
    assert np.isfinite(result.pixels).all()
    assert (result.spec.device, result.spec.dtype) == ("cpu", dtype)
    full = Session(tiny_sd_dir, device="cpu").generate(
        PROMPT, NEGATIVE, seeds=[0, 1], steps=3, scheduler="ddim", size=32
    )
    assert 0 < np.abs(full.pixels - result.pixels).max() < 0.5  # close to float32, not equal


def test_cli_bfloat16_png_records_device_and_dtype(tiny_sd_dir, tmp_path):
    out = tmp_path / "bf16.png"
    argv = ["generate", PROMPT, "--model", str(tiny_sd_dir), "--steps", "2", "--size", "32", "-q", "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16"]) == 0
    with Image.open(out) as image:
        record = json.loads(image.text["negprompt"])
        assert "Precision: bfloat16" in image.text["parameters"]
    assert (record["settings"]["device"], record["settings"]["dtype"]) == ("cpu", "bfloat16")
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_session_refuses_a_spec_for_another_dtype(tiny_sd):
    spec = Session(tiny_sd).spec(PROMPT, steps=2, size=32)
    other = RunSpec(**{**spec.__dict__, "dtype": "bfloat16"})
    with pytest.raises(SettingsError, match="asks for bfloat16 on cpu but this session holds the model in float32"):
        Session(tiny_sd).run(other)
    with pytest.raises(SettingsError, match="run dtype 'half'"):
        RunSpec(**{**spec.__dict__, "dtype": "half"})


# ---------------------------------------------------------------- run specs


def test_old_png_json_without_device_and_dtype_still_loads(tiny_sd):
    spec = Session(tiny_sd).spec(PROMPT, NEGATIVE, steps=3, size=32, seeds=[4])
    data = spec.to_json()
    assert (data["device"], data["dtype"]) == ("cpu", "float32")
    assert RunSpec.from_json(json.loads(json.dumps(data))) == spec
    old = {k: v for k, v in data.items() if k not in ("device", "dtype")}
    loaded = RunSpec.from_json(old)
    assert (loaded.device, loaded.dtype) == ("cpu", "float32") and loaded == spec


def test_top_level_api_keeps_generate_and_exports_session(tiny_sd):
    assert negprompt.Session is Session and negprompt.RunSpec is RunSpec
    result = negprompt.generate(PROMPT, negative=NEGATIVE, model=tiny_sd, steps=2, size=32, seeds=[1])
    again = Session(tiny_sd).generate(PROMPT, NEGATIVE, steps=2, size=32, seeds=[1])
    assert np.array_equal(result.pixels, again.pixels)


def test_session_lock_is_held_during_a_run_and_threads_share_one_session(tiny_sd):
    session = Session(tiny_sd)
    options = dict(steps=3, scheduler="ddim", size=32)
    others_could_lock = []

    def probe(info):
        result = []
        thread = threading.Thread(target=lambda: result.append(session.lock.acquire(blocking=False)))
        thread.start()
        thread.join()
        others_could_lock.append(result[0])

    session.generate(PROMPT, NEGATIVE, callback=probe, **options)
    assert others_could_lock == [False] * 3
    alone = {seed: session.generate(PROMPT, NEGATIVE, seeds=[seed], **options).pixels for seed in (1, 2, 3)}
    together: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(
            target=lambda s=seed: together.__setitem__(
                s, session.generate(PROMPT, NEGATIVE, seeds=[s], **options).pixels
            )
        )
        for seed in (1, 2, 3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(together[s], alone[s]) for s in alone)


# ---------------------------------------------------------------- non-square images


def test_image_size_from_size_or_sides():
    assert image_size(None, None, None, 64) == (64, 64)
    assert image_size(32, None, None, 64) == (32, 32)
    assert image_size((32, 48), None, None, 64) == (32, 48)
    assert image_size(None, None, 48, 64) == (64, 48)
    assert image_size(32, 32, None, 64) == (32, 32)
    with pytest.raises(SettingsError, match="size 32 conflicts with width 48"):
        image_size(32, None, 48, 64)


def test_non_square_run_equals_diffusers_pipeline(tiny_sd):
    height, width, seeds = 32, 48, [3, 11]
    mine = Session(tiny_sd).generate(
        PROMPT, NEGATIVE, height=height, width=width, seeds=seeds, steps=5, scheduler="ddim", scale=7.5
    )
    pipe = diffusers_pipeline(tiny_sd, make_scheduler("ddim", tiny_sd.scheduler))
    theirs = pipe(
        [PROMPT] * 2,
        negative_prompt=[NEGATIVE] * 2,
        num_inference_steps=5,
        guidance_scale=7.5,
        height=height,
        width=width,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    assert mine.pixels.shape == theirs.shape == (2, height, width, 3)
    assert np.abs(mine.pixels - theirs).max() <= 1e-4


def test_cli_width_and_height(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "wide.png"
    argv = ["generate", PROMPT, "--model", str(tiny_sd_dir), "--steps", "2", "-q", "--out", str(out)]
    assert main([*argv, "--width", "48", "--height", "32"]) == 0
    with Image.open(out) as image:
        assert image.size == (48, 32)
        settings = json.loads(image.text["negprompt"])["settings"]
        assert "Size: 48x32" in image.text["parameters"]
    assert (settings["width"], settings["height"]) == (48, 32)
    bad = tmp_path / "bad.png"
    code = main([*argv[:-1], str(bad), "--size", "32", "--width", "48"])
    assert_usage_error(code, capsys, "--size 32 conflicts with --width 48", bad)


def test_encode_groups_encodes_each_prompt_of_the_plan_once_alone(tiny_sd):
    from negprompt.guidance.windows import Window

    delayed = Guidance(positive=Term(("a cat", "a dog")), negatives=(Term(NEGATIVE, window=Window(2)),))
    scheduler = make_scheduler("ddim", tiny_sd.scheduler)
    conditioning = encode_groups(tiny_sd, [Group(delayed, (0, 1))], scheduler, 4)
    # unconditional before the window opens; plain inputs only (no second prompt, size conditions or zeros)
    assert sorted(c.text for c in conditioning) == sorted(["", NEGATIVE, "a cat", "a dog"])
    assert all(c.is_plain for c in conditioning)
    assert all(c.hidden_states.shape[0] == 1 and c.pooled is None and not c.extra for c in conditioning.values())
    alone = encode_groups(tiny_sd, [Group(Guidance(rule="cfg", positive=Term("a dog")), (5,))], scheduler, 4)
    assert sorted(c.text for c in alone) == ["", "a dog"] and torch.equal(
        alone[PromptInput("a dog")].hidden_states, conditioning[PromptInput("a dog")].hidden_states
    )
