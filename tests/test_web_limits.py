"""``negprompt serve``'s handlers on limits and bad input, called directly: each refusal is the command line's one
line and nothing runs (issue 33: the page's edges).

What could break: limits that are not enforced or say nothing useful, errors that are not the command line's
one line or show a traceback, a seed above 2⁵³ rounded on its way, a window slider with an empty range at one
step, a steps label that promises counts the model refuses.
"""

from __future__ import annotations

import pytest

from negprompt.interfaces.cli import main
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    AttentionRequest,
    Cancelled,
    GenerateRequest,
    NegativeInput,
    PageJob,
    SweepRequest,
    error_message,
)
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.session import Session

LIMITS = ServerLimits()


@pytest.fixture(scope="module")
def session() -> Session:
    return Session()


def cli_error(argv: list[str], capsys) -> str:
    """The one line ``negprompt`` prints for ``argv`` (which must be a usage error)."""
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


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


# ---------------------------------------------------------------- cheap negatives (auto end, period K)


@pytest.mark.parametrize(
    "request_fields, message",
    [
        (
            {"rule": "nag", "scale": 1.0},
            "--negative-window 0:auto needs a negative computed as a denoiser branch; rule 'nag' has none",
        ),
        (
            {"rule": "vsf", "negative_every": 2, "end": None},
            "--negative-every 2 needs a negative computed as a denoiser branch; rule 'vsf' has none",
        ),
        ({"scale": 1.0}, "needs a negative denoiser branch, which rule 'sd' does not compute at scale 1"),
        ({"negative_every": 0}, "negative every K 0: a negative is evaluated every K steps, K ≥ 1 (1: every step)"),
        ({"negative_every": -3}, "negative every K -3: a negative is evaluated every K steps, K ≥ 1"),
        ({"negative_every": 2.5}, "negative every K must be a whole number, got 2.5"),
        ({"negative_every": "two"}, "negative every K must be a number, got 'two'"),
        ({"end": "soon"}, "window end 'soon': give a step index (a whole number 1 or more) or auto"),
        ({"negative_every": 3, "text": ""}, "--negative-every 3 needs a negative prompt (-n TEXT)"),
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
