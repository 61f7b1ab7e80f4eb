"""The cheap-negatives scripts' long modes, run small on the bundled model (docs/cheap-negatives.md):
``benchmarks/bench_cheap_negatives.py --faster-cache`` and ``--methods-table`` and
``scripts/negative_convergence.py --reuse``, each on 3 of bench-methods' prompts at 4 steps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "methods" / "new-rows"
STEPS = 4  # the tiny schedule; image 2 of bench-methods' prompts holds a hat at it
TINY = ["--images", "3", "--steps", str(STEPS)]


@pytest.fixture
def scripts_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))


def every(k: int) -> int:
    """Negative rows per image when the negative is computed every k-th of STEPS steps."""
    return math.ceil(STEPS / k)


def check_counts(cell: dict, images: int) -> None:
    """A judged run's counts lie within its images, its share of changed pixels in [0, 1]."""
    assert cell["images"] == images
    assert 0 <= cell["unreadable"] <= images and 0 <= cell["kept"] <= images
    assert 0 <= cell["removed"] <= images
    assert 0.0 <= cell["changed_vs_full"] <= 1.0


def test_faster_cache_run_leaves_the_unet_as_it_found_it(scripts_on_path):
    import bench_cheap_negatives
    import numpy as np
    from diffusers.hooks import HookRegistry

    from negprompt.guidance.plan import Term
    from negprompt.session import Session

    session = Session("shapes")
    spec = session.spec(("a red circle",), [Term("a hat")], rule="sd", seeds=[2], steps=STEPS)
    before = session.run(spec).pixels
    unet = session.components.unet
    _, rows = bench_cheap_negatives.faster_cache_run(session, spec, 2, (-1, 1001))
    assert rows == STEPS + every(2)
    assert not unet._forward_pre_hooks and not unet.conv_in._forward_pre_hooks
    assert not HookRegistry.check_if_exists_or_initialize(unet).hooks
    np.testing.assert_array_equal(session.run(spec).pixels, before)


