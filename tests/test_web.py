"""``negprompt serve`` without a browser: the handlers behind the page's buttons called directly (the server's
command line is tested in test_web_serve.py, limits and bad input in test_web_limits.py, the page itself in a real
browser in test_web_browser.py).

What could break: the page's image differing from ``negprompt generate``'s for the same settings, a
downloaded PNG that does not re-run, a cancelled job that keeps the model or leaves a hook behind, two jobs
that interleave, a page without a field for a rule option.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from negprompt.guidance.economy import computed_rows
from negprompt.interfaces.cli import main
from negprompt.interfaces.png import read_pixels, read_png_settings
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    AttentionRequest,
    Cancelled,
    EditRequest,
    GenerateRequest,
    NegativeInput,
    PageJob,
    SweepRequest,
)
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.session import Session

LIMITS = ServerLimits()


@pytest.fixture(scope="module")
def session() -> Session:
    return Session()


# ---------------------------------------------------------------- Generate


def test_the_page_image_equals_negprompt_generate_bit_for_bit(session, tmp_path, capsys):
    """Same settings, same pixels and same recorded settings as the command line."""
    cli_png = tmp_path / "cli.png"
    argv = ["generate", "a red circle", "-n", "a hat", "--negative-window", "5:", "--seed", "3", "-q"]
    assert main(argv + ["--out", str(cli_png)]) == 0
    request = GenerateRequest("a red circle", (NegativeInput("a hat", None, 5, None),), seed=3)
    result = handlers.generate(session, request, LIMITS, tmp_path / "page", PageJob())
    [page_png] = result.pngs
    assert page_png.name == "negprompt.png"
    assert np.array_equal(read_pixels(page_png), read_pixels(cli_png))
    assert np.array_equal(np.asarray(result.generation.images[0]), read_pixels(cli_png))
    assert read_png_settings(page_png)[0].to_json() == read_png_settings(cli_png)[0].to_json()
    assert result.infotext.splitlines()[:2] == ["a red circle", "Negative prompt: a hat"]


def test_the_downloaded_pngs_rerun_with_from_png(session, tmp_path, capsys):
    """A batch under rule dual with its own option values and a negative's scale: every PNG re-runs to
    the same pixels with ``negprompt generate --from-png``."""
    request = GenerateRequest(
        "a blue square",
        (NegativeInput("a hat", "3", 2, 8), NegativeInput("", "9", 0, None), NegativeInput("striped", 2.0)),
        rule="dual",
        scale=6.0,
        steps=10,
        scheduler="ddim",
        seed=5,
        images=2,
        width=32,
        height=28,
        rescale=0.5,
    )
    result = handlers.generate(session, request, LIMITS, tmp_path, PageJob())
    assert [p.name for p in result.pngs] == ["negprompt-s5.png", "negprompt-s6.png"]
    spec = result.generation.spec
    assert [(t.prompt, t.scale, t.window.start, t.window.end) for t in spec.guidance.negatives] == [
        ("a hat", 3.0, 2, 8),
        ("striped", 2.0, 0, None),
    ]
    for png in result.pngs:
        again = tmp_path / f"again-{png.name}"
        assert main(["generate", "--from-png", str(png), "--out", str(again), "-q"]) == 0
        assert np.array_equal(read_pixels(again), read_pixels(png))


def test_rule_options_come_from_the_settings_and_reach_the_run(session, tmp_path):
    request = GenerateRequest(
        "a red circle",
        (NegativeInput("a hat"),),
        rule="dng",
        rule_options={"strength": 2.0, "prior": 0.02, "p_min": 1e-4, "p_max": 0.8},
        steps=6,
    )
    spec = handlers.generate_specs(session, request, LIMITS)[0]
    assert (spec.guidance.rule, spec.guidance.settings.strength, spec.guidance.settings.prior) == ("dng", 2.0, 0.02)


def test_side_by_side_runs_together_and_keeps_each_image_as_alone(session, tmp_path):
    request = GenerateRequest("a purple circle", (NegativeInput("a hat"),), seed=1, images=2, steps=12)
    alone = handlers.generate(session, request, LIMITS, tmp_path / "alone", PageJob())
    together = handlers.generate(
        session,
        GenerateRequest(**{**request.__dict__, "compare": True, "compare_start": 3}),
        LIMITS,
        tmp_path,
        PageJob(),
    )
    assert np.array_equal(together.generation.pixels, alone.generation.pixels)
    captions = [caption for _, caption in together.comparison]
    assert captions[:3] == ["no negative, seed 1", "negative, seed 1", "delayed negative, seed 1"]
    assert len(together.comparison) == 6
    plain, _, delayed = (read_png_settings(path)[0] for path, _ in together.comparison[:3])
    assert (plain.guidance.rule, plain.guidance.negatives) == ("cfg", ())
    assert delayed.guidance.negatives[0].window.start == 3


def test_steps_report_progress_and_a_preview_of_the_clean_image(session, tmp_path):
    reports = []
    job = PageJob(on_progress=lambda done, total, preview: reports.append((done, total, preview)), preview_every=4)
    handlers.generate(session, GenerateRequest("a red circle", steps=8), LIMITS, tmp_path, job)
    assert [(done, total) for done, total, _ in reports] == [(d, 8) for d in range(1, 9)]
    previews = [done for done, _, preview in reports if preview is not None]
    assert previews == [1, 5, 8] and reports[-1][2].size == (32, 32)


def test_the_first_click_shows_the_negative_acting(session, tmp_path):
    """The page's defaults (example pair, seed, side by side on, the Edit tab's start): the image with no
    negative has the negative's thing (a hat, read by the shapes world's detector) and the negative
    removes it, on the Generate tab and in the Edit tab's edit."""
    from negprompt.interfaces.png import read_pixels
    from negprompt.interfaces.web.settings import EDIT_START, EXAMPLE_SEED
    from negprompt.shapes.detectors import detect

    prompt, negative = handlers.example_pair(session)
    request = GenerateRequest(prompt, (NegativeInput(negative),), seed=str(EXAMPLE_SEED), compare=True)
    result = handlers.generate(session, request, LIMITS, tmp_path, PageJob())
    plain, negated, _ = (detect(read_pixels(path)) for path, _ in result.comparison)
    assert (negative, plain.hat, negated.hat) == ("a hat", True, False)
    edited = handlers.edit(
        session, EditRequest(prompt, negative, start=EDIT_START, seed=str(EXAMPLE_SEED)), LIMITS, PageJob()
    )
    summary = edited.summary
    assert summary["present_original"] > 0 and summary["present_full"] == summary["present_edited"] == 0


