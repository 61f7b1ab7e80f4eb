"""``negprompt serve`` without a browser: its command line, and the handlers behind the page's buttons
called directly (the page itself is tested in a real browser in test_web_browser.py).

What could break: the page's image differing from ``negprompt generate``'s for the same settings, a
downloaded PNG that does not re-run, limits that are not enforced or say nothing useful, errors that
are not the command line's one line, a cancelled job that keeps the model or leaves a hook behind.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_usage_error

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
    error_message,
)
from negprompt.interfaces.web.settings import ServerLimits, is_loopback
from negprompt.session import Session

LIMITS = ServerLimits()


@pytest.fixture(scope="module")
def session() -> Session:
    return Session()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_error(argv: list[str], capsys) -> str:
    """The one line ``negprompt`` prints for ``argv`` (which must be a usage error)."""
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "0"], "port '0': give 1–65535"),
        (["serve", "--port", "70000"], "port '70000': give 1–65535"),
        (["serve", "--port", "http"], "'http' is not an integer"),
        (["serve", "--host", "0.0.0.0"], "add --allow-remote"),
        (["serve", "--host", "192.168.1.5", "--port", "8000"], "can be reached from other machines"),
        (["serve", "--max-steps", "0"], "not a positive integer"),
        (["serve", "--max-negatives", "17"], "--max-negatives must be a whole number in 1–16"),
        (["serve", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_serve_input_is_one_line_before_anything_loads(argv, message):
    """Exit 2, one line naming the problem; neither torch nor gradio imported (nothing was loaded)."""
    program = (
        "import sys\n"
        "from negprompt.interfaces.cli import main\n"
        f"code = main({argv!r})\n"
        "print(code, [m for m in ('torch', 'gradio', 'diffusers') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "2 []", (done.stdout[-500:], done.stderr[-500:])
    err = done.stderr.strip()
    assert err.startswith("negprompt: error: ") and len(err.splitlines()) == 1 and message in err, err


def test_serve_help_is_light_and_lists_every_limit():
    program = (
        "import sys\n"
        "from negprompt.interfaces.cli import main\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, [m for m in ('torch', 'gradio', 'numpy') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout[-300:]
    for name, _, default, _ in ServerLimits.described():
        assert f"{ServerLimits.flag(name)} N" in done.stdout and f"(default {default})" in done.stdout


def test_serve_without_the_web_extra_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # importlib finds no gradio, as when it is not installed
    code = main(["serve", "--port", str(free_port())])
    assert_usage_error(code, capsys, "negprompt serve needs the web extra: pip install 'negprompt[web]'")


def test_a_port_in_use_is_refused_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_usage_error(main(["serve", "--port", str(port)]), capsys, f"cannot listen on 127.0.0.1:{port}")


def test_serve_loads_the_model_and_passes_address_and_limits(monkeypatch, capsys):
    """A remote host with --allow-remote serves with a warning; the limits reach the page."""
    from negprompt.interfaces.web import app

    served = {}
    monkeypatch.setattr(app, "serve", lambda session, host, port, limits: served.update(locals()))
    port = free_port()
    argv = ["serve", "--host", "0.0.0.0", "--allow-remote", "--port", str(port), "--max-steps", "30"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "negprompt: warning: serving on 0.0.0.0" in err and "no login" in err
    assert (served["host"], served["port"], served["limits"].steps) == ("0.0.0.0", port, 30)
    assert served["session"].model == "shapes"


@pytest.mark.parametrize(
    "host, local",
    [("127.0.0.1", True), ("localhost", True), ("127.1.2.3", True), ("::1", True), ("0.0.0.0", False), ("::", False)],
)
def test_which_hosts_count_as_this_machine(host, local):
    assert is_loopback(host) is local


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


# ---------------------------------------------------------------- limits and errors


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"steps": 101}, "steps 101 is over this server's limit of 100"),
        ({"images": 5}, "images 5 is over this server's limit of 4"),
        ({"width": 1028}, "width 1028 is over this server's limit of 1024"),
        ({"prompt": "a" * 501}, "the prompt has 501 characters, over this server's limit of 500"),
        ({"negatives": (NegativeInput("a hat"),) * 4}, "negative prompts: 4 is over this server's limit of 3"),
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
    ],
)
def test_limits_exceeded_give_one_line_naming_the_flag(session, tmp_path, request_fields, message):
    request = GenerateRequest(**{"prompt": "a red circle", **request_fields})
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate(session, request, LIMITS, tmp_path, PageJob())
    line = error_message(caught.value)
    assert line.startswith("negprompt: error: ") and message in line and "\n" not in line, line
    if "limit" in message:
        assert "negprompt serve --max-" in line


def test_words_and_sweep_images_are_bounded_too(session, tmp_path):
    limits = ServerLimits(words=2, sweep_images=1)
    asked = AttentionRequest("a red circle with a sun", "a hat", words="red, circle, sun")
    with pytest.raises(handlers.LimitError, match=r"positive words: 3 is over .* --max-words"):
        handlers.attend(session, asked, limits, tmp_path, PageJob())
    with pytest.raises(handlers.LimitError, match=r"images 2 is over .* --max-sweep-images"):
        handlers.sweep(session, SweepRequest("a red circle", "a hat", images=2), limits, tmp_path, PageJob())


def test_a_bad_window_gives_the_command_lines_message(session, tmp_path, capsys):
    line = cli_error(["generate", "a red circle", "-n", "a hat", "--negative-window", "12:4", "-q"], capsys)
    request = GenerateRequest("a red circle", (NegativeInput("a hat", None, 12, 4),))
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate(session, request, LIMITS, tmp_path, PageJob())
    assert error_message(caught.value) == line
    assert "start must be below end" in line


def test_errors_of_the_server_show_no_traceback(caplog):
    try:
        raise RuntimeError("boom\nTraceback (most recent call last):")
    except RuntimeError as error:
        line = error_message(error)
    assert line == "negprompt: failed: RuntimeError in the server (its log has the details)"
    assert "boom" in caplog.text  # the details go to the server's log
    assert error_message(Cancelled("cancelled")) == "cancelled"


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


def test_job_folders_keep_the_latest(tmp_path):
    from negprompt.interfaces.web.app import JobFolders

    folders = JobFolders(keep=2)
    made = [folders.new() for _ in range(4)]
    assert [path.exists() for path in made] == [False, False, True, True]
    folders.remove()
    assert not Path(folders.root).exists()


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


# ---------------------------------------------------------------- the page's edges (issue 33)


@pytest.mark.parametrize(
    "typed, images, seeds",
    [
        ("0", 1, [0]),
        (" 9007199254740993 ", 1, [9007199254740993]),  # above 2⁵³: a number field would round it to …992
        ("18446744073709551615", 1, [18446744073709551615]),  # 2⁶⁴ − 1, the largest
        ("18446744073709551613", 3, [18446744073709551613, 18446744073709551614, 18446744073709551615]),
        (5, 2, [5, 6]),  # an int from the API
    ],
)
def test_seeds_travel_as_text_and_keep_every_digit(typed, images, seeds):
    assert handlers.seeds_from(typed, images) == seeds


@pytest.mark.parametrize(
    "typed, images, message",
    [
        ("18446744073709551615", 2, "seed 18446744073709551615 leaves no room for 2 images"),
        ("18446744073709551616", 1, "seed 18446744073709551616 is outside 0–18446744073709551615"),
        ("-1", 1, "seed -1 is outside 0–18446744073709551615"),
        ("0-3", 1, "seed '0-3': give one whole number"),
        ("1,2", 1, "seed '1,2': give one whole number"),
        ("1e3", 1, "seed '1e3': give one whole number"),
        ("", 1, "seed '': give one whole number"),
        (2.5, 1, "seed must be a whole number 0–18446744073709551615, got 2.5"),
    ],
)
def test_a_bad_seed_is_one_line_quoting_what_was_typed(session, tmp_path, typed, images, message):
    request = GenerateRequest("a red circle", seed=typed, images=images)
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate_specs(session, request, LIMITS)
    line = error_message(caught.value)
    assert line.startswith("negprompt: error: ") and message in line and "\n" not in line, line


def test_the_largest_seed_runs_as_typed(session, tmp_path):
    request = GenerateRequest("a red circle", (NegativeInput("a hat"),), seed="18446744073709551615", steps=4)
    result = handlers.generate(session, request, LIMITS, tmp_path, PageJob())
    assert list(result.generation.spec.seeds) == [18446744073709551615]
    assert "Seed: 18446744073709551615" in result.infotext


def test_one_step_runs_and_the_window_sliders_stay_valid(session, tmp_path):
    """Steps = 1 (one UNet call): the run works, and the sliders' updates keep minimum < maximum (Gradio
    refuses a slider whose range is empty), fixed at the only window there is."""
    import gradio as gr

    from negprompt.interfaces.web.page_jobs import end_range, start_range, start_update, window_updates

    result = handlers.generate(
        session,
        GenerateRequest("a red circle", (NegativeInput("a hat"),), steps=1, compare=True),
        LIMITS,
        tmp_path,
        PageJob(),
    )
    assert result.generation.spec.steps == 1 and len(result.comparison) == 3
    assert handlers.schedule_length(session, None, 1) == 1
    for calls in (1, 2, 20, 100):
        start, end = window_updates(calls, 20, 5, 20)
        delayed = start_update(calls, 5)
        for update, minimum in ((start, 0), (end, 1), (delayed, 0)):
            kwargs = {k: v for k, v in update.items() if k != "__type__"}
            gr.Slider(minimum, **kwargs)  # what Gradio builds from an update: raises on an empty range
            assert kwargs["interactive"] is (calls > 1)
        assert (start["value"], end["value"], delayed["value"]) == (min(5, calls - 1), calls, min(5, calls - 1))
        assert (start["maximum"], end["maximum"]) == (start_range(calls), end_range(calls))


def test_the_steps_label_names_the_counts_the_model_refuses(session):
    """The label promised 1–100 while the bundled model refuses 83 and 100 (first σ above its max_sigma):
    it now says so, per scheduler, and every other count in the range is accepted."""
    from negprompt.interfaces.web.page_jobs import refused_steps, steps_label

    refused = refused_steps(session, "euler-a", LIMITS.steps)
    assert refused == [83, 100]
    for steps in range(1, LIMITS.steps + 1):
        if steps not in refused:
            session.check_schedule("euler-a", steps)
    label = steps_label(LIMITS.steps, refused, "euler-a")
    assert label == "Steps (1–100; this model refuses 83, 100 with euler-a: too noisy a start)"
    assert steps_label(100, [], "ddim") == "Steps (1–100)"
    assert "… (7 counts)" in steps_label(300, [83, 100, 111, 125, 142, 166, 200], "ddim")
    with pytest.raises(handlers.NegpromptError, match="nearest step count below that starts low enough is 99"):
        handlers.generate_specs(session, GenerateRequest("a red circle", steps=100), LIMITS)


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


def test_long_log_lines_are_cut():
    """A malformed request of megabytes is logged by Gradio whole: the server's stderr cuts each line."""
    import io

    from negprompt.interfaces.web.app import CutLongLines

    target = io.StringIO()
    stream = CutLongLines(target, limit=10)
    stream.write("short\nReceived inputs: [")
    stream.write("x" * 50_000_000)
    stream.write("]\nnext line\n")
    assert target.getvalue() == "short\nReceived i … [50000009 more characters cut]\nnext line\n"


