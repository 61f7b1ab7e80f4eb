"""Wan on the tiny model: our loop against diffusers' WanPipeline, NAG at s = 1 against a plain run, and attention
capture (maps per latent frame) against no capture, as ratios timed in one run.

- ours / WanPipeline: rule sd at s = 5 with one negative vs ``WanPipeline(guidance_scale=5, negative_prompt=…)``
  on the same components, prompts encoded and frames decoded by both;
- NAG / plain at s = 1 (a step-distilled Wan's setting, where a plain negative is dropped): rule nag with the
  negative read inside every ``attn2`` vs one pass of the prompt alone (rule cfg at s = 1);
- capture / no capture: the sd run with the toolkit's reducer on every ``attn2`` (maps, norms, mass and energy per
  latent frame, both branches) vs the same run alone.

Runs are interleaved so that background load hits each alike; each ratio is the median of per-repeat ratios.
Random weights built from configs: speed does not depend on the weights.

    python benchmarks/bench_wan.py            # tiny, CPU
    python benchmarks/bench_wan.py --quick    # fewer steps and repeats
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_sdxl import machine
from common import interleaved, median_ratio, write_result

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.session import Session
from negprompt.testing.tiny_wan import build_tiny_wan, wan_pipeline

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
TARGETS = {"ours_vs_diffusers": "<= 1.00", "nag_vs_plain": "<= 1.50", "capture_vs_none": "<= 2.00"}


def measure(size: int, frames: int, steps: int, batch: int, repeats: int) -> dict:
    """Median seconds of each run and the three ratios."""
    components = build_tiny_wan(seed=0)
    session = Session(components)
    seeds = list(range(batch))
    common = dict(steps=steps, seeds=seeds, size=size, frames=frames)
    guided = session.spec(PROMPT, NEGATIVE, rule="sd", scale=5.0, **common)
    nag = session.spec(PROMPT, NEGATIVE, rule="nag", scale=1.0, **common)
    plain = session.spec(PROMPT, rule="cfg", scale=1.0, **common)
    request = CaptureRequest({"positive": ["cat", "glasses"], "negative": ["hat"]})
    pipe = wan_pipeline(components)
    length = sum(segment[2] for segment in components.family.text_key_segments(components))

    def theirs() -> None:
        pipe(
            prompt=[PROMPT] * batch,
            negative_prompt=[NEGATIVE] * batch,
            num_inference_steps=steps,
            guidance_scale=5.0,
            height=size,
            width=size,
            num_frames=frames,
            max_sequence_length=length,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        )

    runs = {
        "ours": lambda: session.run(guided),
        "diffusers": theirs,
        "nag": lambda: session.run(nag),
        "plain": lambda: session.run(plain),
        "capture": lambda: capture(guided, request, session, trace=False, reducer=reduce_layer),
    }
    times = interleaved(runs, repeats)
    return {
        "median_seconds": {run: statistics.median(values) for run, values in times.items()},
        "ratios": {
            "ours_vs_diffusers": median_ratio(times, "ours", "diffusers"),
            "nag_vs_plain": median_ratio(times, "nag", "plain"),
            "capture_vs_none": median_ratio(times, "capture", "ours"),
        },
        "targets": TARGETS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (a multiple of 16)")
    parser.add_argument("--frames", type=int, default=9, help="frames per video (4k + 1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="videos per run (seeds)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="8 steps, 5 repeats")
    parser.add_argument("--out", default="benchmarks/results/wan.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 8, 5
    measured = measure(args.size, args.frames, args.steps, args.batch, args.repeats)
    result = {"settings": vars(args), "machine": machine(), **measured}
    seconds = measured["median_seconds"]
    for name, ratio in measured["ratios"].items():
        print(f"{name:18s} {ratio:.3f} (target {TARGETS[name]})")
    print("median seconds: " + ", ".join(f"{run} {value:.3f}" for run, value in seconds.items()))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
