"""NAG and VSF at CFG 1 on FLUX.2 [klein] (or Qwen-Image, Z-Image), as ratios against the plain run at s = 1.

A step-distilled Klein runs one pass a step on the prompt alone; NAG (and VSF) at s = 1 keep that one pass and add
the negative's text stream through the blocks (its tokens: Klein's 512 beside 4096 image tokens at 1024²; the tiny
model's 48 beside 64) and a second attention of the image queries in each layer. Whole runs (prompts encoded,
images decoded) are timed interleaved (plain, NAG, VSF, …) so background load hits all alike; each ratio is the
median of per-repeat ratios. Random weights built from configs: speed does not depend on the weights.

    python benchmarks/bench_klein_nag.py            # tiny Klein, CPU
    python benchmarks/bench_klein_nag.py --quick    # fewer steps and repeats (a smoke run)
    python benchmarks/bench_klein_nag.py --family qwen-image   # or z-image: the same runs on that tiny model

On Qwen-Image and Z-Image the negative's text runs as a stream of its own through the blocks in the same way (on
Z-Image it is first refined alone by ``context_refiner``, once a call); their plain run at s = 1 is one pass too.
"""

from __future__ import annotations

import argparse
import statistics

from common import interleaved, median_ratio, write_result

from negprompt.session import Session
from negprompt.testing.tiny_flux2_klein import build_tiny_flux2_klein
from negprompt.testing.tiny_qwen_image import build_tiny_qwen_image
from negprompt.testing.tiny_z_image import build_tiny_z_image

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
TARGETS = {"nag_vs_plain": "<= 1.25", "vsf_vs_plain": "<= 1.25"}
FAMILIES = {  # the tiny model of each family, random weights from configs
    "flux2-klein": lambda: build_tiny_flux2_klein(seed=0, distilled=True),
    "qwen-image": lambda: build_tiny_qwen_image(seed=0),
    "z-image": lambda: build_tiny_z_image(seed=0),
}


def measure(size: int, steps: int, repeats: int, family: str = "flux2-klein") -> dict:
    """Median seconds per run of plain, NAG and VSF at s = 1 on the family's tiny model (Klein: step-distilled),
    and the ratios."""
    session = Session(FAMILIES[family]())
    options = dict(steps=steps, size=size, seeds=(1,), scale=1.0)
    specs = {
        "plain": session.spec(PROMPT, rule="cfg", **options),
        "nag": session.spec(PROMPT, NEGATIVE, rule="nag", **options),
        "vsf": session.spec(PROMPT, NEGATIVE, rule="vsf", **options),
    }
    times = interleaved({name: (lambda spec=spec: session.run(spec)) for name, spec in specs.items()}, repeats)
    return {
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "nag_vs_plain": median_ratio(times, "nag", "plain"),
        "vsf_vs_plain": median_ratio(times, "vsf", "plain"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (tiny Klein: 4 px a token)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="32 px, 2 steps, 3 repeats")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="flux2-klein")
    parser.add_argument("--out", help="default: benchmarks/results/klein_nag.json (Klein), <family>_nag.json")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.repeats = 32, 2, 3
    if args.out is None:
        name = "klein" if args.family == "flux2-klein" else args.family.replace("-", "_")
        args.out = f"benchmarks/results/{name}_nag.json"
    result = measure(args.size, args.steps, args.repeats, args.family)
    result.update(family=args.family, size=args.size, steps=args.steps, repeats=args.repeats, targets=TARGETS)
    for name in ("nag_vs_plain", "vsf_vs_plain"):
        print(f"{name}: {result[name]:.3f} (target {TARGETS[name]})")
    print("median seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in result["seconds"].items()))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
