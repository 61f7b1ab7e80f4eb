"""How close a guidance-distilled student's one pass comes to its teacher's classifier-free guidance.

For held-out seeds (not the training stream's: images are drawn from the sampler's noise) and every
colour × shape prompt, the teacher runs rule `cfg` at scale w (two passes a step) and the student runs
at scale 1 with embedded guidance w (one pass). Printed and written as JSON: the mean and the 95th
percentile of |Δ| per image in [0, 1] (beside the mean |Δ| of the teacher's unguided pass, what the student
started as), and how often the detectors read the same colour, shape, hat and sun in both images.

    python scripts/distill_check.py --student shapes-distilled --images 24 --out docs/training/distill-check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from negprompt.api import to_uint8
from negprompt.session import Session
from negprompt.shapes.detectors import detect
from negprompt.shapes.evaluation import Row, row_prompts

ATTRIBUTES = ("color", "shape", "hat", "sun")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="the exported student (a model directory)")
    parser.add_argument("--teacher", default="shapes", help="the teacher (default: the bundled model)")
    parser.add_argument("--scales", default="3,5,7.5", help="guidance scales w to compare (default 3,5,7.5)")
    parser.add_argument("--images", type=int, default=48, help="images per scale (default 48)")
    parser.add_argument("--first-seed", type=int, default=100_000, help="seeds from here on (default 100000)")
    parser.add_argument("--out", default=None, help="JSON file for the numbers (default: print only)")
    args = parser.parse_args()

    teacher, student = Session(args.teacher), Session(args.student)
    prompts, _ = row_prompts(Row("check", "a {color} {shape}"), args.images)
    seeds = list(range(args.first_seed, args.first_seed + args.images))
    results = []
    for w in (float(x) for x in args.scales.split(",")):
        guided = teacher.run(teacher.spec(tuple(prompts), rule="cfg", scale=w, seeds=seeds)).pixels
        one_pass = student.run(
            student.spec(tuple(prompts), rule="cfg", scale=1, embedded_guidance=w, seeds=seeds)
        ).pixels
        difference = np.abs(guided - one_pass).mean(axis=(1, 2, 3))
        # What the student started as: the teacher's unguided ε_y (its guidance input at zero).
        start = teacher.run(teacher.spec(tuple(prompts), rule="cfg", scale=1, seeds=seeds)).pixels
        start_difference = np.abs(guided - start).mean(axis=(1, 2, 3))
        agree = {name: [] for name in ATTRIBUTES}
        for a, b in zip(guided, one_pass):
            found_a, found_b = detect(to_uint8(a)), detect(to_uint8(b))
            for name in ATTRIBUTES:
                if not (found_a.unreadable(name) or found_b.unreadable(name)):
                    agree[name].append(getattr(found_a, name) == getattr(found_b, name))
        record = {
            "scale": w,
            "images": len(seeds),
            "mean_abs_difference": float(difference.mean()),
            "p95_abs_difference": float(np.percentile(difference, 95)),
            "start_mean_abs_difference": float(start_difference.mean()),
            "detectors_agree": {name: float(np.mean(v)) if v else None for name, v in agree.items()},
            "readable": {name: len(v) for name, v in agree.items()},
        }
        results.append(record)
        print(json.dumps(record))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
