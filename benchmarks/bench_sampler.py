"""Sampler speed, as ratios against peers measured in the same run on the same components.

(a) negprompt's loop with one negative (rule sd) vs diffusers' StableDiffusionPipeline;
(b) rule (8) with three branches vs rule (9);
(c) rule (8) with the negative active for the second half of the steps vs over all steps.

Runs are interleaved (ours, theirs, ours, …) so background load hits both alike; each ratio is
the median over repeats of per-repeat ratios. Prints the ratios and writes them to a JSON file.

    python benchmarks/bench_sampler.py                       # tiny SD, CPU
    python benchmarks/bench_sampler.py --preset sd15 --device cuda --size 512 --steps 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import write_result

from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.windows import Window
from negprompt.sampling.loop import sample
from negprompt.sampling.schedulers import make_scheduler
from negprompt.testing.peers import diffusers_pipeline
from negprompt.testing.tiny_sd import build_tiny_sd

PROMPT, NEGATIVE = "a photo of a cat", "glasses"


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="images per run (seeds)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--out", default="benchmarks/results/sampler.json")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    components = build_tiny_sd(seed=0, unet_preset=args.preset).to(args.device)
    for part in (components.unet, components.text_encoder, components.vae):
        part.to(dtype)
    seeds = list(range(args.batch))

    def ours(guidance: Guidance):
        scheduler = make_scheduler(args.scheduler, components.scheduler)
        return lambda: sample(components, guidance, scheduler, seeds, args.steps, args.size, args.size)

    pipe = diffusers_pipeline(components, make_scheduler(args.scheduler, components.scheduler))

    def theirs():
        pipe.scheduler = make_scheduler(args.scheduler, components.scheduler)
        pipe(
            [PROMPT] * len(seeds),
            negative_prompt=[NEGATIVE] * len(seeds),
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            height=args.size,
            width=args.size,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        )

    sd_rule = ours(Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=7.5))
    dual_full = ours(Guidance(rule="dual", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 3.0),), scale=7.5))
    dual_half = ours(
        Guidance(rule="dual", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 3.0, Window(0.5)),), scale=7.5)
    )

    runs = {"ours_sd": sd_rule, "diffusers": theirs, "dual_full": dual_full, "dual_half": dual_half}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    result = {
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "median_seconds": {name: statistics.median(values) for name, values in times.items()},
        "ratios": {
            "a_ours_sd_vs_diffusers": ratio("ours_sd", "diffusers"),
            "b_dual_vs_sd": ratio("dual_full", "ours_sd"),
            "c_dual_half_window_vs_full": ratio("dual_half", "dual_full"),
        },
        "targets": {"a_ours_sd_vs_diffusers": "<= 1.00", "b_dual_vs_sd": "<= 1.5", "c_dual_half_window_vs_full": "< 1"},
    }
    for name, value in result["ratios"].items():
        print(f"{name:32s} {value:.3f}   (target {result['targets'][name]})")
    for name, value in result["median_seconds"].items():
        print(f"  median {name:12s} {value:.3f} s")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
