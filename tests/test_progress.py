"""Progress bars of the long commands: they move inside a unit of work (per step, per UNet call), not once a
unit, and say what runs. Nothing here measures time: the tests count the bar's updates.

What could break: a unit of 24 images × 11 methods that shows 0/800 for minutes (the bar moved once a
unit), images done before a resume counted as speed, a bar that says nothing of what it is doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import tqdm.auto

from negprompt.jobs import Job, StepReport, UnitBar


class RecordingBar(tqdm.auto.tqdm):
    """A tqdm bar (disabled: nothing printed) that records every count it is moved to and its postfixes."""

    made: list[RecordingBar] = []

    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
        self.counts: list[int] = []
        self.postfixes: list[str] = []
        self.count = kwargs.get("initial", 0)
        self.description, self.size = kwargs.get("desc") or "", kwargs.get("total")
        self.made.append(self)

    def update(self, n: float = 1) -> None:
        if n:
            self.count += n
            self.counts.append(self.count)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfixes.append(s)


@pytest.fixture
def bars(monkeypatch) -> list[RecordingBar]:
    """Every bar the code under test makes (jobs.py imports tqdm.auto's tqdm when a job runs)."""
    import negprompt.analysis.study
    import negprompt.analysis.sweep

    RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    # Modules that bound tqdm when first imported (by any earlier test) get the recording bar too.
    monkeypatch.setattr(negprompt.analysis.study, "tqdm", RecordingBar)
    monkeypatch.setattr(negprompt.analysis.sweep, "tqdm", RecordingBar)
    return RecordingBar.made


@dataclass
class Step:
    """The fields of a sampling loop's StepInfo that a StepReport reads."""

    step: int
    num_steps: int
    group: int = 0


def test_a_job_bar_moves_per_image_inside_a_unit(bars, tmp_path):
    """Two units of 4 images, each reporting its 4 steps: the bar moves one image at a time (not 4 at
    once), and its postfix says which unit and step runs."""
    job = Job(tmp_path / "job", "toy", {}, [4, 4])

    def compute(unit: int) -> int:
        for step in range(4):
            job.report((step + 1) / 4, f"step {step + 1}/4")
        return unit

    assert job.run(compute) == [0, 1]
    [bar] = bars
    assert bar.counts == [1, 2, 3, 4, 5, 6, 7, 8]
    assert bar.description == "toy" and bar.size == 8
    assert "unit 1 of 2: step 2/4" in bar.postfixes and "unit 2 of 2: step 4/4" in bar.postfixes


def test_units_done_before_a_resume_are_not_counted_as_speed(bars, tmp_path):
    """A resumed job starts its bar at the images already done (tqdm's ``initial``), so the first rate and
    ETA come from new work only."""
    folder = tmp_path / "job"
    first = Job(folder, "toy", {}, [3, 3, 3])
    with pytest.raises(ZeroDivisionError):
        first.run(lambda unit: unit if unit < 2 else 1 / 0)
    again = Job(folder, "toy", {}, [3, 3, 3])
    assert again.run(lambda unit: unit) == [0, 1, 2]
    resumed = bars[-1]
    assert resumed.size == 9 and resumed.counts == [9]  # initial 6 (not an update of 6), then the last unit


def test_with_several_processes_the_main_bar_counts_every_shard(bars, tmp_path):
    """Process 1 of 2 ran its units before; process 0's bar (moved by the shard watcher, its own reports
    only adding the part of its current unit) ends at the whole job, never beyond it."""
    from negprompt.jobs import Workers

    folder = tmp_path / "job"
    Job(folder, "toy", {}, [2, 2, 2, 2], Workers(1, 2)).run(lambda unit: unit, progress=False)
    main = Job(folder, "toy", {}, [2, 2, 2, 2], Workers(0, 2))

    def compute(unit: int) -> int:
        main.report(0.5, "step 1/2")
        return unit

    assert main.run(compute) == [0, 1, 2, 3]
    bar = bars[-1]
    assert bar.counts and bar.counts[-1] == 8 and bar.counts == sorted(bar.counts)


def test_a_report_outside_a_running_job_does_nothing(tmp_path):
    Job(tmp_path / "job", "toy", {}, [1]).report(0.5, "step 1/2")


def test_a_unit_bar_never_moves_back_nor_past_its_unit(bars):
    bar = tqdm.auto.tqdm(total=10)
    moving = UnitBar(bar)
    moving.begin(4, "unit 1 of 3")
    for fraction in (0.3, 0.2, 0.6, 1.7, 0.9):
        moving.report(fraction, "working")
    moving.end()
    moving.begin(6, "unit 2 of 3")
    moving.end()
    assert bar.counts == [1, 2, 4, 10]


def test_step_reports_from_callbacks_and_from_unet_calls():
    """As a callback: each finished step of group 0. As a UNet hook: every call, with the calls of a step
    (learned from the step before) splitting the step, within [first, first + share)."""
    seen: list[tuple[float, str]] = []
    as_callback = StepReport(lambda fraction, doing: seen.append((fraction, doing)), label="a hat: ")
    for step in range(4):
        for group in (0, 1):
            as_callback(Step(step, 4, group))
    assert seen == [
        (0.25, "a hat: step 1/4"),
        (0.5, "a hat: step 2/4"),
        (0.75, "a hat: step 3/4"),
        (1.0, "a hat: step 4/4"),
    ]

    seen.clear()
    as_hook = StepReport(lambda fraction, doing: seen.append((fraction, doing)), num_steps=2, first=0.5, share=0.5)
    for step in range(2):
        for _ in range(4):  # four calls a step (e.g. four groups that share none)
            as_hook.before_unet_call(step, 999.0 - step, ())
    fractions = [fraction for fraction, _ in seen]
    assert fractions == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.75, 0.8125, 0.875, 0.9375])
    assert seen[-1][1] == "step 2/2"


def test_bench_methods_moves_its_bar_per_image_within_a_unit(bars, tmp_path, capsys):
    """``negprompt bench-methods`` on the bundled model, one unit of 2 images × every method over 2 steps:
    the bar reaches image 1 of 2 while the unit runs (at the second step's calls), and says what runs."""
    from negprompt.interfaces.cli import main
    from negprompt.shapes.methods import METHODS

    out = tmp_path / "methods"
    assert main(["bench-methods", "--negative", "a hat", "--images", "2", "--steps", "2", "--out", str(out)]) == 0
    [bar] = [bar for bar in bars if bar.description == "bench-methods"]
    assert bar.counts == [1, 2] and bar.size == 2
    methods = len(METHODS)
    assert any(f"unit 1 of 1: a hat, images 0–1, {methods} methods: step 2/2" in text for text in bar.postfixes)
    assert (out / "methods.csv").exists()


def test_a_study_moves_its_bar_at_the_steps_of_a_pair(bars, tmp_path):
    """``run_study`` (one process, no shards): a pair of 4 seeds over 4 steps moves the bar an image a step."""
    from negprompt.analysis.spec import Pair, StudySpec
    from negprompt.analysis.study import run_study

    spec = StudySpec("tiny", 4, (0, 1, 2, 3), (Pair("noun", "a red circle", "a hat", "hat"),))
    run_study(spec, tmp_path / "study")
    [bar] = [bar for bar in bars if bar.description == "study"]
    assert bar.counts == [1, 2, 3, 4]
    assert any("pair 0, 'a red circle' − 'a hat': step 2/4" in text for text in bar.postfixes), bar.postfixes
    assert Path(tmp_path / "study" / "results.csv").exists()