# ---------------------------------------------------------------- one job per model, cancel


def test_cancel_stops_at_the_next_unet_call_and_frees_the_model(session, tmp_path):
    job = PageJob()

    def cancel_after_three(done, total, preview):
        if done == 3:
            job.cancel()

    job.on_progress = cancel_after_three
    with pytest.raises(Cancelled):
        handlers.generate(session, GenerateRequest("a red circle", (NegativeInput("a hat"),)), LIMITS, tmp_path, job)
    assert job.unet_calls == 3
    assert not session.components.unet._forward_pre_hooks  # the cancel hook is gone
    assert session.lock.acquire(blocking=False)
    session.lock.release()
    assert not list(tmp_path.iterdir())  # nothing written


def test_two_jobs_at_once_take_turns_and_get_their_own_images(session, tmp_path):
    requests = [GenerateRequest("a red circle", (NegativeInput("a hat"),), seed=s) for s in (0, 1)]
    alone = [handlers.generate(session, r, LIMITS, tmp_path / f"alone{i}", PageJob()) for i, r in enumerate(requests)]
    results: dict[int, handlers.GenerateResult] = {}
    inside = []

    def work(index: int) -> None:
        job = PageJob(on_progress=lambda done, total, preview: inside.append(index))
        results[index] = handlers.generate(session, requests[index], LIMITS, tmp_path / f"t{index}", job)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        assert np.array_equal(results[index].generation.pixels, alone[index].generation.pixels)
    assert inside in ([0] * 20 + [1] * 20, [1] * 20 + [0] * 20)  # one job at a time, never interleaved


