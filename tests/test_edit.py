"""Delayed negatives as edits: window semantics, locality measures, detector-based removal, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_usage_error

from negprompt.analysis.edit import run_edit, summarize
from negprompt.analysis.locality import changed_pixels, locality, psnr, ssim
from negprompt.analysis.sweep import automatic_start, motion, summarize_sweep
from negprompt.errors import NegpromptError
from negprompt.guidance.windows import Window
from negprompt.interfaces.cli import main
from negprompt.shapes.methods import METHODS
from negprompt.shapes.regions import detector_region
from negprompt.shapes.scene import render, sample_scene

PROMPT, NEGATIVE = "a photo of a woman", "red glasses"


def edit(tiny_sd, window, **kwargs):
    return run_edit(PROMPT, NEGATIVE, window, [1, 2], model=tiny_sd, steps=6, scheduler="ddim", size=32, **kwargs)


def test_window_over_all_steps_gives_the_full_negative_image_bit_exactly(tiny_sd):
    outcome = edit(tiny_sd, Window(0))
    for item in outcome.images:
        assert np.array_equal(item.edited, item.full)
        assert not np.array_equal(item.edited, item.original)


def test_before_its_window_the_edit_follows_the_plain_image_bit_exactly(tiny_sd):
    from negprompt.guidance.plan import Term
    from negprompt.session import Session

    session = Session(tiny_sd)
    common = dict(seeds=[1, 2], steps=6, scheduler="euler-a", size=32)
    plain = session.spec(PROMPT, rule="cfg", **common)
    late = session.spec(PROMPT, [Term(NEGATIVE, None, Window(4))], **common)
    first, second = session.run_together([plain, late], trace=True)
    for a, b in zip(first.trace, second.trace):
        assert np.array_equal(a.latents.numpy(), b.latents.numpy()) == (a.step <= 4)


def test_the_shared_steps_are_computed_once(tiny_sd):
    outcome = edit(tiny_sd, Window(3))
    summary = summarize(outcome)
    assert summary["unet_batch_rows"] < summary["unet_batch_rows_if_separate"]


def test_locality_on_synthetic_images_with_known_changes():
    rng = np.random.default_rng(0)
    original = rng.random((32, 32, 3))
    edited = original.copy()
    edited[4:8, 10:14] = 1 - edited[4:8, 10:14]  # a 4×4 patch changes
    region = np.zeros((32, 32), bool)
    region[4:8, 10:14] = True
    measures = locality(original, edited, region)
    assert measures["changed_fraction"] == pytest.approx(16 / 1024, abs=1 / 1024)
    assert measures["psnr_outside"] == float("inf") and measures["changed_outside_fraction"] == 0.0
    assert measures["ssim_outside"] < 1.0  # SSIM windows near the patch see it
    assert ssim(original, original) == pytest.approx(1.0)
    noisy = np.clip(original + rng.normal(0, 0.05, original.shape), 0, 1)
    assert 20 < psnr(original, noisy) < 30  # σ = 0.05 → about 26 dB
    assert changed_pixels(original, original).sum() == 0


def test_detector_removal_on_generated_images():
    rng = np.random.default_rng(3)
    for hat in (True, False):
        rendering = render(sample_scene(rng, hat=hat, sun=False, blurry=False))
        image = rendering.image / 255.0
        region, present = detector_region(image, "hat")
        assert present == hat
        if hat:
            truth = rendering.regions["hat"] > 0.5
            assert (region & truth).sum() / truth.sum() > 0.9  # the dilated region covers the hat


def test_automatic_start_is_where_the_maps_stop_moving():
    import torch

    steps, size = 8, 4
    maps = torch.zeros(steps, 1, size, size)
    for t in range(steps):
        maps[t, 0, min(t, 3), :] = 1.0  # the map moves down until step 3, then stays
    assert motion(maps)[:, 0].tolist()[4] == pytest.approx(0.0)
    assert automatic_start([maps], tau=0.02) == [4]


def test_sweep_summary_counts_only_images_that_had_the_thing():
    rows = []
    for seed, had in enumerate([True, True, False]):
        base = {"prompt": "p", "negative": "a hat", "word": "hat", "seed": seed, "plain_present": had}
        rows.append(
            {
                **base,
                "variant": "none",
                "start": -1,
                "present": had,
                "ssim_outside": 1.0,
                "psnr_outside": 60.0,
                "changed_outside": 0.0,
            }
        )
        rows.append(
            {
                **base,
                "variant": "start",
                "start": 2,
                "present": seed == 1,
                "ssim_outside": 0.9,
                "psnr_outside": 30.0,
                "changed_outside": 0.1,
            }
        )
        rows.append(
            {
                **base,
                "variant": "auto",
                "start": 3,
                "present": False,
                "ssim_outside": 0.95,
                "psnr_outside": 35.0,
                "changed_outside": 0.05,
            }
        )
        rows.append(
            {
                **base,
                "variant": "early",
                "start": 3,
                "present": True,
                "ssim_outside": 0.9,
                "psnr_outside": 30.0,
                "changed_outside": 0.1,
            }
        )
    summary = summarize_sweep(rows)
    assert summary["fixed_starts"][2]["n"] == 2 and summary["fixed_starts"][2]["removal_rate"] == 0.5
    assert summary["auto"]["removal_rate"] == 1.0 and summary["best_fixed_start"] == 2
    assert summary["early_only_present_rate"][3] == 1.0


def test_edit_command_writes_images_figure_and_measures(tiny_sd_dir, tmp_path):
    out = tmp_path / "edit"
    argv = ["edit", PROMPT, "--negative", NEGATIVE, "--window", "2:", "--model", str(tiny_sd_dir), "--steps", "4"]
    assert main(argv + ["--seed", "0,1", "-q", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["comparison.png", "edit.json"] + [f"{v}-s{s}.png" for v in ("original", "full", "edited") for s in (0, 1)]
    )
    record = json.loads((out / "edit.json").read_text())
    assert record["summary"]["region_source"] == "attention" and len(record["images"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--window", "9:"], "outside the schedule"),
        (["--window", "3:2"], "start must be below end"),
        (["--word", "hat"], "'hat' is not a word of the negative prompt"),
        (["--threshold", "1.5"], "threshold must be in (0, 1)"),
        (["--threshold", "0"], "threshold must be in (0, 1)"),
        (["--region", "detector"], "only for the bundled world"),
    ],
)
def test_edit_bad_input(tiny_sd_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "edit"
    argv = [
        "edit",
        PROMPT,
        "--negative",
        NEGATIVE,
        "--model",
        str(tiny_sd_dir),
        "--steps",
        "4",
        "-q",
        "--out",
        str(out),
    ]
    assert_usage_error(main(argv + extra), capsys, message, out)


def test_detector_edit_skips_attention_capture_and_gives_the_same_images(tiny_shapes_dir, monkeypatch):
    import negprompt.analysis.edit as edit_module

    common = dict(model=str(tiny_shapes_dir), steps=4, scheduler="ddim")
    with monkeypatch.context() as patch:
        patch.setattr(edit_module, "capture_attention", None)  # calling it would fail
        by_detector = run_edit("a red circle", "a hat", Window.parse("1:"), [0, 1], region="detector", **common)
    by_attention = run_edit("a red circle", "a hat", Window.parse("1:"), [0, 1], region="attention", **common)
    assert by_detector.region_source == "detector" and by_attention.region_source == "attention"
    assert "present_edited" in by_detector.images[0].measures
    assert "removal_score_edited" in by_attention.images[0].measures
    for a, b in zip(by_detector.generations, by_attention.generations):
        assert np.array_equal(a.pixels, b.pixels)  # recording attention does not change the images


def test_chunked_unet_calls_give_the_same_edit_up_to_rounding(tiny_shapes_dir):
    common = dict(model=str(tiny_shapes_dir), steps=3, scheduler="euler-a", region="detector")
    whole = run_edit("a red circle", "a hat", Window.parse("1:"), [0, 1, 2], **common)
    chunked = run_edit("a red circle", "a hat", Window.parse("1:"), [0, 1, 2], max_rows_per_call=4, **common)
    assert whole.unet_batch_rows == chunked.unet_batch_rows
    for a, b in zip(whole.generations, chunked.generations):
        assert np.abs(a.pixels - b.pixels).max() < 1e-3
    again = run_edit("a red circle", "a hat", Window.parse("1:"), [0, 1, 2], max_rows_per_call=4, **common)
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(chunked.generations, again.generations))
    with pytest.raises(NegpromptError, match="positive number"):
        run_edit("a red circle", "a hat", Window.parse("1:"), [0], max_rows_per_call=0, **common)
    with pytest.raises(NegpromptError, match="only with the detector region"):
        run_edit(
            "a red circle", "a hat", Window.parse("1:"), [0], max_rows_per_call=4, **{**common, "region": "attention"}
        )


def test_edit_sweep_command_on_a_shapes_model(tiny_shapes_dir, tmp_path):
    out = tmp_path / "sweep"
    argv = [
        "edit-sweep",
        "--pair",
        "a red circle->a hat",
        "--pair",
        "a blue square->striped",
        "--model",
        str(tiny_shapes_dir),
    ]
    assert (
        main(argv + ["--seed", "0-2", "--steps", "4", "--start-every", "2", "--early", "2", "-q", "--out", str(out)])
        == 0
    )
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["images"] == 6 and set(summary["fixed_starts"]) == {"0", "2"}
    assert (out / "sweep.png").exists() and "Reverse activation" in (out / "sweep.md").read_text()


def test_edit_sweep_rejects_a_bad_pair(tiny_shapes_dir, tmp_path, capsys):
    assert (
        main(["edit-sweep", "--pair", "a red circle", "--model", str(tiny_shapes_dir), "--out", str(tmp_path / "s")])
        == 2
    )
    assert "PROMPT->NEGATIVE" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_bench_methods_on_a_tiny_run(tiny_shapes_dir, tmp_path):
    out = tmp_path / "bench"
    argv = ["bench-methods", "--negative", "a hat", "--images", "3", "--steps", "3", "--model", str(tiny_shapes_dir)]
    assert main(argv + ["-q", "--out", str(out)]) == 0
    record = json.loads((out / "methods.json").read_text())
    ranking = record["ranking"]
    assert len(ranking) == len(METHODS) and ranking == sorted(ranking, key=lambda r: -r["score"])
    by_method = {r["method"]: r for r in record["cells"]}
    assert by_method["none (cfg)"]["unet_per_image"] == 2 * 3 and by_method["dual s⁻ = s"]["unet_per_image"] == 3 * 3
    assert by_method["nag φ=5"]["unet_per_image"] == 2 * 3  # the negative is no denoiser row
    assert by_method["sd + interval 0:0.8"]["unet_per_image"] < by_method["sd"]["unet_per_image"]
    assert by_method["sd, every 2"]["unet_per_image"] == 3 + 2  # the negative at steps 0 and 2 of 3
    assert "| rank | method |" in (out / "methods.md").read_text()


def test_bench_methods_rejects_a_foreign_negative(tiny_shapes_dir, tmp_path, capsys):
    argv = [
        "bench-methods",
        "--negative",
        "a dragon",
        "--images",
        "2",
        "--model",
        str(tiny_shapes_dir),
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 2 and "world's things" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [None, 4])
def test_edit_pngs_regenerate_bit_exactly_from_their_metadata(tiny_shapes_dir, tmp_path, rows):
    """Each generation of an edit has its own UNet calls, so its PNG (settings with every seed of its
    batch and the rows per call) regenerates the same pixels with ``generate --from-png``."""
    from negprompt.interfaces.png import read_pixels, read_png_settings

    out = tmp_path / "edit"
    argv = ["edit", "a red circle", "--negative", "a hat", "--window", "1:", "--model", str(tiny_shapes_dir)]
    argv += ["--steps", "3", "--seed", "0,1,2", "-q", "--out", str(out)]
    assert main(argv + ([] if rows is None else ["--rows-per-call", str(rows)])) == 0
    for name in ("original-s1.png", "full-s2.png", "edited-s0.png"):
        settings, _ = read_png_settings(out / name)
        assert settings.rows_per_call == rows
        again = tmp_path / f"again-{name}"
        assert main(["generate", "--from-png", str(out / name), "-q", "--out", str(again)]) == 0
        assert np.array_equal(read_pixels(again), read_pixels(out / name)), name


def test_runs_batched_together_equal_each_run_alone(tiny_sd):
    from negprompt.guidance.plan import Term
    from negprompt.session import Session

    session = Session(tiny_sd)
    common = dict(steps=4, scheduler="euler-a", size=32)
    specs = [
        session.spec(PROMPT, rule="cfg", seeds=[1, 2], **common),
        session.spec(PROMPT, [Term(NEGATIVE, None, Window(2))], seeds=[1, 2], **common),
        session.spec(PROMPT, [NEGATIVE, "blurry"], rule="dual", seeds=[2, 5, 7], **common),
    ]
    together = session.run_together(specs)
    for spec, generation in zip(specs, together):
        assert np.array_equal(session.run(spec).pixels, generation.pixels)
