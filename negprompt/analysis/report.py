"""The study report: r_t curves per group and per pair, peak steps, and a Markdown summary.

Claims from the article the summary checks, per group and definition:

- the negative's strength peaks around steps 5–10 of 30 (scaled to the study's step count);
- nouns rise, then fall (once the object is gone its map weakens);
- adjectives rise, then level off.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from negprompt.analysis.spec import SpecError
from negprompt.analysis.study import RESULTS_FILE, SPEC_FILE

FALL_MARGIN = 0.02  # "falls": the last value is at least 2 % of the peak below it
LEVEL_MARGIN = 0.02  # "levels off": the last value within 2 % of the peak, and no fall


def read_results(folder: Path) -> tuple[dict, list[dict]]:
    spec_path, results_path = folder / SPEC_FILE, folder / RESULTS_FILE
    if not spec_path.exists() or not results_path.exists():
        raise SpecError(f"{folder} holds no study results ({SPEC_FILE} and {RESULTS_FILE}); run negprompt study first")
    spec = json.loads(spec_path.read_text())["spec"]
    with open(results_path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("r_t") not in (None, "")]
    return spec, rows


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


def _plot(stats: dict, pair_curves: dict, definition: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
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
    path = out / f"curves_{definition}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

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
    path = out / f"pairs_{definition}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def make_report(folder: str | Path) -> tuple[Path, list[Path]]:
    """Writes ``report.md`` and the figures into ``folder``; returns their paths."""
    folder = Path(folder)
    spec, rows = read_results(folder)
    if not rows:
        raise SpecError(f"{folder / RESULTS_FILE} has no finished pair yet")
    steps_total = max(int(r["step"]) for r in rows) + 1
    window = (round(5 / 30 * steps_total), round(10 / 30 * steps_total))
    lines = [
        f"# Negative strength r_t — study `{spec['name']}`",
        "",
        f"Model `{spec['model']}`, scheduler `{spec['scheduler']}`, {spec['steps']} steps ({steps_total} UNet calls), "
        f"scale {spec['scale']}, rule {spec.get('rule', 'sd')}, {len(spec['seeds'])} seeds, {len({r['pair'] for r in rows})} of {len(spec['pairs'])} pairs done.",
        "",
        "Definitions (see `negprompt/analysis/strength.py`): *article* = Σ_k‖F_neg(i)‖_F / Σ_k‖F_pos(r(i))‖_F "
        "over cross-attention layers k (maps upsampled to a common size); *released* = Σ_layers Σ_heads mean(A²) "
        "over all token maps of the negative branch divided by the same for the positive branch, each head's map "
        "upsampled bicubically to the map size and clamped ≥ 0 before squaring, mid block left out "
        "(Ban et al.'s `compute_activation_ratio`).",
        "",
    ]
    figures: list[Path] = []
    summary = {}
    for definition in ("article", "released"):
        pair_curves = curves(rows, definition)
        stats = group_statistics(pair_curves)
        figures += _plot(stats, pair_curves, definition, folder)
        lines += [
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
            claim = f"- **{group}**: peak at step {stat['peak_step']} — {'inside' if in_window else 'outside'} the article's steps 5–10 of 30 (here {window[0]}–{window[1]}); the curve {shape_of(stat)}"
            if expected:
                claim += f" (article: {expected}: {'agrees' if shape_of(stat) == expected else 'differs'})"
            lines.append(claim + ".")
        lines += ["", f"![per pair](pairs_{definition}.png)", ""]
        summary[definition] = {
            g: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for g, s in stats.items()
        }
    related = sorted({(r["prompt"], r["negative"], r["related"]) for r in rows})
    lines += ["## r(i) used", "", "| prompt | negative | r(i) |", "|---|---|---|"]
    lines += [f"| {p} | {n} | {rel} |" for p, n, rel in related]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (folder / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    return report, figures
