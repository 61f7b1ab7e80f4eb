"""``negprompt serve`` end to end in a real browser: the server runs as a user starts it (a process of
its own, bundled model, 127.0.0.1, a free port) and Chromium, driven by Playwright, uses the page.

Needs Chromium and Playwright (``scripts/setup.sh`` and ``.ci/run`` install both: the Debian package
``chromium`` and the Python package ``playwright``, whose own browser download is not used). Without
them these tests fail, saying what to install; they never skip. ``NEGPROMPT_CHROMIUM`` names
another Chromium binary. Screenshots, the server's log and the measured times go to the folder
``NEGPROMPT_TEST_ARTIFACTS`` (default: a pytest temporary folder).

The reference images come from ``negprompt generate`` (``main`` in this process); the server runs
with this process's torch thread count (CPU kernels may round differently with another).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from negprompt.interfaces.png import read_pixels, read_png_settings

BROWSER_ENV = "NEGPROMPT_CHROMIUM"
ARTIFACTS_ENV = "NEGPROMPT_TEST_ARTIFACTS"
FINISHED = "/^(done|captured|negprompt: |cancelled)/"  # a status line that ends a job
WAIT_MS = 60_000
# Settings the tests type into the page, and the same as a command line.
SINGLE = {"prompt": "a blue square", "negative": "a hat", "seed": 2}
PAGE_A = {"prompt": "a red circle", "negative": "a hat", "seed": 0}
PAGE_B = {"prompt": "a green triangle", "negative": "blurry", "seed": 7}


def command_line(settings: dict, out: Path) -> list[str]:
    return [
        *("generate", settings["prompt"], "--negative", settings["negative"]),
        *("--seed", str(settings["seed"]), "--out", str(out), "-q"),
    ]


def chromium() -> str:
    found = os.environ.get(BROWSER_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "no Chromium for the browser tests: install it (apt-get install chromium; scripts/setup.sh does) "
            f"or name one in {BROWSER_ENV}"
        )
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path_factory.mktemp("web-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def timings(artifacts):
    """Measured times, written to timings.json and printed at the end (reported, never asserted)."""
    measured: dict[str, float] = {}
    yield measured
    (artifacts / "timings.json").write_text(json.dumps(measured, indent=1) + "\n")
    print("\nweb page timings (s):", json.dumps(measured))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """The command line's PNGs for the settings the tests type."""
    from negprompt.interfaces.cli import main

    folder = tmp_path_factory.mktemp("cli")
    outs = {}
    for name, settings in (("single", SINGLE), ("a", PAGE_A), ("b", PAGE_B)):
        outs[name] = folder / f"{name}.png"
        assert main(command_line(settings, outs[name])) == 0
    return outs


def serving(log_path: Path, *options: str) -> Iterator[str]:
    """``negprompt serve`` with ``options`` on a free port of 127.0.0.1, its log in ``log_path``; yields its URL
    once it answers and stops it as Ctrl+C does."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 (closed at the end)
    # The server computes with this process's thread count, as the reference images were (CPU sums
    # round differently with another).
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(
        [sys.executable, "-m", "negprompt", "serve", "--port", str(port), *options],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment,
        # Ctrl+C reaches it even when this run was started in the background (a shell's `&` ignores
        # SIGINT in what it starts, and the server would inherit that and never stop).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            log.close()
            pytest.fail(f"negprompt serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("negprompt serve did not answer within 180 s")
        time.sleep(0.3)
    yield url
    process.send_signal(signal.SIGINT)  # as Ctrl+C: the server removes its folders
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def server(artifacts, references) -> Iterator[str]:
    """``negprompt serve`` with the bundled model; its URL."""
    yield from serving(artifacts / "serve.log")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("no Playwright for the browser tests: pip install playwright (scripts/setup.sh does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium())
        yield launched
        launched.close()


def open_page(browser, url: str):
    """A page of its own (a fresh browser context: another visitor) that reaches nothing but the server."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#generate-run", timeout=WAIT_MS)
    return page


