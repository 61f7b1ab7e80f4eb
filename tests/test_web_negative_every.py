"""K of "compute each negative every K steps" (``--negative-every K``) the same on the page as on the command
line: K = 1 is every step, the default, under any rule (NAG included, with or without a negative); an auto end
or K > 1 that the run cannot give is refused by one shared check, in the same one line on both, before anything
runs.

What could break: the page and the command line drifting apart again (one refusing what the other runs, or
saying it differently), K = 1 changing the run it names, a refused request that still runs or writes a file.
"""

from __future__ import annotations

import numpy as np
import pytest

from negprompt.interfaces.cli import main
from negprompt.interfaces.png import read_pixels, read_png_settings
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import GenerateRequest, NegativeInput, PageJob, error_message
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.session import Session

LIMITS = ServerLimits()
PROMPT, NEGATIVE = "a red circle", "a hat"


@pytest.fixture(scope="module")
def session() -> Session:
    return Session()


@pytest.mark.parametrize(
    "cli_flags, request_fields",
    [
        (["-n", NEGATIVE, "--rule", "nag"], {"rule": "nag", "negatives": (NegativeInput(NEGATIVE),)}),
        ([], {}),  # no negative at all: K = 1 asks for nothing
    ],
    ids=["nag", "no-negative"],
)
def test_k_1_runs_on_both_and_is_the_run_without_it(session, tmp_path, capsys, cli_flags, request_fields):
    """``--negative-every 1`` runs where the command line once refused it, and names the same run as no flag
    (same pixels and settings) and as the page's K = 1."""
    argv = ["generate", PROMPT, *cli_flags, "--steps", "2", "--seed", "4", "-q"]
    with_k, without = tmp_path / "k1.png", tmp_path / "plain.png"
    assert main([*argv, "--negative-every", "1", "--out", str(with_k)]) == 0, capsys.readouterr().err
    assert main([*argv, "--out", str(without)]) == 0
    request = GenerateRequest(PROMPT, negative_every=1, steps=2, seed="4", **request_fields)
    [page_png] = handlers.generate(session, request, LIMITS, tmp_path / "page", PageJob()).pngs
    assert np.array_equal(read_pixels(with_k), read_pixels(without))
    assert np.array_equal(read_pixels(page_png), read_pixels(with_k))
    settings = [read_png_settings(path)[0].to_json() for path in (with_k, without, page_png)]
    assert settings[0] == settings[1] == settings[2]


@pytest.mark.parametrize(
    "cli_flags, request_fields, said",
    [
        (
            ["-n", NEGATIVE, "--negative-every", "2", "--rule", "nag"],
            {"rule": "nag", "negative_every": 2},
            "--negative-every 2 needs a negative computed as a denoiser branch; rule 'nag' has none",
        ),
        (
            ["-n", NEGATIVE, "--negative-window", "3:auto", "--rule", "vsf"],
            {"rule": "vsf", "negatives": (NegativeInput(NEGATIVE, None, 3, "auto"),)},
            "--negative-window 3:auto needs a negative computed as a denoiser branch; rule 'vsf' has none",
        ),
        (
            ["--negative-every", "3"],
            {"negatives": (NegativeInput(""),), "negative_every": 3},  # the page's empty negative field
            "--negative-every 3 needs a negative prompt",
        ),
        (
            ["-n", NEGATIVE, "--negative-every", "1", "--negative-window", "0:auto", "--rule", "perp-neg"],
            {"rule": "perp-neg", "negative_every": 1, "negatives": (NegativeInput(NEGATIVE, None, 0, "auto"),)},
            "--negative-window 0:auto needs a negative computed as a denoiser branch; rule 'perp-neg' has none",
        ),
    ],
    ids=["nag-k2", "vsf-auto", "k3-no-negative", "k1-with-auto"],
)
def test_the_page_refuses_in_the_command_lines_line(session, tmp_path, capsys, cli_flags, request_fields, said):
    """The same settings give the same one line on both, and on the page nothing runs or is written."""
    out = tmp_path / "never.png"
    assert main(["generate", PROMPT, *cli_flags, "--steps", "2", "-q", "--out", str(out)]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert not out.exists() and len(cli_line.splitlines()) == 1 and said in cli_line, cli_line
    fields = {"negatives": (NegativeInput(NEGATIVE),), **request_fields}
    job, folder = PageJob(), tmp_path / "page"
    folder.mkdir()
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate(session, GenerateRequest(PROMPT, steps=2, **fields), LIMITS, folder, job)
    assert error_message(caught.value) == cli_line
    assert job.unet_calls == 0 and not list(folder.iterdir())
