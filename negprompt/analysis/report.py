"""The study report: r_t curves per group and per pair, peak steps, and a Markdown summary.

Claims from the article the summary checks, per group and definition:

- the negative's strength peaks around steps 5–10 of 30 (scaled to the study's step count);
- nouns rise, then fall (once the object is gone its map weakens);
- adjectives rise, then level off.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from negprompt.analysis.spec import SpecError
from negprompt.analysis.study import COLUMNS, RESULTS_FILE, SPEC_FILE, check_pair_rows, pair_number
from negprompt.files import write_atomically

FALL_MARGIN = 0.02  # "falls": the last value is at least 2 % of the peak below it
LEVEL_MARGIN = 0.02  # "levels off": the last value within 2 % of the peak, and no fall


MAX_R_T = 1e6  # r_t is a ratio of attention norms (0.1–10 in every study run here); beyond 1e6 a table is damaged


class ReportError(SpecError):
    """A study folder whose spec.json or results.csv cannot be read as negprompt wrote them."""


def _read_spec(path: Path) -> dict:
    """The spec of a study folder's spec.json, with the fields the report reads checked."""
    if not path.is_file():
        raise ReportError(f"{path} is not a file; a study folder holds its spec there")
    try:
        recorded = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        raise ReportError(f"{path} is not the JSON negprompt study writes; rerun the study into a new folder") from None
    spec = recorded.get("spec") if isinstance(recorded, dict) else None
    fields = {
        "name": str,
        "model": str,
        "scheduler": str,
        "steps": int,
        "scale": (int, float),
        "seeds": list,
        "pairs": list,
    }
    if not isinstance(spec, dict) or not all(isinstance(spec.get(key), kind) for key, kind in fields.items()):
        raise ReportError(f"{path} holds no study spec (name, model, scheduler, steps, scale, seeds, pairs)")
    for pair in spec["pairs"]:
        if not isinstance(pair, dict) or not all(
            isinstance(pair.get(key), str) for key in ("group", "prompt", "negative", "word")
        ):
            raise ReportError(f"{path}: a pair of its spec is not group, prompt, negative and word")
    return spec


def read_results(folder: Path) -> tuple[dict, list[dict]]:
    """The spec and the rows of a study folder, each row checked (:func:`check_pair_rows`: columns, pair,
    seeds, whole pairs) and its r_t a number from 0 to ``MAX_R_T``; a torn last line (a study in progress
    or killed) is left out. Raises :class:`ReportError` naming the file and line of the first bad row."""
    spec_path, results_path = folder / SPEC_FILE, folder / RESULTS_FILE
    if not (spec_path.exists() or spec_path.is_symlink()) or not (results_path.exists() or results_path.is_symlink()):
        raise ReportError(
            f"{folder} holds no study results ({SPEC_FILE} and {RESULTS_FILE}); run negprompt study first"
        )
    spec = _read_spec(spec_path)
    if not results_path.is_file():
        raise ReportError(f"{results_path} is not a file; a study folder holds its table there")
    try:
        text = results_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ReportError(
            f"{results_path} is not UTF-8 text (byte {error.start}); it is not a results table of negprompt"
        ) from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]  # torn by a kill or a full disk: the study drops it too
    if not lines:
        return spec, []
    if lines[0].rstrip("\r\n") != ",".join(COLUMNS):
        raise ReportError(f"{results_path} is not a results table of negprompt (its header is not {','.join(COLUMNS)})")
    try:
        parsed = list(csv.reader(lines[1:]))
    except csv.Error as error:
        raise ReportError(f"{results_path} cannot be read as CSV ({error})") from None
    by_pair: dict[str, list[tuple[int, list[str]]]] = defaultdict(list)
    for line, fields in enumerate(parsed, 2):
        by_pair[fields[0] if fields else ""].append((line, fields))
    steps = set()
    for key, rows in by_pair.items():
        first = rows[0][0]
        if pair_number(key) is None or pair_number(key) >= len(spec["pairs"]):
            raise ReportError(f"{results_path}, line {first}: pair {key[:20]!r} is not a pair of the study")
        try:
            steps.add(check_pair_rows(rows, int(key), spec["pairs"][int(key)], spec["seeds"]))
        except ValueError as error:
            raise ReportError(
                f"{results_path}: {error}; the table is damaged (rerun the study into a new folder)"
            ) from None
        for line, fields in rows:
            value = float(fields[10])
            if not (0 <= value <= MAX_R_T):  # NaN fails too
                raise ReportError(
                    f"{results_path}, line {line}: r_t {fields[10]!r} is not a number from 0 to {MAX_R_T:g}; "
                    "the table is damaged (rerun the study into a new folder)"
                )
    if len(steps) > 1:
        raise ReportError(f"{results_path}: pairs have different step counts ({sorted(steps)}); the table is damaged")
    return spec, [dict(zip(COLUMNS, fields)) for fields in parsed]