def type_text(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea").fill(text)


def type_number(page, elem_id: str, value: float) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.blur()


def fill_generate(page, settings: dict) -> None:
    type_text(page, "generate-prompt", settings["prompt"])
    type_text(page, "generate-negative-0", settings["negative"])
    type_text(page, "generate-seed", str(settings["seed"]))  # seeds travel as text: every digit of 2⁶⁴ − 1


def click_run(page, tab: str, button: str | None = None) -> None:
    """Blanks the tab's status line (so that only the new job's ends the wait), then clicks its button."""
    page.locator(f"#{tab}-status textarea").evaluate("area => { area.value = ''; }")
    page.click(f"#{button or tab + '-run'}")


def choose_rule(page, rule: str) -> None:
    """Picks ``rule`` on the Generate tab and waits until its options (if it has any) are shown."""
    page.locator("#generate-rule input").click()
    page.get_by_role("option", name=rule, exact=True).click()
    if rule == "dng":
        page.locator("#option-dng-strength").wait_for(timeout=WAIT_MS)
    else:
        page.locator("#option-dng-strength").wait_for(state="hidden", timeout=WAIT_MS)


def status_of(page, tab: str) -> str:
    return page.locator(f"#{tab}-status textarea").input_value()


def wait_until_finished(page, tab: str) -> str:
    page.wait_for_function(
        f"() => {FINISHED}.test(document.querySelector('#{tab}-status textarea').value)", timeout=WAIT_MS
    )
    return status_of(page, tab)


def wait_for_image(page, elem_id: str) -> None:
    """Until the component shows a loaded image over 100 px wide."""
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#{elem_id} img')].some(img => img.complete && img.naturalWidth > 100)",
        timeout=WAIT_MS,
    )


def download_png(page, folder: Path, name: str) -> Path:
    with page.expect_download() as started:
        page.locator("#generate-files a").first.click()
    path = folder / name
    started.value.save_as(path)
    return path


def assert_same_image(downloaded: Path, reference: Path) -> None:
    assert np.array_equal(read_pixels(downloaded), read_pixels(reference))
    assert read_png_settings(downloaded)[0].to_json() == read_png_settings(reference)[0].to_json()


def test_generate_in_the_browser_equals_the_command_line(server, browser, references, artifacts, timings, tmp_path):
    page = open_page(browser, server)
    fill_generate(page, SINGLE)
    started = time.monotonic()
    click_run(page, "generate")
    page.wait_for_selector("#generate-images img", timeout=WAIT_MS)
    timings["first image after the click (first run of the server)"] = round(time.monotonic() - started, 3)
    assert wait_until_finished(page, "generate").startswith("done: 1 image(s)"), status_of(page, "generate")
    assert page.locator("#generate-preview img").count() == 1  # x̂₀ of the last step
    page.screenshot(path=artifacts / "generate.png", full_page=True)
    assert_same_image(download_png(page, tmp_path, "page.png"), references["single"])
    assert page.locator("#generate-info textarea").input_value().startswith("a blue square\nNegative prompt: a hat")

    click_run(page, "generate")  # the same again, warm: the number the target is about
    started = time.monotonic()
    page.wait_for_function(
        "() => document.querySelector('#generate-status textarea').value.startsWith('step')", timeout=WAIT_MS
    )
    wait_until_finished(page, "generate")
    page.wait_for_selector("#generate-images img", timeout=WAIT_MS)
    timings["image after the click (warm)"] = round(time.monotonic() - started, 3)
    page.context.close()


def test_attention_tab_draws_the_timeline_and_the_strength_curve(server, browser, artifacts, timings):
    page = open_page(browser, server)
    page.get_by_role("tab", name="Attention").click()
    type_text(page, "attention-prompt", "a red circle with a sun")
    type_text(page, "attention-negative", "a hat")
    started = time.monotonic()
    click_run(page, "attention")
    assert wait_until_finished(page, "attention").startswith("captured 20 steps"), status_of(page, "attention")
    timings["attention capture after the click"] = round(time.monotonic() - started, 3)
    for figure in ("attention-timeline", "attention-step-view", "attention-rt"):
        wait_for_image(page, figure)
    assert "r(i) =" in page.locator("#attention-related").inner_text()
    page.screenshot(path=artifacts / "attention.png", full_page=True)
    page.context.close()