def test_cancel_of_a_waiting_job_says_what_it_did():
    """A job in line (not started) is taken out of line, and Cancel says so; the places of the others move up."""
    from negprompt.interfaces.web.page_jobs import PageJobs, waiting_text

    jobs = PageJobs()
    running = PageJob()
    jobs.start("a", running)
    assert jobs.wait("b", "generate") == 1 and jobs.wait("c", "edit") == 2
    assert jobs.ahead("c", "edit") == 2 and jobs.ahead("c", "generate") is None
    assert waiting_text(2) == "waiting in line: 2 jobs ahead (one runs at a time)"
    assert jobs.cancel("b") == "cancelled before it started (it was waiting in line)"
    assert jobs.ahead("b") is None and jobs.ahead("c") == 1
    assert jobs.cancel("b") == "nothing to cancel"
    jobs.leave("c")  # the page was closed
    assert jobs.ahead("c") is None
    running.finished.set()
    assert jobs.cancel("a") == "cancelled" and running.stop.is_set()


def test_a_job_turned_away_before_it_started_says_so(session):
    """Gradio turns a click's job away (a full queue): its place in line goes and the status says why; a
    job that ran, or was cancelled, keeps the status it has."""
    from types import SimpleNamespace

    import gradio as gr

    from negprompt.interfaces.web.page_jobs import JobPanel, PageJobs

    jobs = PageJobs()
    with gr.Blocks():
        panel = JobPanel("generate", "Generate", jobs)
    page = SimpleNamespace(session_hash="p")
    status, timer = panel.enqueue(page)
    assert status == "waiting: next in line" and timer.get_config()["active"] is True
    assert panel.on_tick(page)[0] == "waiting: next in line"
    assert "full queue: negprompt serve --max-queue" in panel.not_started(page)
    assert jobs.ahead("p") is None and panel.on_tick(page)[1].get_config()["active"] is False
    panel.enqueue(page)
    jobs.cancel("p")
    assert panel.not_started(page) == gr.skip()  # cancelled while waiting: the status says so already


# ---------------------------------------------------------------- Attention and Edit


def test_attention_timeline_step_view_and_strength_curve(session, tmp_path):
    asked = AttentionRequest("a red circle with a sun", "a hat", negative_words="hat", steps=8, columns=4)
    result = handlers.attend(session, asked, LIMITS, tmp_path, PageJob())
    assert result.steps == list(range(8)) and result.negative_words == ["hat"]
    assert result.timeline.size[0] > 4 * 100 and result.png.exists()
    view = handlers.step_view(session, result.capture, 5)
    assert view.size[0] < result.timeline.size[0] and view.size[1] == result.timeline.size[1]
    figure, note = handlers.strength_view(result.capture, "hat")
    related = note.split("**")[1]
    assert figure.size == (600, 340) and related in {"red", "circle", "sun"}
    with pytest.raises(handlers.NegpromptError, match="step 9 was not captured"):
        handlers.step_view(session, result.capture, 9)


def test_edit_and_start_sweep(session, tmp_path):
    calls = []
    job = PageJob(on_progress=lambda done, total, preview: calls.append((done, total)))
    edited = handlers.edit(session, EditRequest("a red circle", "a hat", start=2, images=1, steps=8), LIMITS, job)
    assert calls[-1] == (22, 22)  # UNet calls: plain 8, full 8, delayed 6 (its first 2 are the plain's)
    assert edited.summary["window"] == [2, 8] and edited.summary["region_source"] == "detector"
    assert "| changed pixels outside the region |" in edited.table and edited.figure.size[0] > 6 * 64
    swept = handlers.sweep(
        session, SweepRequest("a red circle", "a hat", every=3, images=1, steps=8), LIMITS, tmp_path, PageJob()
    )
    assert swept.figure.exists() and sorted(swept.summary["fixed_starts"]) == [0, 3, 6]
    assert "Reverse activation" in swept.table and "![" not in swept.table