def curves(rows: list[dict], definition: str) -> dict[tuple[str, str], np.ndarray]:
    """(group, pair key) → array (seeds, steps) of r_t; NaN where the negative was not evaluated."""
    by_pair: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["definition"] != definition:
            continue
        key = (row["group"], f"{row['prompt']} → {row['negative']}")
        by_pair[key][row["seed"]][int(row["step"])] = float(row["r_t"])
    out = {}
    for key, seeds in by_pair.items():
        steps = sorted({s for values in seeds.values() for s in values})
        out[key] = np.array([[values.get(s, math.nan) for s in steps] for values in seeds.values()])
    return out


def group_statistics(pair_curves: dict[tuple[str, str], np.ndarray]) -> dict[str, dict]:
    """Per group: mean and standard deviation over (pair, seed) per step; peak and half-peak steps."""
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for (group, _), array in pair_curves.items():
        groups[group].append(array)
    stats = {}
    for group, arrays in groups.items():
        stacked = np.concatenate(arrays)  # (pairs·seeds, steps)
        mean, std = np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0)
        peak = int(np.nanargmax(mean))
        half = float(np.nanmin(mean) + 0.5 * (mean[peak] - np.nanmin(mean)))
        half_step = int(np.argmax(mean >= half))
        stats[group] = {
            "mean": mean,
            "std": std,
            "n": stacked.shape[0],
            "peak_step": peak,
            "peak": float(mean[peak]),
            "first": float(mean[~np.isnan(mean)][0]),
            "last": float(mean[~np.isnan(mean)][-1]),
            "half_peak_step": half_step,
        }
    return stats


def shape_of(stat: dict) -> str:
    peak, first, last = stat["peak"], stat["first"], stat["last"]
    rises = peak > first * (1 + FALL_MARGIN)
    if rises and last < peak * (1 - FALL_MARGIN):
        return "rises, then falls"
    if rises and last >= peak * (1 - LEVEL_MARGIN):
        return "rises, then levels off"
    if not rises:
        return "does not rise (peaks at the start)"
    return "rises, then falls slightly"