def test_a_bad_window_and_a_request_over_the_limits_show_the_one_line(server, browser, artifacts, capsys):
    from negprompt.interfaces.cli import main

    assert main(["generate", "a red circle", "-n", "a hat", "--negative-window", "12:4", "-q"]) == 2
    cli_line = capsys.readouterr().err.strip()
    page = open_page(browser, server)
    type_number(page, "generate-window-start-0", 12)
    type_number(page, "generate-window-end-0", 4)
    click_run(page, "generate")
    assert wait_until_finished(page, "generate") == cli_line
    page.screenshot(path=artifacts / "bad-window.png", full_page=True)
    type_number(page, "generate-window-start-0", 0)
    page.locator("#generate-steps input").fill("500")
    click_run(page, "generate")
    line = wait_until_finished(page, "generate")
    assert line.startswith("negprompt: error: steps 500 is over this server's limit of 100"), line
    assert "negprompt serve --max-steps" in line and "Traceback" not in page.content()
    page.context.close()


def test_two_visitors_at_once_get_their_own_images_and_can_cancel(
    server, browser, references, artifacts, timings, tmp_path
):
    first, second = open_page(browser, server), open_page(browser, server)
    asked = time.monotonic()  # the same interaction with no job running, for comparison
    choose_rule(first, "dng")
    timings["page answering with no job (another rule's options shown)"] = round(time.monotonic() - asked, 3)
    choose_rule(first, "sd")
    fill_generate(first, PAGE_A)
    fill_generate(second, PAGE_B)
    started = time.monotonic()
    click_run(first, "generate")
    click_run(second, "generate")
    # While a job runs, the page still answers: the options of another rule appear at once.
    first.wait_for_function(
        "() => document.querySelector('#generate-status textarea').value.startsWith('step')", timeout=WAIT_MS
    )
    asked = time.monotonic()
    choose_rule(first, "dng")
    timings["page answering while a job runs (another rule's options shown)"] = round(time.monotonic() - asked, 3)
    timings["a job was still running then"] = not status_of(second, "generate").startswith("done")
    for page in (first, second):
        assert wait_until_finished(page, "generate").startswith("done"), status_of(page, "generate")
    timings["two visitors, both images"] = round(time.monotonic() - started, 3)
    first.screenshot(path=artifacts / "visitor-a.png", full_page=True)
    second.screenshot(path=artifacts / "visitor-b.png", full_page=True)
    assert_same_image(download_png(first, tmp_path, "a.png"), references["a"])
    assert_same_image(download_png(second, tmp_path, "b.png"), references["b"])

    # A long job, cancelled after its first step; the model is free again at once.
    choose_rule(first, "sd")
    first.locator("#generate-images-count input").fill("4")
    first.locator("#generate-steps input").fill("60")
    click_run(first, "generate")
    first.wait_for_function(
        "() => document.querySelector('#generate-status textarea').value.startsWith('step')", timeout=WAIT_MS
    )
    bar = first.locator("#generate-progress progress")
    assert int(bar.get_attribute("max")) == 60 and int(bar.get_attribute("value")) >= 1  # the live progress bar
    first.click("#generate-cancel")
    cancelled = time.monotonic()
    click_run(second, "generate")
    assert wait_until_finished(second, "generate").startswith("done"), status_of(second, "generate")
    timings["another visitor's image after a cancel"] = round(time.monotonic() - cancelled, 3)
    assert status_of(first, "generate") == "cancelled"
    first.screenshot(path=artifacts / "cancelled.png", full_page=True)
    first.context.close()
    second.context.close()