def test_overlapping_starts_share_one_label_on_the_sweep_plot():
    from negprompt.analysis.sweep import _label_groups

    fixed = {
        0: {"n": 3, "ssim_outside": 0.84, "removal_rate": 1.0},
        4: {"n": 3, "ssim_outside": 0.987, "removal_rate": 0.07},
        8: {"n": 3, "ssim_outside": 0.999, "removal_rate": 0.0},
        12: {"n": 3, "ssim_outside": 1.0, "removal_rate": 0.0},
        16: {"n": 0},
    }
    assert list(_label_groups(fixed).values()) == [[0], [4], [8, 12]]


# ---------------------------------------------------------------- the page and its job folders


def test_the_page_builds_with_a_field_for_every_rule_option(session):
    """The rule options' fields are generated from the rules' Settings dataclasses."""
    from negprompt.guidance.rules import all_rules
    from negprompt.interfaces.web.app import JobFolders, build_app

    folders = JobFolders()
    try:
        page = build_app(session, LIMITS, folders)
    finally:
        folders.remove()
    ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    wanted = {f"option-{r.name}-{o.name}" for r in all_rules().values() for o in r.Settings.options()}
    assert wanted and wanted <= ids
    assert {"generate-run", "attention-timeline", "edit-figure", "sweep-figure"} <= ids
    assert {"generate-negative-every", "generate-economy"} | {f"generate-window-auto-{i}" for i in range(3)} <= ids
    assert not {"generate-prompt-2", "generate-embedded-guidance"} & ids  # the bundled model reads neither


def test_the_page_offers_text_seeds_the_comparison_and_outputs_without_badges(session):
    import gradio as gr

    from negprompt.interfaces.web.app import JobFolders, build_app

    folders = JobFolders()
    try:
        page = build_app(session, LIMITS, folders)
    finally:
        folders.remove()
    blocks = {block.elem_id: block for block in page.blocks.values() if getattr(block, "elem_id", None)}
    for seed in ("generate-seed", "attention-seed", "edit-seed"):
        assert isinstance(blocks[seed], gr.Textbox) and blocks[seed].value == "2"
    assert blocks["generate-compare"].value is True
    for figure in ("attention-timeline", "attention-step-view", "attention-rt", "edit-figure", "sweep-figure"):
        assert blocks[figure].show_label is False, figure
    assert "refuses 83, 100" in blocks["generate-steps"].label


def test_job_folders_keep_the_latest(tmp_path):
    from negprompt.interfaces.web.app import JobFolders

    folders = JobFolders(keep=2)
    made = [folders.new() for _ in range(4)]
    assert [path.exists() for path in made] == [False, False, True, True]
    folders.remove()
    assert not Path(folders.root).exists()


# ---------------------------------------------------------------- other models


def test_a_stable_diffusion_model_serves_too(tiny_sd_dir, tmp_path):
    """Warm-up and a run on a latent model (x̂₀ previews go through its VAE); no example prompts declared."""
    sd = Session(tiny_sd_dir, device="cpu")
    assert handlers.example_pair(sd) == ("", "")
    handlers.warm_up(sd, tmp_path / "warm")
    previews = []
    job = PageJob(on_progress=lambda done, total, preview: previews.append(preview), preview_every=2)
    request = GenerateRequest(
        "a cat", (NegativeInput("glasses", None, 1, None),), steps=4, scheduler="ddim", width=32, height=32
    )
    result = handlers.generate(sd, request, LIMITS, tmp_path, job)
    assert [p is not None for p in previews] == [True, False, True, True]
    assert previews[-1].size == (32, 32) and result.generation.pixels.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("rule, scale", [("sd", 3.0), ("nag", 1.0)])