def _png(fig, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _plot(stats: dict, pair_curves: dict, definition: str) -> dict[str, bytes]:
    """The curves and per-pair figures of one definition: file name → PNG bytes (written by the caller)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for group, stat in sorted(stats.items()):
        steps = np.arange(len(stat["mean"]))
        ax.plot(steps, stat["mean"], label=f"{group} (n={stat['n']})")
        ax.fill_between(steps, stat["mean"] - stat["std"], stat["mean"] + stat["std"], alpha=0.2)
        ax.axvline(stat["peak_step"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("step (UNet call)")
    ax.set_ylabel("r_t")
    ax.set_title(f"negative strength r_t, {definition} definition: mean ± std per group")
    ax.legend()
    fig.tight_layout()
    written[f"curves_{definition}.png"] = _png(fig, 120)
    plt.close(fig)

    keys = sorted(pair_curves)
    cols = 5
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
    for ax, key in zip(axes.flat, keys):
        array = pair_curves[key]
        steps = np.arange(array.shape[1])
        ax.plot(steps, np.nanmean(array, axis=0), color="C0" if key[0] == sorted(stats)[0] else "C1")
        ax.fill_between(steps, np.nanmin(array, axis=0), np.nanmax(array, axis=0), alpha=0.2)
        ax.set_title(key[1], fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"r_t per pair ({definition}): mean and min–max over seeds")
    fig.tight_layout()
    written[f"pairs_{definition}.png"] = _png(fig, 100)
    plt.close(fig)
    return written


def make_report(folder: str | Path) -> tuple[Path, list[Path]]:
    """Writes ``report.md``, ``report.json`` and the figures into ``folder``, all or none (each checked
    writable first); returns the report's and figures' paths."""
    folder = Path(folder)
    spec, rows = read_results(folder)
    if not rows:
        raise SpecError(f"{folder / RESULTS_FILE} has no finished pair yet")
    steps_total = max(int(r["step"]) for r in rows) + 1
    window = (round(5 / 30 * steps_total), round(10 / 30 * steps_total))
    lines = _report_header(spec, rows, steps_total)
    figures: dict[str, bytes] = {}
    summary = {}
    for definition in ("article", "released"):
        pair_curves = curves(rows, definition)
        stats = group_statistics(pair_curves)
        figures.update(_plot(stats, pair_curves, definition))
        lines += _definition_section(definition, stats, window)
        summary[definition] = {
            g: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for g, s in stats.items()
        }
    related = sorted({(r["prompt"], r["negative"], r["related"]) for r in rows})
    lines += ["## r(i) used", "", "| prompt | negative | r(i) |", "|---|---|---|"]
    lines += [f"| {p} | {n} | {rel} |" for p, n, rel in related]
    contents = {
        "report.md": ("\n".join(lines) + "\n").encode(),
        "report.json": (json.dumps(summary, indent=1) + "\n").encode(),
        **figures,
    }
    _write_all(folder, contents)
    return folder / "report.md", [folder / name for name in figures]


def _report_header(spec: dict, rows: list[dict], steps_total: int) -> list[str]:
    """The report's title, the study's settings and progress, and the two definitions of r_t."""
    return [
        f"# Negative strength r_t — study `{spec['name']}`",
        "",
        f"Model `{spec['model']}`, scheduler `{spec['scheduler']}`, {spec['steps']} steps ({steps_total} UNet calls), "
        f"scale {spec['scale']}, rule {spec.get('rule', 'sd')}, {len(spec['seeds'])} seeds, "
        f"{len({r['pair'] for r in rows})} of {len(spec['pairs'])} pairs done.",
        "",
        "Definitions (see `negprompt/analysis/strength.py`): *article* = Σ_k‖F_neg(i)‖_F / Σ_k‖F_pos(r(i))‖_F "
        "over cross-attention layers k (maps upsampled to a common size); *released* = Σ_layers Σ_heads mean(A²) "
        "over all token maps of the negative branch divided by the same for the positive branch, each head's map "
        "upsampled bicubically to the map size and clamped ≥ 0 before squaring, mid block left out "
        "(Ban et al.'s `compute_activation_ratio`).",
        "",
    ]


def _definition_section(definition: str, stats: dict[str, dict], window: tuple[int, int]) -> list[str]:
    """One definition's section: its figures, each group's statistics and how each group's curve compares with
    the article's claims (its peak inside ``window``, the article's steps 5–10 of 30 scaled to the study)."""
    lines = [
        f"## {definition} definition",
        "",
        f"![curves](curves_{definition}.png)",
        "",
        "| group | n (pairs×seeds) | r_t at step 0 | peak | peak step | first step ≥ half of peak | last | shape |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group, stat in sorted(stats.items()):
        lines.append(
            f"| {group} | {stat['n']} | {stat['first']:.4f} | {stat['peak']:.4f} | {stat['peak_step']} | "
            f"{stat['half_peak_step']} | {stat['last']:.4f} | {shape_of(stat)} |"
        )
    lines += ["", "Against the article's claims:", ""]
    for group, stat in sorted(stats.items()):
        in_window = window[0] <= stat["peak_step"] <= window[1]
        expected = {"noun": "rises, then falls", "adjective": "rises, then levels off"}.get(group)
        claim = (
            f"- **{group}**: peak at step {stat['peak_step']} — {'inside' if in_window else 'outside'} the article's "
            f"steps 5–10 of 30 (here {window[0]}–{window[1]}); the curve {shape_of(stat)}"
        )
        if expected:
            claim += f" (article: {expected}: {'agrees' if shape_of(stat) == expected else 'differs'})"
        lines.append(claim + ".")
    lines += ["", f"![per pair](pairs_{definition}.png)", ""]
    return lines


def _write_all(folder: Path, contents: dict[str, bytes]) -> None:
    """Writes each of ``contents`` (file name → bytes) into ``folder``, all or none; a folder in a file's place is
    refused before anything is written."""
    paths = [folder / name for name in contents]
    for path in paths:
        if path.is_dir():
            raise ReportError(f"cannot write {path}: it is a folder; move it away to write the report")
    write_atomically(paths, lambda final, temporary: temporary.write_bytes(contents[final.name]))
