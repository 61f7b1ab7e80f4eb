"""The detector stress suite in full: accuracy per attribute per perturbation, as a Markdown table.

Rendered shapes-world scenes under perturbations that imitate what a model draws (see
``negprompt/shapes/stress.py``), the truth known by construction. Per variant and attribute: the
share read right among the readable images, and how many were declared unreadable. A family passes
when every attribute of every variant is ≥ 95 % right, or all its images are unreadable.

    python scripts/detector_stress.py --images 200 --out docs/detectors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from negprompt.shapes.detectors import ATTRIBUTES
from negprompt.shapes.stress import run_stress

TARGET = 0.95


def verdicts(rows: list[dict]) -> dict[str, str]:
    """Per family: "fails" if some attribute of some variant is read right in < 95 % of its readable
    images; else "readable", or which attributes it declared unreadable."""
    out: dict[str, str] = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        low = [r for r in mine if r["right"] + r["wrong"] and r["right"] / (r["right"] + r["wrong"]) < TARGET]
        unread = list(dict.fromkeys(r["attribute"] for r in mine if r["unreadable"]))
        if low:
            out[family] = "fails: " + ", ".join(f"{r['attribute']} ({r['variant']})" for r in low)
        else:
            out[family] = "readable" if not unread else "unreadable where washed out: " + ", ".join(unread)
    return out


def to_markdown(rows: list[dict], images: int, seconds: float) -> str:
    variants = list(dict.fromkeys((r["family"], r["variant"]) for r in rows))
    lines = [
        f"{images} rendered scenes per variant (seed 0), {seconds:.0f} s. Cells: right / readable images "
        "(unreadable in brackets). `python scripts/detector_stress.py --images "
        f"{images} --out docs/detectors`.",
        "",
        "| family | variant | " + " | ".join(ATTRIBUTES) + " |",
        "|---|---|" + "---:|" * len(ATTRIBUTES),
    ]
    for family, variant in variants:
        cells = []
        for attribute in ATTRIBUTES:
            r = next(x for x in rows if (x["family"], x["variant"], x["attribute"]) == (family, variant, attribute))
            readable = r["right"] + r["wrong"]
            cell = f"{r['right'] / readable:.1%}" if readable else "—"
            if r["unreadable"]:
                cell += f" ({r['unreadable']} unreadable)"
            cells.append(cell)
        lines.append(f"| {family} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "| family | verdict (≥ 95 % right on every attribute and variant, or unreadable) |", "|---|---|"]
    lines += [f"| {family} | {verdict} |" for family, verdict in verdicts(rows).items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="scenes per variant (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes (default 0)")
    parser.add_argument("--out", default="docs/detectors", help="folder for stress.md and stress.json")
    args = parser.parse_args()
    started = time.monotonic()
    rows = run_stress(args.images, seed=args.seed)
    seconds = time.monotonic() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stress.json").write_text(
        json.dumps({"images": args.images, "seed": args.seed, "rows": rows}, indent=1) + "\n"
    )
    (out / "stress.md").write_text(to_markdown(rows, args.images, seconds))
    print(f"wrote {out / 'stress.md'} and {out / 'stress.json'}")
    for family, verdict in verdicts(rows).items():
        print(f"{family:28s} {verdict}")


if __name__ == "__main__":
    main()