def test_serve_on_ipv6_and_bounded_requests(tmp_path):
    """``negprompt serve --host ::1`` serves the page (or, without IPv6, says so in one line); a malformed
    request of 5 MB leaves no line over the log's bound; an upload over the bound is refused."""
    from negprompt.interfaces.web.settings import LOG_LINE_CHARS

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        port = None
    if port is None:  # no IPv6 on this machine: one line, exit 2, before the model loads
        done = subprocess.run(
            [sys.executable, "-m", "negprompt", "serve", "--host", "::1"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stderr.startswith("negprompt: error: cannot listen on ::1")
        return
    import httpx

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "negprompt", "serve", "--host", "::1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            # SIGINT as a terminal gives it: a test run started in the background ignores SIGINT, and the server
            # would inherit that and never stop (as in tests/test_web_browser.py)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    url = f"http://[::1]:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()[-2000:]
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "negprompt serve --host ::1 did not answer within 120 s"
            time.sleep(0.3)
        started = time.monotonic() - deadline + 120
        # Too few inputs for the event: Gradio logs the inputs it received (5 MB) with its traceback.
        malformed = httpx.post(url + "/gradio_api/run/generate", json={"data": ["x" * 5_000_000]}, timeout=60)
        assert malformed.status_code == 500 and "xxx" not in malformed.text, malformed.text[:200]
        upload = httpx.post(url + "/gradio_api/upload", files={"files": ("big.bin", b"\0" * 2_000_000)}, timeout=60)
        assert upload.status_code == 413, upload.text[:200]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    lines = log_path.read_text().splitlines()
    print(f"server answered after {started:.1f} s")
    assert lines[0].startswith(f"negprompt serve: http://[::1]:{port} ")
    assert max(map(len, lines)) <= LOG_LINE_CHARS + 40 and any("more characters cut" in line for line in lines)


@pytest.mark.parametrize(
    "host, written",
    [("::1", "[::1]"), ("[::1]", "[::1]"), ("::", "[::]"), ("127.0.0.1", "127.0.0.1"), ("localhost", "localhost")],
)
def test_an_ipv6_host_is_written_in_brackets_for_gradio_and_urls(host, written):
    from negprompt.interfaces.web.app import url_host

    assert url_host(host) == written


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


@pytest.mark.parametrize(
    "request_fields, message",
    [
        (
            {"rule": "nag", "scale": 1.0},
            "rule 'nag' does not combine through ε_ỹ − ε_ref (NAG and VSF have no negative",
        ),
        ({"rule": "vsf", "negative_every": 2, "end": None}, "[0, end) every 2 of negative needs a negative denoiser"),
        ({"scale": 1.0}, "needs a negative denoiser branch, which rule 'sd' does not compute at scale 1"),
        ({"negative_every": 0}, "negative every K 0: a negative is evaluated every K steps, K ≥ 1 (1: every step)"),
        ({"negative_every": -3}, "negative every K -3: a negative is evaluated every K steps, K ≥ 1"),
        ({"negative_every": 2.5}, "negative every K must be a whole number, got 2.5"),
        ({"negative_every": "two"}, "negative every K must be a number, got 'two'"),
        ({"end": "soon"}, "window end 'soon': give a step index (a whole number 1 or more) or auto"),
        ({"negative_every": 3, "text": ""}, "negative every K 3 needs a negative prompt: give one, or K 1"),
    ],
)
def test_cheap_negative_fields_refuse_bad_input_in_one_line(session, tmp_path, request_fields, message):
    """The command line's checks: an auto end or a period needs a negative branch (rules sd and dual above
    scale 1), K ≥ 1, a negative prompt; nothing runs."""
    negative = {"text": "a hat", "end": "auto"}
    negative.update({k: request_fields.pop(k) for k in ("text", "end") if k in request_fields})
    request = GenerateRequest(
        "a red circle", (NegativeInput(negative["text"], None, 0, negative["end"]),), **request_fields
    )
    job = PageJob()
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate(session, request, LIMITS, tmp_path, job)
    line = error_message(caught.value)
    assert line.startswith("negprompt: error: ") and message in line and "\n" not in line, line
    assert job.unet_calls == 0 and not list(tmp_path.iterdir())


def test_a_period_below_one_says_what_the_command_line_says(session, capsys):
    line = cli_error(["generate", "a red circle", "-n", "a hat", "--negative-every", "0", "-q"], capsys)
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate_specs(
            session, GenerateRequest("a red circle", (NegativeInput("a hat"),), negative_every=0), LIMITS
        )
    said = "a negative is evaluated every K steps, K ≥ 1 (1: every step)"
    assert said in line and error_message(caught.value).endswith(said)
