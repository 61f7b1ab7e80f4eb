"""Scores each exported training checkpoint with the evaluation rows (a few images per row), to show
what the training hours bought. Appends one JSON line per checkpoint to OUT.

    python scripts/eval_checkpoints.py runs/shapes/export-001000 … --images 24 --out runs/shapes/checkpoints.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from negprompt.models.loading import load_components
from negprompt.training.trainer import DEFAULT_SAMPLING
from negprompt.world.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for folder in args.exports:
        components = load_components(folder)
        table = evaluate(
            components,
            images=args.images,
            steps=DEFAULT_SAMPLING["steps"],
            scheduler=DEFAULT_SAMPLING["scheduler"],
            scale=DEFAULT_SAMPLING["scale"],
        )
        step = int(Path(folder).name.split("-")[-1]) if "-" in Path(folder).name else None
        line = {"export": folder, "step": step, **{r["row"]: r["rates"] for r in table["rows"]}}
        with open(args.out, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(folder, {r["row"]: {k: round(v, 2) for k, v in r["rates"].items()} for r in table["rows"]})


if __name__ == "__main__":
    main()
