"""Negatives that cost only where they act (docs/cheap-negatives.md): a negative's window ending at ``auto``
and a negative computed every K-th step, its difference reused in between — windows and their JSON, the
criterion, denoiser rows counted on tiny SDXL, SD3 and FLUX (true CFG), the stand-ins, refusals and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_usage_error

from negprompt.guidance import economy
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules.base import GuidanceError
from negprompt.guidance.windows import Window, WindowError
from negprompt.interfaces.cli import main
from negprompt.sampling.loop import Group, encode_groups, sample_groups
from negprompt.sampling.schedulers import make_scheduler

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
SEEDS = (3, 11)
STEPS = 6
FULL = Window()


def run(components, guidance, size=(32, 32), embedded_guidance=None, **kwargs):
    groups = [Group(guidance, SEEDS)]
    conditioning = encode_groups(components, groups, make_scheduler("default", components.scheduler), STEPS, *size)
    return sample_groups(
        components,
        groups,
        make_scheduler("default", components.scheduler),
        STEPS,
        *size,
        conditioning=conditioning,
        embedded_guidance=embedded_guidance,
        **kwargs,
    )


def every(calls: int, k: int) -> int:
    """Steps at which a negative computed every k-th step of a full window is evaluated."""
    return -(-calls // k)


def sd(window: Window = FULL, scale: float = 4.0, rule: str = "sd") -> Guidance:
    own = None if rule == "sd" else scale - 1
    return Guidance(rule, Term(PROMPT), (Term(NEGATIVE, own, window),), scale)


# ---------------------------------------------------------------- windows and checks


def test_window_auto_and_every_parse_describe_and_round_trip():
    auto = Window.parse("2:auto")
    assert auto.is_auto and auto.economical and not auto.is_full and auto.resolve(10) == (2, 10)
    assert auto.describe() == "[2, auto)" and Window.from_json(auto.to_json()) == auto
    every = Window(0, None, 3)
    assert every.describe() == "[0, end) every 3" and every.to_json() == [0, None, 3]
    assert Window.from_json([0, None, 3]) == every
    assert Window().to_json() == [0, None]  # unchanged JSON where the new options are not used
    guidance = sd(Window(0, "auto"))
    assert Guidance.from_json(guidance.to_json()) == guidance
    assert "Negative 1 window: [0, auto)" in guidance.infotext_fields()


@pytest.mark.parametrize("bad", ["auto:5", "0:autox"])
def test_window_auto_only_as_end(bad):
    with pytest.raises(WindowError, match="not a step index or a fraction"):
        Window.parse(bad)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_period_below_one_is_refused(every):
    with pytest.raises(WindowError, match="≥ 1"):
        Window(0, None, every)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Guidance("nag", Term(PROMPT), (Term(NEGATIVE, None, Window(0, "auto")),), 4.0), "'nag'"),
        (lambda: Guidance("vsf", Term(PROMPT), (Term(NEGATIVE, None, Window(0, None, 2)),), 4.0), "'vsf'"),
        (lambda: Guidance("perp-neg", Term(PROMPT), (Term(NEGATIVE, 1.0, Window(0, "auto")),), 4.0), "perp-neg"),
        (lambda: sd(Window(0, "auto"), scale=1.0), "does not compute at scale 1"),
        (lambda: Guidance("sd", Term(PROMPT, None, Window(0, "auto"))), "only a negative's window"),
        (lambda: Guidance("sd", Term(PROMPT), (Term(NEGATIVE),), 4.0, interval=Window(0, "auto")), "interval"),
    ],
)
def test_where_auto_or_reuse_cannot_apply_one_line(make, message):
    with pytest.raises(GuidanceError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the pure parts


def test_criterion_waits_for_min_steps_below_the_share_of_the_peak():
    peak = [0.4, 0.55, 0.3]
    assert not economy.has_converged(peak, 0.1, 2)
    assert not economy.has_converged(peak + [0.04], 0.1, 2)  # one step below 10 % of 0.55
    assert economy.has_converged(peak + [0.04, 0.05], 0.1, 2)
    assert not economy.has_converged(peak + [0.04, 0.06], 0.1, 2)  # 0.06 ≥ 0.055
    assert not economy.has_converged([0.0, 0.0], 0.1, 2)  # the first steps never end it


def test_relative_change_and_clean_effect():
    a, b = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert torch.allclose(economy.relative_change(a, b, 2), torch.full((2,), 0.5))
    assert torch.allclose(economy.clean_effect(3 * a, 0.5), torch.full((2,), 1.5))


def test_extrapolation_is_linear_in_steps(monkeypatch):
    last, previous = torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), 1.0)
    assert economy.stand_in(last, 4, 5, previous, 2).item() == 3.0  # hold (the measured default)
    monkeypatch.setattr(economy, "REUSE", "extrapolate")
    assert economy.stand_in(last, 4, 5, previous, 2).item() == pytest.approx(4.0)  # 3 + 1·(3 − 1)/2


# ---------------------------------------------------------------- on the loop: rows and stand-ins


def test_every_k_computes_the_negative_every_k_th_step_and_holds_its_difference(tiny_sd):
    full = run(tiny_sd, sd(), keep_trace=True)
    cheap = run(tiny_sd, sd(Window(0, None, 2)), keep_trace=True)
    count, calls = len(SEEDS), full.num_steps  # PNDM: one call more than steps
    assert full.unet_batch_rows == 2 * count * calls
    assert cheap.unet_batch_rows == count * (calls + every(calls, 2))  # negative at steps 0, 2, 4 …
    assert cheap.unet_batch_rows == count * economy.computed_rows(sd(Window(0, None, 2)), calls)
    # step 0 is computed: equal to the full run; step 1 holds Δ of step 0
    assert torch.equal(cheap.trace[0].guided, full.trace[0].guided)
    delta_0 = cheap.trace[0].predictions["negative"] - cheap.trace[0].predictions["positive"]
    delta_1 = cheap.trace[1].predictions["negative"] - cheap.trace[1].predictions["positive"]
    assert torch.allclose(delta_1, delta_0, atol=1e-6)


def test_dual_holds_the_difference_to_the_unconditional(tiny_sd):
    cheap = run(tiny_sd, sd(Window(0, None, 3), rule="dual"), keep_trace=True)
    calls = cheap.num_steps
    assert cheap.unet_batch_rows == len(SEEDS) * (2 * calls + every(calls, 3))  # ∅, y every step; ỹ at 0, 3 …
    p0, p2 = cheap.trace[0].predictions, cheap.trace[2].predictions
    delta_0 = p0["negative"] - p0["unconditional"]
    assert torch.allclose(p2["negative"] - p2["unconditional"], delta_0, atol=1e-6)


def test_every_1_and_a_full_window_are_the_plain_rule(tiny_sd):
    plain = run(tiny_sd, sd())
    same = run(tiny_sd, sd(Window(0, None, 1)))
    assert torch.equal(torch.as_tensor(plain.images), torch.as_tensor(same.images))
    assert plain.negative_stops == ({},)


def test_auto_end_stops_records_and_repeats(tiny_sd, monkeypatch):
    monkeypatch.setattr(economy, "has_converged", lambda effects, *a, **k: len(effects) >= 3)  # stop at step 3
    first = run(tiny_sd, sd(Window(0, "auto")))
    again = run(tiny_sd, sd(Window(0, "auto")))
    assert first.negative_stops == ({"negative": 3},) == again.negative_stops
    calls = first.num_steps
    assert first.unet_batch_rows == len(SEEDS) * (calls + 3)
    assert torch.equal(torch.as_tensor(first.images), torch.as_tensor(again.images))
    assert economy.computed_rows(sd(Window(0, "auto")), calls, {"negative": 3}) == calls + 3


def test_auto_end_with_the_measured_criterion_is_deterministic(tiny_sd):
    first, again = run(tiny_sd, sd(Window(0, "auto"))), run(tiny_sd, sd(Window(0, "auto")))
    assert first.negative_stops == again.negative_stops and first.unet_batch_rows == again.unet_batch_rows
    stop = first.negative_stops[0]["negative"]
    expected = economy.computed_rows(sd(Window(0, "auto")), first.num_steps, {"negative": stop}) * len(SEEDS)
    assert first.unet_batch_rows == expected


def test_denoiser_rows_on_tiny_sdxl(tiny_sdxl):
    full = run(tiny_sdxl, sd())
    cheap = run(tiny_sdxl, sd(Window(0, None, 3)))
    calls = full.num_steps
    assert full.unet_batch_rows == 2 * len(SEEDS) * calls
    assert cheap.unet_batch_rows == len(SEEDS) * (calls + every(calls, 3))


def test_denoiser_rows_on_tiny_sd3(tiny_sd3):
    cheap = run(tiny_sd3, sd(Window(0, None, 2)), size=(32, 48))
    assert cheap.unet_batch_rows == len(SEEDS) * (cheap.num_steps + every(cheap.num_steps, 2))


def test_true_cfg_on_tiny_flux_with_reuse(tiny_flux):
    full = run(tiny_flux, sd(), size=(32, 48), embedded_guidance=3.5)
    cheap = run(tiny_flux, sd(Window(0, None, 4)), size=(32, 48), embedded_guidance=3.5)
    calls = full.num_steps
    assert full.unet_batch_rows == 2 * len(SEEDS) * calls
    assert cheap.unet_batch_rows == len(SEEDS) * (calls + every(calls, 4))
    assert cheap.unet_batch_rows / full.unet_batch_rows <= 0.67
    # the images stay close to the full negative's (reuse changes the last steps only a little)
    assert torch.as_tensor(cheap.images - full.images).abs().mean() < 0.1


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-n", "hat", "--negative-every", "0"], "K ≥ 1"),
        (["-n", "hat", "--negative-window", "0:auto", "--rule", "nag"], "use --rule sd or dual"),
        (["-n", "hat", "--negative-every", "2", "--rule", "vsf"], "use --rule sd or dual"),
        (["--negative-every", "2"], "needs a negative prompt"),
        (["-n", "hat", "--interval", "0:auto"], "cannot end at auto"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "never.png"
    code = main(["generate", "a cat", *extra, "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, message, out)


def test_cli_scale_1_with_auto_is_one_line(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "never.png"
    args = ["generate", "a cat", "-n", "hat", "--negative-window", "0:auto", "--scale", "1"]
    code = main([*args, "--model", str(tiny_sd_dir), "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, "does not compute at scale 1", out)


def test_cli_auto_and_every_reproduce_from_png(tiny_sd_dir, tmp_path):
    from negprompt.interfaces.png import read_png_settings

    out = tmp_path / "cheap.png"
    args = ["generate", "a cat", "-n", "hat", "--negative-window", "1:auto", "--negative-every", "2"]
    assert main([*args, "--model", str(tiny_sd_dir), "--steps", "4", "--size", "32", "-q", "--out", str(out)]) == 0
    spec, _ = read_png_settings(out)
    assert spec.guidance.negatives[0].window == Window(1, "auto", 2)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    from PIL import Image

    assert Image.open(out).tobytes() == Image.open(again).tobytes()


def test_benchmark_quick_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cheap_negatives.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "flux true CFG rows ratio" in proc.stdout and out.exists()
