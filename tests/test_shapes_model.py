"""The shapes-world model: tokenizer, training steps, resume, save/load round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance, Term
from negprompt.interfaces.cli import main
from negprompt.models.loading import load_components
from negprompt.models.prompts import check_prompt
from negprompt.sampling.loop import sample
from negprompt.sampling.schedulers import make_scheduler
from negprompt.shapes.model import ShapesModelConfig, build_tokenizer
from negprompt.shapes.scene import VOCABULARY, WORLDS, sample_example
from negprompt.shapes.training import DECLARATIONS, DEFAULT_SAMPLING, TrainConfig, Trainer, batch_of_examples

TINY = ShapesModelConfig(unet_widths=(16, 32), head_dim=8, text_width=32, text_layers=1, text_heads=2)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        samples=8 * 8, batch_size=8, learning_rate=2e-3, warmup_steps=2, checkpoint_every=3, log_every=1, model=TINY
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_tokenizer_is_word_level_with_start_end_and_padding():
    tokenizer = build_tokenizer()
    ids = tokenizer("A red circle with a hat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words[:8] == ["<bos>", "a", "red", "circle", "with", "a", "hat", "<eos>"]
    assert len(ids) == tokenizer.model_max_length and words[-1] == "<pad>"


def test_unknown_word_lists_the_vocabulary():
    tokenizer = build_tokenizer()
    with pytest.raises(NegpromptError) as error:
        check_prompt(tokenizer, "a red dragon")
    message = str(error.value)
    assert "'dragon'" in message and all(word in message for word in VOCABULARY)


def test_training_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(samples=8 * 30, learning_rate=3e-3), tmp_path)
    pixels, captions, things = batch_of_examples(99, 0, 16)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(trainer.loss_on(pixels, captions, torch.Generator().manual_seed(1), things))

    before = held_out_loss()
    trainer.run(progress=False)
    after = held_out_loss()
    assert after < 0.7 * before


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    straight = Trainer(tiny_config(), tmp_path / "straight")
    straight.run(progress=False)

    first = Trainer(tiny_config(), tmp_path / "resumed")
    first.run(progress=False, max_seconds=0.0)  # stops (with a checkpoint) after one step
    assert first.step == 1
    resumed = Trainer(tiny_config(), tmp_path / "resumed")
    resumed.load_checkpoint()
    resumed.run(progress=False)

    assert resumed.step == straight.step == 8
    for key, value in straight.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[key]), key
    for key, value in straight.ema.items():
        assert torch.equal(value, resumed.ema[key]), key
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in log] == list(range(1, 9))


def test_resume_refuses_another_model(tmp_path):
    Trainer(tiny_config(), tmp_path).save_checkpoint()
    other = Trainer(tiny_config(model=ShapesModelConfig(unet_widths=(16, 16), head_dim=8, text_width=32)), tmp_path)
    with pytest.raises(ValueError, match="another model"):
        other.load_checkpoint()


def test_fine_tune_starts_from_an_exported_model(tmp_path):
    source = Trainer(tiny_config(samples=16), tmp_path / "source")
    source.run(progress=False)
    folder = source.export(tmp_path / "model")
    fine = Trainer(tiny_config(init_from=str(folder)), tmp_path / "fine")
    for key, value in source.ema_components().unet.state_dict().items():
        assert torch.equal(fine.unet.state_dict()[key], value), key
        assert torch.equal(fine.ema[f"unet.{key}"], value), key
    other = tiny_config(init_from=str(folder), model=ShapesModelConfig(unet_widths=(16, 16), head_dim=8, text_width=32))
    with pytest.raises(NegpromptError, match="do not fit this model config"):
        Trainer(other, tmp_path / "other")
    with pytest.raises(NegpromptError, match="not an exported model"):
        Trainer(tiny_config(init_from=str(tmp_path / "fine")), tmp_path / "missing")
    assert not (tmp_path / "other").exists() and not (tmp_path / "missing").exists()


def test_export_loads_with_the_stable_diffusion_loader(tmp_path):
    trainer = Trainer(tiny_config(samples=16), tmp_path / "train")
    trainer.run(progress=False)
    folder = trainer.export(tmp_path / "model")
    assert json.loads((folder / "negprompt.json").read_text()) == {**DEFAULT_SAMPLING, **DECLARATIONS}
    loaded = load_components(folder)
    assert loaded.vae is None and loaded.latent_factor == 1 and loaded.default_size == 32
    guidance = Guidance(positive=Term("a red circle"), negatives=(Term("a hat"),))
    images = sample(loaded, guidance, make_scheduler("ddim", loaded.scheduler), [0], 3, 32, 32).images
    again = sample(trainer.ema_components(), guidance, make_scheduler("ddim", loaded.scheduler), [0], 3, 32, 32).images
    assert images.shape == (1, 32, 32, 3) and np.array_equal(images, again)


def test_thing_pixels_weigh_more_in_the_loss(tmp_path):
    pixels, captions, things = batch_of_examples(7, 0, 8)
    assert things.shape == (8, 1, 32, 32) and 0 < float(things.mean()) < 0.2
    plain = Trainer(tiny_config(thing_weight=1.0), tmp_path / "a")
    weighted = Trainer(tiny_config(thing_weight=5.0), tmp_path / "b")
    weighted.unet.load_state_dict(plain.unet.state_dict())
    weighted.text_encoder.load_state_dict(plain.text_encoder.state_dict())
    with torch.no_grad():
        a = float(plain.loss_on(pixels, captions, torch.Generator().manual_seed(0), things))
        b = float(weighted.loss_on(pixels, captions, torch.Generator().manual_seed(0), things))
        c = float(weighted.loss_on(pixels, captions, torch.Generator().manual_seed(0), None))
    assert b > a and c == pytest.approx(a)


def test_resume_with_another_loss_setting_is_recorded(tmp_path):
    Trainer(tiny_config(thing_weight=1.0), tmp_path).run(progress=False, max_seconds=0.0)
    resumed = Trainer(tiny_config(thing_weight=5.0), tmp_path)
    resumed.load_checkpoint()
    resumed.run(progress=False)
    import json

    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["history"] == [{"from_step": 1, "changed": {"thing_weight": 5.0}}]
    assert '"event": "config changed"' in (tmp_path / "train_log.jsonl").read_text()


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--thing-weight", "0"], "must be a positive number"),
        (["--lr", "nan"], "must be a positive number"),
        (["--samples", "0"], "--samples: '0' is not a positive integer"),
    ],
)
def test_train_refuses_bad_settings(tmp_path, capsys, flag, message):
    code = main(["train", "--out", str(tmp_path / "run"), "-q", *flag])
    assert_usage_error(code, capsys, message, tmp_path / "run")


def test_world_v2_puts_the_sun_top_right_and_names_nouns_in_either_order():
    examples = [sample_example(3, index, WORLDS["v2"]) for index in range(400)]
    suns = [scene for scene, _, _ in examples if scene.sun]
    assert len(suns) > 100 and {scene.sun_side for scene in suns} == {"right"}
    captions = [caption for _, _, caption in examples]
    assert any("with a hat and a sun" in c for c in captions) and any("with a sun and a hat" in c for c in captions)
    # v1's stream is what the first training saw: both corners, hat always named first
    v1 = [sample_example(3, index) for index in range(400)]
    assert {scene.sun_side for scene, _, _ in v1 if scene.sun} == {"left", "right"}
    assert not any("with a sun and a hat" in c for _, _, c in v1)
    # a caption never names something absent, in either world
    for scene, _, caption in examples + v1:
        for thing in ("hat", "sun", "striped", "blurry"):
            assert thing not in caption.split() or getattr(scene, thing)


def test_world_v2_names_present_things_more_often():
    def named_share(world):
        named = present = 0
        for index in range(600):
            scene, _, caption = sample_example(5, index, world)
            for thing in ("hat", "sun"):
                if getattr(scene, thing):
                    present += 1
                    named += thing in caption.split()
        return named / present

    assert named_share(WORLDS["v2"]) > named_share(WORLDS["v1"]) + 0.15


def test_training_world_is_recorded_and_checked(tmp_path, capsys):
    config = tiny_config(world="v2")
    assert TrainConfig.from_json(config.to_json()).world == "v2"
    legacy = config.to_json()
    del legacy["world"]  # checkpoints written before the field: trained on v1
    assert TrainConfig.from_json(legacy).world == "v1"
    with pytest.raises(NegpromptError, match="unknown world version 'v9'; known: v1, v2"):
        tiny_config(world="v9")
    pixels_v1, captions_v1, _ = batch_of_examples(11, 0, 16)
    pixels_v2, captions_v2, _ = batch_of_examples(11, 0, 16, WORLDS["v2"])
    assert captions_v1 != captions_v2 or not torch.equal(pixels_v1, pixels_v2)
    code = main(["train", "--out", str(tmp_path / "run"), "-q", "--world", "v9"])
    assert_usage_error(code, capsys, "--world", tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the CLI writes its choices out (no import of the world at start-up)
        main(["train", "--help"])
    assert "{" + ",".join(WORLDS) + "}" in capsys.readouterr().out


def test_guidance_distillation_student_starts_as_the_teacher_and_learns_cfg(tmp_path):
    """A student with a guidance input starts as the teacher's ε_y, trains resumably towards the teacher's
    CFG output, and exports a model that takes w as an input (scale 1, w declared)."""
    from negprompt.session import Session

    teacher_trainer = Trainer(tiny_config(samples=16), tmp_path / "teacher")
    teacher_trainer.run(progress=False)
    teacher_dir = teacher_trainer.export(tmp_path / "teacher-model")
    student_model = ShapesModelConfig(**{**TINY.to_json(), "guidance_embedding_dim": 16})
    config = tiny_config(
        distill_from=str(teacher_dir), model=student_model, samples=8 * 6, guidance_max=6.0, learning_rate=3e-4
    )
    student = Trainer(config, tmp_path / "student")
    teacher = load_components(teacher_dir)
    for key, value in teacher.unet.state_dict().items():
        assert torch.equal(student.unet.state_dict()[key], value), key
    assert not student.unet.time_embedding.cond_proj.weight.any()  # the guidance input starts at zero

    pixels, captions, things = batch_of_examples(0, 10_000, 8)

    def held_out() -> float:
        with torch.no_grad():
            return float(student.distillation_loss(pixels, captions, torch.Generator().manual_seed(5), things))

    before = held_out()
    student.run(progress=False, max_seconds=0.0)  # one step, then a checkpoint
    resumed = Trainer(config, tmp_path / "student")
    resumed.load_checkpoint()
    resumed.run(progress=False)
    straight = Trainer(config, tmp_path / "straight")
    straight.run(progress=False)
    for key, value in straight.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[key]), key
    student = resumed
    assert held_out() < before
    folder = student.export(tmp_path / "student-model")
    declared = json.loads((folder / "negprompt.json").read_text())
    assert declared["scale"] == 1.0 and declared["embedded_guidance"] == DEFAULT_SAMPLING["scale"]
    session = Session(str(folder))
    run = session.run(session.spec("a red circle", steps=3, seeds=[0]))
    assert run.spec.embedded_guidance == DEFAULT_SAMPLING["scale"] and run.unet_batch_rows == 3  # one pass a step
    with pytest.raises(NegpromptError, match="guidance input"):
        TrainConfig(distill_from=str(teacher_dir), model=TINY)


def test_train_refuses_a_bad_guidance_range_at_once(tmp_path, capsys):
    from helpers import assert_usage_error

    from negprompt.interfaces.cli import main

    out = tmp_path / "student"
    code = main(["train", "--out", str(out), "--distill-from", "shapes", "--guidance-range", "1-10"])
    assert_usage_error(code, capsys, "--guidance-range '1-10' must look like LO:HI", out)
    code = main(["train", "--out", str(out), "--distill-from", "shapes", "--guidance-range", "5:2"])
    assert_usage_error(code, capsys, "guidance range must be 0 ≤ low < high", out)