def test_faster_cache_tiny_run_compares_the_same_rows(scripts_on_path, tmp_path):
    import bench_cheap_negatives

    out = tmp_path / "faster_cache.json"
    assert bench_cheap_negatives.main(["--faster-cache", *TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    holding, table = result["holding"], result["table"]
    assert result["steps"] == STEPS and holding and holding == sorted(set(holding)) and max(holding) < 3
    assert list(table) == [
        "full",
        "ours auto end",
        "ours every 2",
        "ours every 3",
        "FasterCache every 2, all steps",
        "FasterCache every 3, all steps",
        "FasterCache every 5, defaults",
    ]
    for name, cell in table.items():
        check_counts(cell, len(holding))
        assert STEPS < cell["rows_per_image"] <= 2 * STEPS, name
    assert table["full"]["rows_per_image"] == 2 * STEPS and table["full"]["changed_vs_full"] == 0
    for k in (2, 3):  # ours counted from the plan, FasterCache's counted at the UNet's first layer
        assert table[f"ours every {k}"]["rows_per_image"] == STEPS + every(k)
        assert table[f"FasterCache every {k}, all steps"]["rows_per_image"] == STEPS + every(k)
        assert table[f"FasterCache every {k}, all steps"]["changed_vs_full"] > 0  # its held rows changed images
    assert table["FasterCache every 5, defaults"]["rows_per_image"] < 2 * STEPS


def expected_unet_rows(method: str) -> tuple[float, float]:
    """bench-methods' UNet evaluations per image of a row at STEPS steps: (least, most)."""
    exact = {"none (cfg)": 2, "sd": 2, "dual s⁻ = s": 3}
    if method in exact or method.startswith("guider "):
        rows = exact.get(method, 2) * STEPS
        return rows, rows
    base, _, cheap = method.partition(", ")
    branches = 2 if base == "dual s⁻ = s" else 1  # rows computed every step besides the negative's
    if cheap == "auto end":
        return branches * STEPS + 1, (branches + 1) * STEPS
    rows = branches * STEPS + every(int(cheap.removeprefix("every ")))
    return rows, rows


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def table_headers(path: Path) -> list[str]:
    """The markdown's headings and table header rows (the lines that fix its format, not its numbers)."""
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
    return [line for line in lines if line.startswith("#")] + [f"{lines[i]}\n{lines[i + 1]}" for i in starts]


def test_methods_table_tiny_run_matches_the_committed_format(scripts_on_path, tmp_path, capsys):
    import bench_cheap_negatives

    out, units = tmp_path / "new-rows", tmp_path / "units"
    argv = ["--methods-table", str(out), *TINY, "--units", str(units)]
    assert bench_cheap_negatives.main(argv) == 0
    assert "unit 0:" in capsys.readouterr().out
    names = ["methods.csv", "methods.json", "methods.md", "methods.png"]
    assert all((out / name).stat().st_size > 0 for name in names)
    assert (units / f"shapes-scale-default-3-steps-{STEPS}" / "unit-000.json").is_file()
    records, committed = read_csv(out / "methods.csv"), read_csv(COMMITTED / "methods.csv")
    assert list(records[0]) == list(committed[0])
    assert [r["method"] for r in records] == [r["method"] for r in committed]
    assert table_headers(out / "methods.md") == table_headers(COMMITTED / "methods.md")
    data, reference = (
        json.loads((out / "methods.json").read_text()),
        json.loads((COMMITTED / "methods.json").read_text()),
    )
    assert list(data) == list(reference) and list(data["settings"]) == list(reference["settings"])
    assert list(data["cells"][0]) == list(reference["cells"][0]) and data["settings"]["steps"] == STEPS
    had = {r["had_thing"] for r in records}
    assert len(had) == 1  # every row judged against the same plain images
    for r in records:
        images, unreadable, had_thing = int(r["images"]), int(r["unreadable"]), int(r["had_thing"])
        assert images == 3 and 0 <= unreadable and had_thing <= images - unreadable, r["method"]
        rates = ("present_rate", "removal", "color", "shape", "preservation", "changed_outside", "score")
        assert all(0.0 <= float(r[k]) <= 1.0 for k in rates), r["method"]
        least, most = expected_unet_rows(r["method"])
        assert least <= float(r["unet_per_image"]) <= most, r["method"]
    plain = records[0]
    assert plain["method"] == "none (cfg)" and float(plain["removal"]) == 0 and float(plain["changed_outside"]) == 0
    assert float(plain["present_rate"]) == pytest.approx(int(plain["had_thing"]) / 3)

    again = tmp_path / "again"  # a second run reads the cached unit: no image is made, the same table comes out
    assert bench_cheap_negatives.main(["--methods-table", str(again), *TINY, "--units", str(units)]) == 0
    assert "unit 0:" not in capsys.readouterr().out
    assert (again / "methods.csv").read_text() == (out / "methods.csv").read_text()


def test_reuse_tiny_run_compares_hold_and_extrapolate(scripts_on_path, tmp_path):
    import negative_convergence

    from negprompt.guidance import economy

    out = tmp_path / "reuse.json"
    assert negative_convergence.main(["--reuse", *TINY, "--every", "2", "3", "--out", str(out)]) == 0
    assert economy.REUSE == "hold"  # restored after the extrapolating runs
    result = json.loads(out.read_text())
    holding = result["holding"]
    assert result["steps"] == STEPS and result["every"] == [2, 3] and f"--steps {STEPS}" in result["command"]
    assert holding and max(holding) < 3 and result["plain_unreadable"] <= 3 - len(holding)
    assert list(result["table"]) == ["sd", "dual"]
    names = ["full", "every 2, hold", "every 3, hold", "every 2, extrapolate", "every 3, extrapolate"]
    for rule, branches in (("sd", 1), ("dual", 2)):  # rows per step besides the negative's
        cells = result["table"][rule]
        assert sorted(cells) == sorted(names)
        for name, cell in cells.items():
            check_counts(cell, len(holding))
            removal = cell["removal"]  # removed / images readable for the thing (NaN: none readable)
            assert math.isnan(removal) or cell["removed"] / len(holding) <= removal <= 1, (rule, name)
        assert cells["full"]["changed_vs_full"] == 0 and cells["full"]["rows_per_image"] == (branches + 1) * STEPS
        for k in (2, 3):
            rows = branches * STEPS + every(k)
            assert cells[f"every {k}, hold"]["rows_per_image"] == cells[f"every {k}, extrapolate"]["rows_per_image"]
            assert cells[f"every {k}, hold"]["rows_per_image"] == rows


@pytest.mark.parametrize(
    ("script", "argv", "words"),
    [
        ("bench_cheap_negatives", ["--faster-cache", "--steps", "0"], "--steps 0"),
        ("bench_cheap_negatives", ["--methods-table", "{tmp}/table", "--images", "0"], "--images 0"),
        ("bench_cheap_negatives", ["--steps", "4"], "--methods-table and --faster-cache only"),
        ("bench_cheap_negatives", ["--methods-table", "{tmp}/table", "--negative", "a cat"], "'a cat'"),
        ("bench_cheap_negatives", ["--faster-cache", "--steps", "4", "--holding-from", "x.json"], "--holding-from"),
        ("bench_cheap_negatives", ["--faster-cache", "--units", "{tmp}/units"], "--units"),
        ("negative_convergence", ["--steps", "4"], "--reuse only"),
        ("negative_convergence", ["--reuse", "--negative", "a hatt"], "'a hatt'"),
        ("negative_convergence", ["--reuse", "--every", "0"], "--every 0"),
    ],
)
def test_bad_options_are_refused_in_one_line(scripts_on_path, tmp_path, capsys, script, argv, words):
    """Refused before the model loads: one line, exit 2, nothing written."""
    module = __import__(script)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert module.main([*argv, "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: error: ") and words in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())