def test_the_page_runs_flux_with_previews_and_equals_the_command_line(tiny_flux, tiny_flux_dir, tmp_path, rule, scale):
    """The page on a FLUX model (true CFG, and NAG in one pass): progress with x̂₀ previews, and the same
    pixels as ``negprompt generate`` on the saved directory."""
    reports = []
    job = PageJob(on_progress=lambda done, total, preview: reports.append((done, total, preview)), preview_every=2)
    request = GenerateRequest(
        "a photo of a cat", (NegativeInput("a red hat"),), rule=rule, scale=scale, steps=4, width=32, height=32
    )
    result = handlers.generate(Session(tiny_flux), request, LIMITS, tmp_path / "page", job)
    assert [(done, total) for done, total, _ in reports] == [(d, 4) for d in range(1, 5)]
    assert reports[-1][2].size == (32, 32)
    cli_png = tmp_path / "cli.png"
    argv = ["generate", "a photo of a cat", "-n", "a red hat", "--rule", rule, "--scale", str(scale)]
    argv += ["--steps", "4", "--size", "32", "--model", str(tiny_flux_dir), "-q", "--out", str(cli_png)]
    assert main(argv) == 0
    assert np.array_equal(read_pixels(result.pngs[0]), read_pixels(cli_png))


# ---------------------------------------------------------------- cheap negatives (auto end, period K)


def test_an_auto_end_and_a_period_equal_the_command_line_and_show_where_it_stopped(session, tmp_path):
    """``NegativeInput(end="auto")`` and ``negative_every`` are ``--negative-window 0:auto --negative-every 2``:
    the same pixels and settings (in the side-by-side run the page starts with), and the run's recorded stop
    step and rows shown with the result."""
    cli_png = tmp_path / "cli.png"
    argv = [
        "generate",
        "a red circle",
        "-n",
        "a hat",
        "--negative-window",
        "0:auto",
        "--negative-every",
        "2",
        "--steps",
        "12",
    ]
    assert main(argv + ["--seed", "2", "-q", "--out", str(cli_png)]) == 0
    request = GenerateRequest(
        "a red circle", (NegativeInput("a hat", None, 0, "auto"),), negative_every=2, seed="2", steps=12, compare=True
    )
    result = handlers.generate(session, request, LIMITS, tmp_path / "page", PageJob())
    assert np.array_equal(read_pixels(result.pngs[0]), read_pixels(cli_png))
    assert read_png_settings(result.pngs[0])[0].to_json() == read_png_settings(cli_png)[0].to_json()
    stop = result.generation.negative_stops["negative"]
    steps = result.generation.num_steps
    assert isinstance(stop, int) and 0 < stop < steps
    first, rows = result.negative_stops.splitlines()
    assert first == (
        f"negative 1 ('a hat'): auto end at step {stop} of {steps} (computed every 2 steps in steps 0–{stop - 1}, "
        "its last difference held after)"
    )
    computed = computed_rows(result.generation.spec.guidance, steps, {"negative": stop})
    assert rows == f"denoiser rows per image: {computed} of {2 * steps} with every negative at every step"
    assert computed < 2 * steps - (steps - stop)  # fewer than the auto end alone: every 2nd step before it
    _, _, delayed = (read_png_settings(path)[0] for path, _ in result.comparison[:3])
    assert delayed.guidance.negatives[0].window.to_json() == [steps // 4, "auto", 2]
    plain = handlers.generate(
        session, GenerateRequest("a red circle", (NegativeInput("a hat"),), steps=4), LIMITS, tmp_path, PageJob()
    )
    assert plain.negative_stops == "" and plain.generation.negative_stops == {}
