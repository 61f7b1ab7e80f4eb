"""Loop speed on SDXL (or SD) components, as ratios against peers timed in the same run.

(a) negprompt's run with one negative (rule sd) vs diffusers' StableDiffusionXLPipeline (or
StableDiffusionPipeline) on the same components, prompts encoded and images decoded by both;
(b) rule (8) with three branches (dual) vs rule (9) (sd);
(c) the sd run while capturing the cross-attention maps of two words on both branches vs without.

Runs are interleaved (ours, theirs, …) so background load hits all alike; each ratio is the median of
per-repeat ratios. Random weights built from configs: speed does not depend on the weights.

    python benchmarks/bench_sdxl.py                                   # tiny SDXL, CPU
    python benchmarks/bench_sdxl.py --preset sdxl --device cuda --dtype float16 --size 1024
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from common import interleaved, median_ratio, write_result

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.models.components import Components
from negprompt.session import Session
from negprompt.testing.peers import diffusers_pipeline

PROMPT, NEGATIVE = "a photo of a cat", "red glasses"
TARGETS = {"a_ours_vs_diffusers": "<= 1.00", "b_dual_vs_sd": "<= 1.5", "c_capture_vs_none": "<= 1.3"}


def measure(components: Components, size: int, steps: int, batch: int, repeats: int, scheduler: str) -> dict:
    """Median seconds per run and per step of each variant, and the ratios (a)–(c)."""
    from negprompt.sampling.schedulers import make_scheduler

    session = Session(components)
    seeds = list(range(batch))
    common = dict(steps=steps, scheduler=scheduler, seeds=seeds, size=size, scale=5.0)
    sd_spec = session.spec(PROMPT, NEGATIVE, **common)
    dual_spec = session.spec(PROMPT, NEGATIVE, rule="dual", negative_scales=[3.0], **common)
    request = CaptureRequest(words={"positive": ["cat"], "negative": ["glasses"]})
    pipe = diffusers_pipeline(components)

    def theirs() -> None:
        pipe.scheduler = make_scheduler(scheduler, components.scheduler)
        pipe(
            [PROMPT] * batch,
            negative_prompt=[NEGATIVE] * batch,
            num_inference_steps=steps,
            guidance_scale=5.0,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        )

    runs = {
        "ours_sd": lambda: session.run(sd_spec),
        "diffusers": theirs,
        "ours_dual": lambda: session.run(dual_spec),
        "ours_sd_capture": lambda: capture(sd_spec, request, session, trace=False, reducer=reduce_layer),
    }
    times = interleaved(runs, repeats)

    def ratio(a: str, b: str) -> float:
        return median_ratio(times, a, b)

    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "median_seconds": medians,
        "seconds_per_step": {name: value / steps for name, value in medians.items()},
        "ratios": {
            "a_ours_vs_diffusers": ratio("ours_sd", "diffusers"),
            "b_dual_vs_sd": ratio("ours_dual", "ours_sd"),
            "c_capture_vs_none": ratio("ours_sd_capture", "ours_sd"),
        },
        "targets": TARGETS,
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build(preset: str, device: str, dtype: torch.dtype) -> Components:
    from negprompt.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl

    if preset in ("tiny-sd", "sd15"):
        components = build_tiny_sd(seed=0, unet_preset="tiny" if preset == "tiny-sd" else "sd15")
    else:
        components = build_tiny_sdxl(seed=0, unet_preset="tiny" if preset == "tiny" else "sdxl")
    return components.to(device, None if dtype == torch.float32 else dtype)  # diffusers warns on any cast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sdxl", "tiny-sd", "sd15"])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="images per run (seeds)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/sdxl.json")
    args = parser.parse_args()
    components = build(args.preset, args.device, getattr(torch, args.dtype))
    result = {"settings": vars(args), "machine": machine()}
    result.update(measure(components, args.size, args.steps, args.batch, args.repeats, args.scheduler))
    report(result)
    write_result(result, args.out)


def report(result: dict) -> None:
    for name, value in result["ratios"].items():
        print(f"{name:24s} {value:.3f}   (target {result['targets'][name]})")
    for name, value in result["median_seconds"].items():
        print(f"  median {name:16s} {value:.3f} s  ({result['seconds_per_step'][name]:.4f} s/step)")


if __name__ == "__main__":
    main()