def test_edit_tab_shows_the_change_map_and_the_numbers(server, browser, artifacts, timings):
    page = open_page(browser, server)
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-images input").fill("1")
    started = time.monotonic()
    click_run(page, "edit")
    assert wait_until_finished(page, "edit") == "done", status_of(page, "edit")
    timings["edit after the click"] = round(time.monotonic() - started, 3)
    wait_for_image(page, "edit-figure")
    assert "SSIM outside the region" in page.locator("#edit-table").inner_text()
    page.screenshot(path=artifacts / "edit.png", full_page=True)
    page.context.close()


def test_one_step_and_the_largest_seed(server, browser, artifacts, timings):
    """Steps = 1 (one UNet call: the window sliders keep a valid, fixed range) and seed 2⁶⁴ − 1, typed
    into the page, run as typed; the server logs no error on the way."""
    page = open_page(browser, server)
    steps = page.locator("#generate-steps input[type=number]")
    steps.fill("1")
    steps.blur()
    page.wait_for_function(  # the sliders moved onto the one-call schedule, fixed
        "() => document.querySelector('#generate-window-end-0 input[type=range]').disabled", timeout=WAIT_MS
    )
    largest = str(2**64 - 1)
    type_text(page, "generate-seed", largest)
    started = time.monotonic()
    click_run(page, "generate")
    assert wait_until_finished(page, "generate").startswith("done: 1 image(s)"), status_of(page, "generate")
    timings["one step, largest seed, after the click"] = round(time.monotonic() - started, 3)
    info = page.locator("#generate-info textarea").input_value()
    assert "Steps: 1," in info and f"Seed: {largest}," in info, info
    page.screenshot(path=artifacts / "one-step-largest-seed.png", full_page=True)
    log = (artifacts / "serve.log").read_text()
    assert "Traceback" not in log and "Slider minimum" not in log, log[-2000:]
    page.context.close()


def test_a_new_family_with_an_auto_end_and_a_period(browser, artifacts, timings, tmp_path_factory):
    """The page on a tiny Qwen-Image (a family with no second prompt: no field for one) with the cheap-negative
    fields set (auto end, every 2 steps): the image comes back, and where the auto end stopped is shown."""
    from negprompt.models.saving import save_components
    from negprompt.testing.tiny_qwen_image import build_tiny_qwen_image

    folder = save_components(build_tiny_qwen_image(seed=0), tmp_path_factory.mktemp("tiny-qwen-image"))
    started = time.monotonic()
    served = serving(artifacts / "serve-qwen-image.log", "--model", str(folder))
    url = next(served)
    timings["tiny Qwen-Image server answering"] = round(time.monotonic() - started, 3)
    try:
        page = open_page(browser, url)
        assert page.locator("#generate-prompt-2").count() == 0 and page.locator("#generate-negative-every").count()
        fill_generate(page, {"prompt": "a photo of a cat", "negative": "a red hat", "seed": 3})
        for elem_id, value in (("generate-steps", 6), ("generate-width", 32), ("generate-height", 32)):
            type_number(page, elem_id, value)
        type_number(page, "generate-negative-every", 2)
        page.wait_for_function(  # the window sliders moved onto the 6-step schedule (the model's default is 50)
            "() => document.querySelector('#generate-window-end-0 input[type=range]').max === '6'", timeout=WAIT_MS
        )
        page.locator("#generate-window-auto-0 input").check()
        started = time.monotonic()
        click_run(page, "generate")
        assert wait_until_finished(page, "generate").startswith("done: 1 image(s)"), status_of(page, "generate")
        timings["tiny Qwen-Image, auto end every 2, after the click"] = round(time.monotonic() - started, 3)
        page.wait_for_selector("#generate-images img", timeout=WAIT_MS)
        economy = page.locator("#generate-economy textarea").input_value()
        assert economy.startswith("negative 1 ('a red hat'): auto end") and "denoiser rows per image: " in economy
        assert "Steps: 6," in page.locator("#generate-info textarea").input_value()
        page.screenshot(path=artifacts / "qwen-image-auto-end.png", full_page=True)
        page.context.close()
    finally:
        next(served, None)
