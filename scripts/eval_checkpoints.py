"""Scores each exported training checkpoint with the evaluation rows (a few images per row), to show
what the training hours bought. Appends one JSON line per checkpoint to OUT.

    python scripts/eval_checkpoints.py runs/shapes/export-001000 … --images 24 --out runs/shapes/checkpoints.jsonl
    python scripts/eval_checkpoints.py runs/ft-v2 --rows compositional --images 24 --out runs/ft-v2/probes.jsonl
    python scripts/eval_checkpoints.py --table runs/shapes/checkpoints.jsonl     # the Markdown table

A training folder (one with a checkpoint, possibly still training) is first exported: the EMA
weights of its latest checkpoint go to FOLDER/export-STEP (read from the checkpoint file only, so
a running training is not disturbed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from negprompt.models.loading import load_components
from negprompt.shapes.evaluation import COMPOSITIONAL, ROWS, evaluate
from negprompt.shapes.training import DEFAULT_SAMPLING, META_FILE, STATE_FILE, TrainConfig, Trainer

ROW_SETS = {"all": ROWS, "compositional": COMPOSITIONAL, "single": tuple(r for r in ROWS if r not in COMPOSITIONAL)}


def export_latest(run: Path) -> Path:
    """Exports the EMA weights of a training folder's latest checkpoint to RUN/export-STEP."""
    meta = json.loads((run / META_FILE).read_text())
    tensors = load_file(str(run / STATE_FILE))  # written atomically by the trainer: never half a file
    config = TrainConfig.from_json(meta["config"])
    config = TrainConfig.from_json({**config.to_json(), "init_from": None})  # the EMA replaces the weights
    trainer = Trainer(config, run / f"export-{int(meta['step']):06d}")
    trainer.ema = {key[len("ema.") :]: value for key, value in tensors.items() if key.startswith("ema.")}
    return trainer.export(run / f"export-{int(meta['step']):06d}")


COLUMNS = (  # (row, attribute, header)
    ("plain", "color", "color"),
    ("plain", "shape", "shape"),
    ("plain", "hat", "hat, unnamed"),
    ("plain", "sun", "sun, unnamed"),
    ("named hat", "hat", "hat, named"),
    ("named sun", "sun", "sun, named"),
    ("named striped", "striped", "striped, named"),
    ("named blurry", "blurry", "blurry, named"),
    ("negative hat", "hat", 'hat, neg. "a hat"'),
    ("negative sun", "sun", 'sun, neg. "a sun"'),
    ("negative striped", "striped", "striped, neg."),
    ("negative blurry", "blurry", "blurry, neg."),
)


def markdown_table(lines: list[dict]) -> str:
    """One row per checkpoint: the share of images with each attribute, per evaluation row."""
    header = "| step | samples | images/row | " + " | ".join(c[2] for c in COLUMNS) + " |"
    rows = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    for line in sorted(lines, key=lambda item: item["step"] or 0):
        cells = [f"{line[row][attribute]:.0%}" for row, attribute, _ in COLUMNS]
        rows.append(
            f"| {line['step']} | {32 * (line['step'] or 0):,} | {line.get('images', '?')} | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="*")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", help="JSON-lines file the scores are appended to")
    parser.add_argument("--table", help="print the Markdown table of this JSON-lines file and stop")
    parser.add_argument("--rows", choices=tuple(ROW_SETS), default="single", help="evaluation rows (default single)")
    parser.add_argument("--row", action="append", default=None, help="only this row (repeatable)")
    parser.add_argument("--scale", type=float, default=DEFAULT_SAMPLING["scale"])
    args = parser.parse_args()
    if args.table:
        print(markdown_table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]))
        return
    if not args.out or not args.exports:
        parser.error("give export folders and --out (or --table FILE)")
    for folder in args.exports:
        if (Path(folder) / STATE_FILE).exists():
            folder = str(export_latest(Path(folder)))
        components = load_components(folder)
        table = evaluate(
            components,
            images=args.images,
            steps=DEFAULT_SAMPLING["steps"],
            scheduler=DEFAULT_SAMPLING["scheduler"],
            scale=args.scale,
            rows=[r for r in ROW_SETS[args.rows] if args.row is None or r.name in args.row],
        )
        step = int(Path(folder).name.split("-")[-1]) if "-" in Path(folder).name else None
        line = {
            "export": folder,
            "step": step,
            "images": args.images,
            "scale": args.scale,
            **{r["row"]: {**r["rates"], "passed": r["passed"]} for r in table["rows"]},
        }
        with open(args.out, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(folder, {r["row"]: {k: round(v, 2) for k, v in r["rates"].items()} for r in table["rows"]})


if __name__ == "__main__":
    main()
