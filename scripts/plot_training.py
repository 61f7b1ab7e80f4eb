"""Draws the training curve (loss and learning rate against samples seen) from a training folder's
``train_log.jsonl`` and copies the log beside the figure, with the CPU hours of each resumed segment.

    python scripts/plot_training.py runs/shapes-v2 --out docs/training
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_log(path: Path) -> tuple[dict[int, dict], list[float]]:
    """The last record of each step (a resumed run logs a step again) and each segment's seconds."""
    records: dict[int, dict] = {}
    segments: list[float] = []
    previous = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" not in record:
            continue
        if previous is None or record["seconds"] < previous:
            segments.append(0.0)
        segments[-1] = record["seconds"]
        previous = record["seconds"]
        records[record["step"]] = record
    return dict(sorted(records.items())), segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, segments = read_log(run / "train_log.jsonl")
    samples = np.array([r["samples"] for r in records.values()])
    loss = np.array([r["loss"] for r in records.values()])
    smooth = np.convolve(loss, np.ones(8) / 8, mode="valid")

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.semilogy(samples, loss, color="0.75", linewidth=0.8, label="loss (every 25 steps)")
    axis.semilogy(samples[7:], smooth, color="C0", label="running mean of 8")
    axis.set_xlabel("training samples")
    axis.set_ylabel("ε-prediction MSE")
    lr_axis = axis.twinx()
    lr_axis.plot(samples, [r["lr"] for r in records.values()], color="C1", linewidth=0.8)
    lr_axis.set_ylabel("learning rate", color="C1")
    hours = sum(segments) / 3600
    axis.set_title(f"shapes-world model: {samples[-1]:,} samples, {hours:.2f} h on 2 CPU cores")
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=120)
    shutil.copy(run / "train_log.jsonl", out / "train_log.jsonl")
    summary = {"samples": int(samples[-1]), "segments_hours": [round(s / 3600, 3) for s in segments], "hours": hours}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'loss.png'}: {summary}")


if __name__ == "__main__":
    main()
